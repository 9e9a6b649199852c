"""A live CAN bus through python-can: SocketCAN, SLCAN adapters, the virtual bus, or any other interface.

Bounded receive side: SocketCAN queues in the kernel socket buffer (bounded; the kernel counts its drops), an
SLCAN adapter in its serial buffer; python-can's virtual bus would queue without limit, so its queue is
replaced by one of ``RX_QUEUE_FRAMES`` that drops the newest frame when full and counts it in ``overflow``
(a real controller loses frames the same way when nobody reads them in time). A failing bus (bus-off,
interface down, adapter unplugged) raises SourceReadError; the collector closes the source and reopens it
after ``[can] reopen_s``.
"""

from __future__ import annotations

import logging
import queue
from typing import Any

import can
from can.typechecking import CanFilter

from agent.errors import SourceOpenError, SourceReadError
from agent.j1939 import ids as j1939
from agent.j1939.request import is_request

log = logging.getLogger("vgw.source")

# Interfaces whose driver filters in the kernel or on the adapter (python-can passes can_filters down).
_KERNEL_FILTERS = {"socketcan"}
RX_QUEUE_FRAMES = 4096


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
        try:
            self.bus = can.Bus(**kwargs)
        except (can.CanError, OSError, ValueError, ImportError) as exc:
            raise SourceOpenError(f"cannot open CAN interface {interface!r} channel {channel!r}: {exc}") from exc
        if fd and interface == "slcan" and bitrate and data_bitrate:
            try:
                self.bus.set_bitrate(bitrate, data_bitrate)  # type: ignore[attr-defined]
            except (can.CanError, OSError, ValueError) as exc:
                self.bus.shutdown()
                raise SourceOpenError(f"slcan adapter {channel!r} refused data bitrate {data_bitrate}: {exc}") from exc
        self._closed = False
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
        try:
            msg = self.bus.recv(timeout)
        except (can.CanError, OSError, ValueError) as exc:
            raise SourceReadError(f"CAN {self.interface}:{self.channel} read failed: {exc}") from exc
        return msg

    def send_j1939_request(self, can_id: int, data: bytes) -> None:
        """Send one J1939 request (README "SAE J1939"): the only frame the agent ever puts on a bus, so
        anything else is refused here too. Raises ValueError for another frame, SourceReadError on failure."""
        if not is_request(can_id, data):
            raise ValueError("only J1939 requests for a requestable PGN may be sent")
        try:
            self.bus.send(can.Message(arbitration_id=can_id, is_extended_id=True, data=data), timeout=0.05)
        except (can.CanError, OSError, ValueError) as exc:
            raise SourceReadError(f"CAN {self.interface}:{self.channel} J1939 request failed: {exc}") from exc

    def set_filters(self, frame_ids: frozenset[int]) -> None:
        if self.interface not in _KERNEL_FILTERS:
            return
        # An empty filter list means "everything" to python-can; with no consented id we want nothing,
        # so match a single impossible id instead (an 11-bit id with all 29 bits set never occurs).
        # An id that fits in 11 bits may be a standard or an extended frame: let both through (the agent's
        # own routing filters again by the DBC's frame format).
        exact: list[CanFilter] = [
            {"can_id": fid, "can_mask": 0x1FFFFFFF, "extended": ext}
            for fid in sorted(frame_ids)
            if not j1939.is_route_key(fid)
            for ext in ((False, True) if fid <= 0x7FF else (True,))
        ]
        # J1939 routes match by PGN whatever the priority (and source): a masked filter each.
        masked: list[CanFilter] = [
            {"can_id": can_id, "can_mask": mask, "extended": True}
            for can_id, mask in sorted({j1939.kernel_filter(k) for k in frame_ids if j1939.is_route_key(k)})
        ]
        filters = exact + masked or [{"can_id": 0x1FFFFFFF, "can_mask": 0x1FFFFFFF, "extended": False}]
        try:
            self.bus.set_filters(filters)
        except (can.CanError, OSError) as exc:
            log.warning("could not install kernel CAN filters (%s); filtering in the agent only", exc)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.bus.shutdown()
            except (can.CanError, OSError):
                pass
