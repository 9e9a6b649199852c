"""Fuzz (hypothesis) the ELM327 answer parser and ISO-TP reassembly with random and truncated input.

Properties: no exception escapes (the parser and the reassembler have no error type of their own: they
never raise), the output is never larger than the input, memory does not grow across many inputs, and
time stays linear. Bounded by default; ``--runslow`` runs many more examples.
"""

from __future__ import annotations

import gc
import random
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vgw.sources.obd.elm327 import PROTOCOL_NAMES, parse_answer
from vgw.sources.obd.isotp import RESPONSE_IDS, Reassembly
from vgw_sim.elm327_sim import Elm327Simulator, isotp_frames
from vgw_sim.obd_ecu import frozen_model

CI = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROTOCOLS = st.sampled_from([None, *PROTOCOL_NAMES, "0", "Z", ""])
ERRORS = ["NO DATA", "?", "CAN ERROR", "UNABLE TO CONNECT", "BUS INIT: ...ERROR", "STOPPED", "BUFFER FULL",
          "SEARCHING...", "<DATA ERROR", "ERR94", "OK", "ELM327 v1.5", ">"]
# Text an adapter (or line noise) could send: hex digits, the index colon, spaces, odd punctuation.
NOISE = st.text(alphabet="0123456789ABCDEFabcdef: .?<>\t\x00\x7f\u00e9", max_size=80)
LINE = st.one_of(NOISE, st.sampled_from(ERRORS),
                 st.binary(max_size=16).map(lambda b: b.hex().upper()),
                 st.tuples(st.sampled_from(["7E8", "7E9", "18DAF110", "486B10", "0:", "1:", "014"]),
                           st.binary(max_size=12)).map(lambda t: t[0] + t[1].hex().upper()))


def _answers() -> list[tuple[str, list[str]]]:
    """Real answers of the simulated car in every format: (protocol, lines)."""
    out = []
    for proto in ("3", "6", "7"):
        for headers in ("ATH1", "ATH0"):
            for spaces in ("ATS1", "ATS0"):
                sim = Elm327Simulator(model=frozen_model(), realtime=False, car_protocol=proto)
                try:
                    for cmd in ("ATE0", headers, spaces):
                        sim.handle(cmd)
                    for req in ("0100", "010C0D05", "0902", "03", "07", "0120"):
                        text = sim.handle(req) or ""
                        out.append((proto, [ln for ln in text.replace("\n", "").split("\r") if ln.strip(">")]))
                finally:
                    sim.close()
    return out


ANSWERS = _answers()


def check_parse(lines: list[str], protocol: str | None, headers: bool) -> None:
    start = time.monotonic()
    result = parse_answer(lines, protocol=protocol, headers=headers)
    assert time.monotonic() - start < 1.0
    assert isinstance(result, dict)
    size = sum(len(ln) for ln in lines)
    for ecu, payload in result.items():
        assert isinstance(ecu, int) and isinstance(payload, bytes)
        assert len(payload) <= size  # never more out than in (no amplification)


@CI
@given(st.lists(LINE, max_size=30), PROTOCOLS, st.booleans())
def test_parse_answer_random_lines(lines: list[str], protocol: str | None, headers: bool) -> None:
    check_parse(lines, protocol, headers)


@pytest.mark.slow
@LONG
@given(st.lists(LINE, max_size=60), PROTOCOLS, st.booleans())
def test_parse_answer_random_lines_long(lines: list[str], protocol: str | None, headers: bool) -> None:
    check_parse(lines, protocol, headers)


def truncate(data: st.DataObject) -> tuple[list[str], str | None, bool]:
    proto, lines = data.draw(st.sampled_from(ANSWERS))
    text = "\r".join(lines)
    cut = data.draw(st.integers(0, len(text)))
    kept = text[:cut].split("\r")
    drop = data.draw(st.sets(st.integers(0, max(0, len(kept) - 1)), max_size=3))
    kept = [ln for i, ln in enumerate(kept) if i not in drop]
    return kept, data.draw(st.sampled_from([proto, None])), data.draw(st.booleans())


@CI
@given(st.data())
def test_parse_answer_truncated_real_answers(data: st.DataObject) -> None:
    check_parse(*truncate(data))


@pytest.mark.slow
@LONG
@given(st.data())
def test_parse_answer_truncated_real_answers_long(data: st.DataObject) -> None:
    check_parse(*truncate(data))


@pytest.mark.xdist_group("timing")  # asserts wall-clock bounds: runs alone in its group (README "Layout")
def test_parse_answer_time_is_linear_in_a_huge_line() -> None:
    """A line as long as the client's answer cap, and 30 times that: time grows linearly, not worse."""
    def took(n: int) -> float:
        line = "7E8" + "21" * n
        best = float("inf")
        for _ in range(5):  # CPU time, the best of five: other processes on a busy machine do not count
            start = time.process_time()
            for proto, headers in (("6", True), ("6", False), (None, True), ("3", True), ("3", False)):
                parse_answer([line, "0:" + "41" * n, f"{n:03X}"[:3]], protocol=proto, headers=headers)
            best = min(best, time.process_time() - start)
        return best

    small, big = took(16 * 1024), took(30 * 16 * 1024)
    assert big < 1.0 and big < 30 * max(small, 1e-4) * 4


# ---------------------------------------------------------------- ISO-TP reassembly

ECUS = st.sampled_from(list(RESPONSE_IDS))
FRAME = st.one_of(
    st.binary(max_size=8),
    st.binary(min_size=9, max_size=64),  # longer than classic CAN: never trusted
    st.tuples(st.integers(0, 3), st.integers(0, 15), st.binary(max_size=7)).map(
        lambda t: bytes(((t[0] << 4) | t[1],)) + t[2]),
)


def check_reassembly(frames: list[tuple[int, bytes]]) -> None:
    rx = Reassembly()
    asked: list[int] = []
    for ecu, data in frames:
        if rx.feed(ecu, data):
            asked.append(ecu)
    assert len(asked) == len(set(asked))  # one flow control per ECU per exchange
    for ecu, payload in rx.done.items():
        assert ecu in RESPONSE_IDS and isinstance(payload, bytes) and len(payload) <= 0xFFF
        assert len(payload) <= sum(len(d) for e, d in frames if e == ecu)
    assert not set(rx.open) & set(rx.done)
    for total, buf, _seq in rx.open.values():
        assert len(buf) < total <= 0xFFF


@CI
@given(st.lists(st.tuples(ECUS, FRAME), max_size=200))
def test_reassembly_random_frames(frames: list[tuple[int, bytes]]) -> None:
    check_reassembly(frames)


@pytest.mark.slow
@LONG
@given(st.lists(st.tuples(ECUS, FRAME), max_size=1000))
def test_reassembly_random_frames_long(frames: list[tuple[int, bytes]]) -> None:
    check_reassembly(frames)


def interleaved(data: st.DataObject) -> tuple[dict[int, bytes], list[tuple[int, bytes]], int]:
    messages = data.draw(st.dictionaries(ECUS, st.binary(min_size=1, max_size=300), min_size=1, max_size=4))
    queues = {ecu: isotp_frames(m) for ecu, m in messages.items()}
    order: list[tuple[int, bytes]] = []
    while any(queues.values()):
        ecu = data.draw(st.sampled_from(sorted(e for e, q in queues.items() if q)))
        order.append((ecu, queues[ecu].pop(0)))
    cut = data.draw(st.integers(0, len(order)))
    return messages, order, cut


@CI
@given(st.data())
def test_reassembly_recovers_interleaved_messages_and_drops_truncated_ones(data: st.DataObject) -> None:
    messages, order, cut = interleaved(data)
    rx = Reassembly()
    for ecu, frame in order[:cut]:
        rx.feed(ecu, frame)
    check_reassembly(order[:cut])
    for ecu, message in messages.items():
        sent = [f for e, f in order[:cut] if e == ecu]
        complete = len(sent) == len(isotp_frames(message))
        assert rx.done.get(ecu) == (message if complete else None)


# ---------------------------------------------------------------- no memory growth


def retained_after(fn: Callable[[random.Random], Any], rounds: int) -> int:
    """Bytes still allocated after ``rounds`` calls (after a warm-up): a leak or a cache would show."""
    rng = random.Random(7)
    for _ in range(200):
        fn(rng)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(rounds):
            fn(rng)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def random_lines(rng: random.Random) -> None:
    lines = ["".join(rng.choice("0123456789ABCDEF: ") for _ in range(rng.randrange(40)))
             for _ in range(rng.randrange(12))]
    parse_answer(lines, protocol=rng.choice([None, "6", "7", "3"]), headers=rng.random() < 0.5)


def random_frames(rng: random.Random) -> None:
    rx = Reassembly()
    for _ in range(rng.randrange(60)):
        rx.feed(rng.choice(RESPONSE_IDS), bytes(rng.randrange(256) for _ in range(rng.randrange(9))))


@pytest.mark.parametrize("fn", [random_lines, random_frames], ids=["parse_answer", "reassembly"])
def test_no_memory_growth(fn: Callable[[random.Random], Any]) -> None:
    assert retained_after(fn, 3000) < 64 * 1024
