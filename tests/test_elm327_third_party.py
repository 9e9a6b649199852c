"""An independent ELM327 client, python-OBD, unmodified, against `vgw sim elm327` over a real pty."""

from __future__ import annotations

import subprocess
import sys

import pytest
from vgw_sim.vehicle import DEFAULT_VIN

from tests.agentkit import stop_process

obd = pytest.importorskip("obd", reason="python-OBD is a test extra: pip install -e '.[test]'")


def test_python_obd_reads_the_simulator_unmodified() -> None:
    sim = subprocess.Popen([sys.executable, "-m", "vgw", "sim", "elm327"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    conn = None
    try:
        assert sim.stdout is not None
        path = sim.stdout.readline().strip()
        conn = obd.OBD(path, fast=False, timeout=3)
        assert conn.status() == obd.OBDStatus.CAR_CONNECTED
        assert "15765-4" in conn.protocol_name()
        speed = conn.query(obd.commands.SPEED)
        rpm = conn.query(obd.commands.RPM)
        coolant = conn.query(obd.commands.COOLANT_TEMP)
        fuel = conn.query(obd.commands.FUEL_LEVEL)
        assert 0 <= speed.value.magnitude <= 250 and str(speed.value.units) == "kilometer_per_hour"
        assert 0 <= rpm.value.magnitude <= 8000
        assert -40 <= coolant.value.magnitude <= 215
        assert 0 <= fuel.value.magnitude <= 100
        assert conn.supports(obd.commands.SPEED)
        # python-OBD strips the characters "\x00\x01\x02\\x012" from both ends of a string (its own quirk):
        # the leading '1' of this VIN goes with them. The simulator sends all 17 characters.
        vin = conn.query(obd.commands.VIN, force=True).value
        assert bytes(vin).decode() == DEFAULT_VIN.strip("\\x012")
        dtcs = conn.query(obd.commands.GET_DTC, force=True).value
        assert [code for code, _ in dtcs] == ["P0420"]
        assert 11.0 < conn.query(obd.commands.ELM_VOLTAGE, force=True).value.magnitude < 15.5
    finally:
        if conn is not None:
            conn.close()
        stop_process(sim)
