"""The agent's main-loop periods come in one frozen value (vgw.daemon.timing.Timing), checked when made."""

from __future__ import annotations

import dataclasses

import pytest
from vgw.daemon.timing import DEFAULT_TIMING, Timing


def test_a_period_must_be_a_positive_number_of_seconds() -> None:
    assert Timing(collector_stall_s=0.5).collector_stall_s == 0.5
    for bad in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match=r"Timing\.status_every_s"):
            Timing(status_every_s=bad)  # type: ignore[arg-type]


def test_timing_is_frozen_and_the_defaults_are_the_products() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_TIMING.status_every_s = 0.1  # type: ignore[misc]
    assert DEFAULT_TIMING == Timing()
    assert (DEFAULT_TIMING.collector_stall_s, DEFAULT_TIMING.quota_audit_every_s) == (10.0, 60.0)
