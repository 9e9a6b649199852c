"""ELM327 client over pyserial: a USB/Bluetooth serial adapter, or a Wi-Fi dongle via ``socket://host:port``.

:class:`Elm327` opens the port (``serial.serial_for_url``, so any pyserial URL works), finds the baud rate
when none is configured, and initialises the chip: ``ATZ``, ``ATE0``, ``ATL0``, ``ATS0``, ``ATH1``,
``ATAT1``, then ``ATSP0`` (or the configured protocol) and ``0100``; when the automatic search finds no
ECU it tries the protocols one by one in the order 6, 8, 1, 7, 9, 2, 3, 4, 5, A; ``ATDPN`` (or ``ATDP``)
says which protocol answered. Clone adapters that answer ``?`` to a setting are noted and the client
carries on without it: the answer parser copes with spaces, echo and missing headers.

Every exchange (one command, its answer, the ``>`` prompt) has an absolute deadline: ``timeout_s`` from
the moment the command is written (``SEARCH_TIMEOUT_S`` once the chip prints ``SEARCHING...``), however
the bytes arrive - an adapter that talks forever, drips one byte at a time or sends megabytes without a
prompt is cut off at the deadline or at ``MAX_ANSWER_BYTES``, whichever comes first. ``NO DATA``, ``?``,
``CAN ERROR``, ``UNABLE TO CONNECT``, ``BUS INIT: ...ERROR`` and the other ELM327 error texts mean "no
value", never an exception.

Errors (the poller closes the port and reconnects on each)::

    SourceReadError          I/O failure (agent.errors)
     +-- AnswerTimeout       no ``>`` prompt before the exchange's deadline
     +-- AnswerTooLong       more than MAX_ANSWER_BYTES without a prompt
    SourceOpenError          the port cannot be opened, no adapter or no ECU answers (agent.errors)

Baud rate: only a real serial line has one. On a pseudo-terminal (an emulator), an rfcomm Bluetooth link
or a network URL the baud rate is left alone; on a serial line each candidate rate is probed with
``\\x7f\\x7f`` (what python-OBD sends) and, when that gets no prompt (some clones and emulators echo it and
wait), with ``ATI``.

Only ``AT`` commands and :class:`~vgw.pipeline.obd.request.ObdRequest` objects (made by the safety choke point
:func:`vgw.pipeline.obd.request.build_request`) are ever written to the adapter. Nothing here logs a value.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Sequence
from typing import Any

from vgw.base.errors import SourceOpenError, SourceReadError
from vgw.pipeline.obd.request import ObdRequest, build_request
from vgw.sources.obd.protocols import PROTOCOL_NAMES

log = logging.getLogger(__name__)

BAUD_CANDIDATES = (38400, 9600, 115200, 57600, 230400, 500000)
FALLBACK_PROTOCOLS = ("6", "8", "1", "7", "9", "2", "3", "4", "5", "A")
CAN_PROTOCOLS = frozenset("6789ABC")
CAN_29BIT = frozenset("79A")
KNOWN_CLONE_VERSIONS = ("v2.1",)  # the firmware string of the common PIC18 clones
SEARCH_TIMEOUT_S = 12.0  # a real chip can search for ~10 s
RESET_TIMEOUT_S = 3.0
BAUD_PROBE_TIMEOUT_S = 0.5
# The longest answer vgw asks for is a few hundred bytes (six PIDs, the VIN, a DTC list of every ECU);
# the chip's own send buffer is 512 bytes (ELM327 data sheet, "BUFFER FULL"). 32 KiB leaves ample room.
MAX_ANSWER_BYTES = 32 * 1024
_PTY_MAJORS = range(136, 144)  # Unix98 pty slaves (Linux devices.txt)
_RFCOMM_MAJOR = 216  # Bluetooth RFCOMM TTY (Linux devices.txt)
_NETWORK_URLS = ("socket://", "rfc2217://", "loop://", "spy://")
_DATA_LINE = re.compile(r"^[0-9A-F]+$")
_INDEXED_LINE = re.compile(r"^([0-9A-F]):([0-9A-F]*)$")
_LENGTH_LINE = re.compile(r"^[0-9A-F]{3}$")


class AnswerTimeout(SourceReadError):
    """No ``>`` prompt before the exchange's absolute deadline (silence, or bytes that never end)."""


class AnswerTooLong(SourceReadError):
    """More than :data:`MAX_ANSWER_BYTES` arrived without a ``>`` prompt."""


def baud_matters(port: str) -> bool:
    """True if ``port`` is a real serial line whose baud rate must match the adapter's.

    False for network URLs, pseudo-terminals (emulators, ``vgw sim elm327``) and rfcomm Bluetooth links,
    where the rate is ignored, so probing it only costs time (python-OBD skips ``/dev/pts`` likewise).
    """
    if "://" in port:
        return False
    real = os.path.realpath(port)
    if real.startswith(("/dev/pts/", "/dev/rfcomm")):
        return False
    try:
        st = os.stat(real)
    except OSError:
        return True  # opening it will report the problem
    if stat.S_ISCHR(st.st_mode):
        major = os.major(st.st_rdev)
        return major not in _PTY_MAJORS and major != _RFCOMM_MAJOR
    return True


class Elm327:
    """One ELM327 adapter. Not thread-safe: one poller thread owns it.

    ``port`` is a device (``/dev/ttyUSB0``) or pyserial URL; ``baudrate`` None = detect; ``protocol``
    ``"auto"`` or ``"1"``..``"C"``; ``timeout_s`` is the deadline of one exchange. ``detect_baud`` None
    probes the baud rate only when ``baudrate`` is None and :func:`baud_matters`; True or False forces it.
    """

    def __init__(self, port: str, *, baudrate: int | None = None, protocol: str = "auto",
                 timeout_s: float = 2.0, detect_baud: bool | None = None) -> None:
        self.port = port
        self.baudrate = baudrate
        self.detect_baud = detect_baud
        self.want_protocol = protocol.upper()
        self.timeout_s = timeout_s
        self._ser: Any = None
        self.version = ""
        self.clone = False
        self.rejected: set[str] = set()  # AT commands this adapter refused
        self.protocol: str | None = None  # the protocol number the car answered on
        self.headers = False
        self.echo = True

    # -- public -------------------------------------------------------------------------------------

    @property
    def is_can(self) -> bool:
        """True on ISO 15765-4 (CAN): up to six PIDs per request. Unknown protocols count as not CAN."""
        return self.protocol in CAN_PROTOCOLS

    def open(self) -> None:
        """Open the port and initialise the adapter and the vehicle connection.

        Raises SourceOpenError when the port cannot be opened, no adapter answers, or no ECU answers on
        any protocol (ignition off, not plugged into a car).
        """
        self.close()
        try:
            self._open_port()
            self._init_adapter()
            self._connect_vehicle()
        except SourceReadError as exc:
            self.close()
            raise SourceOpenError(f"ELM327 at {self.port}: initialisation failed: {exc}") from exc
        except SourceOpenError:
            self.close()
            raise
        log.info("ELM327 at %s: %s%s, protocol %s", self.port, self.version or "unknown version",
                 " (clone)" if self.clone else "", self.protocol)

    def close(self) -> None:
        """Close the port (idempotent)."""
        ser, self._ser = self._ser, None
        if ser is not None:
            try:
                ser.close()
            except Exception:  # noqa: S110 - closing a vanished adapter must not raise
                pass

    def at(self, command: str, timeout: float | None = None) -> list[str]:
        """Send an AT command, return the answer lines (echo removed). ``?`` means rejected.

        Raises ValueError for anything that is not an AT command (vehicle requests go through
        :meth:`query` only), SourceReadError on I/O failure or timeout.
        """
        cmd = command.strip().upper().replace(" ", "")
        if not cmd.startswith("AT") or (not cmd.isalnum() and not cmd.startswith("AT@")):
            raise ValueError(f"not an AT command: {command!r}")
        return self._transact(cmd, timeout or self.timeout_s)

    def query(self, request: ObdRequest) -> dict[int, bytes]:
        """Send one checked OBD request; return each answering ECU's response payload ({} = no answer).

        Raises TypeError for anything but an ObdRequest, SourceReadError (AnswerTimeout, AnswerTooLong) on
        I/O failure or when no prompt ends the answer in time.
        """
        if not isinstance(request, ObdRequest):
            raise TypeError("Elm327.query takes an ObdRequest from vgw.pipeline.obd.request.build_request")
        lines = self._transact(request.hex, self.timeout_s)
        return parse_answer(lines, protocol=self.protocol, headers=self.headers)

    # -- initialisation -----------------------------------------------------------------------------

    def _open_port(self) -> None:
        import serial

        network = self.port.startswith(_NETWORK_URLS)
        first_baud = self.baudrate or BAUD_CANDIDATES[0]
        try:
            if network:
                self._ser = serial.serial_for_url(self.port, timeout=0.05, write_timeout=self.timeout_s)
            else:
                self._ser = serial.serial_for_url(self.port, baudrate=first_baud, timeout=0.05,
                                                  write_timeout=self.timeout_s)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise SourceOpenError(f"ELM327 at {self.port}: cannot open: {exc}") from exc
        detect = self.detect_baud
        if detect is None:
            detect = self.baudrate is None and not network and baud_matters(self.port)
        if detect:
            self._detect_baud()

    def _detect_baud(self) -> None:
        """Find the adapter's baud rate: ``\\x7f\\x7f`` at each candidate, then ``ATI`` if that got no prompt."""
        for baud in BAUD_CANDIDATES:
            try:
                self._ser.baudrate = baud
            except (ValueError, OSError):
                continue
            for probe in ("\x7f\x7f", "ATI"):
                try:
                    self._transact(probe, min(BAUD_PROBE_TIMEOUT_S, self.timeout_s), raw=True)
                except SourceReadError:
                    continue
                self.baudrate = baud
                return
        raise SourceOpenError(f"ELM327 at {self.port}: no adapter answered at {', '.join(map(str, BAUD_CANDIDATES))}"
                              " baud")

    def _optional(self, cmd: str) -> bool:
        """An AT command a clone may refuse: note it and carry on. Returns True if accepted."""
        answer = self._transact(cmd, self.timeout_s)
        if any(line.strip() == "?" for line in answer):
            self.rejected.add(cmd)
            self.clone = True
            log.warning("ELM327 at %s rejected %s (clone adapter?); carrying on without it", self.port, cmd)
            return False
        return True

    def _init_adapter(self) -> None:
        self.headers = False
        self.echo = True
        answer = self._transact("ATZ", max(RESET_TIMEOUT_S, self.timeout_s))
        self.version = next((ln.strip() for ln in answer if "ELM" in ln.upper()), "")
        if self._optional("ATE0"):
            self.echo = False
        self._optional("ATL0")
        self._optional("ATS0")
        self.headers = self._optional("ATH1")
        self._optional("ATAT1")
        ident = self._transact("ATI", self.timeout_s)
        self.version = next((ln.strip() for ln in ident if "ELM" in ln.upper()), self.version)
        if any(v in self.version for v in KNOWN_CLONE_VERSIONS):
            self.clone = True

    def _probe(self) -> bool:
        """Send 0100 on the protocol set; True if an ECU answered with data."""
        req = build_request(0x01, [0x00], scopes=frozenset())
        lines = self._transact(req.hex, self.timeout_s)
        return any(p[:1] == b"\x41" for p in parse_answer(lines, protocol=None, headers=self.headers).values())

    def _connect_vehicle(self) -> None:
        self.protocol = None
        if self.want_protocol != "AUTO":
            self._set_protocol(self.want_protocol)
            if not self._probe():
                raise SourceOpenError(f"ELM327 at {self.port}: no ECU answered on protocol {self.want_protocol}"
                                      " (ignition off?)")
            self.protocol = self.want_protocol
            return
        self._set_protocol("0")
        if self._probe():
            self.protocol = self._describe_protocol()
            return
        for p in FALLBACK_PROTOCOLS:  # the automatic search failed: try each protocol in turn
            self._set_protocol(p)
            if self._probe():
                self.protocol = p
                return
        raise SourceOpenError(f"ELM327 at {self.port}: no ECU answered on any OBD protocol (ignition off?)")

    def _set_protocol(self, p: str) -> None:
        answer = self._transact(f"ATSP{p}", self.timeout_s)
        if not any("OK" in ln for ln in answer):
            raise SourceOpenError(f"ELM327 at {self.port}: adapter refused protocol {p}")

    def _describe_protocol(self) -> str | None:
        answer = self._transact("ATDPN", self.timeout_s) if "ATDPN" not in self.rejected else ["?"]
        for ln in answer:
            code = ln.strip().upper().lstrip("A")
            if len(code) == 1 and code in PROTOCOL_NAMES:
                return code
        self.rejected.add("ATDPN")
        self.clone = True
        for ln in self._transact("ATDP", self.timeout_s):
            for code, name in PROTOCOL_NAMES.items():
                if name in ln.upper():
                    return code
        return None  # unknown: the parser guesses the framing from each answer

    # -- I/O ----------------------------------------------------------------------------------------

    def _transact(self, line: str, timeout: float, *, raw: bool = False) -> list[str]:
        """Write ``line`` + CR, read up to the ``>`` prompt; returns the answer lines without the echo.

        The deadline is absolute: it is checked after every read, so bytes that keep coming cannot hold
        the exchange open. Raises SourceReadError (AnswerTimeout, AnswerTooLong).
        """
        ser = self._ser
        if ser is None:
            raise SourceReadError(f"ELM327 at {self.port}: not open")
        import serial

        what = "baud probe" if raw else line
        start = time.monotonic()
        deadline = start + timeout
        buf = bytearray()
        prompt = -1
        searching = False
        try:
            ser.reset_input_buffer()  # a late answer to an earlier, timed-out command must not be read as this one
            ser.write(line.encode("ascii") + b"\r")
            while prompt < 0:
                room = MAX_ANSWER_BYTES - len(buf)
                if room <= 0:
                    raise AnswerTooLong(f"ELM327 at {self.port}: answer to {what} longer than "
                                        f"{MAX_ANSWER_BYTES} bytes without a prompt")
                chunk = ser.read(min(room, max(1, ser.in_waiting)))
                if chunk:
                    scan_from = max(0, len(buf) - len(b"SEARCHING"))  # only the new bytes (and a split word)
                    buf += chunk
                    prompt = buf.find(b">", scan_from)
                    if not searching and buf.find(b"SEARCHING", scan_from) >= 0:
                        searching = True  # a protocol search: the chip may take ~10 s (ELM327 data sheet)
                        deadline = max(deadline, start + SEARCH_TIMEOUT_S)
                if prompt < 0 and time.monotonic() >= deadline:
                    raise AnswerTimeout(f"ELM327 at {self.port}: no prompt within {deadline - start:g} s after {what}")
        except serial.SerialException as exc:
            raise SourceReadError(f"ELM327 at {self.port}: {exc}") from exc
        except OSError as exc:
            raise SourceReadError(f"ELM327 at {self.port}: {exc.strerror or exc}") from exc
        text = bytes(buf[:prompt]).decode("ascii", "replace")
        sent = line.upper().replace(" ", "")
        return [ln.strip() for ln in re.split(r"[\r\n]+", text)
                if ln.strip() and ln.strip().upper().replace(" ", "") != sent]


# -- answer parsing (pure) -------------------------------------------------------------------------


def parse_answer(lines: Sequence[str], *, protocol: str | None, headers: bool) -> dict[int, bytes]:
    """ELM327 answer lines -> {ECU address: response payload}. Error texts and status lines are skipped.

    CAN answers are ISO-TP reassembled (with headers: from the PCI bytes; without: from the ``0:``/``1:``
    lines); K-line answers lose their 3-byte header and checksum, and multi-message answers (VIN, DTCs)
    are joined into the CAN layout (``49 02 01 ...``, ``43 n ...``). Without headers the ECUs are keyed
    0, 1, ... in answer order. Never raises: malformed lines are dropped.
    """
    data = [u for u in (ln.upper().replace(" ", "") for ln in lines) if _DATA_LINE.match(u) or
            _INDEXED_LINE.match(u)]
    if not data:
        return {}
    if protocol is None:
        protocol = _guess_protocol(data, headers)
    if protocol in CAN_PROTOCOLS:
        if headers:
            return _can_with_headers(data, 8 if protocol in CAN_29BIT else 3)
        return _can_without_headers(data)
    return _kline(data, headers)


def _guess_protocol(data: list[str], headers: bool) -> str:
    first = data[0]
    if headers:
        if first.startswith("18DA") and len(first) >= 10:
            return "7"
        if len(first) % 2 == 1:
            return "6"  # an 11-bit header is three hex digits
        return "3"
    return "6" if _LENGTH_LINE.match(first) or _INDEXED_LINE.match(first) else "3"


def _can_with_headers(data: list[str], head_len: int) -> dict[int, bytes]:
    frames: dict[int, list[bytes]] = {}
    for u in data:
        if len(u) <= head_len or (len(u) - head_len) % 2:
            continue
        try:
            frames.setdefault(int(u[:head_len], 16), []).append(bytes.fromhex(u[head_len:]))
        except ValueError:
            continue
    out: dict[int, bytes] = {}
    for ecu in sorted(frames):
        msg = _isotp_reassemble(frames[ecu])
        if msg is not None:
            out[ecu] = msg
    return out


def _isotp_reassemble(frames: list[bytes]) -> bytes | None:
    """The first complete ISO 15765-2 message in ``frames`` (SF, or FF + CFs in sequence)."""
    buf = bytearray()
    total = 0
    expect = 1
    for f in frames:
        if not f:
            continue
        kind = f[0] >> 4
        if kind == 0:
            length = f[0] & 0x0F
            if 1 <= length <= len(f) - 1:
                return bytes(f[1 : 1 + length])
        elif kind == 1 and len(f) >= 2:
            total = ((f[0] & 0x0F) << 8) | f[1]
            buf = bytearray(f[2:])
            expect = 1
        elif kind == 2 and total:
            if f[0] & 0x0F != expect & 0x0F:
                total = 0  # a lost frame: drop the message
                continue
            buf += f[1:]
            expect += 1
        if total and len(buf) >= total:
            return bytes(buf[:total])
    return None


def _can_without_headers(data: list[str]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    total = 0
    buf = bytearray()
    for u in data:
        indexed = _INDEXED_LINE.match(u)
        if _LENGTH_LINE.match(u):
            total, buf = int(u, 16), bytearray()
            continue
        if indexed and total:
            body = indexed.group(2)
            if len(body) % 2 == 0:
                buf += bytes.fromhex(body)
            if len(buf) >= total:
                out[len(out)] = bytes(buf[:total])
                total = 0
            continue
        if len(u) % 2 == 0 and not indexed:
            out[len(out)] = bytes.fromhex(u)
    return out


def _kline(data: list[str], headers: bool) -> dict[int, bytes]:
    messages: dict[int, list[bytes]] = {}
    for u in data:
        if len(u) % 2 or _INDEXED_LINE.match(u):
            continue
        raw = bytes.fromhex(u)
        if headers:
            if len(raw) < 5:
                continue
            messages.setdefault(raw[2], []).append(raw[3:-1])  # strip the 3-byte header and the checksum
        else:
            messages.setdefault(0, []).append(raw)
    out: dict[int, bytes] = {}
    for ecu, msgs in sorted(messages.items()):
        first = msgs[0]
        if not first:
            continue
        if first[0] == 0x49 and len(first) >= 3 and first[1] == 0x02:
            ordered = sorted((m for m in msgs if len(m) >= 3 and m[:2] == first[:2]), key=lambda m: m[2])
            out[ecu] = bytes((0x49, 0x02, 0x01)) + b"".join(m[3:] for m in ordered)
        elif first[0] in (0x43, 0x47):
            codes = b"".join(m[1:] for m in msgs if m[:1] == first[:1])
            count = sum(1 for i in range(0, len(codes) - 1, 2) if codes[i : i + 2] != b"\0\0")
            out[ecu] = bytes((first[0], count)) + codes
        else:
            out[ecu] = first
    return out
