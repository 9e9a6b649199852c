"""`vgw dev`: a complete development stack laid out in one directory, kept, started and stopped there.

``init DIR`` writes everything a developer needs to run the agent against their own broker (README "Your own
dev stack"); ``up DIR`` starts the parts in the background; ``down DIR`` stops them. Layout::

    DIR/vgw.toml                  the agent's config (paths relative to it; edit it)
    DIR/vehicle.dbc, signals.toml the vehicle's DBC and signal map (copies of the demo car's; edit them)
    DIR/grants.toml               what the cloud grants (the `vgw cloud sign` grants file, README)
    DIR/pki/                      CA, broker, cloud and device certificates; private keys 0600
    DIR/consent/                  consent signer key (0600) + public key, recipients/<grant>.key (0600) + .pub.json,
                                  current.jws: the consent document `up` pushes (retained)
    DIR/broker/                   mosquitto.conf (mutual TLS on a loopback port chosen at init), acl, db/
    DIR/state/                    the agent's state directory
    DIR/logs/                     broker.log, sim.log, cloud.log, agent.log (appended, kept)
    DIR/cloud/received.jsonl      what the cloud listener received and decrypted (the apps' side)
    DIR/run/                      <part>.pid, can0 and can1: links to the simulator's two SLCAN ptys
                                  (the agent reads can0; `vgw monitor` reads can1: a pty has one reader)
    DIR/service/                  after ``up --service``: the owner's consent service's service.toml, database,
                                  owner-password and apps.json (0600)

One signer per car: the device's consent document is signed either from grants.toml (the default) or, after
``up --service``, by the owner's consent service alone (docs/consent-service.md), until ``up --no-service``.
Which one is kept in stack.json (``"consent"``) and every ``up`` keeps to it; each hand-over signs a version
above every one either signer made, so the car's version floor never locks the new signer out.

Every part is a plain process with a pid file; ``down`` stops only processes whose command line names DIR.
Before ``up`` starts anything, the whole folder is held to the state directory's rules (docs/guarantees.md):
owned by one user, writable by nobody else, no symbolic link but the simulator's run/can0 and run/can1. Run
as root on a folder another user owns, every part runs as that user (mosquitto too: it reads the 0600 keys),
and what ``up`` writes there is given to that user.
Errors: :class:`~vgw.base.errors.ConfigError` for a directory that is not a stack (or already is one for
``init``), :class:`~vgw.base.errors.VgwError` when a part does not start (the message names its log).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vgw.base.errors import ConfigError, VgwError
from vgw.base.fsutil import Account, acting_for, atomic_write
from vgw.tools import devstack_service

DEFAULT_DEVICE = "dev-car-01"
STACK_FILE = "stack.json"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
PARTS = ("broker", "sim", "cloud", "service", "agent")  # started in this order, stopped in the reverse one
LINKS_ALLOWED = ("run/can0", "run/can1")  # the simulator's pty links: the only links a stack holds
# The demo's two apps: one fleet operator (location coarsened on the car), one insurer.
GRANTS_TOML = """# What the cloud grants this device: the grants file of `vgw cloud sign` (README "The grants file").
# `vgw dev up` signs it into consent/current.jws and pushes it; after an edit run `vgw dev up` again
# (or sign and push yourself, README). After `vgw dev up --service` the owner's consent service alone signs
# the car's consent and this file is not pushed, until `vgw dev up --no-service` (README "One signer per car").
ttl_s = 86400                       # the document expires this long after it is signed

[[grant]]
id = "g-fleet"
controller = "com.example.fleet"
purpose = "fleet-maintenance"
scopes = ["read_odometer", "read_fuel", "read_tires", "read_location"]
recipient = "consent/recipients/g-fleet.pub.json"
limits = { read_location = { max_hz = 0.5, precision_m = 500 } }

[[grant]]
id = "g-insurer"
controller = "com.example.insurer"
purpose = "usage-based-insurance"
scopes = ["read_speedometer", "read_odometer", "read_battery"]
recipient = "consent/recipients/g-insurer.pub.json"
retention_s = 86400
"""


@dataclass(frozen=True)
class Stack:
    """The files of one dev stack directory."""

    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "vgw.toml"

    def pid_file(self, part: str) -> Path:
        return self.dir / "run" / f"{part}.pid"

    def log(self, part: str) -> Path:
        return self.dir / "logs" / f"{part}.log"

    @property
    def can_links(self) -> tuple[Path, Path]:
        return self.dir / "run" / "can0", self.dir / "run" / "can1"

    def info(self) -> dict[str, object]:
        try:
            data = json.loads((self.dir / STACK_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.dir}: not a vgw dev stack (run `vgw dev init {self.dir}` first)") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{self.dir / STACK_FILE}: not a dev stack description")
        return data


# ---------------------------------------------------------------- init


def init(directory: Path, *, device: str = DEFAULT_DEVICE, trace: Path | None = None,
         progress: Callable[[str], None] = lambda _m: None) -> Stack:
    """Lay out a new dev stack in ``directory`` (created; an existing stack is refused, nothing overwritten).

    ``trace``: the agent replays this trace (copied in, looped) instead of reading the simulator's pty.
    Raises :class:`ConfigError` for an existing stack, a bad device id or trace, a directory it cannot write.
    """
    stack = Stack(directory.expanduser().absolute())
    try:
        return _init(stack, device, trace, progress)
    except OSError as exc:
        raise ConfigError(f"{stack.dir}: cannot lay out a dev stack here: {exc.strerror or exc}") from exc


def _init(stack: Stack, device: str, trace: Path | None, progress: Callable[[str], None]) -> Stack:
    from vgw_sim.broker import free_port
    from vgw_sim.paths import default_dbc, default_signal_map
    from vgw_sim.pki import TestPKI

    from vgw.cloud.cloudkit import keygen, load_grants, load_signing_key, sign_documents
    from vgw.config.settings import DEVICE_ID_PATTERN

    if (stack.dir / STACK_FILE).exists() or stack.config.exists():
        raise ConfigError(f"{stack.dir}: already holds a dev stack (or a vgw.toml); pick another directory")
    if not DEVICE_ID_PATTERN.match(device):
        raise ConfigError(f"--device-id {device!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if trace is not None:
        from vgw_sim.can_play import check_trace

        check_trace(trace)
    stack.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(stack.dir, 0o700)  # it holds private keys and the agent's state
    for sub in ("logs", "run", "state", "cloud", "broker"):
        (stack.dir / sub).mkdir(mode=0o700, exist_ok=True)
    TestPKI(stack.dir / "pki", devices=[device], ca_name="vgw dev CA", days=365, key_mode=0o600)
    os.chmod(stack.dir / "pki", 0o700)
    progress("PKI: CA, broker, cloud and device certificates (private keys 0600) in pki/")
    keygen(stack.dir / "consent", ["g-fleet", "g-insurer"])
    progress("consent signer key and one HPKE recipient key per app in consent/")
    (stack.dir / "grants.toml").write_text(GRANTS_TOML)
    shutil.copyfile(default_dbc(), stack.dir / "vehicle.dbc")
    shutil.copyfile(default_signal_map(), stack.dir / "signals.toml")
    if trace is not None:
        shutil.copyfile(trace, stack.dir / f"trace{trace.suffix}")
    port = free_port()
    (stack.dir / "vgw.toml").write_text(_agent_config(stack, device, port, trace))
    (stack.dir / STACK_FILE).write_text(json.dumps({"device": device, "port": port,
                                                    "source": "trace" if trace else "slcan"}, indent=2) + "\n")
    key = load_signing_key(stack.dir / "consent" / "consent-signer.key")
    token = sign_documents(key, load_grants(stack.dir / "grants.toml"), [device])[device]
    (stack.dir / "consent" / "current.jws").write_text(token + "\n")
    progress(f"agent config vgw.toml (device {device}, broker 127.0.0.1:{port}), grants.toml, consent/current.jws")
    return stack


def _agent_config(stack: Stack, device: str, port: int, trace: Path | None) -> str:
    if trace is None:
        source = f"""interface = "slcan"
channel = "{stack.can_links[0]}"   # `vgw dev up` links it to the simulator's SLCAN pty
bitrate = 500000"""
    else:
        source = f"""interface = "virtual"             # unused: the agent replays the trace below
replay = "trace{trace.suffix}"
replay_loop = true"""
    return f"""# The agent's config of a vgw dev stack (README "Your own dev stack"). Paths are relative to this file.
[device]
id = "{device}"
state_dir = "state"

[can]
{source}
dbc = ["vehicle.dbc"]
signal_map = "signals.toml"
silent_s = 10.0                 # warn when the bus delivers no frame for this long

[mqtt]
host = "localhost"
port = {port}
ca_file = "pki/ca.crt"
cert_file = "pki/{device}.crt"
key_file = "pki/{device}.key"
backoff_max_s = 5.0

[consent]
trust_keys = ["consent/consent-signer.pub.pem"]

[batch]
max_interval_s = 0.5
"""


def _broker_config(stack: Stack, port: int, owner: Account) -> str:
    from vgw_sim.broker import device_acl

    acl = stack.dir / "broker" / "acl"
    _write(acl, device_acl("vgw", cloud_user="cloud").encode(), 0o600, owner)
    db = stack.dir / "broker" / "db"
    db.mkdir(mode=0o700, exist_ok=True)
    _own(db, owner)
    pki = stack.dir / "pki"
    # Started as root, mosquitto would drop to the `mosquitto` user, which cannot read the 0600 keys: it runs
    # as the owner of this directory instead. It is started as that user already when `up` runs as root on
    # another user's folder, and `user` is ignored without root; an owner with no name gets no line.
    name = _user_name(owner.uid)
    return "\n".join([
        "# written by `vgw dev up`: a private broker with mutual TLS and the per-device ACL (README \"Topics\")",
        f"user {name}" if name else f"# runs as uid {owner.uid}, the owner of this folder",
        "per_listener_settings false",
        "allow_anonymous false",
        f"listener {port} 127.0.0.1",
        f"cafile {pki / 'ca.crt'}",
        f"certfile {pki / 'server.crt'}",
        f"keyfile {pki / 'server.key'}",
        "require_certificate true",
        "use_identity_as_username true",
        "tls_version tlsv1.2",
        f"acl_file {acl}",
        "persistence true",
        f"persistence_location {db}/",
        "log_dest stderr",
        "log_timestamp true",
        "connection_messages true",
    ]) + "\n"


def _write(path: Path, data: bytes, mode: int, owner: Account) -> None:
    """Write a stack file crash-safely (never through a link), owned by the folder's owner: the parts, run as that
    owner, read it as soon as they start."""
    atomic_write(path, data, mode=mode)
    _own(path, owner)


def _own(path: Path, owner: Account) -> None:
    if os.geteuid() == 0 and owner.uid != 0:
        os.chown(path, owner.uid, owner.gid, follow_symlinks=False)


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def check_stack(stack: Stack) -> Account:
    """Hold the whole stack folder to the state directory's rules before anything starts; return its owner.

    The folder is a directory (not a link) owned by the running user, or, run as root, by any one user (the
    parts then run as that user); nobody else may write to it; every entry below it has the same owner and is
    no symbolic link, but for the simulator's pty links. Raises ConfigError naming the path and the rule.
    """
    try:
        top = os.lstat(stack.dir)
    except OSError as exc:
        raise ConfigError(f"{stack.dir}: cannot check the stack folder: {exc.strerror}") from exc
    if stat.S_ISLNK(top.st_mode) or not stat.S_ISDIR(top.st_mode):
        raise ConfigError(f"{stack.dir}: the stack folder is a symbolic link or not a directory; refused")
    me = os.geteuid()
    if top.st_uid != me and me != 0:
        raise ConfigError(f"{stack.dir}: owned by uid {top.st_uid}, not by the running user (uid {me}); refused "
                          "(run `vgw dev up` as its owner)")
    if top.st_mode & 0o022:
        raise ConfigError(f"{stack.dir}: writable by group or others (mode {stat.S_IMODE(top.st_mode):o}); "
                          "refused (chmod 700 it after checking its content)")
    for folder, dirs, files, dir_fd in os.fwalk(stack.dir, follow_symlinks=False):
        for name in (*dirs, *files):
            rel = os.path.relpath(os.path.join(folder, name), stack.dir)
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode) and rel not in LINKS_ALLOWED:
                raise ConfigError(f"{stack.dir}: holds a symbolic link ({rel}); refused (a stack's files are never "
                                  "followed: remove it)")
            if st.st_uid != top.st_uid:
                raise ConfigError(f"{stack.dir}: {rel} is owned by uid {st.st_uid}, not by the folder's owner "
                                  f"(uid {top.st_uid}); refused")
    return Account(top.st_uid, top.st_gid, _user_name(top.st_uid))


@dataclass(frozen=True)
class _Credentials:
    """Popen's user, group and extra_groups: all None to run a part as ourselves."""

    user: int | None = None
    group: int | None = None
    extra_groups: list[int] | None = None


def _as_owner(owner: Account) -> _Credentials:
    """How to run a part as ``owner`` when root starts it on another user's folder (else as ourselves)."""
    if os.geteuid() != 0 or owner.uid == 0:
        return _Credentials()
    return _Credentials(owner.uid, owner.gid, os.getgrouplist(owner.name, owner.gid) if owner.name else [])


def _check_owner_runs_python(stack: Stack, owner: Account) -> None:
    """Root starting another user's stack: that user must be able to run this interpreter and vgw from the
    stack folder, or the parts would fail one by one after the broker started. Raises ConfigError."""
    who = _as_owner(owner)
    if who.user is None:
        return
    try:
        proc = subprocess.run([sys.executable, "-c", "import vgw.cli"], cwd=stack.dir, capture_output=True,
                              timeout=60, check=False, user=who.user, group=who.group, extra_groups=who.extra_groups)
        ok = proc.returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    if not ok:
        raise ConfigError(f"{sys.executable} cannot be run by the stack's owner (uid {owner.uid}) from {stack.dir} "
                          "(an interpreter in a folder only root may enter, such as a pyenv under /root?); run "
                          "`vgw dev up` as that user, or from a venv it can run")


# ---------------------------------------------------------------- processes


def _pid(stack: Stack, part: str) -> int | None:
    """The pid of ``part`` if it runs and is ours (its command line names the stack directory)."""
    try:
        pid = int(stack.pid_file(part).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return pid if str(stack.dir) in cmdline and status != "Z" else None


def _spawn(stack: Stack, part: str, argv: list[str], owner: Account) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Never through a link (check_stack refused them; O_NOFOLLOW holds if one appears since).
    fd = os.open(stack.log(part), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if os.geteuid() == 0 and owner.uid != 0:
        os.fchown(fd, owner.uid, owner.gid)
    with os.fdopen(fd, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} vgw dev up: starting {part}\n".encode())
        log.flush()
        who = _as_owner(owner)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=stack.dir,
                                env=env, start_new_session=True, close_fds=True, user=who.user, group=who.group,
                                extra_groups=who.extra_groups)
    _write(stack.pid_file(part), f"{proc.pid}\n".encode(), 0o644, owner)
    return proc


def _wait(stack: Stack, part: str, proc: subprocess.Popen[bytes], ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise VgwError(f"{part} exited with code {proc.returncode} during start: see {stack.log(part)}")
        if ready():
            return
        time.sleep(0.05)
    raise VgwError(f"{part} not ready after {START_TIMEOUT_S:.0f} s: see {stack.log(part)}")


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def _log_has(stack: Stack, part: str, offset: int, text: str) -> bool:
    with open(stack.log(part), "rb") as fh:
        fh.seek(offset)
        return text.encode() in fh.read()


def _agent_connected(stack: Stack) -> bool:
    try:
        return json.loads((stack.dir / "state" / "status.json").read_text()).get("link") == "connected"  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return False


def up(directory: Path, *, service: bool | None = None, progress: Callable[[str], None] = lambda _m: None) -> Stack:
    """Start broker, simulator (unless the agent replays a trace), cloud listener, the owner's consent service
    (when it signs the car's consent) and agent in the background; push the consent document. Parts already
    running are left alone. On a failure what this call started is stopped again.

    ``service``: True hands the car's consent to the consent service, False gives it back to grants.toml, None
    keeps the stack's choice (stack.json ``"consent"``). Raises :class:`ConfigError` (also for ``True`` without
    the ``service`` extra, before anything starts) / :class:`VgwError`."""
    stack = Stack(directory.expanduser().absolute())
    info = stack.info()
    owner = check_stack(stack)  # before anything starts
    if service or (service is None and info.get("consent") == "service"):
        from vgw.tools.service_play import service_missing

        missing = service_missing()
        if missing is not None:
            raise ConfigError(f"{stack.dir}: the owner's consent service needs its extra: pip install 'vgw[service]' "
                              f"({missing} missing)")
    _check_owner_runs_python(stack, owner)
    with acting_for(owner, stack.dir):  # what root writes here goes to the folder's owner
        return _up(stack, info, owner, service, progress)


def _up(stack: Stack, info: dict[str, object], owner: Account, service: bool | None,
        progress: Callable[[str], None]) -> Stack:
    from vgw_sim.broker import MosquittoNotFound, find_mosquitto

    port = int(str(info["port"]))
    device = str(info["device"])
    was = "service" if info.get("consent") == "service" else "grants"
    signer = was if service is None else ("service" if service else "grants")
    py = [sys.executable, "-m", __name__.split(".")[0]]
    started: list[str] = []
    try:
        if _pid(stack, "broker") is None:
            if _listening(port):
                raise VgwError(f"port {port} of this stack is taken by another program (edit port in "
                               f"{stack.config} and {stack.dir / STACK_FILE})")
            conf = stack.dir / "broker" / "mosquitto.conf"
            _write(conf, _broker_config(stack, port, owner).encode(), 0o600, owner)
            offset = stack.log("broker").stat().st_size if stack.log("broker").exists() else 0
            try:
                binary = find_mosquitto()
            except MosquittoNotFound as exc:
                raise VgwError(str(exc)) from exc
            proc = _spawn(stack, "broker", [binary, "-c", str(conf)], owner)
            started.append("broker")
            _wait(stack, "broker", proc, lambda: _log_has(stack, "broker", offset, " running") and _listening(port))
            progress(f"broker: mosquitto on 127.0.0.1:{port} (mutual TLS), log logs/broker.log")
        if info.get("source") == "slcan" and _pid(stack, "sim") is None:
            links = stack.can_links
            for link in links:
                with contextlib.suppress(FileNotFoundError):
                    link.unlink()
            proc = _spawn(stack, "sim", [*py, "sim", "can", "--dbc", str(stack.dir / "vehicle.dbc"),
                                         "--link", str(links[0]), "--link", str(links[1])], owner)
            started.append("sim")
            _wait(stack, "sim", proc, lambda: all(os.path.lexists(p) for p in links))
            progress("simulator: SLCAN ptys run/can0 (agent) and run/can1 (vgw monitor), log logs/sim.log")
        pki = stack.dir / "pki"
        broker_opts = ["--broker", f"127.0.0.1:{port}", "--ca", str(pki / "ca.crt"), "--cert",
                       str(pki / "cloud.crt"), "--tls-key", str(pki / "cloud.key")]
        if _pid(stack, "cloud") is None:
            offset = stack.log("cloud").stat().st_size if stack.log("cloud").exists() else 0
            proc = _spawn(stack, "cloud", [*py, "cloud", "listen", *broker_opts, "--recipient",
                                           str(stack.dir / "consent"), "--device-cert", str(pki / f"{device}.crt"),
                                           "--out", str(stack.dir / "cloud" / "received.jsonl")], owner)
            started.append("cloud")
            _wait(stack, "cloud", proc, lambda: _log_has(stack, "cloud", offset, "subscribed"))
            progress("cloud listener: decrypts what the apps receive into cloud/received.jsonl")
        if signer == "grants":
            floor = None
            if was == "service":
                # Given back: the service stops first (it signs nothing more), and grants.toml is signed above
                # every version the service made, whatever the car holds of them.
                _stop(stack, "service")
                floor = devstack_service.latest_version(stack.dir, device)
            pushed = _push_consent(stack, device, broker_opts, floor=floor, force=was == "service")
            if was == "service":
                _set_signer(stack, info, "grants", owner)
                progress(f"consent: given back to grants.toml: signed (v{pushed.ver}) and pushed (retained); the "
                         "consent service is stopped and signs nothing for this car until `vgw dev up --service`")
            elif pushed.held_newer is not None:
                progress(f"consent: not pushed: the device holds v{pushed.held_newer}, newer than consent/current.jws "
                         "(signed and pushed by hand); edit grants.toml and run `vgw dev up` again to replace it")
            elif pushed.signed:
                progress(f"consent: grants.toml signed (v{pushed.ver}) and pushed (retained) to the device's consent "
                         "topic")
            else:
                progress(f"consent: grants.toml unchanged; consent/current.jws (v{pushed.ver}) pushed again (retained) "
                         "to the device's consent topic")
        else:
            _serve_consent(stack, info, owner, was, broker_opts, py, started, progress)
        if _pid(stack, "agent") is None:
            proc = _spawn(stack, "agent", [*py, "run", "--config", str(stack.config)], owner)
            started.append("agent")
            _wait(stack, "agent", proc, lambda: _agent_connected(stack))
            progress(f"agent: {device} connected, log logs/agent.log, state in state/")
    except BaseException:
        for part in reversed(started):
            _stop(stack, part)
        raise
    return stack


def _set_signer(stack: Stack, info: dict[str, object], signer: str, owner: Account) -> None:
    """Record which one signs the car's consent (stack.json ``"consent"``): every later `up` keeps to it."""
    info = {**info, "consent": signer}
    _write(stack.dir / STACK_FILE, (json.dumps(info, indent=2) + "\n").encode(), 0o644, owner)


def _serve_consent(stack: Stack, info: dict[str, object], owner: Account, was: str, broker_opts: list[str],
                   py: list[str], started: list[str], progress: Callable[[str], None]) -> None:
    """The consent service signs the car's consent: hand it over if grants.toml signed until now, start the
    service unless it runs, print its pages. Appends to ``started`` what it started."""
    device = str(info["device"])

    def write(path: Path, data: bytes, mode: int) -> None:
        _write(path, data, mode, owner)

    if was == "grants":
        ver, token = devstack_service.hand_over(
            stack.dir, device, int(str(info["port"])), held=_held_versions(stack),
            publish=lambda tok: _publish(broker_opts, device, tok), write=write)
        atomic_write(stack.dir / "consent" / "current.jws", (token + "\n").encode(), mode=0o644)
        for path in [stack.dir / "service", *(stack.dir / "service").iterdir()]:  # what this process created,
            _own(path, owner)  # for the service, which runs as the folder's owner (root's acting_for gives it later)
        _set_signer(stack, info, "service", owner)
        progress(f"consent: handed to the owner's consent service, which alone signs {device}'s consent from now "
                 "on (grants.toml is not pushed; `vgw dev up --no-service` gives it back)")
        progress(f"consent: the service signed v{ver} with the grants owners allowed on it and pushed it (retained): "
                 "the car stops what grants.toml granted and erases what it holds of it")
    elif (stack.dir / "grants.toml").stat().st_mtime > (stack.dir / "consent" / "current.jws").stat().st_mtime:
        progress("consent: grants.toml changed but not signed: the consent service signs this car's consent (allow "
                 "and withdraw on its pages, or `vgw dev up --no-service` to sign grants.toml again)")
    url = devstack_service.service_url(stack.dir)
    if _pid(stack, "service") is None:
        offset = stack.log("service").stat().st_size if stack.log("service").exists() else 0
        proc = _spawn(stack, "service", [*py, "cloud", "serve", "--config",
                                         str(devstack_service.config_path(stack.dir))], owner)
        started.append("service")
        _wait(stack, "service", proc, lambda: _log_has(stack, "service", offset, "listening on"))
    progress(f"consent service: {url}/ (the owner's page: sign in as {devstack_service.OWNER}, password in "
             "service/owner-password), log logs/service.log")
    for client_id, ask in devstack_service.ask_urls(stack.dir, write).items():
        progress(f"  {client_id} asks (open it, sign in, Allow): {ask}")


def _held_versions(stack: Stack) -> list[tuple[int, str]]:
    """(version, token) of the documents this stack's signer made that the car may hold: consent/current.jws and
    the device's own copy (state/consent.jws); unreadable ones are left out."""
    from vgw.cloud.cloudkit import CloudKitError, load_signing_key, read_document
    from vgw.config.settings import load_config

    key = load_signing_key(stack.dir / "consent" / "consent-signer.key")
    out = []
    paths = [stack.dir / "consent" / "current.jws"]
    with contextlib.suppress(ConfigError):
        paths.append(load_config(stack.config).state_dir / "consent.jws")
    for path in paths:
        try:
            claims = read_document(path, key)
            out.append((int(claims["ver"]), path.read_text().strip()))
        except (CloudKitError, OSError):
            continue
    return out


def _publish(broker_opts: list[str], device: str, token: str) -> None:
    """Publish ``token`` retained at QoS 1 on the device's consent topic as the cloud identity; PUBACK awaited."""
    from vgw.cloud.cloudlink import BrokerOptions, CloudLink

    opts = dict(zip(broker_opts[::2], broker_opts[1::2], strict=True))
    host, port = BrokerOptions.parse_address(opts["--broker"])
    link = CloudLink(BrokerOptions(host=host, port=port, ca_file=Path(opts["--ca"]), cert_file=Path(opts["--cert"]),
                                   key_file=Path(opts["--tls-key"]), client_id=f"vgw-dev-up-{os.getpid()}")).connect()
    try:
        link.publish(f"vgw/{device}/consent", token.encode())
    finally:
        link.close()


@dataclass(frozen=True)
class _Pushed:
    """What :func:`_push_consent` did, so `up` says exactly that: signed anew or not, or not pushed at all."""

    ver: int | None  # the version published (None: nothing published)
    signed: bool  # True: grants.toml was signed now into a new version
    held_newer: int | None = None  # the device holds this newer version: nothing published


def _push_consent(stack: Stack, device: str, broker_opts: list[str], *, floor: int | None = None,
                  force: bool = False) -> _Pushed:
    """Sign grants.toml afresh (a newer version) when it changed since current.jws, then publish, retained.

    When grants.toml is unchanged and the device already holds a newer document (one signed and pushed by
    hand, README "Your own dev stack"), nothing is published: re-publishing current.jws would replace the
    broker's retained document with an older one, which a device starting afresh would then take (a revoked
    grant back in force). ``force``: sign anew in any case, above ``floor`` and every version the car may hold
    (the consent service gives the car's consent back). Says which of these it did."""
    from vgw.cloud.cloudkit import (
        CloudKitError,
        default_version,
        load_grants,
        load_signing_key,
        read_document,
        sign_documents,
    )
    from vgw.config.settings import load_config

    grants, current = stack.dir / "grants.toml", stack.dir / "consent" / "current.jws"
    key = load_signing_key(stack.dir / "consent" / "consent-signer.key")
    desc = load_grants(grants)
    claims = read_document(current, key)
    signed = False
    if force:
        above = max([floor or 0, *(v for v, _t in _held_versions(stack))])
        next_ver = max(default_version(), above + 1, int(desc.get("ver") or 0))
        atomic_write(current, (sign_documents(key, desc, [device], ver=next_ver)[device] + "\n").encode(), mode=0o644)
        signed = True
    elif grants.stat().st_mtime > current.stat().st_mtime:
        atomic_write(current, (sign_documents(key, desc, [device])[device] + "\n").encode(), mode=0o644)
        signed = True
    else:
        try:
            held = read_document(load_config(stack.config).state_dir / "consent.jws", key)["ver"]
        except (CloudKitError, ConfigError):
            held = None  # no document on the device yet, or one this stack's signer did not sign
        if isinstance(held, int) and held > claims["ver"]:
            return _Pushed(None, signed=False, held_newer=held)
        if claims.get("exp", 0) < time.time() + 3600:
            atomic_write(current, (sign_documents(key, desc, [device])[device] + "\n").encode(), mode=0o644)
            signed = True  # the same grants, signed anew because the old document was about to expire
    ver = read_document(current, key).get("ver")
    _publish(broker_opts, device, current.read_text().strip())
    return _Pushed(ver if isinstance(ver, int) else None, signed=signed)


def _stop(stack: Stack, part: str) -> bool:
    """SIGTERM ``part`` (SIGKILL after STOP_TIMEOUT_S) and remove its pid file. True if it was running."""
    pid = _pid(stack, part)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _pid(stack, part) is not None and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.05)
        if _pid(stack, part) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _reap(pid)
    with contextlib.suppress(FileNotFoundError):
        stack.pid_file(part).unlink()
    return pid is not None


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def down(directory: Path, *, progress: Callable[[str], None] = lambda _m: None) -> Stack:
    """Stop every part of the stack (agent first, broker last). Raises :class:`ConfigError` for no stack."""
    stack = Stack(directory.expanduser().absolute())
    stack.info()
    for part in reversed(PARTS):
        if _stop(stack, part):
            progress(f"{part}: stopped")
    return stack


def parts(stack: Stack) -> tuple[str, ...]:
    """The parts this stack runs (no simulator when the agent replays a trace, the consent service only while it
    signs the car's consent)."""
    info = stack.info()
    return tuple(p for p in PARTS if (p != "sim" or info.get("source") == "slcan")
                 and (p != "service" or info.get("consent") == "service"))


def status(directory: Path) -> dict[str, int | None]:
    """Part -> pid while it runs, else None, for the parts this stack runs. Raises :class:`ConfigError` for no
    stack."""
    stack = Stack(directory.expanduser().absolute())
    return {part: _pid(stack, part) for part in parts(stack)}
