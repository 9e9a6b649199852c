"""`vgw sim can` answers OBD-II over ISO-TP too: the agent's ISO-TP transport reads it through a real SLCAN pty."""

from __future__ import annotations

import subprocess
import sys

from vgw.pipeline.obd.request import build_request
from vgw.sources.obd.isotp import IsoTpTransport
from vgw.sources.obd.poller import decode_vin
from vgw_sim.vehicle import DEFAULT_VIN

from tests.agentkit import stop_process


def test_can_simulator_answers_vin_and_speed_over_slcan() -> None:
    sim = subprocess.Popen([sys.executable, "-m", "vgw", "sim", "can", "--interface", "slcan", "--duration", "30"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    transport = None
    try:
        assert sim.stdout is not None
        pty = sim.stdout.readline().strip()
        transport = IsoTpTransport("slcan", pty, timeout_s=2.0)
        transport.open()
        answers = transport.query(build_request(0x09, [0x02], scopes=frozenset({"read_vin"})))
        assert any(decode_vin(payload) == DEFAULT_VIN for payload in answers.values())
        answers = transport.query(build_request(0x01, [0x0D], scopes=frozenset({"read_speedometer"})))
        payload = next(iter(answers.values()))
        assert payload[:2] == b"\x41\x0d" and len(payload) == 3
    finally:
        if transport is not None:
            transport.close()
        stop_process(sim)
