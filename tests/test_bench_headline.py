"""`vgw bench --headline` in its short form: every case runs both whole processes (`vgw run` from exec to its
last PUBACK and exit, and the naive python-can + cantools + paho process) on the demo DBC and on a second DBC
(the CAN FD demo: FD lines in both trace forms), on traces written by python-can's Logger and by candump -L.
The report's structure and that each process read the whole trace and had every batch acknowledged are
asserted; no timing (docs/performance.md has the numbers)."""

from __future__ import annotations

import json

import pytest
from vgw.cli import main
from vgw.tools.bench.headline import format_headline
from vgw_sim.paths import dbc_dir


def test_headline_runs_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--headline", "--json", "--frames", "1000", "--rounds", "1", "--dbc",
            str(dbc_dir() / "vehicle_fd.dbc")]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    cases = result["headline"]["cases"]
    got = {(c["dbc"], c["trace"], c["consent"]) for c in cases}
    want = {(dbc, trace, consent) for dbc in ("demo", "vehicle_fd") for trace in ("logger", "candump")
            for consent in ("typical", "all")} | {("demo", "start", "typical")}
    assert got == want
    for c in cases:
        assert c["frames"] == (2 if c["trace"] == "start" else 1000)
        assert c["signals_consented"] == (3 if c["consent"] == "typical" else c["signals_consented"]) > 0
        [row] = c["rounds"]
        for who in ("vgw", "naive"):
            run = row[who]
            assert run["exit_code"] == 0 and run["frames"] == c["frames"]
            assert run["acked"] == run["batches"] > 0  # every batch acknowledged
            assert run["wall_s"] > 0 and run["cpu_s"] > 0 and run["peak_rss_mb"] > 0
        if c["consent"] == "typical":
            # The same signals decoded by both: vgw's compiled decoders and cantools agree on these.
            assert row["vgw"]["samples"] == row["naive"]["samples"] > 0
        assert c["median"]["ratio"] == row["ratio"] > 0 and c["median"]["cpu_ratio"] == row["cpu_ratio"] > 0
    table = format_headline(result["headline"])
    assert "whole process, exec to last PUBACK and exit" in table
    assert len(table.splitlines()) == 3 + len(cases) and "targets:" in table
    assert set(result["headline"]["targets"]) == {"typical_ge_2_5x_naive", "all_ge_1_5x_naive", "rss_le_60mb"}


def test_headline_rejects_bad_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--headline", "--rounds", "0"]) == 1
    assert "--rounds 0" in capsys.readouterr().err
