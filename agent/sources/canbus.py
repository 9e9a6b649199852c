"""A live CAN bus through python-can: SocketCAN, SLCAN adapters, the virtual bus, or any other interface."""

from __future__ import annotations

import logging
from typing import Any

import can

from agent.errors import SourceOpenError, SourceReadError

log = logging.getLogger("vgw.source")

# Interfaces whose driver filters in the kernel or on the adapter (python-can passes can_filters down).
_KERNEL_FILTERS = {"socketcan"}


class BusSource:
    finished = False

    def __init__(self, interface: str, channel: str | None, bitrate: int | None = None) -> None:
        if interface == "udp_multicast":
            raise SourceOpenError("interface udp_multicast is not allowed: it sends frames off the device")
        self.interface = interface
        self.channel = channel
        kwargs: dict[str, Any] = {"interface": interface, "channel": channel}
        if bitrate:
            kwargs["bitrate"] = bitrate
        if interface == "virtual":
            kwargs["receive_own_messages"] = False
        try:
            self.bus = can.Bus(**kwargs)
        except (can.CanError, OSError, ValueError, ImportError) as exc:
            raise SourceOpenError(f"cannot open CAN interface {interface!r} channel {channel!r}: {exc}") from exc
        self._closed = False

    def recv(self, timeout: float) -> can.Message | None:
        try:
            msg = self.bus.recv(timeout)
        except (can.CanError, OSError, ValueError) as exc:
            raise SourceReadError(f"CAN {self.interface}:{self.channel} read failed: {exc}") from exc
        return msg

    def set_filters(self, frame_ids: frozenset[int]) -> None:
        if self.interface not in _KERNEL_FILTERS:
            return
        # An empty filter list means "everything" to python-can; with no consented id we want nothing,
        # so match a single impossible id instead (an 11-bit id with all 29 bits set never occurs).
        filters: list[can.typechecking.CanFilterExtended] = [
            {"can_id": fid, "can_mask": 0x1FFFFFFF, "extended": fid > 0x7FF} for fid in sorted(frame_ids)
        ] or [{"can_id": 0x1FFFFFFF, "can_mask": 0x1FFFFFFF, "extended": False}]
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
