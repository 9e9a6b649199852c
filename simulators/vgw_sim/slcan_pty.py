"""An SLCAN (Lawicel CAN232/CANUSB ASCII protocol) adapter on a pseudo-terminal.

:class:`SlcanPtyBus` is a python-can bus: whatever is ``send()`` to it goes out on the pty as
``tIIILDD..\\r`` / ``TIIIIIIIILDD..\\r`` lines while a client has opened the channel, and frames the
client transmits come back from ``recv()``. A client in another process opens the pty's slave side
(:attr:`SlcanPtyBus.path`) exactly like a USB adapter, e.g.
``can.Bus(interface="slcan", channel=path, bitrate=500000)``.

Commands answered (``\\r`` = OK, ``\\a`` = error, as in the Lawicel manual):

======== ====================================== =====================================
command  meaning                                state
======== ====================================== =====================================
``Sn``   bitrate n = 0..8 (10k .. 1M)           closed only
``Yn``   CAN FD data bitrate n = 2/5 (Mbit/s)   closed only
``sxxyy`` BTR0/BTR1 register bitrate            closed only
``O``    open channel                           closed only
``L``    open channel listen-only               closed only
``C``    close channel                          any
``V``    hardware/software version -> ``V1013`` any
``N``    serial number -> ``NVGW1``             any
``F``    status flags -> ``F00``                open only
``Zn``   timestamps off/on (n = 0/1)            closed only
``Mx``/``mx`` acceptance code/mask (ignored)    closed only
``t``/``T``/``r``/``R`` transmit -> ``z``/``Z`` open (not listen-only)
======== ====================================== =====================================

Frames sent to the client may be CAN FD: ``d``/``D``/``b``/``B`` lines of the CANable 2.0 dialect, which
python-can's slcan parses (an adapter without FD firmware never sends them).

While nobody holds the slave side open the channel counts as closed, so a client that dies without
``C`` does not leave frames piling up. Frames that do not fit the pty's buffer (a client that stopped
reading) are dropped and counted in :attr:`SlcanPtyBus.overruns`, as a real adapter would.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import select
import threading
import time
import tty
from typing import Any

import can
from can.util import dlc2len, len2dlc

_OK = b"\r"
_ERR = b"\a"
_VERSION = b"V1013\r"
_SERIAL = b"NVGW1\r"
_WRITE_STALL_S = 1.0  # finish a half-written line for at most this long
_DATA_BITRATES = {"2": 2_000_000, "5": 5_000_000}
_BITRATES = {
    str(n): rate
    for n, rate in enumerate((10_000, 20_000, 50_000, 100_000, 125_000, 250_000, 500_000, 800_000, 1_000_000))
}


class SlcanPtyBus(can.BusABC):
    """A python-can bus that is an SLCAN adapter on a new pseudo-terminal.

    ``channel`` is ignored (the pty path is chosen by the kernel; read :attr:`path`). Raises
    ``can.CanInitializationError`` if no pty can be created.
    """

    def __init__(self, channel: Any = None, *, rx: queue.SimpleQueue[can.Message] | None = None,
                 **kwargs: Any) -> None:
        try:
            master, slave = os.openpty()
        except OSError as exc:
            raise can.CanInitializationError(f"cannot create a pseudo-terminal: {exc}") from exc
        try:
            # Raw mode: no echo of what the client writes, no CR -> NL translation of our replies.
            tty.setraw(slave)
            self.path: str = os.ttyname(slave)
        finally:
            # Hold no slave fd ourselves: a read on the master then fails (EIO) whenever no client
            # has the pty open, which is how a vanished client is noticed.
            os.close(slave)
        os.set_blocking(master, False)
        self._master = master
        self._write_lock = threading.Lock()
        # Frames the client transmits; a group of adapters on one bus shares one queue (SlcanPtyGroup).
        self._rx: queue.SimpleQueue[can.Message] = rx if rx is not None else queue.SimpleQueue()
        self._open = False
        self._listen_only = False
        self._timestamps = False
        self._client_present = False
        self.bitrate: int | None = None
        self.data_bitrate: int | None = None  # CAN FD data phase (Yn), None: not set
        self.overruns = 0
        self._stop = threading.Event()
        self.channel_info = f"SLCAN pty {self.path}"
        super().__init__(channel=self.path, **kwargs)
        self._reader = threading.Thread(target=self._serve, name="slcan-pty", daemon=True)
        self._reader.start()

    # --- public -----------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True while a client has opened the CAN channel (``O`` or ``L``)."""
        return self._open

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        """Write ``msg`` to the client if the channel is open; otherwise it is lost like on an idle bus."""
        if not self._open or self._stop.is_set():
            return
        if msg.is_fd and not msg.is_remote_frame:
            # CAN FD in the CANable 2.0 dialect python-can's slcan reads: d/D (no bitrate switch), b/B (with
            # one), then one hex digit of FD DLC code and the data padded to that code's length.
            code = len2dlc(len(msg.data))
            data = bytes(msg.data).ljust(dlc2len(code), b"\0")
            kind = ("B" if msg.bitrate_switch else "D") if msg.is_extended_id else ("b" if msg.bitrate_switch else "d")
            ident = f"{msg.arbitration_id:08X}" if msg.is_extended_id else f"{msg.arbitration_id:03X}"
            stamp = f"{int(time.time() * 1000) % 60000:04X}" if self._timestamps else ""
            self._write((f"{kind}{ident}{code:X}{data.hex().upper()}{stamp}").encode("ascii") + _OK, droppable=True)
            return
        if msg.is_extended_id:
            head = f"{'R' if msg.is_remote_frame else 'T'}{msg.arbitration_id:08X}{msg.dlc:d}"
        else:
            head = f"{'r' if msg.is_remote_frame else 't'}{msg.arbitration_id:03X}{msg.dlc:d}"
        body = "" if msg.is_remote_frame else msg.data.hex().upper()
        stamp = f"{int(time.time() * 1000) % 60000:04X}" if self._timestamps else ""
        self._write((head + body + stamp).encode("ascii") + _OK, droppable=True)

    def send_raw(self, data: bytes) -> None:
        """Write ``data`` to the client as it is, channel open or not: line noise, a truncated or garbled
        line, bytes without a terminator (what a flaky adapter or cable delivers)."""
        self._write(data, droppable=False)

    def shutdown(self) -> None:
        """Stop serving and close the pty (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        super().shutdown()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=2.0)
        with self._write_lock, contextlib.suppress(OSError):
            os.close(self._master)

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        return _take(self._rx, timeout), False

    # --- the adapter side -------------------------------------------------------------------------

    def _serve(self) -> None:
        buffer = b""
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._master], [], [], 0.1)
            except (OSError, ValueError):
                return  # closed under us by shutdown()
            if not ready:
                continue
            try:
                chunk = os.read(self._master, 4096)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno != errno.EIO:
                    return
                chunk = b""
            if not chunk:
                # EIO: no process holds the slave open. The client is gone (or not here yet).
                if self._client_present:
                    self._client_present = False
                    self._open = False
                    buffer = b""
                self._stop.wait(0.05)
                continue
            self._client_present = True
            buffer += chunk
            while b"\r" in buffer:
                line, buffer = buffer.split(b"\r", 1)
                self._write(self._handle(line.strip(b"\n \t").decode("ascii", "replace")), droppable=False)
            if len(buffer) > 256:
                buffer = b""  # garbage without a terminator; resynchronise

    def _handle(self, cmd: str) -> bytes:
        """The reply to one command line (without its ``\\r``)."""
        if not cmd:
            return _OK  # an empty command is answered OK (python-can sends one for "no data bitrate")
        op, arg = cmd[0], cmd[1:]
        if op in "tTrR":
            return self._transmit(cmd)
        if op == "C":
            self._open = False
            return _OK
        if op in "OL":
            if self._open or arg:
                return _ERR
            self._open, self._listen_only = True, op == "L"
            return _OK
        if op == "S":
            if self._open or arg not in _BITRATES:
                return _ERR
            self.bitrate = _BITRATES[arg]
            return _OK
        if op == "Y":
            # CAN FD data bitrate, CANable 2.0 dialect (Y2 = 2 Mbit/s, Y5 = 5 Mbit/s), as python-can's slcan sends it.
            if self._open or arg not in _DATA_BITRATES:
                return _ERR
            self.data_bitrate = _DATA_BITRATES[arg]
            return _OK
        if op == "s":
            if self._open or len(arg) != 4 or not _is_hex(arg):
                return _ERR
            self.bitrate = None
            return _OK
        if op == "V" and not arg:
            return _VERSION
        if op == "N" and not arg:
            return _SERIAL
        if op == "F" and not arg:
            return b"F00\r" if self._open else _ERR
        if op == "Z":
            if self._open or arg not in ("0", "1"):
                return _ERR
            self._timestamps = arg == "1"
            return _OK
        if op in "Mm":
            return _OK if not self._open and len(arg) == 8 and _is_hex(arg) else _ERR
        return _ERR

    def _transmit(self, cmd: str) -> bytes:
        """Parse a client's ``t``/``T``/``r``/``R`` line into a received frame."""
        if not self._open or self._listen_only:
            return _ERR
        op = cmd[0]
        extended = op in "TR"
        id_len = 8 if extended else 3
        ident, dlc_char, data_hex = cmd[1 : 1 + id_len], cmd[1 + id_len : 2 + id_len], cmd[2 + id_len :]
        if len(ident) != id_len or not _is_hex(ident) or not dlc_char.isdigit():
            return _ERR
        arbitration_id, dlc = int(ident, 16), int(dlc_char)
        remote = op in "rR"
        if dlc > 8 or arbitration_id > (0x1FFFFFFF if extended else 0x7FF):
            return _ERR
        if remote:
            data = b""
        else:
            if len(data_hex) < 2 * dlc or not _is_hex(data_hex[: 2 * dlc]):
                return _ERR
            data = bytes.fromhex(data_hex[: 2 * dlc])
        self._rx.put(
            can.Message(
                timestamp=time.time(),
                arbitration_id=arbitration_id,
                is_extended_id=extended,
                is_remote_frame=remote,
                dlc=dlc,
                data=data,
                channel=self.path,
            )
        )
        return b"Z\r" if extended else b"z\r"

    def _write(self, data: bytes, *, droppable: bool) -> None:
        """Write ``data`` to the client. A frame that does not fit is dropped whole; a reply waits."""
        with self._write_lock:
            if self._stop.is_set():
                return
            view = memoryview(data)
            deadline = time.monotonic() + _WRITE_STALL_S
            while view:
                try:
                    n = os.write(self._master, view)
                except BlockingIOError:
                    if droppable and len(view) == len(data):
                        self.overruns += 1
                        return
                    n = 0
                except OSError:
                    self._open = False  # the client went away
                    return
                view = view[n:]
                if view:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self.overruns += 1
                        return
                    select.select([], [self._master], [], remaining)


class SlcanPtyGroup(can.BusABC):
    """Several SLCAN adapters on one simulated bus, like several nodes on a real one.

    A pty has exactly one reader (two programs reading it would each get half of every line), so a second
    program (``vgw monitor``, a candump-like tool) needs an adapter of its own. Every frame ``send()`` goes to
    each adapter whose channel a client opened; what any client transmits comes back from ``recv()``.
    ``links`` (one path per adapter, or fewer) are symbolic links made to the ptys, replaced if they exist
    and removed on :meth:`shutdown`: a config can name a path that stays the same across restarts, as a udev
    rule does for a USB adapter. Raises ``can.CanInitializationError`` if a pty or a link cannot be made.
    """

    def __init__(self, count: int = 1, links: tuple[str, ...] = (), **kwargs: Any) -> None:
        count = max(count, len(links), 1)
        self._rx: queue.SimpleQueue[can.Message] = queue.SimpleQueue()
        self.adapters: list[SlcanPtyBus] = []
        self.links: list[str] = []
        try:
            for _ in range(count):
                self.adapters.append(SlcanPtyBus(rx=self._rx))
            for link, adapter in zip(links, self.adapters, strict=False):
                _replace_link(link, adapter.path)
                self.links.append(link)
        except (OSError, can.CanInitializationError) as exc:
            self.shutdown()
            raise can.CanInitializationError(f"cannot set up the SLCAN ptys: {exc}") from exc
        self.path: str = self.adapters[0].path
        self.paths: list[str] = [a.path for a in self.adapters]
        self.channel_info = "SLCAN ptys " + ", ".join(self.paths)
        super().__init__(channel=self.path, **kwargs)

    @property
    def overruns(self) -> int:
        return sum(a.overruns for a in self.adapters)

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        for adapter in self.adapters:
            adapter.send(msg, timeout)

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        return _take(self._rx, timeout), False

    def shutdown(self) -> None:
        """Close every pty and remove the links that still point at them (idempotent)."""
        for link, adapter in zip(self.links, self.adapters, strict=False):
            with contextlib.suppress(OSError):
                if os.readlink(link) == adapter.path:
                    os.unlink(link)
        self.links = []
        for adapter in self.adapters:
            adapter.shutdown()
        if hasattr(self, "_is_shutdown"):
            super().shutdown()


def _replace_link(link: str, target: str) -> None:
    """Point the symbolic link ``link`` at ``target`` (atomically replacing a link or file there)."""
    tmp = f"{link}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdefABCDEF" for c in text)


def _take(rx: queue.SimpleQueue[can.Message], timeout: float | None) -> can.Message | None:
    """The next frame a simulated adapter received, waiting up to ``timeout`` (None: for ever)."""
    try:
        return rx.get(timeout=timeout)
    except queue.Empty:
        return None
