"""`vgw install` / `vgw uninstall [--purge]` into a temp prefix (a staging root: no systemctl, no useradd),
and the final erasure of --purge against a real broker and cloud peer."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import vgw.ops.install as inst
from vgw.base.fsutil import acting_for_owner
from vgw.cli import main
from vgw.config.settings import load_config
from vgw.daemon.agent import AgentLock, open_state
from vgw_sim.broker import Mosquitto
from vgw_sim.cloud import CloudPeer, RecipientKey, SigningKey, consent_claims, grant, sign_consent
from vgw_sim.pki import TestPKI

from tests.test_provision import SERVICE_USER, install_signed_cert

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = {
    "etc/systemd/system/vgw-agent.service": "systemd/vgw-agent.service",
    "etc/systemd/system/vgw-vcan.service": "systemd/vgw-vcan.service",
    "etc/systemd/system/vgw-enroll.service": "systemd/vgw-enroll.service",
    "etc/systemd/network/80-can0.network": "systemd/80-can0.network",
    "etc/udev/rules.d/60-vgw-obd.rules": "systemd/60-vgw-obd.rules",
    "etc/systemd/system/vgw-sysusers.service": "systemd/vgw-sysusers.service",
    "usr/lib/sysusers.d/vgw.conf": "systemd/vgw.sysusers",
    "usr/lib/systemd/system-preset/80-vgw.preset": "systemd/80-vgw.preset",
    "opt/vgw/share/dbc/vehicle.dbc": "dbc/vehicle.dbc",
    "opt/vgw/share/dbc/signals.toml": "dbc/signals.toml",
}


@pytest.fixture(autouse=True)
def no_system_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may touch the host: no systemctl, udevadm, useradd, pip."""
    def refuse(cmd: list[str], **_kw: Any) -> int:
        raise AssertionError(f"system command run: {cmd}")

    monkeypatch.setattr(inst, "_run", refuse)
    monkeypatch.setattr(inst, "_is_enabled", refuse)


def files(root: Path) -> set[str]:
    """Regular files below ``root`` (links name device paths, which may or may not exist on this host)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def links(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): os.readlink(p) for p in root.rglob("*") if p.is_symlink()}


def test_install_lays_out_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "root"
    assert main(["install", "--prefix", str(prefix), "--no-venv"]) == 0
    assert files(prefix) == set(INSTALLED) | ({"opt/vgw/docs/install-raspberry-pi.md"}
                                              if (ROOT / "docs/install-raspberry-pi.md").exists() else set())
    for dest, src in INSTALLED.items():
        assert (prefix / dest).read_bytes() == (ROOT / src).read_bytes()
        assert stat.S_IMODE((prefix / dest).stat().st_mode) == 0o644
    assert (prefix / "etc/vgw").is_dir()
    assert "skip user creation, systemctl and udevadm" in capsys.readouterr().out
    # Idempotent: a second run succeeds and changes nothing.
    before = {f: (prefix / f).read_bytes() for f in files(prefix)}
    assert main(["install", "--prefix", str(prefix), "--no-venv"]) == 0
    assert {f: (prefix / f).read_bytes() for f in files(prefix)} == before


def test_dry_run_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "root"
    assert main(["install", "--prefix", str(prefix), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not prefix.exists()
    assert f"would: {inst.sys.executable} -m venv {prefix}/opt/vgw/venv" in out
    assert f"would: {prefix}/opt/vgw/venv/bin/pip install --upgrade {ROOT}" in out


def test_live_system_plan(capsys: pytest.CaptureFixture[str]) -> None:
    """What `vgw install` does on a real Pi (prefix /), shown with --dry-run so nothing is touched."""
    plan = inst.install(prefix=Path("/"), dry_run=True, echo=lambda _line: None)
    steps = "\n".join(plan.done)
    for expected in ("create system user and group vgw", "/opt/vgw/venv/bin/pip install --upgrade",
                     "install /etc/systemd/system/vgw-agent.service", "install /etc/systemd/network/80-can0.network",
                     "install /etc/udev/rules.d/60-vgw-obd.rules", "systemctl daemon-reload",
                     "systemctl enable vgw-sysusers.service vgw-enroll.service vgw-agent.service", "systemd-networkd",
                     "udevadm control --reload", "install /usr/lib/sysusers.d/vgw.conf", "link /usr/local/bin/vgw"):
        assert expected in steps, expected
    enable = "systemctl enable vgw-sysusers.service vgw-enroll.service vgw-agent.service"
    assert steps.index("create system user") < steps.index(enable)


def test_install_config_keeps_a_backup(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    (tmp_path / "a.toml").write_text("# a\n")
    (tmp_path / "b.toml").write_text("# b\n")
    assert main(["install", "--prefix", str(prefix), "--no-venv", "--config", str(tmp_path / "a.toml")]) == 0
    assert main(["install", "--prefix", str(prefix), "--no-venv", "--config", str(tmp_path / "b.toml")]) == 0
    assert (prefix / "etc/vgw/vgw.toml").read_text() == "# b\n"
    assert (prefix / "etc/vgw/vgw.toml.bak").read_text() == "# a\n"


def test_not_from_a_source_checkout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install", "--prefix", str(tmp_path), "--source", str(tmp_path), "--no-venv"]) == 1
    err = capsys.readouterr().err
    assert "not a vgw source checkout" in err and len(err.strip().splitlines()) == 1


# -- uninstall ------------------------------------------------------------------------------------------


def provisioned(prefix: Path, pki: TestPKI, port: int) -> tuple[Path, SigningKey]:
    """Install into ``prefix`` and provision dev-0001 there (state in PREFIX/var/lib/vgw) with a signed cert."""
    assert main(["install", "--prefix", str(prefix), "--no-venv"]) == 0
    signer = SigningKey.generate()
    trust = signer.write_public_pem(prefix.parent / "signer.pub.pem")
    etc = prefix / "etc/vgw"
    assert main(["provision", "--device-id", "dev-0001", "--broker", f"localhost:{port}", "--ca", str(pki.ca.cert),
                 "--consent-key", str(trust), "--out", str(etc), "--state-dir", str(prefix / "var/lib/vgw"),
                 "--source", "can", "--demo-dbc", *SERVICE_USER]) == 0
    install_signed_cert(etc, pki, prefix.parent)
    return etc / "vgw.toml", signer


def test_uninstall_keeps_config_and_state(tmp_path: Path, pki: TestPKI) -> None:
    prefix = tmp_path / "root"
    provisioned(prefix, pki, 8883)
    assert main(["uninstall", "--prefix", str(prefix)]) == 0
    left = files(prefix)
    assert not any(f.startswith(("opt/", "etc/systemd/", "etc/udev/")) for f in left)
    assert {"etc/vgw/vgw.toml", "etc/vgw/device.key", "etc/vgw/device.crt", "var/lib/vgw/storage.key"} <= left


def test_purge_erases_every_grant_then_removes_state(tmp_path: Path, pki: TestPKI, broker: Mosquitto,
                                                     cloud: CloudPeer, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "root"
    config, signer = provisioned(prefix, pki, broker.port)
    cloud.add_device("dev-0001", prefix / "etc/vgw/device.crt")  # the provisioned key, not the fixture's
    doc = tmp_path / "consent.jws"
    doc.write_text(sign_consent(consent_claims("dev-0001", 1, [
        grant("g-fleet", ["read_speedometer"], RecipientKey.generate()),
        grant("g-idle", ["read_fuel"], RecipientKey.generate())]), signer))
    assert main(["consent", "apply", "--config", str(config), str(doc)]) == 0
    cfg = load_config(config)
    with acting_for_owner(cfg.state_dir):  # the agent's rows, in the service user's state dir
        outbox, *_ = open_state(cfg)
        try:
            for _ in range(3):
                outbox.commit_batch("g-fleet", lambda seq: b"\x01sealed-envelope-%d" % seq, 1.0, 1)
        finally:
            outbox.close()
    capsys.readouterr()

    assert main(["uninstall", "--prefix", str(prefix), "--purge", "--receipt-timeout", "15"]) == 0
    out = capsys.readouterr().out
    assert "grant g-fleet: 3 batch(es) deleted, data key destroyed" in out
    assert "grant g-idle: 0 batch(es) deleted" in out
    assert "could not be delivered" not in out
    # The cloud got one signed erasure receipt per grant, sent only after the data were gone.
    assert cloud.wait_for(lambda: len(cloud.receipts("dev-0001", typ="erasure")) == 2, timeout=10)
    receipts = {r.claims["grant"]: r.claims for r in cloud.receipts("dev-0001", typ="erasure")}
    assert receipts["g-fleet"]["batches_deleted"] == 3 and receipts["g-fleet"]["key_destroyed"] is True
    assert receipts["g-idle"]["batches_deleted"] == 0 and receipts["g-fleet"]["ver"] == 1
    assert not cloud.bad_receipts()
    # And then everything is gone: state, keys, config, units, venv.
    assert not (prefix / "var/lib/vgw").exists() and not (prefix / "etc/vgw").exists()
    assert files(prefix) == set()


def test_purge_refuses_while_the_agent_runs(tmp_path: Path, pki: TestPKI, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "root"
    provisioned(prefix, pki, 8883)
    before = files(prefix)
    lock = AgentLock(prefix / "var/lib/vgw")
    assert lock.acquire()
    try:
        capsys.readouterr()
        assert main(["uninstall", "--prefix", str(prefix), "--purge", "--receipt-timeout", "0"]) == 1
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert "the agent is running" in err and len(err.strip().splitlines()) == 1
    assert files(prefix) >= before - {"var/lib/vgw/agent.lock"}  # nothing removed


def test_purge_offline_still_erases(tmp_path: Path, pki: TestPKI, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "root"
    config, signer = provisioned(prefix, pki, 8883)
    doc = tmp_path / "consent.jws"
    doc.write_text(sign_consent(consent_claims("dev-0001", 1, [
        grant("g-1", ["read_speedometer"], RecipientKey.generate())]), signer))
    assert main(["consent", "apply", "--config", str(config), str(doc)]) == 0
    summary = inst.final_erasure(config, receipt_timeout_s=0)
    assert summary.grants == {"g-1": 0} and not summary.receipts_delivered
    cfg = load_config(config)
    with acting_for_owner(cfg.state_dir):
        outbox, audit, *_ = open_state(cfg)
        try:
            assert outbox.receipt_count() >= 1 and not outbox.orphan_grants(set())
            events = [e["event"] for e in audit.entries()]
            assert events[-3:] == ["grant-stopped", "key-destroyed", "erasure-done"]
        finally:
            outbox.close()


def test_system_commands_only_on_the_live_root(tmp_path: Path) -> None:
    """A staging prefix never runs systemctl/udevadm/useradd even when asked to (the autouse fixture fails
    the test on any system command)."""
    plan = inst.install(prefix=tmp_path / "stage", venv=False, system=True, echo=lambda _line: None)
    assert not any("systemctl" in step and "skip" not in step for step in plan.done)
    plan = inst.uninstall(prefix=tmp_path / "stage", system=True, echo=lambda _line: None)
    assert not any("systemctl" in step for step in plan.done)
    assert files(tmp_path / "stage") == set()


# -- a tree that runs anywhere ---------------------------------------------------------------------------

WANTS = "etc/systemd/system/multi-user.target.wants"
LINKS = {"usr/local/bin/vgw": "/opt/vgw/venv/bin/vgw",
         f"{WANTS}/vgw-agent.service": "/etc/systemd/system/vgw-agent.service",
         f"{WANTS}/vgw-sysusers.service": "/etc/systemd/system/vgw-sysusers.service",
         f"{WANTS}/vgw-enroll.service": "/etc/systemd/system/vgw-enroll.service"}


def test_vgw_is_on_path_and_the_agent_enabled_in_a_staged_tree(tmp_path: Path) -> None:
    """provision's "Next steps" print bare `vgw doctor ...`, but nothing put `vgw` on PATH; and a staged tree had
    no enabled unit."""
    prefix = tmp_path / "root"
    assert main(["install", "--prefix", str(prefix), "--no-venv"]) == 0
    assert links(prefix) == LINKS
    assert main(["install", "--prefix", str(prefix), "--no-venv"]) == 0  # idempotent
    assert links(prefix) == LINKS
    assert main(["uninstall", "--prefix", str(prefix)]) == 0
    assert links(prefix) == {}


def test_a_foreign_vgw_on_path_is_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "root"
    mine = prefix / "usr/local/bin/vgw"
    mine.parent.mkdir(parents=True)
    mine.write_text("#!/bin/sh\necho my own vgw\n")
    assert main(["install", "--prefix", str(prefix), "--no-venv"]) == 0
    assert mine.read_text().startswith("#!/bin/sh") and "left alone" in capsys.readouterr().out
    assert main(["uninstall", "--prefix", str(prefix)]) == 0
    assert mine.read_text().startswith("#!/bin/sh")


def sysusers_lines(path: Path) -> list[list[str]]:
    """sysusers.d(5) lines: type, name, id, GECOS, home, shell (quoted fields kept whole)."""
    rows = []
    for raw in path.read_text().splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            rows.append([f.strip('"') for f in re.findall(r'"[^"]*"|\S+', raw)])
    return rows


def test_a_staged_tree_creates_its_user_at_boot(tmp_path: Path) -> None:
    """A staged `--root` tree had no `vgw` user and no enabled unit, yet the guide said it could be copied onto
    the device as it is."""
    from tests.test_systemd import directives, values

    prefix = tmp_path / "root"
    assert main(["install", "--prefix", str(prefix), "--no-venv"]) == 0
    units = prefix / "etc/systemd/system"
    agent, boot = units / "vgw-agent.service", units / "vgw-sysusers.service"
    (row,) = sysusers_lines(prefix / "usr/lib/sysusers.d/vgw.conf")
    assert row[:2] == ["u", "vgw"] and row[4:] == ["/nonexistent", "/usr/sbin/nologin"]
    assert values(agent, "User") == values(agent, "Group") == ["vgw"]  # the same name everywhere
    assert 'GROUP="vgw"' in (prefix / "etc/udev/rules.d/60-vgw-obd.rules").read_text()
    # The boot unit makes the user before the agent starts, from the file installed here.
    assert "vgw-sysusers.service" in values(agent, "Wants", "Unit")[0].split()
    assert "vgw-sysusers.service" in " ".join(values(agent, "After", "Unit"))
    assert "vgw-agent.service" in values(boot, "Before", "Unit")[0].split()
    assert any("systemd-sysusers /usr/lib/sysusers.d/vgw.conf" in v for v in values(boot, "ExecStart"))
    assert ("Install", "WantedBy", "multi-user.target") in directives(boot)
    preset = (prefix / "usr/lib/systemd/system-preset/80-vgw.preset").read_text().splitlines()
    assert {"enable vgw-agent.service", "enable vgw-sysusers.service", "enable vgw-enroll.service"} <= set(preset)

    # systemd's own tools agree: sysusers makes the user in the tree, the preset enables what is linked.
    if shutil.which("systemd-sysusers"):
        subprocess.run(["systemd-sysusers", f"--root={prefix}"], check=True, capture_output=True)
        passwd = {ln.split(":")[0]: ln.split(":") for ln in (prefix / "etc/passwd").read_text().splitlines()}
        assert passwd["vgw"][6] == "/usr/sbin/nologin" and int(passwd["vgw"][2]) < 1000
    if shutil.which("systemctl"):
        shutil.rmtree(prefix / WANTS)
        proc = subprocess.run(["systemctl", f"--root={prefix}", "preset", "vgw-agent.service",
                               "vgw-sysusers.service", "vgw-enroll.service"], capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        assert {k: v for k, v in links(prefix).items() if k.startswith(WANTS)} == \
            {k: v for k, v in LINKS.items() if k.startswith(WANTS)}


needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="running as another user needs root and setpriv")


@needs_root
def test_the_live_venv_gets_an_interpreter_the_agent_can_run(capsys: pytest.CaptureFixture[str]) -> None:
    """`make install` made /opt/vgw/venv from the interpreter vgw ran with (a pyenv under /root, mode 0700), so
    the agent's user got `Permission denied`. Shown with --dry-run: nothing is touched."""
    from tests.test_bundle import as_nobody

    assert main(["install", "--dry-run"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.endswith("-m venv /opt/vgw/venv"))
    python = line.removeprefix("would: ").split()[0]
    ran = as_nobody(python, "-c", "import encodings")
    assert ran.returncode == 0, (python, ran.stderr)


@needs_root
def test_an_interpreter_the_agent_cannot_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "python3").symlink_to(inst.sys.executable)
    assert main(["install", "--dry-run", "--python", str(hidden / "python3")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(hidden / "python3") in err[0] and "unprivileged" in err[0] and "--python" in err[0]
