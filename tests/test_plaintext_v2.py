"""README "Telemetry envelope" plaintext version 2 (columnar): it carries exactly the samples of version 1
(times to 1 µs), and every receiver reads both versions."""

from __future__ import annotations

import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vgw.cloud.consent_authority import RecipientKey
from vgw.cloud.envelopes import EnvelopeError, open_envelope
from vgw.contract.envelope import (
    batch_plaintext,
    columnar_plaintext,
    dumps,
    load_recipient_key,
    loads,
    plaintext_samples,
    seal,
    to_us,
    us_of,
)

PATHS = ("Vehicle.Speed", "Vehicle.CurrentLocation.Latitude", "Vehicle.VehicleIdentification.VIN", "A.B")
values = st.one_of(st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False),
                   st.text(max_size=20), st.dictionaries(st.sampled_from(["min", "max", "n"]),
                                                         st.floats(allow_nan=False, allow_infinity=False)))
times = st.floats(min_value=0.0, max_value=4_102_444_800.0, allow_nan=False)  # 1970..2100


def _decode(plaintext: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = loads(zlib.decompress(plaintext))
    return doc


def _key(s: dict[str, Any]) -> tuple[str, float]:
    return s["path"], s["t"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PATHS), times, values), max_size=40))
def test_v2_round_trip_equals_the_v1_samples(samples: list[tuple[str, float, Any]]) -> None:
    series: dict[str, tuple[list[float], list[Any]]] = {}
    for path, t, value in samples:
        col = series.setdefault(path, ([], []))
        col[0].append(us_of(t))
        col[1].append(value)
    v1 = plaintext_samples(_decode(batch_plaintext("d", "g", 1, [{"t": round(t, 6), "path": p, "value": v}
                                                                  for p, t, v in samples], epoch="e")))
    doc = _decode(columnar_plaintext("d", "g", 1, series, epoch="e"))
    assert doc["v"] == 2 and doc["seq"] == 1 and doc["epoch"] == "e" and isinstance(doc["t0_us"], int)
    if samples:
        assert doc["t0_us"] / 1e6 == min(round(t, 6) for _, t, _ in samples)  # t0_us is the smallest time
    v2 = plaintext_samples(doc)
    assert len(v2) == len(v1)
    # Per path, the same values in the same time order; every time within 1 µs of the v1 time.
    for path in PATHS:
        a = sorted((s for s in v1 if s["path"] == path), key=lambda s: s["t"])
        b = [s for s in v2 if s["path"] == path]
        assert [s["t"] for s in b] == sorted(s["t"] for s in b)
        assert sorted(map(repr, (s["value"] for s in a))) == sorted(map(repr, (s["value"] for s in b)))
        for x, y in zip(sorted(a, key=_key), sorted(b, key=_key), strict=True):
            assert x["t"] == y["t"]  # the v1 time, round(t, 6), to the bit


def test_v2_is_smaller_than_v1() -> None:
    ts = [1_795_920_000.0 + i * 0.02 for i in range(1000)]
    series = {p: (to_us(ts), [50.0 + i % 7 for i in range(1000)]) for p in PATHS}
    v1 = batch_plaintext("d", "g", 1, [{"t": round(t, 6), "path": p, "value": v}
                                       for p, (tt, vv) in series.items()
                                       for t, v in zip(ts, vv, strict=False)], epoch="e")
    assert len(columnar_plaintext("d", "g", 1, series, epoch="e")) < 0.8 * len(v1)


@pytest.mark.parametrize("bad", [
    {"v": 2, "t0_us": 1.5, "series": []},
    {"v": 2, "t0_us": 1, "series": [{"path": "a", "dt_us": [0, 1], "value": [1]}]},
    {"v": 2, "t0_us": 1, "series": [{"path": "a", "dt_us": [0, -1], "value": [1, 2]}]},
    {"v": 2, "t0_us": 1, "series": [{"path": 3, "dt_us": [0], "value": [1]}]},
    {"v": 2, "t0_us": 1, "series": [{"path": "a", "dt_us": [0.5], "value": [1]}]},
    {"v": 3, "samples": []},
])
def test_a_malformed_v2_batch_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        plaintext_samples(bad)


def test_the_cloud_side_opens_both_versions() -> None:
    key = RecipientKey.generate()
    rk = load_recipient_key("X25519", key.public_raw)
    v1 = seal("X25519", rk, "dev", "g", batch_plaintext("dev", "g", 1, [{"t": 1.5, "path": "A.B", "value": 3}],
                                                         epoch="e"))
    v2 = seal("X25519", rk, "dev", "g", columnar_plaintext("dev", "g", 2, {"A.B": ([1_500_000, 2_000_000], [3, 4])},
                                                            epoch="e"))
    assert open_envelope(v1, key, "dev", "g")["samples"] == [{"t": 1.5, "path": "A.B", "value": 3}]
    doc = open_envelope(v2, key, "dev", "g")
    assert doc["seq"] == 2 and doc["samples"] == [{"t": 1.5, "path": "A.B", "value": 3},
                                                  {"t": 2.0, "path": "A.B", "value": 4}]
    bad = seal("X25519", rk, "dev", "g", zlib.compress(dumps({"v": 2, "device": "dev", "grant": "g", "seq": 3,
                                                              "t0_us": "x", "series": []})))
    with pytest.raises(EnvelopeError) as err:
        open_envelope(bad, key, "dev", "g")
    assert err.value.reason == "schema"
