"""The collector's frame: a plain tuple, several times cheaper to build than a ``can.Message``.

``(t, can_id, extended, data, kind)``: the frame time in Unix seconds, the arbitration id, whether it is an
extended (29-bit) id, the data bytes, and :data:`DATA`, :data:`ERROR` or :data:`REMOTE`. Sources hand the
collector lists of them (``recv_many``, :mod:`vgw.sources.canmsg` converts python-can messages); error and
remote frames are counted, never decoded.
"""

from __future__ import annotations

DATA, ERROR, REMOTE = 0, 1, 2

#: (t, can_id, extended, data, kind)
Frame = tuple[float, int, bool, bytes, int]
