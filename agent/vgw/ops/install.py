"""`vgw install` / `vgw uninstall`: lay the agent out on Debian / Raspberry Pi OS, or take it away.

Layout (every path below is under ``prefix``, a root directory: ``/`` on a device, a temp dir in tests):

=====================================  ================================================================
``/opt/vgw/venv``                      virtualenv with this project pip-installed (``vgw`` entry point)
``/opt/vgw/share/dbc``                 the shipped ``vehicle.dbc`` and ``signals.toml`` (`vgw provision`)
``/opt/vgw/docs``                      the Raspberry Pi guide the unit's ``Documentation=`` points at
``/etc/vgw``                           config, device key and certificate (`vgw provision` fills it)
``/etc/systemd/system``                ``vgw-agent.service`` (enabled), ``vgw-vcan.service`` (not enabled)
``/etc/systemd/system``                ``vgw-enroll.service`` (enabled: zero-touch enrollment at boot)
``/etc/systemd/network``               ``80-can0.network`` (systemd-networkd sets up can0)
``/etc/udev/rules.d``                  ``60-vgw-obd.rules`` (USB OBD and SLCAN adapters -> group vgw)
``/etc/systemd/system``                ``vgw-sysusers.service`` (enabled: makes the user at boot)
``/usr/lib/sysusers.d/vgw.conf``       the ``vgw`` user and group (sysusers.d(5))
``/usr/lib/systemd/system-preset``     ``80-vgw.preset`` (what first boot and `systemctl preset` enable)
``/usr/local/bin/vgw``                 a link to ``/opt/vgw/venv/bin/vgw``, so ``vgw`` is on root's PATH
=====================================  ================================================================

A staged tree (``prefix`` not ``/``) also gets the ``multi-user.target.wants`` links `systemctl enable` makes,
so it can be copied onto a device as it is: at boot vgw-sysusers.service makes the user, and the agent starts
once the device is provisioned.

System actions (creating the ``vgw`` user, ``systemctl``, ``udevadm``) run only when ``prefix`` is ``/`` and
``system`` is true. ``dry_run`` prints the plan and changes nothing.

`vgw uninstall --purge` first erases every grant (in force, or with data on disk) with the consent manager's
erasure, as a revocation does: data key destroyed, rows deleted, audit entry, signed erasure receipt (built
from what the erasure found, with the audit anchor) queued and, if the broker is reachable within
``receipt_timeout_s``, delivered; only then are the state dir and ``/etc/vgw`` removed. An erasure that cannot
be verified (another process holds the outbox open) stops the uninstall with nothing removed.

Raises :class:`~vgw.base.errors.ConfigError` (bad source/config) and :class:`~vgw.base.errors.StorageError`
(files, a running agent, a failed system command).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vgw.base.errors import ConfigError, StorageError
from vgw.base.fsutil import acting_for_owner
from vgw.dbc import shipped_dir

if TYPE_CHECKING:
    from vgw.config.settings import Config
    from vgw.state.outbox import Outbox

log = logging.getLogger(__name__)

SERVICE_USER = "vgw"
AGENT_UNIT = "vgw-agent.service"
VCAN_UNIT = "vgw-vcan.service"
ENROLL_UNIT = "vgw-enroll.service"  # zero-touch enrollment at boot (README "Enrollment")
SYSUSERS_UNIT = "vgw-sysusers.service"
SYSUSERS_SOURCE = "vgw.sysusers"  # in systemd/; installed as SYSUSERS_FILE
SYSUSERS_FILE = "vgw.conf"
PRESET = "80-vgw.preset"
VGW_TARGET = "/opt/vgw/venv/bin/vgw"  # what /usr/local/bin/vgw points at, on the device
# vgw-enroll.service runs only while /etc/vgw/claim holds a token and there is no certificate.
ENABLED_UNITS = (SYSUSERS_UNIT, ENROLL_UNIT, AGENT_UNIT)
NETWORK_FILE = "80-can0.network"
UDEV_RULE = "60-vgw-obd.rules"
GUIDE = "install-raspberry-pi.md"


@dataclass(frozen=True)
class Layout:
    """Every path `vgw install` writes, below ``prefix``."""

    prefix: Path

    def _p(self, path: str) -> Path:
        return self.prefix / path.lstrip("/")

    @property
    def opt(self) -> Path:
        return self._p("/opt/vgw")

    @property
    def venv(self) -> Path:
        return self._p("/opt/vgw/venv")

    @property
    def dbc(self) -> Path:
        return self._p("/opt/vgw/share/dbc")

    @property
    def docs(self) -> Path:
        return self._p("/opt/vgw/docs")

    @property
    def etc(self) -> Path:
        return self._p("/etc/vgw")

    @property
    def units(self) -> Path:
        return self._p("/etc/systemd/system")

    @property
    def network(self) -> Path:
        return self._p("/etc/systemd/network")

    @property
    def udev(self) -> Path:
        return self._p("/etc/udev/rules.d")

    @property
    def state(self) -> Path:
        return self._p("/var/lib/vgw")

    @property
    def sysusers(self) -> Path:
        return self._p(f"/usr/lib/sysusers.d/{SYSUSERS_FILE}")

    @property
    def preset(self) -> Path:
        return self._p(f"/usr/lib/systemd/system-preset/{PRESET}")

    @property
    def wants(self) -> Path:
        return self._p("/etc/systemd/system/multi-user.target.wants")

    @property
    def bin_link(self) -> Path:
        return self._p("/usr/local/bin/vgw")

    def installed_files(self) -> list[Path]:
        return [self.units / AGENT_UNIT, self.units / ENROLL_UNIT, self.units / VCAN_UNIT, self.units / SYSUSERS_UNIT,
                self.network / NETWORK_FILE, self.udev / UDEV_RULE, self.sysusers, self.preset]


@dataclass
class Plan:
    """Steps, each a line of text and an action; run in order, or only printed for a dry run."""

    dry_run: bool
    echo: Callable[[str], None] = print
    done: list[str] = field(default_factory=list)

    def step(self, text: str, action: Callable[[], object] | None = None) -> None:
        self.done.append(text)
        if self.dry_run:
            self.echo(f"would: {text}")
            return
        self.echo(text)
        if action is not None:
            action()


def find_source(source: Path | None = None) -> Path:
    """The source checkout holding ``pyproject.toml`` and ``systemd/``. Raises ConfigError."""
    # The checkout this module runs from (editable install), else the current folder (a venv with a
    # non-editable install, run from inside the clone).
    candidates = [source] if source is not None else [Path(__file__).resolve().parents[3], Path.cwd()]
    # An unpacked offline bundle (packaging/bundle.py) has the same systemd/, dbc/ and docs/ folders and a
    # BUNDLE.txt instead of pyproject.toml; its install.sh runs `vgw install --no-venv --source BUNDLE`.
    for root in candidates:
        if ((root / "pyproject.toml").is_file() or (root / "BUNDLE.txt").is_file()) \
                and (root / "systemd" / AGENT_UNIT).is_file():
            return root
    raise ConfigError(f"{candidates[0]}: not a vgw source checkout or bundle (no pyproject.toml or "
                      f"systemd/{AGENT_UNIT}); run `vgw install` from the cloned repository or pass --source DIR")


def _run(cmd: list[str], *, check: bool = True) -> int:
    try:
        proc = subprocess.run(cmd, check=False)
    except OSError as exc:
        raise StorageError(f"{cmd[0]}: cannot run: {exc.strerror}") from exc
    if check and proc.returncode != 0:
        raise StorageError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}")
    return proc.returncode


def _copy(src: Path, dest: Path, mode: int = 0o644) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(src, tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except OSError as exc:
        raise StorageError(f"{dest}: cannot install {src.name}: {exc.strerror}") from exc


def _copier(src: Path, dest: Path) -> Callable[[], None]:
    return lambda: _copy(src, dest)


def _remover(path: Path) -> Callable[[], None]:
    return lambda: _remove(path)


def _mkdir(path: Path, mode: int) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
        os.chmod(path, mode)
    except OSError as exc:
        raise StorageError(f"{path}: cannot create: {exc.strerror}") from exc


NOBODY = 65534  # an account with no rights, like the agent's: what it can run, the agent can run
PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3")


def runs_unprivileged(python: str) -> bool:
    """True if an account with no rights (so the agent's user too) can run ``python`` and import its standard
    library. Checked by the kernel itself: a forked child drops to uid/gid 65534 and execs it. Always true
    when not running as root (then the venv is ours and runs as us)."""
    if os.geteuid() != 0:
        return True
    pid = os.fork()
    if pid == 0:  # the child only makes system calls, then execs or leaves without any Python cleanup
        try:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 1)
            os.dup2(null, 2)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.execv(python, [python, "-c", "import encodings"])  # noqa: S606 - the exec is what is checked
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def choose_python(python: str | None) -> str:
    """The interpreter for /opt/vgw/venv (the venv's python is a link to it, run by the agent's user).

    ``python`` given: checked. Else this vgw's own interpreter, /usr/bin/python3 or /usr/local/bin/python3,
    whichever an unprivileged user can run first. Raises ConfigError naming the interpreter otherwise."""
    candidates = [python] if python else [sys.executable, *PYTHON_CANDIDATES]
    for candidate in candidates:
        if os.access(candidate, os.X_OK) and runs_unprivileged(candidate):
            return candidate
    bad = candidates[0]
    raise ConfigError(f"{bad} ({os.path.realpath(bad)}) cannot be run by an unprivileged user, so neither by the "
                      f"agent's user {SERVICE_USER} (is it in a folder only root may enter, such as a pyenv under "
                      "/root?); pass --python with a system interpreter, e.g. --python /usr/bin/python3")


def _is_enabled(unit: str) -> bool:
    proc = subprocess.run(["systemctl", "is-enabled", "--quiet", unit], check=False)
    return proc.returncode == 0


def _ensure_user(sysusers: Path) -> None:
    import pwd

    try:
        pwd.getpwnam(SERVICE_USER)
        return
    except KeyError:
        pass
    if shutil.which("systemd-sysusers") and sysusers.is_file():
        _run(["systemd-sysusers", str(sysusers)])  # the same definition vgw-sysusers.service applies at boot
        return
    _run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
          "--shell", "/usr/sbin/nologin", "--comment", "vgw agent", SERVICE_USER])


def _ours(link: Path, target: str) -> bool | None:
    """True if ``link`` is a link to ``target`` (or to another vgw install's), False if something else is
    there, None if nothing is."""
    if link.is_symlink():
        return os.readlink(link) == target or os.readlink(link).startswith("/opt/vgw/")
    return False if link.exists() else None


def _link(link: Path, target: str, echo: Callable[[str], None]) -> None:
    """Make ``link`` point at ``target`` (a device path: it need not exist here); leave anything not ours."""
    if _ours(link, target) is False:
        echo(f"  {link} exists and is not vgw's link: left alone")
        return
    try:
        link.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = link.with_name(f".{link.name}.tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError as exc:
        raise StorageError(f"{link}: cannot link it to {target}: {exc.strerror}") from exc


def _unlink_ours(link: Path, target: str) -> None:
    if _ours(link, target):
        _remove(link)


def _own_key(key: Path) -> None:
    import pwd

    if not key.exists():
        return
    pw = pwd.getpwnam(SERVICE_USER)
    os.chown(key, pw.pw_uid, pw.pw_gid)
    os.chmod(key, 0o600)


def install(
    *,
    prefix: Path = Path("/"),
    config: Path | None = None,
    source: Path | None = None,
    python: str | None = None,
    venv: bool = True,
    system: bool = True,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> Plan:
    """Install the agent below ``prefix``. Raises ConfigError/StorageError; see the module docstring."""
    src = find_source(source)
    lay = Layout(prefix.absolute())
    system = system and lay.prefix == Path("/")
    if config is not None and not config.is_file():
        raise ConfigError(f"--config {config}: file not found")
    # On the device the agent's user runs the venv's python: pick (or check) one it can run.
    python = choose_python(python) if venv and system else (python or sys.executable)
    plan = Plan(dry_run=dry_run, echo=echo)

    if system:
        plan.step(f"install {lay.sysusers}", lambda: _copy(src / "systemd" / SYSUSERS_SOURCE, lay.sysusers))
        plan.step(f"create system user and group {SERVICE_USER} (if missing)", lambda: _ensure_user(lay.sysusers))
    if venv and lay.prefix != Path("/"):
        # A venv records its own path in its scripts: this one would name the staging folder, not /opt/vgw.
        echo(f"note: the venv under {lay.prefix} names that folder and cannot be copied onto a device; to stage an "
             "image use the offline bundle: install.sh --root DIR (make bundle; docs/install-raspberry-pi.md)")
    if venv:
        pip = lay.venv / "bin" / "pip"
        if not (lay.venv / "bin" / "python").exists():
            plan.step(f"{python} -m venv {lay.venv}", lambda: _run([python, "-m", "venv", str(lay.venv)]))
        # The car's distribution (agent/pyproject.toml): the agent without the simulators (README "Layout").
        car = src / "agent" if (src / "agent" / "pyproject.toml").is_file() else src
        plan.step(f"{pip} install --upgrade {car}",
                  lambda: _run([str(pip), "install", "--quiet", "--upgrade", str(car)]))
    for name in ("vehicle.dbc", "signals.toml"):
        plan.step(f"install {lay.dbc / name}", _copier(shipped_dir() / name, lay.dbc / name))
    if (src / "docs" / GUIDE).is_file():
        plan.step(f"install {lay.docs / GUIDE}", lambda: _copy(src / "docs" / GUIDE, lay.docs / GUIDE))
    plan.step(f"create {lay.etc} (0755)", lambda: _mkdir(lay.etc, 0o755))
    if config is not None:
        dest = lay.etc / "vgw.toml"

        def put_config() -> None:
            if dest.exists() and dest.read_bytes() != config.read_bytes():
                shutil.copy2(dest, dest.with_name("vgw.toml.bak"))
            _copy(config, dest)

        plan.step(f"install {config} as {dest} (an existing one is kept as vgw.toml.bak)", put_config)
    plan.step(f"install {lay.units / AGENT_UNIT}", lambda: _copy(src / "systemd" / AGENT_UNIT, lay.units / AGENT_UNIT))
    plan.step(f"install {lay.units / ENROLL_UNIT}",
              lambda: _copy(src / "systemd" / ENROLL_UNIT, lay.units / ENROLL_UNIT))
    plan.step(f"install {lay.units / VCAN_UNIT} (developers; not enabled)",
              lambda: _copy(src / "systemd" / VCAN_UNIT, lay.units / VCAN_UNIT))
    plan.step(f"install {lay.network / NETWORK_FILE}",
              lambda: _copy(src / "systemd" / NETWORK_FILE, lay.network / NETWORK_FILE))
    plan.step(f"install {lay.udev / UDEV_RULE}", lambda: _copy(src / "systemd" / UDEV_RULE, lay.udev / UDEV_RULE))
    plan.step(f"install {lay.units / SYSUSERS_UNIT} (makes the {SERVICE_USER} user at boot)",
              lambda: _copy(src / "systemd" / SYSUSERS_UNIT, lay.units / SYSUSERS_UNIT))
    if not system:
        plan.step(f"install {lay.sysusers}", lambda: _copy(src / "systemd" / SYSUSERS_SOURCE, lay.sysusers))
    plan.step(f"install {lay.preset}", lambda: _copy(src / "systemd" / PRESET, lay.preset))
    plan.step(f"link {lay.bin_link} -> {VGW_TARGET}", lambda: _link(lay.bin_link, VGW_TARGET, echo))

    if system:
        plan.step(f"give {lay.etc / 'device.key'} to {SERVICE_USER} (if present)",
                  lambda: _own_key(lay.etc / "device.key"))
        plan.step("systemctl daemon-reload", lambda: _run(["systemctl", "daemon-reload"]))
        plan.step(f"systemctl enable {' '.join(ENABLED_UNITS)}", lambda: _run(["systemctl", "enable", *ENABLED_UNITS]))

        def networkd() -> None:
            # Enabling networkd also enables its wait-online unit (Also=), which would wait 2 min at boot
            # for links networkd does not manage: keep it as it was.
            wait_online = "systemd-networkd-wait-online.service"
            was_enabled = _is_enabled(wait_online)
            _run(["systemctl", "enable", "systemd-networkd.service"])
            if not was_enabled:
                _run(["systemctl", "disable", wait_online], check=False)
            _run(["systemctl", "restart", "systemd-networkd.service"])

        plan.step("systemctl enable --now systemd-networkd (can0 via 80-can0.network)", networkd)
        plan.step("udevadm control --reload; udevadm trigger --subsystem-match=tty --action=add", lambda: (
            _run(["udevadm", "control", "--reload"]),
            _run(["udevadm", "trigger", "--subsystem-match=tty", "--action=add"])))
    else:
        for unit in ENABLED_UNITS:  # what `systemctl enable` makes; the tree may be copied onto a device
            plan.step(f"enable {unit} in the tree: {lay.wants / unit}",
                      (lambda u: lambda: _link(lay.wants / u, f"/etc/systemd/system/{u}", echo))(unit))
        plan.step("skip user creation, systemctl and udevadm (not the live system: prefix is not / or "
                  "--no-systemctl); the user is made at boot by vgw-sysusers.service")
    return plan


# -- uninstall -----------------------------------------------------------------------------------------


@dataclass
class ErasureSummary:
    grants: dict[str, int] = field(default_factory=dict)  # grant id -> batches deleted
    receipts_delivered: bool = False


def final_erasure(config_path: Path, *, receipt_timeout_s: float = 10.0) -> ErasureSummary:
    """Erase every grant in force or with data on disk, as a revocation would; try to deliver the receipts.

    Raises ConfigError if the config cannot be loaded and StorageError if an agent still runs on the state
    dir (stop it first) or the outbox cannot be erased.
    """
    from vgw.config.settings import load_config

    cfg = load_config(config_path)
    # Root erases the service user's state as that user's (fsutil.acting_for): no chown, nothing refused.
    with acting_for_owner(cfg.state_dir):
        return _final_erasure(cfg, receipt_timeout_s)


def _final_erasure(cfg: Config, receipt_timeout_s: float) -> ErasureSummary:
    from vgw.state.consent.manager import ConsentManager, load_trust_keys
    from vgw.state.outbox.erasure import ERASE_WAIT_S
    from vgw.state.statedir import AgentLock, open_state

    if AgentLock.held_by_other(cfg.state_dir):
        raise StorageError(f"{cfg.state_dir}: the agent is running; stop it first (systemctl stop vgw-agent)")
    lock = AgentLock(cfg.state_dir)
    outbox, audit, store, signer = open_state(cfg)
    summary = ErasureSummary()
    try:
        if not lock.acquire():
            raise StorageError(f"{cfg.state_dir}: the agent is running; stop it first (systemctl stop vgw-agent)")
        manager = ConsentManager(device=cfg.device.id, store=store, outbox=outbox, audit=audit, signer=signer,
                                 trust_keys=load_trust_keys(cfg.consent.trust_keys))
        manager.load_cached_readonly()
        consent = manager.in_force
        ver = consent.ver if consent else 0
        # An erasure an earlier run could not verify: its receipt goes now, if nothing of it is left.
        for done in manager.finish_pending_erasures(wait_s=ERASE_WAIT_S):
            summary.grants[done.grant_id] = done.batches_deleted
        ids = {g.id for g in consent.grants} if consent else set()
        ids |= outbox.orphan_grants(set())  # anything with a key or rows on disk
        outbox.set_active_grants(set())  # nothing may store again
        for gid in sorted(ids - set(summary.grants)):
            # The consent manager's erasure, as for a revocation: the one routine of the outbox, the audit
            # entries, and a receipt built from what it found, with the audit anchor (README "Receipts").
            erasure = manager.erase(gid, reason="uninstall", ver=ver)
            summary.grants[gid] = erasure.batches_deleted
            log.info("grant %s erased: %d batch(es)%s", gid, erasure.batches_deleted,
                     ", data key destroyed" if erasure.key_destroyed else ", not verified yet")
        manager.finish_pending_erasures(wait_s=ERASE_WAIT_S)
        pending = sorted({p.grant for p in manager.store.pending_erasures()})
        if pending:
            # Rows and keys are deleted, but another process holds the outbox open, so a copy is still in its
            # files: no receipt may say they are gone, and nothing is removed (run it again once it has let go).
            raise StorageError(f"{cfg.state_dir}: erasure of grant(s) {', '.join(pending)} not verified: another "
                               "process holds the outbox open; stop it and run the uninstall again")
        if outbox.receipt_count() and receipt_timeout_s > 0:
            summary.receipts_delivered = _deliver_receipts(cfg, outbox, receipt_timeout_s)
        elif not outbox.receipt_count():
            summary.receipts_delivered = True
    finally:
        outbox.close()
        lock.release()
    return summary


def _deliver_receipts(cfg: Config, outbox: Outbox, timeout_s: float) -> bool:
    """Connect as the agent would and wait until every queued receipt is acknowledged (or the timeout)."""
    from vgw.uplink.link import Uplink

    uplink = Uplink(cfg.mqtt, cfg.device.id, outbox, on_consent=lambda _payload: None,
                    status_payload=lambda: {"device": cfg.device.id, "consent_version": None, "grants": []})
    uplink.start()
    try:
        return uplink.drain(timeout_s)
    finally:
        uplink.stop()  # publishes the offline status first


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError as exc:
        raise StorageError(f"{path}: cannot remove: {exc.strerror}") from exc


def uninstall(
    *,
    prefix: Path = Path("/"),
    purge: bool = False,
    config: Path | None = None,
    system: bool = True,
    dry_run: bool = False,
    receipt_timeout_s: float = 10.0,
    echo: Callable[[str], None] = print,
) -> Plan:
    """Remove what :func:`install` laid out; with ``purge`` erase every grant, then the state and ``/etc/vgw``.

    Raises ConfigError/StorageError; nothing is removed when the final erasure fails.
    """
    lay = Layout(prefix.absolute())
    system = system and lay.prefix == Path("/")
    plan = Plan(dry_run=dry_run, echo=echo)
    if system:
        plan.step(f"systemctl disable --now {AGENT_UNIT} {VCAN_UNIT} {SYSUSERS_UNIT}",
                  lambda: _run(["systemctl", "disable", "--now", AGENT_UNIT, VCAN_UNIT, SYSUSERS_UNIT], check=False))
    state_dirs: list[Path] = [lay.state]
    if purge:
        cfg_path = config or lay.etc / "vgw.toml"
        if cfg_path.exists():
            from vgw.config.settings import load_config

            if not dry_run:
                state_dirs = [load_config(cfg_path).state_dir]

            def erase() -> None:
                summary = final_erasure(cfg_path, receipt_timeout_s=receipt_timeout_s)
                for gid, n in summary.grants.items():
                    echo(f"  grant {gid}: {n} batch(es) deleted, data key destroyed, erasure receipt signed")
                if summary.grants and not summary.receipts_delivered:
                    echo("  the erasure receipts could not be delivered (broker unreachable); the data are erased "
                         "anyway")

            plan.step(f"final erasure of every grant ({cfg_path})", erase)
        elif lay.state.exists():
            raise ConfigError(f"{cfg_path}: config not found, so the grants in {lay.state} cannot be erased "
                              "properly; pass --config FILE")
    for unit in ENABLED_UNITS:
        plan.step(f"remove {lay.wants / unit}",
                  (lambda u: lambda: _unlink_ours(lay.wants / u, f"/etc/systemd/system/{u}"))(unit))
    plan.step(f"remove {lay.bin_link} (if it is vgw's link)", lambda: _unlink_ours(lay.bin_link, VGW_TARGET))
    for path in lay.installed_files():
        plan.step(f"remove {path}", _remover(path))
    plan.step(f"remove {lay.opt}", lambda: _remove(lay.opt))
    if purge:
        for d in state_dirs:
            plan.step(f"remove state {d}", _remover(d))
        plan.step(f"remove config, keys and certificate {lay.etc}", lambda: _remove(lay.etc))
    if system:
        plan.step("systemctl daemon-reload; udevadm control --reload", lambda: (
            _run(["systemctl", "daemon-reload"], check=False), _run(["udevadm", "control", "--reload"], check=False)))
    return plan
