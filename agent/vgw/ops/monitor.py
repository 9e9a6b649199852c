"""`vgw monitor`: a live view of the mapped signals and of what the consent in force does with each.

Like ``cantools monitor``, but from the agent's own point of view: for every signal the signal map names, its
latest value with the DBC's unit, its rate, and whether the consent in force sends it (to which grant, within
which limits) or holds it back. It changes nothing and sends nothing:

- it opens the CAN source of the config itself, read-only (a SocketCAN interface has any number of readers;
  a serial SLCAN adapter or pty has one, so a source another process holds open is refused with what to do
  instead; a replayed trace is read again from its file);
- it decodes only mapped signals (README "Configuration": an unmapped signal is never decoded), with the
  agent's decoder;
- it reads the consent in force from the state directory read-only, re-verified like the agent does, and
  follows it while it runs (an applied or revoked document shows within a second);
- values go to the terminal only, never to a log; it refuses to run where stdout is the systemd journal.

:class:`MonitorModel` is the pure part (frames and a consent in, rows out); :func:`run_monitor` the loop.
Errors: :class:`~vgw.base.errors.ConfigError` (no [can] section, a source already in use, running under systemd),
:class:`~vgw.base.errors.SourceOpenError` when the source cannot be opened.
"""

from __future__ import annotations

import collections
import os
import select
import shutil
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from vgw.base.errors import ConfigError, SourceError, SourceFrameError
from vgw.config.settings import CanConfig, Config
from vgw.contract.consent.model import Consent, version_text
from vgw.pipeline.catalogue import Catalogue, SignalSpec, load_catalogue
from vgw.pipeline.decoder import MessageDecoder
from vgw.pipeline.j1939 import ids as j1939
from vgw.pipeline.j1939.transport import Reassembler
from vgw.sources.serialport import holders

RATE_WINDOW_S = 5.0
_CONSENT_MIN = 24  # characters of the CONSENT column kept in view: "sent: g-fleet, g-insurer"
_UNIT_MAX, _UNIT_MAX_NARROW = 10, 5  # characters of a DBC unit shown ("km/h", "degC", "rpm"), wide and narrow
_CLEAR = "\x1b[H\x1b[2J"
_SERIAL_INTERFACES = {"slcan", "serial", "seeedstudio", "robotell", "slcan_pty"}


@dataclass
class _Row:
    spec: SignalSpec
    unit: str = ""  # the DBC's unit of the signal, as `cantools monitor` shows it
    value: Any = None
    seen: collections.deque[float] | None = None
    parts: list[bytes | None] | None = None


class MonitorModel:
    """Latest value and rate per mapped path, and the consent verdict per scope. Owned by one thread."""

    def __init__(self, catalogue: Catalogue, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.rows: dict[str, _Row] = {}
        # Keyed like the agent's router: exact (id, extended), or a J1939 route key (PGN and source, README
        # "SAE J1939"); a mapped message longer than 8 bytes arrives by J1939 transport protocol and is
        # reassembled as the agent does (vgw.pipeline.j1939.transport).
        wanted: dict[tuple[int, bool], list[tuple[str, object]]] = {}
        message_of: dict[tuple[int, bool], int] = {}
        for spec in catalogue.specs:
            message = catalogue.messages[spec.frame_id]
            unit = "" if spec.parts is not None else (message.get_signal_by_name(spec.signal).unit or "")
            row = self.rows.setdefault(spec.path, _Row(spec, unit=unit, seen=collections.deque()))
            if spec.parts is not None:
                row.parts = [None] * spec.parts
            key = ((j1939.message_key(message, spec.source_address), True) if j1939.is_j1939(message)
                   else (spec.frame_id, bool(message.is_extended_frame)))
            message_of[key] = spec.frame_id
            wanted.setdefault(key, []).append((spec.signal, spec))
        j1939.widen(wanted)
        self.j1939 = any(j1939.is_j1939(m) for m in catalogue.messages.values())
        self.decoders = {key: MessageDecoder(catalogue.messages[message_of[key]], signals)
                         for key, signals in wanted.items()}
        long = any(j1939.is_route_key(k) and catalogue.messages[message_of[(k, ext)]].length > 8
                   for k, ext in wanted)
        self.reassembler = Reassembler() if long else None
        self.frames = 0
        self.started = clock()
        self.consent: Consent | None = None
        self.expired = False

    def feed(self, arbitration_id: int, data: bytes, is_extended: bool) -> None:
        """Decode one frame's mapped signals."""
        self.frames += 1
        decoder = self.decoders.get((arbitration_id, is_extended))
        if decoder is None and is_extended and self.j1939:
            if self.reassembler is not None and j1939.parse(arbitration_id).pgn in (j1939.PGN_TP_CM,
                                                                                     j1939.PGN_TP_DT):
                transfer = self.reassembler.feed(arbitration_id, data, self.clock())
                if transfer is None:
                    return
                arbitration_id = j1939.make_id(transfer.pgn, transfer.source, destination=transfer.destination)
                data = transfer.data
            decoder = (self.decoders.get((j1939.route_key(arbitration_id), True))
                       or self.decoders.get((j1939.any_source_key(arbitration_id), True)))
        if decoder is None:
            return
        now = self.clock()
        values, _short = decoder.decode(data)
        for key, value in values:
            spec: SignalSpec = key  # type: ignore[assignment]  # the keys given to the decoder
            row = self.rows[spec.path]
            if row.parts is not None:
                try:
                    row.parts[spec.part or 0] = int(value).to_bytes(spec.byte_len, "big")
                except (OverflowError, ValueError):
                    continue
                if spec.part != len(row.parts) - 1 or any(p is None for p in row.parts):
                    continue
                row.value = b"".join(p for p in row.parts if p is not None).rstrip(b"\0").decode("ascii", "replace")
                row.parts = [None] * len(row.parts)
            else:
                row.value = value
            assert row.seen is not None
            row.seen.append(now)

    def rate(self, path: str) -> float:
        """Samples per second of ``path`` over the last RATE_WINDOW_S."""
        seen = self.rows[path].seen
        assert seen is not None
        now = self.clock()
        while seen and seen[0] < now - RATE_WINDOW_S:
            seen.popleft()
        # Over the window, or over the time since the view started while it is younger than that.
        return len(seen) / max(min(RATE_WINDOW_S, now - self.started), 0.5)

    def verdict(self, scope: str) -> str:
        """What the consent in force does with a sample of ``scope``: ``sent: <grant> (limits)`` or ``held: why``."""
        if self.consent is None:
            return "held: no consent in force"
        if self.expired:
            return f"held: consent v{self.consent.ver} expired"
        sent = []
        for g in self.consent.grants:
            if scope in g.scopes:
                lim = g.limits_for(scope)
                notes = ([f"<= {lim.max_hz:g} Hz"] if lim.max_hz else []) + (
                    [f"{lim.precision_m:g} m grid"] if lim.precision_m else [])
                sent.append(g.id + (f" ({', '.join(notes)})" if notes else ""))
        return "sent: " + ", ".join(sent) if sent else f"held: no grant holds {scope}"

    def lines(self, width: int) -> list[str]:
        """The table, one line per mapped path, cut to ``width`` characters. Where the full table does not fit
        (an 80-column SSH terminal), the SCOPE column goes (a held verdict names the scope), "Vehicle." is
        dropped and long paths keep their end, so the CONSENT column stays in view."""
        paths = sorted(self.rows)
        path_w = min(64, max(len(p) for p in paths)) if paths else 10
        longest_unit = max((len(r.unit) for r in self.rows.values()), default=0)
        # A UNIT column only when the DBC gives units; a row shows its unit once it has a value.
        unit_w = min(_UNIT_MAX, max(4, longest_unit)) if longest_unit else 0
        unit_head = f"{'UNIT':<{unit_w}} " if unit_w else ""
        if path_w + 1 + 18 + 1 + 17 + 1 + (unit_w + 1 if unit_w else 0) + 8 + 2 + _CONSENT_MIN <= width:
            out = [f"{'SIGNAL (VSS path)':<{path_w}} {'SCOPE':<18} {'VALUE':>17} {unit_head}{'RATE':>8}  CONSENT"]
            for path in paths:
                row = self.rows[path]
                out.append(f"{path[:path_w]:<{path_w}} {row.spec.scope:<18} {_fmt(row.value):>17} "
                           f"{_unit(row, unit_w)}{self.rate(path):>6.1f}/s  {self.verdict(row.spec.scope)}")
            return [line[:width] for line in out]
        # Narrow: the unit goes into the VALUE column ("243.9 kPa"), two characters wider than a bare value.
        value_w = 12 if unit_w else 10
        names = {p: p.removeprefix("Vehicle.") for p in paths}
        path_w = max(16, min(max((len(n) for n in names.values()), default=10), width - 12 - value_w - _CONSENT_MIN))
        out = [f"{'SIGNAL (VSS path)':<{path_w}} {'VALUE':>{value_w}} {'RATE':>8}  CONSENT"]
        for path in paths:
            row, name = self.rows[path], names[path]
            shown = name if len(name) <= path_w else ".." + name[-(path_w - 2):]
            verdict = self.verdict(row.spec.scope).replace("held: no grant holds ", "held: ")
            out.append(f"{shown:<{path_w}} {_value_and_unit(row, value_w):>{value_w}} "
                       f"{self.rate(path):>6.1f}/s  {verdict}")
        return [line[:width] for line in out]


def _unit(row: _Row, width: int) -> str:
    """The UNIT cell and its separator ("" without a UNIT column); blank until the row has a value."""
    if not width:
        return ""
    return f"{(row.unit if row.value is not None else '')[:width]:<{width}} "


def _value_and_unit(row: _Row, width: int) -> str:
    """``243.9 kPa`` in ``width`` characters: the unit (at most _UNIT_MAX_NARROW) kept, the value cut first."""
    if row.value is None or not row.unit:
        return _fmt(row.value)[:width]
    unit = row.unit[:_UNIT_MAX_NARROW]
    return f"{_fmt(row.value)[:width - len(unit) - 1]} {unit}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)[:17]


# ---------------------------------------------------------------- consent, read-only


class ConsentView:
    """The consent in force in a state directory, read-only and re-verified (as `vgw consent show` does)."""

    def __init__(self, cfg: Config) -> None:
        from vgw.state.consent.manager import ConsentManager, load_trust_keys
        from vgw.state.consent.store import ConsentStore

        self.path = cfg.state_dir / "consent.jws"
        trust = load_trust_keys(cfg.consent.trust_keys)

        def make() -> ConsentManager:
            # Reading only: load_cached_readonly touches the store and the trust keys, no outbox, audit or key.
            return ConsentManager(device=cfg.device.id, store=ConsentStore(cfg.state_dir), outbox=None,  # type: ignore[arg-type]
                                  audit=None, signer=None, trust_keys=trust)  # type: ignore[arg-type]

        self._make = make
        self._stamp: tuple[float, int] | None = None
        self.consent: Consent | None = None
        self.expired = False

    def refresh(self) -> None:
        """Re-read the cached document if it changed (never writes; the manager only reads when read-only)."""
        try:
            st = self.path.stat()
            stamp: tuple[float, int] | None = (st.st_mtime, st.st_size)
        except FileNotFoundError:
            stamp = None
        except PermissionError as exc:
            raise ConfigError(f"{self.path}: cannot read the consent in force (run as the agent's user)") from exc
        if stamp == self._stamp and stamp is not None:
            if self.consent is not None:
                self.expired = time.time() >= self.consent.exp
            return
        self._stamp = stamp
        manager = self._make()
        manager.load_cached_readonly()
        self.consent, self.expired = manager.in_force, manager.expired


# ---------------------------------------------------------------- the source


def open_monitor_source(can: CanConfig, interface: str | None, channel: str | None, *, bitrate: int | None = None,
                        fd: bool = False) -> tuple[Any, str]:
    """The source to read: the config's, or ``interface``/``channel`` instead; ``bitrate`` and ``fd`` (CAN FD)
    override the config's bus settings (README "CAN FD"). Returns the source and how it was opened. Raises
    ConfigError when a serial adapter is already read by another process or bus settings are given for a replayed
    trace, SourceOpenError when it cannot be opened."""
    from vgw.sources.canbus import BusSource

    if can.replay is not None and interface is None and channel is None:
        if bitrate is not None or fd:
            raise ConfigError(f"-b/--fd set up a CAN bus; this config replays {can.replay.name}: give -i and -c too")
        from vgw.sources.replay import ReplaySource

        return ReplaySource(can.replay, rate=can.replay_rate or 1.0, loop=True), f"replay {can.replay.name}"
    if bitrate is not None and bitrate <= 0:
        raise ConfigError(f"-b/--bitrate {bitrate}: must be > 0 (bit/s)")
    iface = interface or can.interface
    chan = channel if channel is not None else can.channel
    rate = bitrate if bitrate is not None else can.bitrate
    fd = fd or can.fd
    if iface in _SERIAL_INTERFACES and chan:
        pids = holders(chan)
        if pids:
            raise ConfigError(
                f"CAN {iface}:{chan} is already open in process {pids[0]} (the agent?): a serial adapter or pty "
                "has one reader. Give the monitor its own adapter (`vgw sim can --link A --link B`; in a dev "
                "stack: -c DIR/run/can1), or share a USB adapter as SocketCAN with slcand and read that")
    name = f"{iface}:{chan}" + (f" {rate} bit/s" if rate else "") + (" CAN FD" if fd else "")
    return BusSource(iface, chan, rate, fd=fd, data_bitrate=can.data_bitrate if fd else None), name


# ---------------------------------------------------------------- the loop


def run_monitor(cfg: Config, *, interface: str | None = None, channel: str | None = None,
                bitrate: int | None = None, fd: bool = False, interval: float | None = None,
                duration: float | None = None, out: IO[str] | None = None, stop: threading.Event | None = None) -> int:
    """Show the live view until ``q``, SIGINT/SIGTERM (``stop``) or ``duration``. Returns 0."""
    from vgw.base.logs import under_systemd

    if cfg.can is None:
        raise ConfigError(f"{cfg.path}: vgw monitor shows CAN signals; this config has no [can] section")
    if under_systemd():
        raise ConfigError("vgw monitor prints signal values: not under systemd, where its output would go to "
                          "the journal; run it in a terminal")
    out = out or sys.stdout
    live = out.isatty()
    every = interval if interval is not None else (0.5 if live else 5.0)
    catalogue = load_catalogue(cfg.can.dbc, cfg.can.signal_map, strict=cfg.can.dbc_strict)
    model = MonitorModel(catalogue)
    consent = ConsentView(cfg)
    source, name = open_monitor_source(cfg.can, interface, channel, bitrate=bitrate, fd=fd)
    stop = stop or threading.Event()
    keys = _Keys(sys.stdin) if live else None
    started = time.monotonic()
    last_draw = last_consent = 0.0
    problem = ""
    try:
        while not stop.is_set():
            now = time.monotonic()
            if duration is not None and now - started >= duration:
                break
            if keys is not None and keys.quit():
                break
            try:
                msg = source.recv(0.05)
                if msg is not None and not (msg.is_error_frame or msg.is_remote_frame):
                    model.feed(msg.arbitration_id, bytes(msg.data), msg.is_extended_id)
                problem = ""
            except SourceFrameError:
                pass
            except SourceError as exc:
                problem = f"source failed ({type(exc).__name__}); retrying"
                stop.wait(1.0)
            if now - last_consent >= 1.0:
                last_consent = now
                consent.refresh()
                model.consent, model.expired = consent.consent, consent.expired
            if now - last_draw >= every:
                last_draw = now
                _draw(out, live, model, cfg, name, problem, now - started)
        if live:
            _draw(out, live, model, cfg, name, problem, time.monotonic() - started)
    finally:
        if keys is not None:
            keys.close()
        source.close()
    return 0


def _draw(out: IO[str], live: bool, model: MonitorModel, cfg: Config, name: str, problem: str,
          elapsed: float) -> None:
    c = model.consent
    held = (version_text(None) if c is None
            else f"{version_text(c.ver)}, {len(c.grants)} grant(s)" + (" EXPIRED" if model.expired else ""))
    head = (f"vgw monitor  device {cfg.device.id}  {held}  frames {model.frames}  "
            f"{time.strftime('%H:%M:%S')}  source {name}")
    if live:
        size = shutil.get_terminal_size((120, 40))
        body = [head[:size.columns], problem[:size.columns], *model.lines(size.columns)]
        if len(body) > size.lines - 2:  # no scrolling: say what is cut off rather than hide it silently
            hidden = len(body) - (size.lines - 3)
            more = f"({hidden} more signal(s) below: a taller terminal shows them, or pipe it: vgw monitor ... | less)"
            body = [*body[:size.lines - 3], more[:size.columns]]
        out.write(_CLEAR + "\n".join(body) + "\nq or Ctrl-C quits\n")
    else:
        out.write(f"--- {elapsed:.1f} s  {head}\n" + (problem + "\n" if problem else "")
                  + "\n".join(model.lines(200)) + "\n")
    out.flush()


class _Keys:
    """``q`` on the terminal quits: stdin in cbreak mode (no echo, no line buffering) while the view runs."""

    def __init__(self, stdin: IO[str]) -> None:
        self.fd: int | None = None
        self._saved: Any = None
        try:
            if stdin.isatty():
                self.fd = stdin.fileno()
                self._saved = termios.tcgetattr(self.fd)
                tty.setcbreak(self.fd)
        except (OSError, termios.error, ValueError):
            self.fd = None

    def quit(self) -> bool:
        if self.fd is None:
            return False
        ready, _, _ = select.select([self.fd], [], [], 0)
        return bool(ready) and os.read(self.fd, 32).lower().startswith(b"q")

    def close(self) -> None:
        if self.fd is not None and self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
