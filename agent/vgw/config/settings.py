"""The agent's configuration file (README "Configuration (TOML)"): TOML in, frozen dataclasses out.

Unknown keys are an error, because a typo must never silently disable a protection. Relative paths are
resolved against the config file's folder. :func:`load_config` raises :class:`~vgw.base.errors.ConfigError`
with a message that names the file, the key and the rule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vgw.base.errors import ConfigError, MissingFileError
from vgw.base.fsutil import MAX_CONFIG_BYTES, load_toml
from vgw.contract.replay import DEFAULT_REPLAY_WINDOW_S as DEFAULT_REPLAY_WINDOW_S
from vgw.contract.replay import MAX_REPLAY_WINDOW_S

DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TOPIC_PREFIX = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")

# Damaged or hostile config files (docs/guarantees.md, "Damaged files"): a ConfigError, never a traceback.
MAX_DURATION_OR_RATE = 1e9  # float settings (seconds, Hz): finite and below threading.TIMEOUT_MAX (~9.2e9 s)
MAX_INTEGER = 2**63 - 1  # integer settings fit a C long and SQLite INTEGER


def _shown(value: Any) -> str:
    """``repr(value)``, cut short: an error message stays one readable line whatever the file holds."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class DeviceConfig:
    id: str
    state_dir: Path
    storage_key: Path


@dataclass(frozen=True)
class CanConfig:
    interface: str
    channel: str | None
    bitrate: int | None
    dbc: tuple[Path, ...]
    signal_map: Path
    dbc_strict: bool = True
    replay: Path | None = None
    replay_rate: float = 1.0
    replay_loop: bool = False
    replay_exit: bool = False
    reopen_s: float = 2.0
    silent_s: float = 10.0  # no frame for this long: the agent warns (log, status); 0 = never
    fd: bool = False  # CAN FD (README "CAN FD"): open the bus in FD mode
    data_bitrate: int | None = None  # FD data-phase bitrate, for interfaces that set it themselves
    j1939_requests: bool = False  # README "SAE J1939": may the agent send request PGN 59904 at all
    j1939_address: int | None = None  # the source address it sends requests from (never claimed)


@dataclass(frozen=True)
class ObdConfig:
    port: str
    transport: str = "elm327"
    baudrate: int | None = None  # None: auto-detect
    protocol: str = "auto"
    interval_s: float = 1.0
    pids: tuple[str, ...] | None = None  # None: auto from the supported-PID bitmaps
    timeout_s: float = 2.0
    can_interface: str | None = None  # isotp transport: python-can interface and channel
    can_channel: str | None = None


DEFAULT_RENEW_BEFORE_DAYS = 30.0
# After each (re)connect, stored batches wait until the retained consent document is taken, or until this
# long after the broker granted the consent subscription without one (README "Topics").
DEFAULT_CONSENT_WAIT_S = 3.0
MAX_CONSENT_WAIT_S = 600.0


@dataclass(frozen=True)
class MqttConfig:
    host: str
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    topic_prefix: str = "vgw"
    keepalive_s: int = 30
    max_inflight: int = 20
    drain_rate: float = 200.0  # backlog batches per second after a reconnect
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    protocol: str = "auto"  # "5", "3.1.1", or "auto": MQTT 5, falling back to 3.1.1 if the broker refuses it
    # Every endpoint of the broker cluster, in the order tried ([mqtt] hosts, README "Configuration (TOML)"); one
    # entry, (host, port), when the config names a single host. host and port are the first endpoint.
    endpoints: tuple[tuple[str, int], ...] = ()
    # How long an acknowledged batch is kept to be re-published after a failover (README "Replay after
    # failover"). None: DEFAULT_REPLAY_WINDOW_S with several endpoints, 0 (delete on PUBACK) with one.
    replay_window_s: float | None = None
    # Renew the client certificate this long before it expires (README "Enrollment"); 0: never.
    renew_before_days: float = 30.0
    # After each (re)connect: how long to wait for the retained consent document before stored batches go out
    # without one (README "Topics").
    consent_wait_s: float = DEFAULT_CONSENT_WAIT_S

    def __post_init__(self) -> None:
        if not self.endpoints:
            object.__setattr__(self, "endpoints", ((self.host, self.port),))
        if self.replay_window_s is None:
            object.__setattr__(self, "replay_window_s",
                               DEFAULT_REPLAY_WINDOW_S if len(self.endpoints) > 1 else 0.0)

    @property
    def replay_window(self) -> float:
        """``replay_window_s`` resolved (never None after construction)."""
        return float(self.replay_window_s or 0.0)


@dataclass(frozen=True)
class ConsentConfig:
    trust_keys: tuple[Path, ...]


@dataclass(frozen=True)
class BatchConfig:
    max_samples: int = 5000  # bigger batches cost less per sample; max_interval_s still bounds latency
    max_interval_s: float = 0.2  # frame-to-PUBACK p99 ~250 ms (docs/performance.md)


@dataclass(frozen=True)
class OutboxConfig:
    quota_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class AgentConfig:
    # Processes that seal batches beside the agent (vgw.daemon.seal_worker): 0 seals in the agent's own process
    # (a one-core device gains nothing from a second process); 1 uses a second core (docs/performance.md
    # "A second core").
    seal_workers: int = 0


@dataclass(frozen=True)
class Config:
    path: Path
    device: DeviceConfig
    mqtt: MqttConfig
    consent: ConsentConfig
    can: CanConfig | None = None
    obd: ObdConfig | None = None
    batch: BatchConfig = field(default_factory=BatchConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    log_level: str | None = None  # [log] level: debug, info, warning, error (re-read on SIGHUP)

    @property
    def state_dir(self) -> Path:
        return self.device.state_dir


class _Section:
    """Reads one TOML table, tracking which keys were used so leftovers can be reported."""

    def __init__(self, path: Path, name: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        self.path = path
        self.name = name
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def _where(self, key: str) -> str:
        return f"{self.path}: [{self.name}] {key}"

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.table:
            if required or default is ...:
                raise ConfigError(f"{self._where(key)}: required key is missing")
            return default
        value = self.table[key]
        # bool is an int in Python; never accept true for a number.
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"{self._where(key)}: expected {_kind_name(kinds)}, got {_shown(value)}")
        if not isinstance(value, kinds):
            raise ConfigError(f"{self._where(key)}: expected {_kind_name(kinds)}, got {_shown(value)}")
        return value

    def path_value(self, key: str, *, required: bool = True, must_exist: bool = True) -> Path | None:
        raw = self.get(key, str, None if not required else ..., required=required)
        if raw is None:
            return None
        return self._resolve(key, raw, must_exist)

    def _resolve(self, key: str, raw: str, must_exist: bool) -> Path:
        if not raw:
            raise ConfigError(f"{self._where(key)}: must not be empty")
        try:
            p = Path(raw).expanduser()
            if not p.is_absolute():
                p = (self.path.parent / p).resolve()
            if must_exist and not p.exists():
                raise MissingFileError(f"{self._where(key)}: file not found: {p}", p)
        except (ValueError, RuntimeError, OSError) as exc:
            # NUL in the path (ValueError), ~unknown-user or a symlink loop (RuntimeError), a name too long.
            raise ConfigError(f"{self._where(key)}: not a usable path: {_shown(raw)}") from exc
        return p

    def path_list(self, key: str, *, must_exist: bool = True) -> tuple[Path, ...]:
        raw = self.get(key, (str, list))
        items = [raw] if isinstance(raw, str) else raw
        if not items:
            raise ConfigError(f"{self._where(key)}: must name at least one file")
        out = []
        for item in items:
            if not isinstance(item, str):
                raise ConfigError(f"{self._where(key)}: expected a list of paths, got {_shown(item)}")
            out.append(self._resolve(key, item, must_exist))
        return tuple(out)

    def number(self, key: str, default: Any, *, minimum: float | None = None, integer: bool = False) -> Any:
        value = self.get(key, (int,) if integer else (int, float), default)
        if value is None:
            return value
        # TOML has inf and nan and integers of any size: a NaN passes every `<` check, an inf sleeps forever.
        if integer and abs(value) > MAX_INTEGER:
            raise ConfigError(f"{self._where(key)}: must be <= {MAX_INTEGER}, got {_shown(value)}")
        if not integer and not (math.isfinite(value) and abs(value) <= MAX_DURATION_OR_RATE):
            raise ConfigError(f"{self._where(key)}: must be a finite number <= {MAX_DURATION_OR_RATE:g}, "
                              f"got {_shown(value)}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self._where(key)}: must be >= {minimum}, got {_shown(value)}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(f"{self.path}: [{self.name}] unknown key {unknown[0]!r} (typo?)")


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


_SECTIONS = {"device", "agent", "can", "obd", "mqtt", "consent", "batch", "outbox", "log"}


def load_config(path: str | Path, *, enrolling: bool = False) -> Config:
    """Load and validate a config file. Raises ConfigError naming the file, key and rule.

    ``enrolling`` (`vgw enroll`): ``[mqtt] cert_file`` and ``key_file`` may be missing (enrollment makes them).
    """
    try:
        path = Path(path).expanduser().resolve()
    except (ValueError, RuntimeError, OSError) as exc:
        raise ConfigError(f"{_shown(str(path))}: not a usable path for a config file") from exc
    try:
        doc = load_toml(path, what="config file", max_bytes=MAX_CONFIG_BYTES, error=ConfigError)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    return config_from_dict(doc, path, enrolling=enrolling)


def config_from_dict(doc: dict[str, Any], path: Path, *, enrolling: bool = False) -> Config:
    unknown = sorted(set(doc) - _SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown section [{unknown[0]}] (expected one of {sorted(_SECTIONS)})")
    for required in ("device", "mqtt", "consent"):
        if required not in doc:
            raise ConfigError(f"{path}: required section [{required}] is missing")
    if "can" not in doc and "obd" not in doc:
        raise ConfigError(f"{path}: no source configured: add a [can] or an [obd] section (or both)")

    device = _device(_Section(path, "device", doc["device"]))
    mqtt = _mqtt(_Section(path, "mqtt", doc["mqtt"]), enrolling=enrolling)
    consent = _consent(_Section(path, "consent", doc["consent"]))
    can = _can(_Section(path, "can", doc["can"])) if "can" in doc else None
    obd = _obd(_Section(path, "obd", doc["obd"])) if "obd" in doc else None
    batch = _batch(_Section(path, "batch", doc.get("batch", {})))
    outbox = _outbox(_Section(path, "outbox", doc.get("outbox", {})))
    agent = _agent(_Section(path, "agent", doc.get("agent", {})))
    log_level = _log_level(_Section(path, "log", doc.get("log", {})))
    return Config(path=path, device=device, mqtt=mqtt, consent=consent, can=can, obd=obd, batch=batch,
                  outbox=outbox, agent=agent, log_level=log_level)


def _agent(s: _Section) -> AgentConfig:
    workers = s.number("seal_workers", AgentConfig.seal_workers, minimum=0, integer=True)
    if workers > 1:
        raise ConfigError(f"{s.path}: [agent] seal_workers {workers}: expected 0 or 1 (one worker keeps up with "
                          "the collector, see docs/performance.md \"A second core\")")
    s.finish()
    return AgentConfig(seal_workers=workers)


def _log_level(s: _Section) -> str | None:
    level: str | None = s.get("level", str, None)
    if level is not None and level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{s.path}: [log] level {level!r}: expected debug, info, warning or error")
    s.finish()
    return level


def _device(s: _Section) -> DeviceConfig:
    dev_id = s.get("id", str)
    if not DEVICE_ID_PATTERN.match(dev_id):
        raise ConfigError(
            f"{s.path}: [device] id {_shown(dev_id)}: use 1-64 letters, digits, '.', '_' or '-' "
            "(it is an MQTT topic segment and client id)"
        )
    state_dir = s.path_value("state_dir", must_exist=False)
    assert state_dir is not None
    storage_key = s.path_value("storage_key", required=False, must_exist=False) or state_dir / "storage.key"
    s.finish()
    return DeviceConfig(id=dev_id, state_dir=state_dir, storage_key=storage_key)


def _can(s: _Section) -> CanConfig:
    interface = s.get("interface", str, "socketcan")
    if interface == "udp_multicast":
        # It sends every frame to the LAN; a vehicle's data must not leave the device that way.
        raise ConfigError(f"{s.path}: [can] interface 'udp_multicast' is not allowed (it sends off the device)")
    channel = s.get("channel", str, None)
    bitrate = s.number("bitrate", None, minimum=1, integer=True)
    dbc = s.path_list("dbc")
    signal_map = s.path_value("signal_map")
    assert signal_map is not None
    dbc_strict = s.get("dbc_strict", bool, True)
    replay = s.path_value("replay", required=False)
    replay_rate = float(s.number("replay_rate", 1.0, minimum=0))
    replay_loop = s.get("replay_loop", bool, False)
    replay_exit = s.get("replay_exit", bool, False)
    reopen_s = float(s.number("reopen_s", 2.0, minimum=0.05))
    silent_s = float(s.number("silent_s", 10.0, minimum=0))
    if replay is None and interface != "virtual" and channel is None and interface not in ("socketcan",):
        raise ConfigError(f"{s.path}: [can] channel: required for interface {interface!r}")
    if replay_loop and replay_exit:
        raise ConfigError(f"{s.path}: [can] replay_loop and replay_exit cannot both be true")
    fd, data_bitrate = _can_fd(s, interface, bitrate)
    j1939_requests = s.get("j1939_requests", bool, False)
    j1939_address = s.get("j1939_address", int, None)
    if j1939_address is not None and not 0 <= j1939_address <= 253:
        raise ConfigError(f"{s.path}: [can] j1939_address: must be 0..253 (254 null, 255 global), got {j1939_address}")
    if j1939_requests and j1939_address is None:
        raise ConfigError(f"{s.path}: [can] j1939_address: required with j1939_requests = true (a free address "
                          "such as 0xF9; the agent never claims one)")
    if j1939_requests and replay is not None:
        raise ConfigError(f"{s.path}: [can] j1939_requests: a replayed trace cannot answer requests")
    s.finish()
    return CanConfig(interface=interface, channel=channel if channel is not None else "can0" if interface ==
                     "socketcan" else channel, bitrate=bitrate, dbc=dbc, signal_map=signal_map,
                     dbc_strict=dbc_strict, replay=replay, replay_rate=replay_rate, replay_loop=replay_loop,
                     replay_exit=replay_exit, reopen_s=reopen_s, silent_s=silent_s, fd=fd,
                     data_bitrate=data_bitrate, j1939_requests=j1939_requests, j1939_address=j1939_address)


# python-can's slcan speaks the CANable 2.0 FD dialect, which knows these data bitrates only.
SLCAN_DATA_BITRATES = (2_000_000, 5_000_000)


def _can_fd(s: _Section, interface: str, bitrate: int | None) -> tuple[bool, int | None]:
    """``fd`` and ``data_bitrate`` (README "CAN FD"): checked here so a bus never opens half-configured."""
    fd = s.get("fd", bool, False)
    data_bitrate = s.number("data_bitrate", None, minimum=1, integer=True)
    if data_bitrate is not None and not fd:
        raise ConfigError(f"{s.path}: [can] data_bitrate: only meaningful with fd = true")
    if data_bitrate is not None and interface == "socketcan":
        # The kernel owns SocketCAN bit timing (`ip link set can0 type can ... dbitrate N fd on`).
        raise ConfigError(f"{s.path}: [can] data_bitrate: SocketCAN takes it from `ip link ... dbitrate`, "
                          "not from vgw; remove it")
    if interface == "slcan" and data_bitrate is not None:
        if data_bitrate not in SLCAN_DATA_BITRATES:
            raise ConfigError(f"{s.path}: [can] data_bitrate {data_bitrate}: an slcan adapter takes "
                              f"{' or '.join(str(r) for r in SLCAN_DATA_BITRATES)}")
        if bitrate is None:
            raise ConfigError(f"{s.path}: [can] bitrate: required with data_bitrate on slcan")
    return fd, data_bitrate


def _obd(s: _Section) -> ObdConfig:
    port = s.get("port", str)
    transport = s.get("transport", str, "elm327")
    if transport not in ("elm327", "isotp"):
        raise ConfigError(f"{s.path}: [obd] transport {transport!r}: expected 'elm327' or 'isotp'")
    baud_raw = s.get("baudrate", (int, str), "auto")
    if isinstance(baud_raw, str):
        if baud_raw != "auto":
            raise ConfigError(f"{s.path}: [obd] baudrate {baud_raw!r}: expected a number or 'auto'")
        baudrate = None
    else:
        if baud_raw <= 0:
            raise ConfigError(f"{s.path}: [obd] baudrate: must be > 0, got {baud_raw}")
        baudrate = baud_raw
    protocol = str(s.get("protocol", (str, int), "auto")).upper()
    if protocol != "AUTO" and not re.fullmatch(r"[1-9A-C]", protocol):
        raise ConfigError(f"{s.path}: [obd] protocol {protocol!r}: expected 'auto' or an ELM327 protocol 1-9, A-C")
    interval_s = float(s.number("interval_s", 1.0, minimum=0.05))
    pids_raw = s.get("pids", (str, list), "auto")
    pids: tuple[str, ...] | None
    if isinstance(pids_raw, str):
        if pids_raw != "auto":
            raise ConfigError(f"{s.path}: [obd] pids {pids_raw!r}: expected a list or 'auto'")
        pids = None
    else:
        if not all(isinstance(p, str) for p in pids_raw):
            raise ConfigError(f"{s.path}: [obd] pids: expected a list of PID names or hex strings")
        pids = tuple(pids_raw)
    timeout_s = float(s.number("timeout_s", 2.0, minimum=0.05))
    can_interface = s.get("can_interface", str, None)
    can_channel = s.get("can_channel", str, None)
    if transport == "isotp" and can_interface is None:
        can_interface = "socketcan"
    s.finish()
    return ObdConfig(port=port, transport=transport, baudrate=baudrate, protocol=protocol.lower() if
                     protocol == "AUTO" else protocol, interval_s=interval_s, pids=pids, timeout_s=timeout_s,
                     can_interface=can_interface, can_channel=can_channel)


def _endpoint(s: _Section, text: Any) -> tuple[str, int]:
    """One ``[mqtt] hosts`` entry: ``"host:port"`` or ``"[v6-address]:port"``. Raises :class:`ConfigError`."""
    where = f"{s.path}: [mqtt] hosts"
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected a list of \"host:port\" strings, got {text!r}")
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535 or any(c.isspace() for c in host):
        raise ConfigError(f"{where}: {text!r}: expected \"host:port\" with a port 1..65535")
    return host, int(port)


def _endpoints(s: _Section) -> tuple[tuple[str, int], ...]:
    """``hosts`` (several endpoints of one cluster) or ``host`` + ``port`` (one); not both (README "Configuration
    (TOML)")."""
    if "hosts" in s.table:
        if "host" in s.table or "port" in s.table:
            raise ConfigError(f"{s.path}: [mqtt] give either hosts = [\"host:port\", ...] or host/port, not both")
        raw = s.get("hosts", list)
        if not raw:
            raise ConfigError(f"{s.path}: [mqtt] hosts: must name at least one \"host:port\"")
        endpoints = tuple(_endpoint(s, item) for item in raw)
        if len(set(endpoints)) != len(endpoints):
            raise ConfigError(f"{s.path}: [mqtt] hosts: an endpoint is listed twice")
        return endpoints
    host = s.get("host", str)
    port = s.number("port", 8883, minimum=1, integer=True)
    if port > 65535:
        raise ConfigError(f"{s.path}: [mqtt] port: must be <= 65535, got {port}")
    return ((host, port),)


def _mqtt(s: _Section, *, enrolling: bool = False) -> MqttConfig:
    endpoints = _endpoints(s)
    host, port = endpoints[0]
    ca_file = s.path_value("ca_file")
    cert_file = s.path_value("cert_file", must_exist=not enrolling)
    key_file = s.path_value("key_file", must_exist=not enrolling)
    assert ca_file and cert_file and key_file
    prefix = s.get("topic_prefix", str, "vgw")
    if not _TOPIC_PREFIX.match(prefix):
        raise ConfigError(f"{s.path}: [mqtt] topic_prefix {prefix!r}: no wildcards, no empty levels")
    keepalive = s.number("keepalive_s", 30, minimum=5, integer=True)
    max_inflight = s.number("max_inflight", 20, minimum=1, integer=True)
    drain_rate = float(s.number("drain_rate", 200.0, minimum=0.1))
    backoff_min = float(s.number("backoff_min_s", 1.0, minimum=0.05))
    backoff_max = float(s.number("backoff_max_s", 60.0, minimum=0.05))
    protocol = str(s.get("protocol", str, "auto"))
    if protocol not in ("auto", "5", "3.1.1"):
        raise ConfigError(f"{s.path}: [mqtt] protocol {protocol!r}: expected 'auto', '5' or '3.1.1'")
    if backoff_max < backoff_min:
        raise ConfigError(f"{s.path}: [mqtt] backoff_max_s must be >= backoff_min_s")
    replay: float | None = None
    if "replay_window_s" in s.table:
        replay = float(s.number("replay_window_s", 0.0, minimum=0.0))
        if replay > MAX_REPLAY_WINDOW_S:
            raise ConfigError(f"{s.path}: [mqtt] replay_window_s: must be <= {MAX_REPLAY_WINDOW_S:g}, got {replay:g}")
    renew_before = float(s.number("renew_before_days", DEFAULT_RENEW_BEFORE_DAYS, minimum=0.0))
    consent_wait = float(s.number("consent_wait_s", DEFAULT_CONSENT_WAIT_S, minimum=0.0))
    if consent_wait > MAX_CONSENT_WAIT_S:
        raise ConfigError(f"{s.path}: [mqtt] consent_wait_s: must be <= {MAX_CONSENT_WAIT_S:g}, got {consent_wait:g}")
    s.finish()
    return MqttConfig(host=host, port=port, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
                      renew_before_days=renew_before,
                      topic_prefix=prefix, keepalive_s=keepalive,
                      max_inflight=max_inflight, drain_rate=drain_rate, backoff_min_s=backoff_min,
                      backoff_max_s=backoff_max, protocol=protocol, endpoints=endpoints, replay_window_s=replay,
                      consent_wait_s=consent_wait)


def _consent(s: _Section) -> ConsentConfig:
    keys = s.path_list("trust_keys")
    s.finish()
    return ConsentConfig(trust_keys=keys)


def _batch(s: _Section) -> BatchConfig:
    max_samples = s.number("max_samples", BatchConfig.max_samples, minimum=1, integer=True)
    max_interval_s = float(s.number("max_interval_s", 0.2, minimum=0.01))
    s.finish()
    return BatchConfig(max_samples=max_samples, max_interval_s=max_interval_s)


def _outbox(s: _Section) -> OutboxConfig:
    quota = s.number("quota_bytes", 64 * 1024 * 1024, minimum=4096, integer=True)
    s.finish()
    return OutboxConfig(quota_bytes=quota)
