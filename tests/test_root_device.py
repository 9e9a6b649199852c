"""Root on a provisioned device (docs/install-raspberry-pi.md): the state dir and the device key belong to the
service user (the agent's `User=`), and root runs `vgw provision` again, `consent apply`, `status`, `report`,
`audit` and `uninstall --purge` on them. Each works, and leaves every file owned as it was.

"The service user" is a numeric uid with no passwd entry (``--service-user UID:GID``), so nothing here
depends on whether the host has a `vgw` user, an /etc/vgw or a /var/lib/vgw.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest
from vgw.cli import main
from vgw.config.settings import load_config
from vgw_sim.cloud import RecipientKey, SigningKey, consent_claims, grant, sign_consent
from vgw_sim.pki import TestPKI

from tests.test_provision import SERVICE, SERVICE_USER, sign_csr

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acting for another user needs root")


def owners(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry below ``folder`` (and itself) -> (uid, gid), links not followed."""
    found = {".": (os.lstat(folder).st_uid, os.lstat(folder).st_gid)}
    for p in sorted(folder.rglob("*")):
        st = os.lstat(p)
        found[str(p.relative_to(folder))] = (st.st_uid, st.st_gid)
    return found


def give_away(*paths: Path) -> None:
    """What the first `vgw provision` (or the agent itself) leaves: these paths belong to the service user."""
    for top in paths:
        for p in [top, *(top.rglob("*") if top.is_dir() else [])]:
            os.lchown(p, SERVICE, SERVICE)


def assert_service_owned(state: Path, key: Path) -> None:
    wrong = {k: v for k, v in owners(state).items() if v != (SERVICE, SERVICE)}
    assert not wrong, f"not owned by the service user {SERVICE}: {wrong}"
    assert (key.stat().st_uid, key.stat().st_gid) == (SERVICE, SERVICE)


class Device:
    """A device provisioned in a temp root, with a signed certificate and a consent applied, then handed to the
    service user as a real install does."""

    def __init__(self, tmp: Path, pki: TestPKI) -> None:
        self.tmp = tmp
        self.pki = pki
        self.prefix = tmp / "root"
        self.etc = self.prefix / "etc/vgw"
        self.state = self.prefix / "var/lib/vgw"
        self.signer = SigningKey.generate()
        self.trust = self.signer.write_public_pem(tmp / "signer.pub.pem")
        self.config = self.etc / "vgw.toml"
        self.key = self.etc / "device.key"

    def provision_argv(self, *extra: str, device: str = "dev-0001") -> list[str]:
        return ["provision", "--device-id", device, "--broker", "127.0.0.1:1", "--ca", str(self.pki.ca.cert),
                "--consent-key", str(self.trust), "--out", str(self.etc), "--state-dir", str(self.state),
                "--source", "can", "--demo-dbc", *SERVICE_USER, *extra]

    def consent(self, ver: int, *grants: str) -> Path:
        doc = self.tmp / f"consent-{ver}.jws"
        doc.write_text(sign_consent(consent_claims("dev-0001", ver, [
            grant(g, ["read_speedometer"], RecipientKey.generate()) for g in grants]), self.signer))
        return doc


@pytest.fixture
def device(tmp_path: Path, pki: TestPKI) -> Iterator[Device]:
    dev = Device(tmp_path, pki)
    assert main(["install", "--prefix", str(dev.prefix), "--no-venv"]) == 0
    assert main(dev.provision_argv()) == 0
    signed = tmp_path / "signed.crt"
    signed.write_bytes(sign_csr(dev.etc / "device.csr", pki))
    assert main(["provision", "--install-cert", str(signed), "--out", str(dev.etc)]) == 0
    assert main(["consent", "apply", "--config", str(dev.config), str(dev.consent(1, "g-fleet"))]) == 0
    give_away(dev.state, dev.key)
    yield dev


def test_provision_rerun_as_root(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    """`sudo vgw provision ...` a second time, as the guide says is safe, refused the service user's state dir."""
    key_before = device.key.read_bytes()
    capsys.readouterr()
    assert main(device.provision_argv()) == 0, capsys.readouterr().err
    assert device.key.read_bytes() == key_before
    assert_service_owned(device.state, device.key)


def test_provision_force_as_root(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    key_before = device.key.read_bytes()
    storage_before = (device.state / "storage.key").read_bytes()
    capsys.readouterr()
    assert main(device.provision_argv("--force", device="dev-0002")) == 0, capsys.readouterr().err
    assert device.key.read_bytes() != key_before
    assert (device.state / "storage.key").read_bytes() != storage_before
    assert_service_owned(device.state, device.key)  # the new key and storage key too


def test_install_cert_as_root(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    signed = device.tmp / "renewed.crt"
    signed.write_bytes(sign_csr(device.etc / "device.csr", device.pki, days=30))
    capsys.readouterr()
    assert main(["provision", "--install-cert", str(signed), "--out", str(device.etc)]) == 0
    out = capsys.readouterr().out
    assert "Fix the config" not in out, out
    assert (device.etc / "device.crt").read_bytes() == signed.read_bytes()
    assert_service_owned(device.state, device.key)


def test_consent_apply_status_report_audit_as_root(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["consent", "apply", "--config", str(device.config),
                 str(device.consent(2, "g-fleet", "g-new"))]) == 0, capsys.readouterr().err
    assert "consent v2 applied" in capsys.readouterr().out
    assert_service_owned(device.state, device.key)
    before = owners(device.state)
    for argv in (["status", "--config", str(device.config)], ["report", "--config", str(device.config)],
                 ["audit", "verify", "--config", str(device.config)],
                 ["audit", "show", "--config", str(device.config)]):
        assert main(argv) == 0, f"{argv}: {capsys.readouterr().err}"
    assert "g-new" in capsys.readouterr().out
    assert owners(device.state) == before  # a read creates nothing and gives nothing away
    assert load_config(device.config).device.id == "dev-0001"


def test_uninstall_purge_as_root(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    """`sudo vgw uninstall --purge` refused the state dir, then the device key, both the service user's."""
    capsys.readouterr()
    assert main(["uninstall", "--prefix", str(device.prefix), "--purge", "--receipt-timeout", "0"]) == 0, \
        capsys.readouterr().err
    assert "grant g-fleet: 0 batch(es) deleted, data key destroyed" in capsys.readouterr().out
    assert not device.state.exists() and not device.etc.exists()


def test_a_host_with_a_vgw_user(tmp_path: Path, pki: TestPKI) -> None:
    """`make test` failed on a host that has a `vgw` user (a developer's Pi after `make install`): provision
    gave the test's state dir to that user, and the re-run was refused. The service user is looked up through
    a parameter; here the lookup answers as such a host would."""
    from vgw.base.fsutil import Account
    from vgw.ops.provisioning import Sources, provision, resolve_account

    def host_with_vgw(name: str) -> pwd.struct_passwd:
        if name != "vgw":
            raise KeyError(name)
        return pwd.struct_passwd(("vgw", "x", SERVICE, SERVICE, "vgw agent", "/nonexistent", "/usr/sbin/nologin"))

    account = resolve_account("vgw", getpwnam=host_with_vgw)
    assert account == Account(SERVICE, SERVICE, "vgw")
    assert resolve_account("vgw", getpwnam=lambda name: (_ for _ in ()).throw(KeyError(name))) is None
    assert resolve_account("4242") == Account(4242, 4242) and resolve_account("4242:7") == Account(4242, 7)

    trust = SigningKey.generate().write_public_pem(tmp_path / "signer.pub.pem")
    out, state = tmp_path / "etc", tmp_path / "state"
    for _ in range(2):  # the second run is the one that was refused
        provision(device_id="dev-0001", broker="127.0.0.1:1", ca=pki.ca.cert, consent_key=trust,
                  sources=Sources(can=False, obd=True), out=out, state_dir=state, service_user=account)
        assert_service_owned(state, out / "device.key")


def test_the_agent_itself_never_runs_as_root_on_the_service_users_state(device: Device) -> None:
    """Acting for the service user is for the commands above; `vgw run` as root would leave root-owned files
    (SQLite's -wal) the agent could not open: it refuses, saying how the agent runs."""
    import subprocess
    import sys

    from tests.agentkit import ROOT

    before = owners(device.state)
    r = subprocess.run([sys.executable, "-m", "vgw", "run", "--config", str(device.config)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode != 0 and "run the agent as its owner" in r.stderr, r.stderr
    assert owners(device.state) == before
