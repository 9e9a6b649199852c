"""Unix times as text for people, for any value a file may hold.

A consent cache, an audit log or a status file can hold a time no calendar shows (2**63, 1e300, NaN, a string):
``time.gmtime`` then raises ``OverflowError``/``OSError``/``ValueError``. The commands that print times
(`vgw consent show`, `vgw status`, `vgw report`) format them here and print a placeholder instead.
"""

from __future__ import annotations

import math
import time

#: 9999-12-31 23:59:59 UTC: the last second that gmtime/strftime and every date library can show.
LATEST_TIME = 253_402_300_799

UTC_FORMAT = "%Y-%m-%d %H:%M:%S UTC"


def valid_time(t: object) -> bool:
    """True when ``t`` is a number of Unix seconds in years 1970..9999."""
    if isinstance(t, bool) or not isinstance(t, int | float):
        return False
    return math.isfinite(t) and 0 <= t <= LATEST_TIME


def utc_text(t: object, fmt: str = UTC_FORMAT, *, missing: str = "-") -> str:
    """``t`` (Unix seconds) as UTC text; ``missing`` when it is not a number, "invalid time" when out of range."""
    if t is None or isinstance(t, bool) or not isinstance(t, int | float):
        return missing
    if not valid_time(t):
        return "invalid time"
    return time.strftime(fmt, time.gmtime(t))


def local_text(t: object, fmt: str = "%Y-%m-%d %H:%M:%S", *, missing: str = "-") -> str:
    """``t`` (Unix seconds) as local time text; placeholders as in :func:`utc_text`."""
    if t is None or isinstance(t, bool) or not isinstance(t, int | float):
        return missing
    if not valid_time(t):
        return "invalid time"
    try:
        return time.strftime(fmt, time.localtime(t))
    except (OverflowError, OSError, ValueError):  # a time zone database may end before year 9999
        return "invalid time"
