"""A faithful ELM327 v1.5 simulator on a pseudo-terminal or a TCP port (Wi-Fi dongles).

It speaks the ELM327 command language to whoever opens it (vgw, python-OBD, a terminal): ``\\r``-terminated
lines in, answers ending in the ``>`` prompt out. Supported:

* AT commands: ``Z`` (reset), ``WS``, ``D``, ``I``, ``@1``, ``RV``, ``E0/E1`` echo, ``L0/L1`` linefeeds,
  ``S0/S1`` spaces, ``H0/H1`` headers, ``SPh``/``SPAh``/``TPh``/``TPAh`` set/try protocol, ``DP``/``DPN``,
  ``PC``, ``AT0-2``, ``STxx``, ``M0/M1``, ``CAF0/1``, ``AL``/``NL``; anything else answers ``?``.
* OBD requests as hex (``010D``, ``010C0D05``, ``0902``, ``03``, ``07``; a trailing response-count digit is
  accepted): ``SEARCHING...`` on the first request under automatic protocol, then the answers of the
  simulated ECUs (:mod:`vgw_sim.obd_ecu`, values from the vehicle model) formatted for the protocol:
  CAN 11/29-bit (6-9) with ISO-TP frames (PCI bytes shown with headers on, ``0:``/``1:`` lines without),
  or ISO 9141-2 (3) style 3-byte headers and checksum. Error answers as a real chip prints them:
  ``NO DATA``, ``CAN ERROR``, ``UNABLE TO CONNECT``, ``BUS INIT: ...ERROR``, ``?``.
* Scenarios: ``normal``; ``engine-off`` (no ECU answers: ``NO DATA`` / ``UNABLE TO CONNECT``);
  ``unplugged`` (silence: nothing is answered, not even AT commands); ``clone`` (a v2.1 clone that
  answers ``?`` to ``ATS0/S1``, ``ATDPN``, ``AT@1`` and adaptive timing); ``slow`` (answers arrive late and
  in pieces); ``no-auto`` (automatic protocol search fails; only an explicit ``ATSPh`` connects).
* Hostile adapters (AT commands are answered normally, so a client can initialise; OBD requests meet the
  fault): ``endless`` (the answer repeats forever, a line every ``hostile_interval_s``, never a prompt);
  ``drip`` (one byte every 40 ms, never a prompt); ``flood`` (``flood_bytes`` hex digits on one line, then
  the prompt); ``echo-probe`` (echoes the ``\\x7f\\x7f`` baud probe with no prompt, as some emulators and
  clones do; everything else is normal). Like a real chip, any byte received stops an answer in progress.

:attr:`Elm327Simulator.requests` records every OBD request line received (uppercase hex, no spaces, in
order), whether or not the car answered it, so tests can prove what a client asked for.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import threading
import time
import tty
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from vgw.sources.obd.protocols import PROTOCOL_NAMES

from vgw_sim.obd_ecu import ObdEcus, VehicleLike

IDENT = "ELM327 v1.5"
CLONE_IDENT = "ELM327 v2.1"
# The ELM327 protocol numbers and the names ATDP answers (ELM327 data sheet): one table, the client's.
PROTOCOLS = PROTOCOL_NAMES
SIMULATED_CAR_PROTOCOLS = ("3", "6", "7", "8", "9")
SCENARIOS = ("normal", "engine-off", "unplugged", "clone", "slow", "no-auto", "endless", "drip", "flood",
             "echo-probe")
HOSTILE = frozenset({"endless", "drip", "flood"})
DRIP_S = 0.04  # "one byte every 40 ms": under a 50 ms read timeout, so a naive client never sees silence
# Output comes in pieces: (bytes, seconds to wait before the next piece).
Piece = tuple[bytes, float]
CLONE_REJECTS = frozenset({"S0", "S1", "DPN", "@1", "AT0", "AT1", "AT2"})
_OK_COMMANDS = frozenset({"D", "M0", "M1", "CAF0", "CAF1", "AL", "NL", "R0", "R1", "CFC0", "CFC1", "AT0", "AT1",
                          "AT2", "PC", "BI", "AR", "SS", "KW0", "KW1"})
_SEARCH_ORDER = ("6", "8", "1", "7", "9", "2", "3", "4", "5", "A")
_CAN_11 = frozenset("68BC")
_CAN_29 = frozenset("79A")
_HEX = frozenset("0123456789ABCDEF")


class Elm327Simulator:
    """One simulated adapter plugged into one simulated car.

    ``model`` is the vehicle (default: a :class:`~vgw_sim.vehicle.VehicleModel` of ``seed``);
    ``car_protocol`` the car's OBD protocol (one of :data:`SIMULATED_CAR_PROTOCOLS`); ``realtime=False``
    freezes the model so answers are deterministic; ``slow_s`` is the delay of the ``slow`` scenario.
    Raises ``ValueError`` for an unknown scenario or protocol.
    """

    def __init__(
        self,
        model: VehicleLike | None = None,
        *,
        scenario: str = "normal",
        seed: int = 1,
        car_protocol: str = "6",
        realtime: bool = True,
        slow_s: float = 0.4,
        unsupported: Iterable[int] = (),
        pending_dtcs: Iterable[str] = ("P0301",),
        flood_bytes: int = 20 * 1024 * 1024,
        hostile_interval_s: float = 0.005,
    ) -> None:
        if car_protocol not in SIMULATED_CAR_PROTOCOLS:
            raise ValueError(f"car protocol {car_protocol!r}: simulated are {', '.join(SIMULATED_CAR_PROTOCOLS)}")
        if model is None:
            from vgw_sim.vehicle import VehicleModel

            model = VehicleModel(seed=seed, dtcs=("P0420",))
            model.step(60.0)  # into the drive cycle: engine warm, moving
        self.ecus = ObdEcus(model, realtime=realtime, unsupported=unsupported, pending_dtcs=pending_dtcs)
        self.car_protocol = car_protocol
        self.slow_s = slow_s
        self.flood_bytes = flood_bytes
        self.hostile_interval_s = hostile_interval_s
        self.scenario = "normal"
        self.set_scenario(scenario)
        self.requests: list[str] = []  # every OBD request line received (hex, no spaces)
        self.commands: list[str] = []  # every line received (normalised)
        self.resets = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()
        self._fds: list[int] = []
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._defaults()

    # -- settings -----------------------------------------------------------------------------------

    def _defaults(self) -> None:
        """Power-on state (ATZ, ATD, or replugging the adapter)."""
        self.echo = True
        self.linefeeds = True
        self.spaces = True
        self.headers = False
        self.protocol = "0"  # "0" = automatic
        self.auto = True
        self.active: str | None = None  # protocol found on the car
        self._last = ""

    def set_scenario(self, name: str) -> None:
        """Switch the fault scenario (takes effect on the next line). Raises ValueError if unknown."""
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
        self.scenario = name

    @property
    def plugged(self) -> bool:
        return self.scenario != "unplugged"

    def unplug(self) -> None:
        """Pull the adapter: silence from now on; a TCP client's connection is dropped."""
        self.set_scenario("unplugged")
        conn = self._conn
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def replug(self, scenario: str = "normal") -> None:
        """Plug the adapter back in: it powers up with default settings."""
        with self._lock:
            self._defaults()
        self.set_scenario(scenario)

    # -- the command interpreter --------------------------------------------------------------------

    def handle(self, raw: str) -> str | None:
        """The adapter's complete output for one received line (echo, answer, prompt); None = silence."""
        if not self.plugged:
            return None
        with self._lock:
            line = raw.replace("\n", "").replace("\0", "")
            if self.scenario == "echo-probe" and line.startswith("\x7f"):
                return line + "\r" if self.echo else ""  # echoed, and no prompt: the client must try ATI
            cmd = line.upper().replace(" ", "")
            if not cmd:
                cmd = self._last  # an empty line repeats the last command (ELM327 datasheet)
            self.commands.append(cmd)
            echo = line + "\r" if self.echo else ""
            if cmd.startswith("AT"):
                body = self._at(cmd[2:])
            else:
                body = self._obd(cmd)
                self._last = cmd
            eol = "\r\n" if self.linefeeds else "\r"
            return echo + "".join(b + eol for b in body) + eol + ">"

    def _at(self, c: str) -> list[str]:
        clone = self.scenario == "clone"
        if clone and c in CLONE_REJECTS:
            return ["?"]
        ident = CLONE_IDENT if clone else IDENT
        if c in ("Z", "WS"):
            self._defaults()
            self.resets += 1
            time.sleep(0.05)
            return ["", ident]
        if c == "I":
            return [ident]
        if c == "@1":
            return ["OBDII to RS232 Interpreter"]
        if c == "RV":
            return [f"{self.ecus.model.state.module_voltage_v:.1f}V"]
        flags = {"E": "echo", "L": "linefeeds", "S": "spaces", "H": "headers"}
        if len(c) == 2 and c[0] in flags and c[1] in "01":
            setattr(self, flags[c[0]], c[1] == "1")
            return ["OK"]
        if c == "D":
            self._defaults()
            return ["OK"]
        if c in ("DP", "DPN"):
            proto = self.active or self.protocol
            if c == "DPN":
                return [("A" if self.auto else "") + proto]
            if proto == "0":
                return ["AUTO"]
            return [("AUTO, " if self.auto else "") + PROTOCOLS[proto]]
        for prefix in ("SPA", "TPA", "SP", "TP"):
            if c.startswith(prefix) and len(c) == len(prefix) + 1:
                p = c[-1]
                if p != "0" and p not in PROTOCOLS:
                    return ["?"]
                self.protocol = p
                self.auto = p == "0" or prefix.endswith("A")
                self.active = None
                return ["OK"]
        if c.startswith("ST") and len(c) == 4 and set(c[2:]) <= _HEX:
            return ["OK"]
        if c in _OK_COMMANDS:
            if c == "PC":
                self.active = None
            return ["OK"]
        return ["?"]

    def _obd(self, cmd: str) -> list[str]:
        if not cmd or not set(cmd) <= _HEX:
            return ["?"]
        if len(cmd) % 2:
            cmd = cmd[:-1]  # a trailing digit is the number of responses to wait for
        if not cmd:
            return ["?"]
        self.requests.append(cmd)
        request = bytes.fromhex(cmd)
        if self.scenario == "slow":
            time.sleep(self.slow_s)
        out: list[str] = []
        if self.active is None:
            found = self._connect(out)
            if not found:
                return out
        reachable = self.scenario != "engine-off"
        if not reachable:
            return [*out, "NO DATA"]
        proto = self.active
        assert proto is not None
        if proto not in _CAN_11 | _CAN_29 and request[0] == 0x01 and len(request) > 2:
            return [*out, "NO DATA"]  # K-line ECUs take one PID per request
        answers = self.ecus.answer(request)
        if not answers:
            return [*out, "NO DATA"]
        for ecu in sorted(answers):
            out += self._format(proto, ecu, answers[ecu])
        return out

    def _connect(self, out: list[str]) -> bool:
        """Find the car's protocol as a real chip would; appends SEARCHING.../errors to ``out``."""
        reachable = self.scenario != "engine-off"
        if self.protocol != "0":
            if self.protocol == self.car_protocol and reachable:
                if self.protocol in "345":
                    out.append("BUS INIT: ...OK")
                self.active = self.protocol
                return True
            if not self.auto:
                out.append(self._wrong_protocol_error(self.protocol))
                return False
        out.append("SEARCHING...")
        if reachable and self.scenario != "no-auto":
            self.active = self.car_protocol
            return True
        out.append("UNABLE TO CONNECT")
        return False

    @staticmethod
    def _wrong_protocol_error(p: str) -> str:
        if p in "345":
            return "BUS INIT: ...ERROR"
        if p in "12":
            return "NO DATA"
        return "CAN ERROR"

    # -- formatting ---------------------------------------------------------------------------------

    def _hex(self, data: bytes) -> str:
        return (" " if self.spaces else "").join(f"{b:02X}" for b in data)

    def _format(self, proto: str, ecu: int, payload: bytes) -> list[str]:
        if proto in _CAN_11 or proto in _CAN_29:
            return self._format_can(proto, ecu, payload)
        return self._format_kline(ecu, payload)

    def _format_can(self, proto: str, ecu: int, payload: bytes) -> list[str]:
        frames = isotp_frames(payload)
        if self.headers:
            if proto in _CAN_11:
                head = f"{0x7E8 + ecu:03X}"
            else:
                head = self._hex(bytes((0x18, 0xDA, 0xF1, 0x10 + ecu)))
            sep = " " if self.spaces else ""
            return [head + sep + self._hex(f) for f in frames]
        if len(frames) == 1:
            return [self._hex(payload)]
        sep = " " if self.spaces else ""
        lines = [f"{len(payload):03X}"]
        for i, f in enumerate(frames):
            data = f[2:] if i == 0 else f[1:]
            lines.append(f"{i & 0xF:X}:" + sep + self._hex(data))
        return lines

    def _format_kline(self, ecu: int, payload: bytes) -> list[str]:
        messages: list[bytes]
        if payload[:2] == b"\x49\x02":
            vin = b"\0\0\0" + payload[3:]
            messages = [bytes((0x49, 0x02, i + 1)) + vin[4 * i : 4 * i + 4] for i in range((len(vin) + 3) // 4)]
        elif payload[0] in (0x43, 0x47):
            codes = payload[2:]
            groups = [codes[i : i + 6] for i in range(0, len(codes), 6)] or [b""]
            messages = [bytes((payload[0],)) + g.ljust(6, b"\0") for g in groups]
        else:
            messages = [payload]
        out = []
        for m in messages:
            if self.headers:
                frame = bytes((0x48, 0x6B, 0x10 + 8 * ecu)) + m
                out.append(self._hex(frame + bytes((sum(frame) & 0xFF,))))
            else:
                out.append(self._hex(m))
        return out

    # -- transports ---------------------------------------------------------------------------------

    def output(self, line: str) -> Iterator[Piece]:
        """What the adapter sends for one received ``line``, in pieces (lazily: a flood is never in memory)."""
        scenario = self.scenario
        out = self.handle(line)
        if out is None:
            return
        data = out.encode("ascii")
        cmd = line.upper().replace(" ", "")
        if scenario in HOSTILE and cmd and not cmd.startswith("AT") and data.endswith(b">"):
            yield from self._hostile(scenario, data[:-1])
        elif scenario == "slow" and len(data) > 4:
            half = len(data) // 2
            yield data[:half], self.slow_s / 2
            yield data[half:], 0.0
        else:
            yield data, 0.0

    def _hostile(self, scenario: str, answer: bytes) -> Iterator[Piece]:
        if scenario == "endless":
            lines = [ln + b"\r" for ln in answer.split(b"\r") if ln.strip()] or [b"NO DATA\r"]
            for ln in itertools.cycle(lines):
                yield ln, self.hostile_interval_s
        elif scenario == "drip":
            for byte in itertools.cycle(answer.replace(b">", b"") or b"4"):
                yield bytes((byte,)), DRIP_S
        else:  # flood: one enormous line of hex digits, then the prompt
            chunk = b"41" * 32768
            left = self.flood_bytes
            while left > 0:
                yield chunk[:left], 0.0
                left -= len(chunk)
            yield b"\r\r>", 0.0

    def _serve(self, fd: int, read: Callable[[], bytes], write: Callable[[bytes], int], *, tcp: bool) -> None:
        """Serve one connection until it closes: lines in, pieces out, an answer stopped by any new input.

        ``fd`` is non-blocking; ``read`` returns b"" at end of file, ``write`` returns how much it wrote.
        Unplugging ends a TCP connection (the Wi-Fi is gone); a pty stays, silent, for the replug.
        """
        buf = b""
        pending = b""  # bytes of the current piece not yet written
        stream: Iterator[Piece] | None = None
        next_at = 0.0
        while not self._closing.is_set() and (self.plugged or not tcp):
            now = time.monotonic()
            want_write = bool(pending) or (stream is not None and now >= next_at)
            timeout = 0.05 if want_write or stream is None else min(0.05, max(0.0, next_at - now))
            try:
                readable, writable, _ = select.select([fd], [fd] if want_write else [], [], timeout)
                if readable:
                    chunk = read()
                    if not chunk:
                        return
                    buf += chunk
                    if stream is not None or pending:
                        stream, pending = None, b""  # a real chip stops sending when a byte arrives
                    while b"\r" in buf and stream is None:
                        line, buf = buf.split(b"\r", 1)
                        stream = self.output(line.decode("ascii", "replace"))
                        next_at = 0.0
                if writable:
                    if not pending and stream is not None:
                        piece = next(stream, None)
                        if piece is None:
                            stream = None
                        else:
                            pending, delay = piece
                            next_at = time.monotonic() + delay
                    if pending:
                        n = write(pending)
                        pending = pending[n:]
                if stream is None and not pending and b"\r" in buf:
                    line, buf = buf.split(b"\r", 1)
                    stream = self.output(line.decode("ascii", "replace"))
                    next_at = 0.0
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return

    def open_pty(self) -> str:
        """Open a raw pseudo-terminal and serve it in a thread; returns the path clients open."""
        master, slave = os.openpty()
        tty.setraw(slave)  # no line discipline: \\r stays \\r, no echo by the kernel
        tty.setraw(master)
        os.set_blocking(master, False)
        self._fds += [master, slave]
        path = os.ttyname(slave)
        self._spawn(lambda: self._serve(master, lambda: os.read(master, 4096), lambda b: os.write(master, b),
                                        tcp=False),
                    "elm327-pty")
        return path

    def open_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 = a free port) like a Wi-Fi dongle, one client at a time; returns the port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(1)
        self._listener = listener

        def serve() -> None:
            while not self._closing.is_set():
                try:
                    ready, _, _ = select.select([listener], [], [], 0.05)
                    if not ready:
                        continue
                    conn, _addr = listener.accept()
                except OSError:
                    return
                if not self.plugged:
                    conn.close()  # nothing at the other end of the Wi-Fi
                    continue
                self._conn = conn
                try:
                    self._serve_conn(conn)
                finally:
                    self._conn = None
                    conn.close()

        self._spawn(serve, "elm327-tcp")
        return int(listener.getsockname()[1])

    def _serve_conn(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self._serve(conn.fileno(), lambda: conn.recv(4096), conn.send, tcp=True)

    def _spawn(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        """Stop serving and release the pty/socket (idempotent)."""
        self._closing.set()
        if self._conn is not None:
            try:
                self._conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(2.0)
        self._threads.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __enter__(self) -> Elm327Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def isotp_frames(payload: bytes, pad: int = 0xAA) -> list[bytes]:
    """ISO 15765-2 frames (8 bytes, padded) of one message: a single frame, or first + consecutive frames."""
    if len(payload) <= 7:
        return [(bytes((len(payload),)) + payload).ljust(8, bytes((pad,)))]
    frames = [bytes((0x10 | (len(payload) >> 8), len(payload) & 0xFF)) + payload[:6]]
    rest, seq = payload[6:], 1
    while rest:
        frames.append((bytes((0x20 | (seq & 0xF),)) + rest[:7]).ljust(8, bytes((pad,))))
        rest, seq = rest[7:], seq + 1
    return frames
