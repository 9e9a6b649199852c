"""`vgw install` / `vgw uninstall`: lay the agent out on Debian / Raspberry Pi OS, or take it away.

Layout (every path below is under ``prefix``, a root directory: ``/`` on a device, a temp dir in tests):

=====================================  ================================================================
``/opt/vgw/venv``                      virtualenv with this project pip-installed (``vgw`` entry point)
``/opt/vgw/share/dbc``                 the shipped ``vehicle.dbc`` and ``signals.toml`` (`vgw provision`)
``/opt/vgw/docs``                      the Raspberry Pi guide the unit's ``Documentation=`` points at
``/etc/vgw``                           config, device key and certificate (`vgw provision` fills it)
``/etc/systemd/system``                ``vgw-agent.service`` (enabled), ``vgw-vcan.service`` (not enabled)
``/etc/systemd/network``               ``80-can0.network`` (systemd-networkd sets up can0)
``/etc/udev/rules.d``                  ``60-vgw-obd.rules`` (USB OBD adapters -> group vgw)
=====================================  ================================================================

System actions (creating the ``vgw`` user, ``systemctl``, ``udevadm``) run only when ``prefix`` is ``/`` and
``system`` is true. ``dry_run`` prints the plan and changes nothing.

`vgw uninstall --purge` first erases every grant (in force, or with data on disk) with the consent manager's
erasure, as a revocation does: data key destroyed, rows deleted, audit entry, signed erasure receipt (built
from what the erasure found, with the audit anchor) queued and, if the broker is reachable within
``receipt_timeout_s``, delivered; only then are the state dir and ``/etc/vgw`` removed. An erasure that cannot
be verified (another process holds the outbox open) stops the uninstall with nothing removed.

Raises :class:`~vgw.errors.ConfigError` (bad source/config) and :class:`~vgw.errors.StorageError`
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

from vgw.dbc import shipped_dir
from vgw.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from vgw.config import Config
    from vgw.outbox import Outbox

log = logging.getLogger(__name__)

SERVICE_USER = "vgw"
AGENT_UNIT = "vgw-agent.service"
VCAN_UNIT = "vgw-vcan.service"
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

    def installed_files(self) -> list[Path]:
        return [self.units / AGENT_UNIT, self.units / VCAN_UNIT, self.network / NETWORK_FILE, self.udev / UDEV_RULE]


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
    candidates = [source] if source is not None else [Path(__file__).resolve().parents[1], Path.cwd()]
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


def _is_enabled(unit: str) -> bool:
    proc = subprocess.run(["systemctl", "is-enabled", "--quiet", unit], check=False)
    return proc.returncode == 0


def _ensure_user() -> None:
    import pwd

    try:
        pwd.getpwnam(SERVICE_USER)
        return
    except KeyError:
        pass
    _run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
          "--shell", "/usr/sbin/nologin", "--comment", "vgw agent", SERVICE_USER])


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
    python: str = sys.executable,
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
    plan = Plan(dry_run=dry_run, echo=echo)

    if system:
        plan.step(f"create system user and group {SERVICE_USER} (if missing)", _ensure_user)
    if venv and lay.prefix != Path("/"):
        # A venv records its own path in its scripts: this one would name the staging folder, not /opt/vgw.
        echo(f"note: the venv under {lay.prefix} names that folder and cannot be copied onto a device; to stage an "
             "image use the offline bundle: install.sh --root DIR (make bundle; docs/install-raspberry-pi.md)")
    if venv:
        pip = lay.venv / "bin" / "pip"
        if not (lay.venv / "bin" / "python").exists():
            plan.step(f"{python} -m venv {lay.venv}", lambda: _run([python, "-m", "venv", str(lay.venv)]))
        plan.step(f"{pip} install --upgrade {src}",
                  lambda: _run([str(pip), "install", "--quiet", "--upgrade", str(src)]))
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
    plan.step(f"install {lay.units / VCAN_UNIT} (developers; not enabled)",
              lambda: _copy(src / "systemd" / VCAN_UNIT, lay.units / VCAN_UNIT))
    plan.step(f"install {lay.network / NETWORK_FILE}",
              lambda: _copy(src / "systemd" / NETWORK_FILE, lay.network / NETWORK_FILE))
    plan.step(f"install {lay.udev / UDEV_RULE}", lambda: _copy(src / "systemd" / UDEV_RULE, lay.udev / UDEV_RULE))

    if system:
        plan.step(f"give {lay.etc / 'device.key'} to {SERVICE_USER} (if present)",
                  lambda: _own_key(lay.etc / "device.key"))
        plan.step("systemctl daemon-reload", lambda: _run(["systemctl", "daemon-reload"]))
        plan.step(f"systemctl enable {AGENT_UNIT}", lambda: _run(["systemctl", "enable", AGENT_UNIT]))

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
        plan.step("skip user creation, systemctl and udevadm (not the live system: prefix is not / or "
                  "--no-systemctl)")
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
    from vgw.config import load_config
    from vgw.consent.manager import ConsentManager, load_trust_keys
    from vgw.outbox.erasure import ERASE_WAIT_S
    from vgw.runtime import AgentLock, open_state

    cfg = load_config(config_path)
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
    from vgw.uplink import Uplink

    uplink = Uplink(cfg.mqtt, cfg.device.id, outbox, on_consent=lambda _payload: None,
                    status_payload=lambda: {"device": cfg.device.id, "consent_version": None, "grants": []})
    uplink.start()
    try:
        ok = uplink.drain(timeout_s)
        uplink.publish_offline()
        return ok
    finally:
        uplink.stop()


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
        plan.step(f"systemctl disable --now {AGENT_UNIT} {VCAN_UNIT}",
                  lambda: _run(["systemctl", "disable", "--now", AGENT_UNIT, VCAN_UNIT], check=False))
    state_dirs: list[Path] = [lay.state]
    if purge:
        cfg_path = config or lay.etc / "vgw.toml"
        if cfg_path.exists():
            from vgw.config import load_config

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
