"""The collector's frame: a plain tuple, several times cheaper to build than a ``can.Message``.

``(t, can_id, extended, data, kind)``: the frame time in Unix seconds, the arbitration id, whether it is an
extended (29-bit) id, the data bytes, and :data:`DATA`, :data:`ERROR` or :data:`REMOTE`. Sources hand the
collector lists of them (``recv_many``); error and remote frames are counted, never decoded.
"""

from __future__ import annotations

import can

DATA, ERROR, REMOTE = 0, 1, 2

#: (t, can_id, extended, data, kind)
Frame = tuple[float, int, bool, bytes, int]


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
