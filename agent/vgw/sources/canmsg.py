"""python-can messages to and from the collector's frame tuple (:mod:`vgw.pipeline.frame`)."""

from __future__ import annotations

import can

from vgw.pipeline.frame import DATA, ERROR, REMOTE, Frame

__all__ = ["DATA", "ERROR", "REMOTE", "Frame", "frame_of", "message_of"]


def frame_of(msg: can.Message) -> Frame:
    """The frame tuple of a python-can message."""
    kind = ERROR if msg.is_error_frame else REMOTE if msg.is_remote_frame else DATA
    return (msg.timestamp, msg.arbitration_id, bool(msg.is_extended_id), bytes(msg.data), kind)


def message_of(frame: Frame) -> can.Message:
    """A python-can message for a frame tuple (``recv`` callers that want one)."""
    t, can_id, extended, data, kind = frame
    if kind == ERROR:
        return can.Message(timestamp=t, is_error_frame=True)
    if kind == REMOTE:
        return can.Message(timestamp=t, arbitration_id=can_id, is_extended_id=extended, is_remote_frame=True)
    return can.Message(timestamp=t, arbitration_id=can_id, is_extended_id=extended, data=data, dlc=len(data),
                       is_fd=len(data) > 8)
