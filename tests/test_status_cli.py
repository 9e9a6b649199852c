"""`vgw status`: a versioned JSON schema with the counters as a tree, and text with units."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from vgw.cli.status import SCHEMA_VERSION, human_bytes, structured_counters
from vgw.config.settings import load_config
from vgw.daemon.agent import open_state
from vgw_sim.broker import free_port
from vgw_sim.pki import TestPKI

from tests.agentkit import AgentThread, Authority, vgw, wait_until, write_config

DEV = "dev-0001"


def _keys(obj: object) -> list[str]:
    if isinstance(obj, dict):
        return [k for k, v in obj.items() for k in [k, *_keys(v)]]
    if isinstance(obj, list):
        return [k for v in obj for k in _keys(v)]
    return []


def test_status_json_is_versioned_and_its_counters_structured(tmp_path: Path, pki: TestPKI) -> None:
    """The counters were flat "dropped_quota:g-1" and "sent_samples:g-1:read_fuel" keys: a program reading
    them had to parse key strings, and nothing said which layout it was reading."""
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": "status"},
                       outbox={"quota_bytes": 3 * 1024 * 1024})
    doc = tmp_path / "consent.jws"
    doc.write_text(auth.doc(DEV, {"g-1": ["read_speedometer", "read_fuel"]}))
    assert vgw("consent", "apply", "--config", str(cfg), str(doc)).returncode == 0
    outbox, _audit, _store, _signer = open_state(load_config(cfg))
    try:  # what the agent counts while it works: per grant, and per grant and scope
        outbox.count("dropped_quota:g-1", 2)
        outbox.count("sent_samples:g-1:read_fuel", 5)
    finally:
        outbox.close()

    st = json.loads(vgw("status", "--config", str(cfg), "--json").stdout)
    assert st["schema_version"] == SCHEMA_VERSION == 2
    # The contract's fields (README "The contract, in our words") are all there, as they were.
    assert st["device"] == DEV and st["consent_version"] == 1
    assert st["grants"][0]["id"] == "g-1" and set(st["grants"][0]) == {"id", "scopes", "expires"}
    assert st["outbox"] == {"g-1": {"rows": 0, "bytes": 0}}
    assert set(st["counters"]) == {"agent", "grants"}
    assert st["counters"]["grants"]["g-1"]["dropped_quota"] == 2
    assert st["counters"]["grants"]["g-1"]["by_scope"]["read_fuel"]["sent_samples"] == 5
    assert not [k for k in _keys(st) if ":" in k]

    text = vgw("status", "--config", str(cfg)).stdout
    assert "outbox: 0 B of 3.0 MiB quota (0 %); dropped for quota: g-1 2 batch(es)" in text
    assert "grant g-1: read_speedometer, read_fuel; outbox 0 batch(es), 0 B" in text


def test_structured_counters_and_units() -> None:
    assert structured_counters({"frames": 9, "dropped_quota:g1": 2, "sent_samples:g1:read_fuel": 5,
                                "sent_samples:g1:read_odometer": 1}) == {
        "agent": {"frames": 9},
        "grants": {"g1": {"dropped_quota": 2, "by_scope": {"read_fuel": {"sent_samples": 5},
                                                          "read_odometer": {"sent_samples": 1}}}},
    }
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 1024 * 1024, 3 * 1024**3)] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 MiB", "3.0 GiB"]


def test_status_shows_pending_erasures_without_personal_data(tmp_path: Path, pki: TestPKI) -> None:
    """An erasure (or a narrowing) whose receipt waits until no copy is left in the outbox's files was only in
    erasures.pending.json: neither `vgw status` nor its JSON said that data were still waiting to be gone."""
    from vgw.state.consent.store import ConsentStore, PendingErasure

    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": "status-pending"})
    doc = tmp_path / "consent.jws"
    doc.write_text(auth.doc(DEV, {"g-1": ["read_speedometer"]}))
    assert vgw("consent", "apply", "--config", str(cfg), str(doc)).returncode == 0
    store = ConsentStore(load_config(cfg).state_dir)
    store.add_pending_erasure(PendingErasure("g-old", 1, "revoked", 7, since=1_700_000_000.0))
    store.add_pending_erasure(PendingErasure("g-1", 1, "narrowed", 3, since=1_700_000_100.0,
                                             narrowing=("scope-removed",), scopes=("read_fuel",),
                                             samples_deleted=40))

    st = json.loads(vgw("status", "--config", str(cfg), "--json").stdout)
    assert st["erasures_pending"] == [
        {"grant": "g-old", "reason": "revoked", "since": 1_700_000_000.0, "batches_deleted": 7},
        {"grant": "g-1", "reason": "narrowed", "since": 1_700_000_100.0, "batches_deleted": 3}]
    text = vgw("status", "--config", str(cfg)).stdout
    assert "erasures pending (no receipt until no copy is left): g-old revoked, 7 batch(es), since " in text
    assert "g-1 narrowed, 3 batch(es), since " in text

    store.remove_pending_erasure(PendingErasure("g-old", 1, "revoked", 7))
    store.remove_pending_erasure(PendingErasure("g-1", 1, "narrowed", 3))
    st = json.loads(vgw("status", "--config", str(cfg), "--json").stdout)
    assert st["erasures_pending"] == []
    assert "erasures pending" not in vgw("status", "--config", str(cfg)).stdout


def test_consent_apply_names_a_narrowing(tmp_path: Path, pki: TestPKI) -> None:
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": "status-narrow"})
    for ver, scopes in ((1, ["read_speedometer", "read_fuel"]), (2, ["read_speedometer"])):
        doc = tmp_path / f"consent-{ver}.jws"
        doc.write_text(auth.doc(DEV, {"g-1": scopes}, ver=ver))
        out = vgw("consent", "apply", "--config", str(cfg), str(doc))
        assert out.returncode == 0, out.stderr
    assert "grant g-1 narrowed (scope-removed): 0 stored batch(es) deleted, data key replaced" in out.stdout


def test_consent_versions_read_as_dates_and_no_consent_is_said(tmp_path: Path, pki: TestPKI,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Versions are Unix milliseconds by default (`vgw cloud sign`): people read `consent v1796625176006`, and
    `consent vnone` in the log. Text shows the version's date beside it; with no document, the words say so;
    JSON keeps the integer."""
    ver, dated = 1796625176006, "consent v1796625176006 (dated 2026-12-07 06:32:56 UTC)"
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": "versions"})
    doc = tmp_path / "consent.jws"
    doc.write_text(auth.doc(DEV, {"g-1": ["read_speedometer"]}, ver=ver))
    caplog.set_level(logging.INFO, logger="vgw")
    with AgentThread(cfg):
        assert wait_until(lambda: any(" running " in r.getMessage() for r in caplog.records))
        applied = vgw("consent", "apply", "--config", str(cfg), str(doc))
        assert applied.returncode == 0, applied.stderr
        assert wait_until(lambda: any("applied from" in r.getMessage() for r in caplog.records))
    running = next(r.getMessage() for r in caplog.records if " running " in r.getMessage())
    assert "vnone" not in running and "(no consent in force)" in running, running
    assert any(r.getMessage().startswith(f"{dated} applied from") for r in caplog.records), caplog.text
    assert f"{dated} applied by the running agent" in applied.stdout, applied.stdout

    show = vgw("consent", "show", "--config", str(cfg))
    assert show.stdout.startswith(f"{dated} in force"), show.stdout
    assert f"consent: v{ver} (dated 2026-12-07 06:32:56 UTC)" in vgw("status", "--config", str(cfg)).stdout
    # JSON keeps its types: the version is the integer it was.
    assert json.loads(vgw("consent", "show", "--config", str(cfg), "--json").stdout)["version"] == ver
    assert json.loads(vgw("status", "--config", str(cfg), "--json").stdout)["consent_version"] == ver
    # A small version (a test authority's 1, 2, 3) is no date: it stays as it is.
    from vgw.contract.consent.model import version_text

    assert version_text(7) == "consent v7" and version_text(None) == "no consent in force"
