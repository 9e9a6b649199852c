"""The hash-chained audit log and `vgw audit verify|show`: chain, tamper detection (edit, delete, reorder,
re-hash, garbage), the receipt anchor that reveals a cut tail, and the CLI's exit codes and messages."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest
from vgw.cli import main
from vgw.state.audit import GENESIS, AuditLog, _digest

from tests.consentkit import Authority, State


def _log(tmp_path: Path, n: int = 6) -> AuditLog:
    tmp_path.mkdir(mode=0o700, exist_ok=True)
    log = AuditLog(tmp_path)
    for i in range(n):
        log.append("retention-delete", grant=f"g-{i % 2}", batches_deleted=i, retention_s=60)
    return log


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines()


def _write(log: AuditLog, lines: list[str]) -> None:
    log.path.write_text("\n".join(lines) + "\n")


def test_chain_links_and_verifies(tmp_path: Path) -> None:
    log = _log(tmp_path)
    entries = log.entries()
    assert [e["n"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(entries))
    assert all(e["hash"] == _digest(e) for e in entries)
    r = log.verify()
    assert r.ok and r.entries == 6 and r.first_bad is None
    assert (log.path.stat().st_mode & 0o777) == 0o600


def test_empty_or_missing_log_verifies(tmp_path: Path) -> None:
    assert AuditLog(tmp_path).verify().ok


def test_edit_is_detected_at_that_line(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    e = json.loads(lines[2])
    e["batches_deleted"] = 0  # hide a deletion
    lines[2] = json.dumps(e, sort_keys=True, separators=(",", ":"))
    _write(log, lines)
    r = log.verify()
    assert not r.ok and r.first_bad == 3 and "hash" in r.reason


def test_edit_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    e = json.loads(lines[1])
    e["grant"] = "g-other"
    e["hash"] = _digest(e)
    lines[1] = json.dumps(e, sort_keys=True, separators=(",", ":"))
    _write(log, lines)
    r = log.verify()
    assert not r.ok and r.first_bad == 3 and "link" in r.reason


def test_deleted_line_is_detected(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    del lines[3]
    _write(log, lines)
    r = log.verify()
    assert not r.ok and r.first_bad == 4


def test_reordered_lines_are_detected(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    lines[1], lines[4] = lines[4], lines[1]
    _write(log, lines)
    r = log.verify()
    assert not r.ok and r.first_bad == 2


def test_garbage_line_is_detected(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    lines.insert(2, "not json at all")
    _write(log, lines)
    r = log.verify()
    assert not r.ok and r.first_bad == 3 and r.reason == "not JSON"


def test_receipts_anchor_the_chain_so_a_cut_tail_shows(tmp_path: Path, pki: Any) -> None:
    # A hash chain alone cannot reveal entries cut off its end; every receipt the cloud holds carries the
    # entry number and hash of the audit entry it reports, signed by the device.
    s = State(tmp_path, pki, Authority(tmp_path))
    try:
        auth = s.authority
        s.manager.apply(auth.doc("dev-0001", 1, [auth.grant("g-a", ["read_fuel"])], iat=int(time.time())),
                        source="mqtt")
        s.manager.apply(b"garbage", source="mqtt")
        receipts = s.receipts()
        entries = s.events()
        by_n = {e["n"]: e for e in entries}
        assert [r["typ"] for r in receipts] == ["consent-applied", "consent-rejected"]
        for r in receipts:
            assert by_n[r["audit"]["n"]]["hash"] == r["audit"]["hash"]
        cut = _lines(s.audit)[:-1]  # drop the consent-rejected entry: the chain still verifies...
        _write(s.audit, cut)
        assert s.audit.verify().ok
        last = s.audit.entries()[-1]
        assert last["n"] < receipts[-1]["audit"]["n"]  # ...but the signed anchor is past its end
    finally:
        s.close()


def _config(tmp_path: Path, pki: Any) -> Path:
    from tests.agentkit import write_config

    return write_config(tmp_path, pki, 1, Authority(tmp_path).trust[0], can={"channel": "unused"})


def test_cli_verify_ok_and_broken(tmp_path: Path, pki: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, pki)
    log = _log(tmp_path / "state")
    assert main(["audit", "verify", "--config", str(cfg)]) == 0
    assert "intact (6 entries)" in capsys.readouterr().out
    lines = _lines(log)
    del lines[4]
    _write(log, lines)
    assert main(["audit", "verify", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "BROKEN at line 5" in err and len(err.strip().splitlines()) == 1
    assert main(["audit", "verify", "--file", str(log.path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["first_bad_line"] == 5


def test_cli_show_text_and_json(tmp_path: Path, pki: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, pki)
    _log(tmp_path / "state", n=3)
    assert main(["audit", "show", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and all("retention-delete" in line and "grant=g-" in line for line in out)
    assert "hash=" not in out[0] and "prev=" not in out[0]
    assert main(["audit", "show", "--config", str(cfg), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["n"] for r in rows] == [1, 2, 3] and all("hash" in r for r in rows)


def test_cli_missing_file_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", "--file", str(tmp_path / "nope.log")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vgw audit:") and "nope.log" in err and "Traceback" not in err
