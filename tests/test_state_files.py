"""The state directory and the files the agent reads cannot be turned against it (docs/guarantees.md, "Files
the agent reads and writes").

Driven from outside through the real CLI (`vgw consent apply`, a subprocess with a memory cap, so a defect
shows as a failure, never as a test run eating the machine). The tests run as root here: another user is
simulated with ``os.chown`` to an unused uid.
"""

from __future__ import annotations

import os
import resource
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from vgw.state.keys import load_or_create_storage_key
from vgw.state.outbox import Outbox

from tests.agentkit import ROOT, Authority, write_config

OTHER_UID = 4242  # no such user here: "someone else"
VICTIM_TEXT = b"precious root-owned content\n"


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def vgw(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vgw", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, preexec_fn=_cap_memory)


@pytest.fixture
def setup(tmp_path: Path, pki: Any) -> dict[str, Any]:
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, 1883, auth.trust, can={"channel": "vgw-state-files"})
    doc = tmp_path / "v1.jws"
    doc.write_text(auth.doc("dev-0001", {"g-speed": ["read_speedometer"]}))
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM_TEXT)
    return {"cfg": cfg, "doc": doc, "state": tmp_path / "state", "victim": victim, "tmp": tmp_path, "auth": auth}


def apply(s: dict[str, Any], cfg: Path | None = None) -> subprocess.CompletedProcess[str]:
    return vgw("consent", "apply", "--config", str(cfg or s["cfg"]), str(s["doc"]))


def assert_refused(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode not in (0, 3), (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def assert_untouched(victim: Path) -> None:
    assert victim.read_bytes() == VICTIM_TEXT
    assert victim.stat().st_uid == os.geteuid()


# -- the state directory ----------------------------------------------------------------------------------------


def test_state_dir_of_another_user_is_refused_and_its_links_never_followed(setup: dict[str, Any]) -> None:
    state: Path = setup["state"]
    state.mkdir(mode=0o700)
    (state / "agent.lock").symlink_to(setup["victim"])  # planted: the lock file is truncated on open
    (state / "audit.log").symlink_to(setup["victim"])
    os.chown(state, OTHER_UID, OTHER_UID)
    r = apply(setup)
    # Root acts for the state dir's owner (the service user: fsutil.acting_for), so it is the planted link that
    # is refused; anyone else is refused the folder itself.
    assert_refused(r, "symbolic link" if os.geteuid() == 0 else "owned by uid 4242", str(state))
    assert_untouched(setup["victim"])
    assert sorted(p.name for p in state.iterdir()) == ["agent.lock", "audit.log"]  # nothing adopted or created


def test_state_dir_writable_by_others_is_refused(setup: dict[str, Any]) -> None:
    state: Path = setup["state"]
    state.mkdir()
    os.chmod(state, 0o777)  # noqa: S103 - the fault under test
    assert_refused(apply(setup), "writable by group or others")
    assert list(state.iterdir()) == []


@pytest.mark.parametrize("name", ["agent.lock", "audit.log", "outbox.sqlite", "outbox.sqlite-wal", "consent.jws",
                                  "storage.key"])
def test_a_link_planted_in_our_own_state_dir_is_refused(setup: dict[str, Any], name: str) -> None:
    state: Path = setup["state"]
    state.mkdir(mode=0o700)
    (state / name).symlink_to(setup["victim"])
    assert_refused(apply(setup), "symbolic link", name)
    assert_untouched(setup["victim"])


def test_every_state_file_is_created_0600_even_under_umask_022(setup: dict[str, Any]) -> None:
    state: Path = setup["state"]
    state.mkdir(mode=0o700)
    # A fresh outbox: SQLite's -wal and -shm exist only while a connection is open, so look at them then.
    old = os.umask(0o022)
    try:
        key = load_or_create_storage_key(state / "storage.key")
        outbox = Outbox(state / "outbox.sqlite", key, "dev-0001")
        try:
            outbox.set_active_grants({"g-speed"})
            made = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.glob("outbox.sqlite*")}
            assert set(made) == {"outbox.sqlite", "outbox.sqlite-wal", "outbox.sqlite-shm"}, made
            assert set(made.values()) == {0o600}, made
        finally:
            outbox.close()
    finally:
        os.umask(old)

    r = apply(setup)  # the CLI (umask 022 inherited from this test process) adds the rest
    assert r.returncode == 0, r.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
    assert {"outbox.sqlite", "audit.log", "consent.jws", "storage.key", "agent.lock"} <= set(modes)
    assert all(m == 0o600 for m in modes.values()), modes
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


# -- key and config files: regular files only, capped, owned by us (or root) and writable by nobody else -----------


def _fifo(folder: Path) -> Path:
    p = folder / "fifo"
    os.mkfifo(p)
    return p


def _with(cfg: Path, section: str, key: str, value: Path) -> Path:
    """A copy of ``cfg`` with ``key`` in ``[section]`` set (replaced or added) to ``value``."""
    out, inside, done = [], False, False
    for line in cfg.read_text().splitlines():
        if line.startswith("["):
            if inside and not done:
                out.append(f'{key} = "{value}"')
                done = True
            inside = line == f"[{section}]"
        if inside and line.split("=")[0].strip() == key:
            line, done = f'{key} = "{value}"', True
        out.append(line)
    new = cfg.with_name(f"{key}.toml")
    new.write_text("\n".join(out) + "\n")
    return new


@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
@pytest.mark.parametrize("which", ["storage key", "consent trust key", "device private key", "config file"])
def test_a_key_or_config_path_that_is_not_a_regular_file_gives_one_clear_line(setup: dict[str, Any], which: str,
                                                                              kind: str) -> None:
    bad = Path("/dev/zero") if kind == "dev-zero" else _fifo(setup["tmp"])
    cfg: Path = setup["cfg"]
    if which == "storage key":
        cfg = _with(cfg, "device", "storage_key", bad)
    elif which == "consent trust key":
        cfg = _with(cfg, "consent", "trust_keys", bad)
    elif which == "device private key":
        cfg = _with(cfg, "mqtt", "key_file", bad)
    else:
        cfg = bad
    r = apply(setup, cfg)  # before: MemoryError traceback (/dev/zero) or a hang for ever (FIFO)
    assert_refused(r, which, "not a regular file")


def test_a_storage_key_of_another_user_is_refused(setup: dict[str, Any]) -> None:
    assert apply(setup).returncode == 0
    key = setup["state"] / "storage.key"
    os.chown(key, OTHER_UID, OTHER_UID)
    assert_refused(apply(setup), "storage key", "owned by uid 4242")


def test_a_trust_key_others_can_replace_is_refused(setup: dict[str, Any]) -> None:
    trust: Path = setup["auth"].trust
    os.chmod(trust, 0o666)  # noqa: S103 - the fault under test: anyone could swap the consent authority
    assert_refused(apply(setup), "consent trust key", "writable by group or others")


def test_an_oversized_key_file_is_refused_before_it_is_read(setup: dict[str, Any]) -> None:
    big = setup["tmp"] / "big.pem"
    with big.open("wb") as fh:
        fh.truncate(1 << 30)  # sparse: 1 GiB that costs no disk
    assert_refused(apply(setup, _with(setup["cfg"], "consent", "trust_keys", big)), "consent trust key", "allowed")


def test_a_tls_file_that_is_a_fifo_is_a_link_error_not_a_hung_uplink(setup: dict[str, Any]) -> None:
    from tests.agentkit import AgentThread, wait_until

    cfg = _with(setup["cfg"], "mqtt", "ca_file", _fifo(setup["tmp"]))
    with AgentThread(cfg) as runner:  # before: the uplink thread blocked for ever opening the FIFO
        uplink = runner.agent.uplink
        assert wait_until(lambda: "not a regular file" in (uplink.view().last_error or ""), 10), \
            uplink.view().last_error
        assert uplink.view().connect_failures >= 1 and uplink.view().state != "connected"


# -- hostile state files: every reader opens them as the agent does (regular file, ours, capped, never followed) --

_READERS = {  # which command reads which state file
    "status.json": ("status",),  # the report takes its counts from the outbox, never from the status file
    "audit.log": ("report", "audit verify"),
    "agent.lock": ("status",),
    "outbox.sqlite": ("status", "report"),
}
_COMMANDS = ("status", "report", "audit verify")


def _plant(state: Path, name: str, kind: str) -> None:
    target = state / name
    target.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(target, 0o600)
    else:
        target.symlink_to("/dev/zero")


@pytest.mark.parametrize("kind", ["fifo", "link-to-dev-zero"])
@pytest.mark.parametrize("name", sorted(_READERS))
def test_a_hostile_state_file_is_refused_promptly_by_every_read_only_command(setup: dict[str, Any], name: str,
                                                                            kind: str) -> None:
    """Before: a FIFO made `vgw status`, `report` and `audit verify` hang for ever, a link to /dev/zero made them
    read until memory ran out. Now: one line naming the file and the rule, exit 1, at once; a command that does
    not read the file is not disturbed by it."""
    assert apply(setup).returncode == 0
    _plant(setup["state"], name, kind)
    for command in _COMMANDS:
        r = vgw(*command.split(), "--config", str(setup["cfg"]), timeout=20)
        if command in _READERS[name]:
            assert_refused(r, name)
            assert ("not a regular file" if kind == "fifo" else "symbolic link") in r.stderr, (command, r.stderr)
        else:
            assert r.returncode == 0 and "Traceback" not in r.stderr, (command, r.stdout, r.stderr)


def test_an_audit_log_beyond_its_cap_is_refused_before_it_is_read(setup: dict[str, Any]) -> None:
    from vgw.base.fsutil import MAX_AUDIT_BYTES

    assert apply(setup).returncode == 0
    with (setup["state"] / "audit.log").open("r+b") as fh:
        fh.truncate(MAX_AUDIT_BYTES + 1)  # sparse: costs no disk
    for command in ("report", "audit verify"):
        assert_refused(vgw(*command.split(), "--config", str(setup["cfg"]), timeout=20), "audit.log",
                       f"{MAX_AUDIT_BYTES} allowed")


def test_a_state_file_of_another_user_is_refused_by_a_read_only_command(setup: dict[str, Any]) -> None:
    assert apply(setup).returncode == 0
    os.chown(setup["state"] / "audit.log", OTHER_UID, OTHER_UID)
    assert_refused(vgw("audit", "verify", "--config", str(setup["cfg"]), timeout=20), "audit.log",
                   "owned by uid 4242")


@pytest.mark.parametrize("name", ["agent.lock", "outbox.sqlite", "audit.log"])
def test_vgw_run_refuses_a_fifo_state_file_with_one_line(setup: dict[str, Any], name: str, broker: Any,
                                                         pki: Any) -> None:
    """Before: agent.lock a FIFO was a traceback (``os.ftruncate``: EINVAL); outbox.sqlite a FIFO blocked the
    start and ignored SIGTERM. Now: one line naming the file, exit 1, at once."""
    cfg = write_config(setup["tmp"], pki, broker.port, setup["auth"].trust, can={"channel": "vgw-state-fifo"})
    assert vgw("consent", "apply", "--config", str(cfg), str(setup["doc"])).returncode == 0
    _plant(setup["state"], name, "fifo")
    assert_refused(vgw("run", "--config", str(cfg), timeout=30), name, "not a regular file")
