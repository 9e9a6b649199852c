"""A strict, line-by-line reader of candump ``-L`` log files (``(1700000000.000000) can0 123#DEADBEEF``).

python-can's reader is a generator that dies at the first line it cannot parse, so one garbled line would end
(or, re-opened, restart) a replay. This reader judges each line alone: a damaged line is reported as a
:class:`DamagedLine` with its number and a :class:`Damage` kind, and reading goes on with the next line.
Memory is bounded: a line longer than :data:`MAX_LINE_BYTES` is skipped in chunks, never held whole.

Accepted, as candump (can-utils ``lib.c``) writes it: a time ``(seconds.fraction)``, a channel name, a frame
``<id>#<data>`` with a 3-digit standard or 8-digit extended hex id, ``<id>#R[<dlc>]`` (remote),
``<id>##<flags><data>`` (CAN FD), an optional ``_<dlc>`` after 8 data bytes (raw DLC 9..F), an id with the
error flag (0x20000000) as an error frame, and an optional trailing ``R``/``T`` (direction).

:func:`read_frame_tuples` is the collector's reader: it reads the file in blocks, takes the common line (a
classic data frame) on a fast path straight to a frame tuple (vgw.sources.canmsg), and hands every other line
to :func:`parse_line`, so it accepts and refuses exactly the same lines as :func:`read_frames`. The fast path
takes classic and CAN FD data frames, with or without the direction suffix (python-can's ``can.Logger`` writes
`` R``), so a trace recorded by python-can or by candump goes at the same speed.
"""

from __future__ import annotations

import enum
import gzip
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import can

from vgw.base.errors import SourceFrameError
from vgw.base.fsutil import open_regular
from vgw.base.timefmt import LATEST_TIME
from vgw.sources.canmsg import Frame, frame_of

MAX_LINE_BYTES = 512  # the longest candump -L line (FD, 64 bytes, 16-char channel) is under 200
CAN_ERR_FLAG = 0x20000000
FD_LENGTHS = frozenset((*range(9), 12, 16, 20, 24, 32, 48, 64))
_TIME = re.compile(r"\((\d{1,12}(?:\.\d{1,9})?)\)")
_ID = re.compile(r"[0-9A-Fa-f]{3}|[0-9A-Fa-f]{8}")
_HEX_DIGIT = re.compile(r"[0-9A-Fa-f]")


class Damage(enum.Enum):
    """Why a line was not a frame (no line content is ever logged: it may hold signal values)."""

    TOO_LONG = f"longer than {MAX_LINE_BYTES} bytes"
    ENCODING = "not ASCII text"
    FIELDS = "not '(time) channel frame [R|T]'"
    TIME = "time is not a number of seconds in years 1970..9999"
    ID = "frame id is not a 3- or 8-digit hex CAN id"
    DATA = "frame data is not hex bytes of a valid length"


@dataclass(frozen=True)
class DamagedLine:
    """Line ``number`` (1-based) of a trace could not be read, for the reason ``damage``."""

    number: int
    damage: Damage


class LineError(SourceFrameError, ValueError):
    """One line is not a candump frame; ``damage`` says why."""

    def __init__(self, damage: Damage) -> None:
        super().__init__(damage.value)
        self.damage = damage


def parse_line(text: str) -> can.Message | None:
    """The frame on one candump ``-L`` line, or None for a blank line. Raises :class:`LineError`."""
    fields = text.split()
    if not fields:
        return None
    is_rx = True
    if len(fields) == 4 and fields[3] in ("R", "T", "r", "t"):
        is_rx = fields[3] in ("R", "r")
    elif len(fields) != 3:
        raise LineError(Damage.FIELDS)
    stamp, channel_text, frame = fields[0], fields[1], fields[2]
    m = _TIME.fullmatch(stamp)
    if m is None:
        raise LineError(Damage.TIME)
    timestamp = float(m.group(1))
    if timestamp > LATEST_TIME:
        raise LineError(Damage.TIME)
    ident, sep, data = frame.partition("#")
    if not sep or _ID.fullmatch(ident) is None:
        raise LineError(Damage.ID)
    can_id = int(ident, 16)
    extended = len(ident) == 8
    channel: int | str = int(channel_text) if channel_text.isdigit() else channel_text
    if extended and can_id & CAN_ERR_FLAG:
        return can.Message(timestamp=timestamp, is_error_frame=True, channel=channel, is_rx=is_rx)
    if (extended and can_id > 0x1FFFFFFF) or (not extended and can_id > 0x7FF):
        raise LineError(Damage.ID)
    if data[:1] in ("R", "r"):
        dlc_text = data[1:]
        if dlc_text and not (len(dlc_text) == 1 and "0" <= dlc_text <= "8"):
            raise LineError(Damage.DATA)
        return can.Message(timestamp=timestamp, arbitration_id=can_id, is_extended_id=extended,
                           is_remote_frame=True, dlc=int(dlc_text or "0"), channel=channel, is_rx=is_rx)
    is_fd = data[:1] == "#"
    flags = 0
    if is_fd:
        if len(data) < 2 or _HEX_DIGIT.fullmatch(data[1]) is None:
            raise LineError(Damage.DATA)
        flags, data = int(data[1], 16), data[2:]
    elif len(data) == 18 and data[16] == "_" and data[17] in "9ABCDEFabcdef":
        data = data[:16]  # classic CAN with a raw DLC of 9..15: still 8 data bytes
    try:
        payload = bytes.fromhex(data)
    except ValueError:
        raise LineError(Damage.DATA) from None
    # bytes.fromhex skips whitespace, which split() already removed; odd lengths and non-hex raise above.
    if (is_fd and len(payload) not in FD_LENGTHS) or (not is_fd and len(payload) > 8):
        raise LineError(Damage.DATA)
    return can.Message(timestamp=timestamp, arbitration_id=can_id, is_extended_id=extended, is_fd=is_fd,
                       bitrate_switch=bool(flags & 0x01), error_state_indicator=bool(flags & 0x02),
                       dlc=len(payload), data=payload, channel=channel, is_rx=is_rx)


def read_frames(fh: BinaryIO) -> Iterator[can.Message | DamagedLine]:
    """Every frame of an open binary candump log, and a :class:`DamagedLine` for each line that is not one.

    I/O and decompression errors of ``fh`` propagate (``OSError``, ``EOFError``, ``zlib.error``).
    """
    number = 0
    while True:
        raw = fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest of the over-long line, chunk by chunk
                raw = fh.readline(64 * 1024)
            yield DamagedLine(number, Damage.TOO_LONG)
            continue
        judged = _judge_line(raw, number)
        if judged is not None:
            yield judged


BLOCK_BYTES = 64 * 1024
_HEX = "0123456789abcdefABCDEF"


def read_frame_tuples(fh: BinaryIO) -> Iterator[Frame | DamagedLine]:
    """Every frame of an open binary candump log as a frame tuple, and a :class:`DamagedLine` for each line
    that is not one: the same lines as :func:`read_frames`, several times faster. Memory stays bounded by
    one block plus :data:`MAX_LINE_BYTES` (an over-long line is skipped, never held whole).

    I/O and decompression errors of ``fh`` propagate (``OSError``, ``EOFError``, ``zlib.error``).
    """
    for chunk, _clean in read_frame_chunks(fh):
        yield from chunk


# A whole block of common lines is matched at once: data frames, classic (up to 8 bytes) or CAN FD
# (``##<flags><data>``), each with or without the direction suffix that python-can's ``can.Logger`` and some
# candump options write (`` R``/`` T``), single spaces, nothing else. A block with any other line is judged
# line by line. Ids, times and data lengths are range-checked after the match.
_COMMON = re.compile(r"^\((\d{1,12}(?:\.\d{1,9})?)\) [!-~]+ ([0-9A-Fa-f]{3}|[0-9A-Fa-f]{8})#"
                     r"(#[0-9A-Fa-f])?((?:[0-9A-Fa-f]{2}){0,64})(?: [RTrt])?$", re.M)


def read_frame_chunks(fh: BinaryIO) -> Iterator[tuple[list[Frame | DamagedLine], bool]]:
    """:func:`read_frame_tuples` a block at a time: (items, clean), where clean means every item is a frame
    tuple of a data frame (no damaged line, error or remote frame)."""
    number = 0
    rest = b""
    skipping = False  # inside an over-long line: drop bytes up to its end
    while True:
        block = fh.read(BLOCK_BYTES)
        if not block:
            if skipping:
                yield [DamagedLine(number + 1, Damage.TOO_LONG)], False
            elif rest:
                number += 1
                yield list(_slow_line(rest, number)), False
            return
        data = rest + block if rest else block
        cut = data.rfind(b"\n")
        if cut < 0:
            rest = b"" if skipping else data
            if len(rest) > MAX_LINE_BYTES:
                skipping, rest = True, b""
            continue
        complete, rest = data[:cut], data[cut + 1:]
        ends_long, skipping = skipping, len(rest) > MAX_LINE_BYTES
        if skipping:
            rest = b""
        lines_in_block = complete.count(b"\n") + 1
        if not ends_long and complete.isascii():
            text = complete.decode("ascii")
            fast = _fast_block(text, lines_in_block)
            if fast is not None:
                number += lines_in_block
                yield fast, True
                continue
            lines: list[Any] = text.split("\n")
        else:
            lines = list(complete.split(b"\n"))  # judged line by line on the slow path
            if ends_long:
                lines[0] = None  # the end of an over-long line
        out: list[Frame | DamagedLine] = []
        for line in lines:
            number += 1
            if line is None:
                out.append(DamagedLine(number, Damage.TOO_LONG))
            else:
                out.extend(_slow_line(line, number))
        yield out, False


def _fast_block(text: str, lines: int) -> list[Frame | DamagedLine] | None:
    """The frames of a block whose every line is a common one, or None (then it is judged line by line)."""
    found = _COMMON.findall(text)
    if len(found) != lines:
        return None
    try:
        frames: list[Frame | DamagedLine] = [(float(t), int(i, 16), len(i) == 8, bytes.fromhex(d), 0)
                                             for t, i, _fd, d in found]
    except ValueError:
        return None
    if max(f[0] for f in frames) > LATEST_TIME or any(  # type: ignore[index]
            f[1] > (0x1FFFFFFF if f[2] else 0x7FF) for f in frames):  # type: ignore[index]
        return None
    if any((len(d) > 16 and not fd) or (fd and len(d) // 2 not in FD_LENGTHS) for _t, _i, fd, d in found):
        return None  # a classic frame over 8 bytes, or an FD length that does not exist: judged line by line
    return frames


def _slow_line(line: str | bytes, number: int) -> Iterator[Frame | DamagedLine]:
    """One line off the fast path: judged by :func:`parse_line` exactly as :func:`read_frames` judges it."""
    if len(line) > MAX_LINE_BYTES:
        yield DamagedLine(number, Damage.TOO_LONG)
        return
    judged = _judge_line(line, number)
    if isinstance(judged, DamagedLine):
        yield judged
    elif judged is not None:
        yield frame_of(judged)


def _judge_line(line: str | bytes, number: int) -> can.Message | DamagedLine | None:
    """One line of at most MAX_LINE_BYTES: its frame, the damage that makes it none, or None (no frame on it)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("ascii")
        except UnicodeDecodeError:
            return DamagedLine(number, Damage.ENCODING)
    try:
        return parse_line(line)
    except LineError as exc:
        return DamagedLine(number, exc.damage)


def is_candump(path: Path) -> bool:
    """True for the files this reader handles: ``*.log`` and ``*.log.gz`` (as ``can.LogReader`` decides)."""
    suffixes = [s.lower() for s in path.suffixes]
    return suffixes[-1:] == [".log"] or suffixes[-2:] == [".log", ".gz"]


def open_binary(path: Path) -> BinaryIO:
    """Open a candump log for :func:`read_frames` (gzip-decompressed for ``.gz``). Raises OSError, and
    :class:`~vgw.base.fsutil.NotRegularFile` for a FIFO or device (a FIFO would block, ``/dev/zero`` never end)."""
    fh = os.fdopen(open_regular(path), "rb")
    if path.suffix.lower() == ".gz":
        return _GzipReader(fh)  # type: ignore[return-value]
    return fh


class _GzipReader(gzip.GzipFile):
    """A gzip stream over a file it owns: closing it closes the file too (GzipFile leaves a given one open)."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()
