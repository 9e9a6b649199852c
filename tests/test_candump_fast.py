"""The collector's candump reader (read_frame_tuples) judges every line exactly as the strict reader
(read_frames) does, whatever the block boundaries, and keeps memory bounded on over-long lines."""

from __future__ import annotations

import io
from typing import Any

import pytest
import vgw.sources.candump as cd
from hypothesis import given, settings
from hypothesis import strategies as st
from vgw.sources.candump import DamagedLine, read_frame_tuples, read_frames
from vgw.sources.canmsg import frame_of

LINES = ["(1700000000.000100) can0 123#DEADBEEF", "(1700000000.5) vcan0 18FEF100#0102030405060708 R",
         "(1.000001) can0 7FF#", "(1700000000.000100) can0 123#R", "(1700000000.1) can0 20000080#0000000000000000",
         "(1700000000.1) can0 123##1" + "00" * 12, "(1700000000.1) can0 123#0011223344556677_A",
         "", "   ", "(1700000000.1) can0 800#00", "(nan) can0 123#00", "(1e9) can0 123#00", "(1.1) can0 0x1#00",
         "(1.1) can0 123#0", "(1.1) can0 123#001122334455667788", "(1.1) can0 123#00 T extra", "(1.1) can0 1_2#00",
         "(99999999999.1) can0 123#00", "(1.1) can0 123#zz", "(1.1) can0 123#+0", "\xe9(1.1) can0 123#00",
         "(1.1) can0 3FFFFFFF#00", "(1.1)\tcan0\t123#11\r", "x" * 600, "x" * 512, "(1.1) can0 123#" + "0" * 497,
         "(1.1) can0 123#00 r", "(\uff11.1) can0 123#00",  # a full-width digit: not ASCII
         "x(1.1) can0 123#00", "(1.1) can0 123#00 ", "(1.1)  can0 123#00", "(99999999999.999999) can0 123#00"]
COMMON = ["(1700000000.000100) can0 123#DEADBEEF", "(1700000000.5) vcan0 18FEF100#0102030405060708", "(1.0) x 7FF#"]


def _norm(items: Any) -> list[Any]:
    return [("damaged", x.number, x.damage) if isinstance(x, DamagedLine) else x if isinstance(x, tuple)
            else frame_of(x) for x in items]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(COMMON), st.sampled_from(LINES)), max_size=60), st.booleans(),
       st.sampled_from([7, 64, 300, 600, 65536]))
def test_fast_reader_agrees_with_the_strict_reader(lines: list[str], final_newline: bool, block: int) -> None:
    blob = "\n".join(lines).encode("utf-8") + (b"\n" if final_newline else b"")
    old = cd.BLOCK_BYTES
    cd.BLOCK_BYTES = block
    try:
        assert _norm(read_frame_tuples(io.BytesIO(blob))) == _norm(read_frames(io.BytesIO(blob)))
    finally:
        cd.BLOCK_BYTES = old


def test_an_endless_line_is_skipped_in_bounded_memory() -> None:
    class Endless(io.RawIOBase):
        def __init__(self) -> None:
            self.left = 64 * 1024 * 1024

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            n = min(len(b), self.left)
            b[:n] = b"x" * n
            self.left -= n
            return n

    got = list(read_frame_tuples(io.BufferedReader(Endless())))  # type: ignore[arg-type]
    assert got == [DamagedLine(1, cd.Damage.TOO_LONG)]


@pytest.mark.parametrize("line", ["(1700000000.000100) can0 123#DEADBEEF", "(1700000000.1) can0 18FEF100#01",
                                  "(1796624689.040476) can0 2B0#EC66ED797A R", "(1700000000.1) can0 123#00 T",
                                  "(1700000000.1) can0 123##1" + "00" * 12, "(1700000000.1) can0 123##0" + "ab" * 64])
def test_a_common_line_takes_the_fast_path(line: str) -> None:
    """Classic frames with or without the direction python-can's Logger and candump write, and CAN FD frames,
    are read a block at a time (clean), not line by line."""
    [(frames, clean)] = list(cd.read_frame_chunks(io.BytesIO((line + "\n").encode() * 3)))
    assert clean and len(frames) == 3 and frames == _norm(read_frames(io.BytesIO((line + "\n").encode() * 3)))


def test_a_trace_written_by_python_can_logger_takes_the_fast_path(tmp_path: Any) -> None:
    import can

    path = tmp_path / "drive.log"
    with can.Logger(str(path)) as logger:
        for i in range(2000):
            for ext, can_id in ((False, 0x2B0), (True, 0x18FEF100)):
                logger.on_message_received(can.Message(timestamp=1796624689.04 + i / 100, arbitration_id=can_id,
                                                       is_extended_id=ext, data=bytes([i % 256] * 8), channel="can0"))
    with path.open("rb") as fh:
        chunks = list(cd.read_frame_chunks(fh))
    assert all(clean for _items, clean in chunks)
    assert sum(len(items) for items, _clean in chunks) == 4000
