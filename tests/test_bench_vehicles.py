"""`vgw bench --dbc` on the CAN FD demo DBC and the J1939 demo truck (README "CAN FD", "SAE J1939"): the
compiled decoders agree with cantools signal for signal, and every frame routed reaches the broker."""

from __future__ import annotations

import json

import pytest
from vgw.cli import main
from vgw_sim.paths import dbc_dir


@pytest.mark.parametrize("dbc", ["vehicle_fd.dbc", "truck_j1939.dbc"])
def test_bench_runs_on_fd_and_j1939_dbcs(dbc: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--stages", "--json", "--dbc", str(dbc_dir() / dbc), "--frames", "5000", "--rt-seconds", "1",
            "--revoke-rows", "500"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    d, fp = result["decode"], result["full_path"]
    assert d["cantools_errors"] == 0 and d["signals_vgw"] == d["signals_cantools"] > 0
    assert fp["exit_code"] == 0 and fp["frames_routed"] > 0 and fp["samples"] > 0
    assert fp["published_batches"] == fp["batches"] > 0
