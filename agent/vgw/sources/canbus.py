"""A live CAN bus through python-can: SocketCAN, SLCAN adapters, the virtual bus, or any other interface.

Bounded receive side: SocketCAN queues in the kernel socket buffer (bounded; the kernel counts its drops), an
SLCAN adapter in its serial buffer; python-can's virtual bus would queue without limit, so its queue is
replaced by one of ``RX_QUEUE_FRAMES`` that drops the newest frame when full and counts it in ``overflow``
(a real controller loses frames the same way when nobody reads them in time). A failing bus (bus-off,
interface down, adapter unplugged) raises SourceReadError; the collector closes the source and reopens it
after ``[can] reopen_s``.

Bad input is not a failing bus: a garbled or truncated line from an SLCAN adapter (serial noise such as
``t12\r``) makes python-can's parser raise IndexError/ValueError, which arrives here as such or wrapped in a
CanOperationError. :meth:`BusSource.recv` raises SourceFrameError for it: that one frame is skipped, the source
stays open (docs/guarantees.md, "No single bad input stops collection"). python-can's SLCAN driver collects a
line until ``\r``/``\a`` without a limit; a longer run of noise than any valid line is discarded here, so a
line without terminator cannot grow memory.
"""

from __future__ import annotations

import logging
import queue
from typing import Any

import can
from can.typechecking import CanFilter

from vgw.base.errors import SourceError, SourceFrameError, SourceOpenError, SourceReadError
from vgw.pipeline.j1939 import ids as j1939
from vgw.pipeline.j1939.request import is_request
from vgw.sources.canmsg import Frame, frame_of
from vgw.sources.serialport import PortClaim, device_path

log = logging.getLogger(__name__)

# Interfaces whose driver filters in the kernel or on the adapter (python-can passes can_filters down).
_KERNEL_FILTERS = {"socketcan"}
RX_QUEUE_FRAMES = 4096
# The longest valid SLCAN line: CAN FD extended with bitrate switch ("B" + 8 id + 1 dlc + 128 data + 4 stamp).
SLCAN_LINE_MAX = 160
CAN_EFF_FLAG = 0x80000000  # linux/can.h: the frame format bit a kernel filter must match (not only the id bits)


class _DroppingQueue(queue.Queue):  # type: ignore[type-arg]
    """A bounded queue whose ``put`` never blocks the sender: a frame that does not fit is counted and lost."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.dropped = 0

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        try:
            super().put(item, block=False)
        except queue.Full:
            self.dropped += 1


def _fd_kwargs(interface: str, bitrate: int | None, data_bitrate: int | None) -> dict[str, Any]:
    """python-can arguments that open ``interface`` in CAN FD mode (README "CAN FD").

    SocketCAN: ``fd=True`` makes the socket take CANFD_MTU frames (the kernel sets the bit timing).
    slcan: python-can parses FD frames (CANable 2.0 dialect) in any mode; a data bitrate is set after the
    adapter opened, with ``set_bitrate(bitrate, data_bitrate)``.
    Other drivers (pcan, kvaser, vector ...) take ``fd`` and ``data_bitrate``.
    """
    if interface == "virtual":
        return {"protocol": can.CanProtocol.CAN_FD}
    if interface == "slcan":
        return {}
    out: dict[str, Any] = {"fd": True}
    if data_bitrate and interface != "socketcan":
        out["data_bitrate"] = data_bitrate
    return out


class BusSource:
    finished = False
    requests_failed = 0  # J1939 requests the bus did not take

    def __init__(self, interface: str, channel: str | None, bitrate: int | None = None, *, fd: bool = False,
                 data_bitrate: int | None = None) -> None:
        if interface == "udp_multicast":
            raise SourceOpenError("interface udp_multicast is not allowed: it sends frames off the device")
        self.interface = interface
        self.channel = channel
        kwargs: dict[str, Any] = {"interface": interface, "channel": channel}
        if bitrate:
            kwargs["bitrate"] = bitrate
        if interface == "virtual":
            kwargs["receive_own_messages"] = False
        if fd:
            kwargs.update(_fd_kwargs(interface, bitrate, data_bitrate))
        # A serial port has one reader: claim it before python-can opens it (and writes its setup commands).
        port = device_path(interface, channel)
        self._claim = PortClaim(f"{interface}:{channel}", port) if port is not None else None
        try:
            self.bus = can.Bus(**kwargs)
        except (can.CanError, OSError, ValueError, ImportError) as exc:
            self._release_claim()
            raise SourceOpenError(f"cannot open CAN interface {interface!r} channel {channel!r}: {exc}") from exc
        if fd and interface == "slcan" and bitrate and data_bitrate:
            try:
                self.bus.set_bitrate(bitrate, data_bitrate)  # type: ignore[attr-defined]
            except (can.CanError, OSError, ValueError) as exc:
                self.bus.shutdown()
                self._release_claim()
                raise SourceOpenError(f"slcan adapter {channel!r} refused data bitrate {data_bitrate}: {exc}") from exc
        if self._claim is not None:
            try:
                self._claim.exclusive()
            except SourceOpenError:
                self.bus.shutdown()
                self._release_claim()
                raise
        self._closed = False
        self._error: SourceError | None = None  # raised by the next recv_many (vgw.sources.FrameSource)
        self._rx: _DroppingQueue | None = None
        if interface == "virtual":
            self._bound_virtual_queue()

    def _bound_virtual_queue(self) -> None:
        from can.interfaces import virtual

        bus: Any = self.bus
        rx = _DroppingQueue(RX_QUEUE_FRAMES)
        with virtual.channels_lock:
            try:
                bus.channel[bus.channel.index(bus.queue)] = rx
            except (AttributeError, ValueError):  # another python-can layout: keep its own queue
                log.warning("virtual bus: receive queue left unbounded (unknown python-can layout)")
                return
            bus.queue = rx
        self._rx = rx

    @property
    def overflow(self) -> int:
        """Frames lost because the receive queue was full."""
        return self._rx.dropped if self._rx is not None else 0

    def recv(self, timeout: float) -> can.Message | None:
        """The next frame or None. Raises SourceFrameError for one malformed frame, SourceReadError when the bus
        fails."""
        try:
            msg = self.bus.recv(timeout)
        except Exception as exc:
            if _is_read_failure(exc):
                raise SourceReadError(f"CAN {self.interface}:{self.channel} read failed: {exc}") from exc
            # python-can clears its SLCAN line buffer only after decoding it: a non-ASCII byte would stay and
            # spoil every later line. Start the next line afresh.
            self._slcan_resync(0)
            # Only the exception's type: its text may quote the frame's bytes.
            raise SourceFrameError(f"CAN {self.interface}:{self.channel}: malformed frame skipped "
                                   f"({type(_root_cause(exc)).__name__})") from exc
        if msg is None:
            if self._slcan_resync(SLCAN_LINE_MAX):
                raise SourceFrameError(f"CAN {self.interface}:{self.channel}: more than {SLCAN_LINE_MAX} bytes "
                                       "without a line terminator discarded")
            return None
        if not (msg.is_remote_frame or msg.is_error_frame) and (
                len(msg.data) != msg.dlc or len(msg.data) > (64 if msg.is_fd else 8)):
            # python-can builds such frames from garbled SLCAN lines without checking them ("T...9" + 9 bytes:
            # dlc 12, 9 data bytes): no controller delivers one (ISO 11898-1 data length codes).
            raise SourceFrameError(f"CAN {self.interface}:{self.channel}: frame with dlc {msg.dlc} and "
                                   f"{len(msg.data)} data bytes skipped")
        return msg

    def recv_many(self, max_frames: int, timeout: float) -> list[Frame]:
        """Up to ``max_frames`` frames: waits up to ``timeout`` s for the first, then takes what the bus already
        holds (``recv(0)``), so the collector takes its lock once per chunk. A malformed frame or a failure
        after the first frame is raised by the next call, after the good frames before it were handed out."""
        error, self._error = self._error, None
        if error is not None:
            raise error
        msg = self.recv(timeout)
        out: list[Frame] = []
        while msg is not None:
            out.append(frame_of(msg))
            if len(out) >= max_frames:
                break
            try:
                msg = self.recv(0)
            except SourceError as exc:
                self._error = exc
                break
        return out

    def send_j1939_request(self, can_id: int, data: bytes) -> bool:
        """Send one J1939 request (README "SAE J1939"): the only frame the agent ever puts on a bus, so
        anything else is refused here too. Raises ValueError for another frame; returns False (counted in
        ``requests_failed``) when the bus does not take it -- the next one is due after the rate limit anyway."""
        if not is_request(can_id, data):
            raise ValueError("only J1939 requests for a requestable PGN may be sent")
        try:
            self.bus.send(can.Message(arbitration_id=can_id, is_extended_id=True, data=data), timeout=0.05)
        except (can.CanError, OSError, ValueError):
            self.requests_failed += 1
            return False
        return True

    def _slcan_resync(self, longer_than: int) -> bool:
        """Empty python-can's pending SLCAN line if it is longer than ``longer_than`` bytes. True if it did."""
        buffer = getattr(self.bus, "_buffer", None) if self.interface == "slcan" else None
        if isinstance(buffer, bytearray) and len(buffer) > longer_than:
            buffer.clear()
            return True
        return False

    def set_filters(self, frames: frozenset[tuple[int, bool]]) -> None:
        if self.interface not in _KERNEL_FILTERS:
            return
        filters = kernel_filters(frames)
        try:
            self.bus.set_filters(filters)
        except (can.CanError, OSError) as exc:
            log.warning("could not install kernel CAN filters (%s); filtering in the agent only", exc)

    def _release_claim(self) -> None:
        if self._claim is not None:
            self._claim.release()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.bus.shutdown()
            except (can.CanError, OSError):
                pass
            self._release_claim()


def kernel_filters(frames: frozenset[tuple[int, bool]]) -> list[CanFilter]:
    """python-can filters passing exactly the (id, extended) frames given, and nothing else.

    An empty filter list means "everything" to python-can; with no consented frame we want nothing, so match a
    single impossible id instead (an 11-bit id with all 29 bits set never occurs). ``extended`` makes
    python-can put CAN_EFF_FLAG into the kernel filter's can_id and can_mask (socketcan/utils.py
    pack_filters); it is in the mask here too, so a standard 0x123 filter never passes the extended 0x123
    frame and the reverse, whichever layer applies the filter.
    """
    mask = 0x1FFFFFFF | CAN_EFF_FLAG
    filters: list[CanFilter] = [{"can_id": fid, "can_mask": mask, "extended": ext} for fid, ext in sorted(frames)
                                if not j1939.is_route_key(fid)]
    # J1939 route keys (vgw.pipeline.j1939.ids) match a PGN whatever the priority (and the source): one masked
    # extended filter each.
    filters += [{"can_id": can_id, "can_mask": j1939_mask | CAN_EFF_FLAG, "extended": True}
                for can_id, j1939_mask in sorted({j1939.kernel_filter(fid) for fid, _ in frames
                                                  if j1939.is_route_key(fid)})]
    return filters or [{"can_id": 0x1FFFFFFF, "can_mask": mask, "extended": False}]


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _is_read_failure(exc: BaseException) -> bool:
    """True when the bus or the serial line failed (reopen), False when one frame's content was bad (skip).

    An OSError anywhere in the chain (pyserial's SerialException is one) or a CanError that wraps nothing
    (bus-off, closed bus) is a failure; python-can parsing a garbled line raises IndexError/ValueError/
    UnicodeDecodeError, bare or wrapped by its ``error_check`` in a CanOperationError.
    """
    cur: BaseException | None = exc
    while cur is not None:
        if isinstance(cur, OSError):
            return True
        if isinstance(cur, can.CanError) and cur.__cause__ is None:
            return True
        cur = cur.__cause__
    return False
