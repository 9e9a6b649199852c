"""A bus that delivers nothing is reported (README "Configuration", [can] silent_s): one warning in the log and
``bus.silent`` in status.json and `vgw status`, cleared when frames come back."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vgw_sim.broker import free_port
from vgw_sim.pki import TestPKI

from tests.agentkit import AgentThread, Authority, Vehicle, wait_until, write_config


def _bus(state: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state / "status.json").read_text()).get("bus")  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def test_silent_bus_is_reported_once_and_clears_when_frames_return(
        tmp_path: Path, pki: TestPKI, channel: str, vehicle_on: Callable[[str, int], Vehicle],
        caplog: pytest.LogCaptureFixture) -> None:
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": channel, "silent_s": 0.5})
    caplog.set_level(logging.INFO, logger="vgw")
    with AgentThread(cfg):
        assert wait_until(lambda: (_bus(tmp_path / "state") or {}).get("silent") is True)
        time.sleep(1.0)  # longer than silent_s again: still one warning, not one per check
        warnings = [r for r in caplog.records if "no frame for" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert warnings[0].levelno == logging.WARNING
        assert channel in warnings[0].getMessage()

        vehicle_on(channel, 3)
        assert wait_until(lambda: (_bus(tmp_path / "state") or {}).get("silent") is False)
        assert any("frames again" in r.getMessage() for r in caplog.records)


def test_status_command_shows_a_silent_bus(tmp_path: Path, pki: TestPKI, channel: str) -> None:
    from vgw.cli.status import collect_status

    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": channel, "silent_s": 0.3})
    with AgentThread(cfg):
        st = wait_until(lambda: (s := collect_status(str(cfg)))["bus"] and s["bus"]["silent"] and s)
        assert st, "the status never said the bus is silent"
        assert st["bus"]["last_frame_age_s"] >= 0.3


def test_silent_s_zero_never_warns(tmp_path: Path, pki: TestPKI, channel: str) -> None:
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": channel, "silent_s": 0})
    with AgentThread(cfg):
        assert wait_until(lambda: _bus(tmp_path / "state") is not None)
        time.sleep(0.8)
        assert _bus(tmp_path / "state")["silent"] is False  # type: ignore[index]
