"""The OBD-II poller: the agent's second source, beside CAN.

:class:`ObdPoller` is a daemon thread the runtime starts (``vgw.daemon.agent.Agent._start_obd``). Every
``interval_s`` it reads ``wanted_scopes()`` - the scopes that grants in force hold right now - and asks the
vehicle only for PIDs of those scopes that the car announced in its supported-PID bitmaps (and, when the
config lists ``pids``, only those). When no scope is wanted it polls nothing and does not even open the
adapter (minimisation at the source). Answers become ``(path, scope, t, value)`` samples, ``t`` the Unix
time the answer arrived, handed to ``sink`` (the same consent policy, encryption and outbox as CAN).

Slow readings - the VIN (service 09 PID 02, ``read_vin``) and the stored/pending trouble codes (services
03/07, ``read_diagnostics``, paths ``Vehicle.OBD.DTCList`` / ``Vehicle.OBD.PendingDTCList``) - are read when
their scope becomes wanted, after each reconnect, and then every ``slow_interval_s``.

Safety: every request is made by :func:`vgw.pipeline.obd.request.build_request` (re-exported here), which allows
services 01 and 09 only, plus 03 and 07 while ``read_diagnostics`` is granted; the transports send nothing
else. The poller never crashes the agent: adapter errors close the session and reconnect with exponential
backoff; unexpected errors are logged (type only, never a value or the VIN) and retried the same way.
Every exchange with the adapter has an absolute deadline (the transports enforce it), so a hostile adapter
costs at most ``timeout_s`` per request before the session is dropped and reopened.

Health (:meth:`ObdPoller.health`, shown by ``vgw status``): ``state`` is ``idle`` (no scope wanted, the
adapter closed), ``connecting``, ``connected`` or ``failing`` (the last exchange or connection attempt
failed; reconnecting with backoff); ``ok`` is False only while failing; ``last_error`` is that failure's
one-line message (port and command, never a value).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from vgw.base.errors import SourceError
from vgw.config.settings import ObdConfig
from vgw.pipeline.obd.pids import (
    BITMAP_PIDS,
    BY_NUMBER,
    DATA_LENGTH,
    DTC_NAME,
    DTC_PATH,
    PENDING_DTC_NAME,
    PENDING_DTC_PATH,
    PIDS,
    SPECIAL_SCOPES,
    VIN_NAME,
    VIN_PATH,
    decode_dtcs,
    parse_bitmap,
    resolve,
)
from vgw.pipeline.obd.request import MAX_PIDS_PER_REQUEST, ForbiddenRequest, ObdRequest, build_request
from vgw.sources.obd.elm327 import AnswerTimeout, AnswerTooLong

__all__ = ["ForbiddenRequest", "ObdPoller", "ObdRequest", "ObdTransport", "build_request", "open_transport"]

log = logging.getLogger(__name__)

Sample = tuple[str, str, float, Any]
_SLOW = ((VIN_NAME, 0x09, 0x02, VIN_PATH), (DTC_NAME, 0x03, None, DTC_PATH),
         (PENDING_DTC_NAME, 0x07, None, PENDING_DTC_PATH))


class ObdTransport(Protocol):
    """What the poller needs from an adapter: ELM327 (:mod:`vgw.sources.obd.elm327`) or ISO-TP
    (:mod:`vgw.sources.obd.isotp`)."""

    @property
    def is_can(self) -> bool: ...

    def open(self) -> None: ...

    def close(self) -> None: ...

    def query(self, request: ObdRequest) -> dict[int, bytes]: ...


def open_transport(cfg: ObdConfig) -> ObdTransport:
    """The transport ``cfg.transport`` names (not yet opened). Raises ValueError for an unknown one.

    For ``isotp`` the CAN channel is ``can_channel``, or ``port`` when that is unset.
    """
    if cfg.transport == "elm327":
        from vgw.sources.obd.elm327 import Elm327

        return Elm327(cfg.port, baudrate=cfg.baudrate, protocol=cfg.protocol, timeout_s=cfg.timeout_s)
    if cfg.transport == "isotp":
        from vgw.sources.obd.isotp import IsoTpTransport

        return IsoTpTransport(cfg.can_interface, cfg.can_channel or cfg.port, timeout_s=cfg.timeout_s)
    raise ValueError(f"unknown OBD transport {cfg.transport!r}")


class _Session:
    """One open adapter connection and what was learned on it."""

    def __init__(self, transport: ObdTransport) -> None:
        self.transport = transport
        self.supported: set[int] = set()
        self.slow_last: dict[str, float] = {}  # reading name -> monotonic time last read


class ObdPoller(threading.Thread):
    """Polls consented OBD-II readings until ``stop`` is set. See the module docstring.

    The poller thread owns the transport, ``counters`` and the health fields; :meth:`health` (any thread)
    reads them under ``_health_lock``, which also guards every write to them.
    Raises ValueError at construction when ``cfg.pids`` names an unknown PID.
    """

    def __init__(
        self,
        cfg: ObdConfig,
        *,
        wanted_scopes: Callable[[], frozenset[str]],
        sink: Callable[[list[Sample]], None],
        stop: threading.Event,
        transport_factory: Callable[[ObdConfig], ObdTransport] = open_transport,
        backoff_min_s: float = 1.0,
        backoff_max_s: float = 30.0,
        slow_interval_s: float = 60.0,
    ) -> None:
        super().__init__(name="vgw-obd", daemon=True)
        self.cfg = cfg
        self._wanted_scopes = wanted_scopes
        self._sink = sink
        self._stop_event = stop
        self._factory = transport_factory
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.slow_interval_s = slow_interval_s
        if cfg.pids is None:
            self._only_pids: frozenset[int] | None = None
            self._only_special: frozenset[str] | None = None
        else:
            self._only_pids, self._only_special = resolve(cfg.pids)
        self.counters: dict[str, int] = {"cycles": 0, "requests": 0, "answers": 0, "no_data": 0, "samples": 0,
                                         "reconnects": 0, "errors": 0, "timeouts": 0, "too_long": 0,
                                         "source_errors": 0}
        self.connected = threading.Event()
        self._health_lock = threading.Lock()
        self._state = "idle"
        self._last_error: str | None = None
        self._last_answer: float | None = None  # Unix time

    def health(self) -> dict[str, Any]:
        """A snapshot for status.json: state, ok, last_error, last_answer and the counters (no values)."""
        with self._health_lock:
            return {"state": self._state, "ok": self._state != "failing", "last_error": self._last_error,
                    "last_answer": self._last_answer, "counters": dict(self.counters)}

    def _set_state(self, state: str, error: str | None = None) -> None:
        with self._health_lock:
            self._state = state
            if error is not None:
                self._last_error = error

    def _count(self, name: str, n: int = 1) -> None:
        with self._health_lock:
            self.counters[name] += n

    # -- thread -------------------------------------------------------------------------------------

    def run(self) -> None:
        session: _Session | None = None
        backoff = self.backoff_min_s
        stop = self._stop_event
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    scopes = self._scopes()
                    if scopes:
                        if session is None:
                            if self._state != "failing":
                                self._set_state("connecting")
                            session = self._connect()
                            backoff = self.backoff_min_s
                        self._cycle(session, scopes)
                        self._count("cycles")
                    if session is None:
                        self._set_state("idle")
                except SourceError as exc:
                    # Messages name the port and the command, never a value.
                    self._count("timeouts" if isinstance(exc, AnswerTimeout) else
                                "too_long" if isinstance(exc, AnswerTooLong) else "source_errors")
                    self._set_state("failing", str(exc))
                    log.warning("OBD: %s; reconnecting in %.1f s", exc, backoff)
                    self._drop(session)
                    session = None
                    stop.wait(backoff)
                    backoff = min(self.backoff_max_s, backoff * 2)
                    continue
                except Exception as exc:
                    self._count("errors")
                    self._set_state("failing", f"unexpected {type(exc).__name__}")
                    log.error("OBD: unexpected %s; reconnecting in %.1f s", type(exc).__name__, backoff)
                    log.debug("OBD poller error", exc_info=True)
                    self._drop(session)
                    session = None
                    stop.wait(backoff)
                    backoff = min(self.backoff_max_s, backoff * 2)
                    continue
                stop.wait(max(0.0, self.cfg.interval_s - (time.monotonic() - started)))
        finally:
            self._drop(session)

    def _scopes(self) -> frozenset[str]:
        return frozenset(self._wanted_scopes())

    def _drop(self, session: _Session | None) -> None:
        self.connected.clear()
        if session is not None:
            session.transport.close()
        return None

    def _connect(self) -> _Session:
        transport = self._factory(self.cfg)
        try:
            transport.open()
            session = _Session(transport)
            session.supported = self._read_bitmaps(transport)
        except BaseException:
            transport.close()
            raise
        self._count("reconnects")
        self._set_state("connected")
        self.connected.set()
        log.info("OBD: connected; the vehicle supports %d service 01 PIDs", len(session.supported))
        return session

    # -- requests -----------------------------------------------------------------------------------

    def _ask(self, transport: ObdTransport, service: int, pids: list[int]) -> dict[int, bytes]:
        # Scopes are read again right before each request: a revocation stops polling mid-cycle.
        request = build_request(service, pids, scopes=self._scopes())
        self._count("requests")
        answers = transport.query(request)
        self._count("answers" if answers else "no_data")
        with self._health_lock:
            self._last_answer = time.time()
            if self._state == "failing":
                self._state = "connected"
        return answers

    def _read_bitmaps(self, transport: ObdTransport) -> set[int]:
        """Walk the supported-PID bitmaps (0100, 0120, ...) of every answering ECU."""
        supported: set[int] = set()
        for base in BITMAP_PIDS:
            if base and base not in supported:
                break
            for payload in self._ask(transport, 0x01, [base]).values():
                for pid, data in _walk_service01(payload):
                    if pid == base:
                        supported |= parse_bitmap(base, data)
        return supported

    def _cycle(self, session: _Session, scopes: frozenset[str]) -> None:
        wanted = sorted(p.pid for p in PIDS if p.scope in scopes and p.pid in session.supported
                        and (self._only_pids is None or p.pid in self._only_pids))
        per_request = MAX_PIDS_PER_REQUEST if session.transport.is_can else 1
        for i in range(0, len(wanted), per_request):
            if self._stop_event.is_set():
                return
            live = self._scopes()
            chunk = [p for p in wanted[i : i + per_request] if BY_NUMBER[p].scope in live]
            if not chunk:
                continue
            answers = self._ask(session.transport, 0x01, chunk)
            t = time.time()
            samples: list[Sample] = []
            seen: set[int] = set()
            for _ecu, payload in sorted(answers.items()):
                for pid, data in _walk_service01(payload):
                    if pid in chunk and pid not in seen:
                        seen.add(pid)
                        spec = BY_NUMBER[pid]
                        samples.append((spec.path, spec.scope, t, spec.value(data)))
            self._emit(samples)
        self._slow(session, scopes)

    def _slow(self, session: _Session, scopes: frozenset[str]) -> None:
        now = time.monotonic()
        for name, service, pid, path in _SLOW:
            scope = SPECIAL_SCOPES[name]
            if scope not in scopes or (self._only_special is not None and name not in self._only_special):
                session.slow_last.pop(name, None)  # read at once when the scope is granted again
                continue
            last = session.slow_last.get(name)
            if last is not None and now - last < self.slow_interval_s:
                continue
            session.slow_last[name] = now
            answers = self._ask(session.transport, service, [] if pid is None else [pid])
            t = time.time()
            value = _decode_slow(service, answers)
            if value is not None:
                self._emit([(path, scope, t, value)])

    def _emit(self, samples: list[Sample]) -> None:
        if samples:
            self._count("samples", len(samples))
            self._sink(samples)


def _walk_service01(payload: bytes) -> list[tuple[int, bytes]]:
    """(PID, data) pairs of a service 01 answer ``41 pid data [pid data ...]``; stops at an unknown PID."""
    out: list[tuple[int, bytes]] = []
    if not payload or payload[0] != 0x41:
        return out
    i = 1
    while i < len(payload):
        pid = payload[i]
        length = DATA_LENGTH.get(pid)
        if length is None or i + 1 + length > len(payload):
            break
        out.append((pid, payload[i + 1 : i + 1 + length]))
        i += 1 + length
    return out


def decode_vin(payload: bytes) -> str | None:
    """``49 02 <count> <VIN>`` (CAN) or the joined K-line form -> the 17-character VIN, or None."""
    if payload[:2] != b"\x49\x02" or len(payload) < 3:
        return None
    text = "".join(chr(b) for b in payload[3:] if 0x20 < b < 0x7F)
    return text[-17:] if len(text) >= 17 else None


def _decode_slow(service: int, answers: dict[int, bytes]) -> Any:
    if service == 0x09:
        for _ecu, payload in sorted(answers.items()):
            vin = decode_vin(payload)
            if vin is not None:
                return vin
        return None
    codes: list[str] = []
    positive = False
    for _ecu, payload in sorted(answers.items()):
        if payload[:1] == bytes((service + 0x40,)):
            positive = True
            # CAN answers carry a count byte after the service id (ISO 15765-4); the joined K-line form too.
            for code in decode_dtcs(payload[2:]):
                if code not in codes:
                    codes.append(code)
    return codes if positive else None
