"""`vgw bench` in its short form: it runs end to end (mosquitto, the agent in a child process, the cloud peer)
and prints its table and its JSON. No thresholds: CI machines vary; docs/performance.md has the numbers.
The headline (whole processes) is tests/test_bench_headline.py."""

from __future__ import annotations

import json

import pytest
from vgw.cli import main

SHORT = ["--stages", "--frames", "5000", "--rt-seconds", "1", "--revoke-rows", "500", "--rules-seconds", "1"]


def test_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--json", *SHORT]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["trace"]["frames"] == 5000
    d, fp = result["decode"], result["full_path"]
    assert d["cantools_decode_fps"] > 0 and d["vgw_decode_fps"] > 0 and d["naive_agent_fps"] > 0
    assert d["signals_vgw"] == d["signals_cantools"]  # the same values decoded, every signal
    assert fp["exit_code"] == 0 and fp["fps_ingest"] > 0
    assert fp["published_batches"] == fp["batches"] > 0  # every batch acknowledged
    for label in ("default", "low_latency"):
        rt = result["realtime"][label]
        assert rt["latency"]["samples"] > 0 and rt["latency"]["p99_ms"] is not None
        assert rt["cpu_pct_one_core"] is not None
    rv = result["revocation"]
    assert rv["rows"] == 500 and rv["rows_after"] == 0 and rv["key_destroyed_ms"] is not None
    assert set(result["targets"]) >= {"full_path_ge_2x_naive_agent", "rss_le_60mb", "revocation_le_100ms",
                                      "rules_cpu_le_2x_no_rules", "rules_rss_le_2x_no_rules"}
    rules = result["rules"]
    assert {rules[run]["exit_code"] for run in ("worst_work", "worst_memory", "no_rules")} == {0}
    assert all(d["work_nodes_per_s"] <= d["work_budget"] for d in rules["documents"].values())


def test_bench_table_all_signals(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--consent", "all", *SHORT]) == 0
    out = capsys.readouterr().out
    for text in ("cantools decode_message", "vgw compiled decoders", "full path", "frame->PUBACK p50",
                 "revocation with 500 buffered rows", "collection rules: the costliest documents accepted",
                 "targets:"):
        assert text in out


def test_bench_rejects_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--frames", "10"]) == 1
    assert "--frames 10" in capsys.readouterr().err
    assert main(["bench", "--rules", "--rules-seconds", "-1"]) == 1
    assert "--rules-seconds -1" in capsys.readouterr().err
    assert main(["bench", "--rules", "--dbc", "x.dbc"]) == 1
    assert "demo vehicle" in capsys.readouterr().err
