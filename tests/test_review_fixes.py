"""Defects found in review, each pinned by a test: the hand-over can no longer roll consent back, a cached
older document is refused, changed grant terms drop what was collected under the old ones, NaN never stops
the collector, and a huge audit entry never blocks the log."""

from __future__ import annotations

from pathlib import Path

import pytest
from vgw.contract.consent.model import Grant, Limits, Recipient
from vgw.pipeline.catalogue import load_catalogue
from vgw.pipeline.router import Pipeline
from vgw.state.audit import AuditLog
from vgw_sim.broker import free_port
from vgw_sim.paths import default_dbc, default_signal_map

from tests.agentkit import AgentThread, Authority, vgw, wait_until, write_config
from tests.consentkit import Authority as DocAuthority
from tests.consentkit import State

DEV = "dev-0001"


def test_handover_never_overwrites_a_newer_consent(tmp_path: Path, pki) -> None:
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": "handover"})
    v1 = auth.doc(DEV, {"g1": ["read_odometer"], "g2": ["read_fuel"]}, ver=1)
    v2 = auth.doc(DEV, {"g1": ["read_odometer"], "g2": ["read_fuel"], "g3": ["read_tires"]}, ver=2)
    v3 = auth.doc(DEV, {"g1": ["read_odometer"]}, ver=3)
    doc = tmp_path / "v1.jws"
    doc.write_text(v1)
    assert vgw("consent", "apply", "--config", str(cfg), str(doc)).returncode == 0  # v1 in force before start
    with AgentThread(cfg) as runner:
        agent = runner.agent
        # Driven through the agent's inboxes only: the MQTT intake (what paho's thread calls) and the file
        # `vgw consent apply` hands over to a running agent.
        agent.intake.offer(v3.encode())  # a newer document arrives over MQTT ...
        assert wait_until(lambda: agent.manager.in_force is not None and agent.manager.in_force.ver == 3, 10)
        agent.store.write_inbox(v2)  # ... while `vgw consent apply` hands over v2, verified against v1
        assert wait_until(lambda: agent.store.read_inbox() is None, 3)  # taken once, not retried in a loop
        assert agent.manager.in_force is not None and agent.manager.in_force.ver == 3
        assert agent.store.read_token() == v3
        rejected = [e for e in agent.audit.entries() if e["event"] == "consent-rejected"]
        assert [e["reason"] for e in rejected] == ["version-rollback"]
    with AgentThread(cfg) as runner:  # restart: still v3, g2 stays revoked
        wait_until(lambda: runner.agent.manager.in_force is not None, 5)
        assert runner.agent.manager.in_force is not None and runner.agent.manager.in_force.ver == 3
        assert runner.agent.outbox.active_grants() == {"g1"}


def test_an_older_cached_document_is_refused_after_restart(tmp_path: Path, pki) -> None:
    authority = DocAuthority(tmp_path)
    state = State(tmp_path, pki, authority)
    try:
        old = authority.doc(DEV, 1, [authority.grant("g1", ["read_odometer"]), authority.grant("g2", ["read_fuel"])])
        new = authority.doc(DEV, 2, [authority.grant("g1", ["read_odometer"])])
        assert state.manager.apply(old, source="test").status == "applied"
        assert state.manager.apply(new, source="test").status == "applied"
        (state.dir / "consent.jws").write_text(old + "\n")  # the cache file rolled back behind our back
        state.reopen()
        assert state.manager.in_force is None  # refused: nothing is in force rather than a revoked grant
        assert "g2" not in state.outbox.active_grants()
        assert any(e.get("reason") == "version-rollback" for e in state.events("consent-cache-invalid"))
    finally:
        state.close()


def _grant(scopes: tuple[str, ...], pk: bytes = b"\x01" * 32) -> Grant:
    return Grant(id="g", controller="c", purpose="p", scopes=scopes, recipient=Recipient("X25519", pk))


def test_changed_terms_under_the_same_grant_id_drop_the_open_batch() -> None:
    pipe = Pipeline(load_catalogue([default_dbc()], default_signal_map()))
    pipe.swap((_grant(("read_location", "read_speedometer")),))
    pipe.offer("Vehicle.CurrentLocation.Latitude", "read_location", 1.0, 52.5)
    pipe.offer("Vehicle.Speed", "read_speedometer", 1.0, 50.0)
    assert len(pipe.batches["g"].samples) == 2
    pipe.swap((_grant(("read_speedometer",)),))  # location withdrawn, same grant id
    assert pipe.batches["g"].samples == []
    pipe.swap((_grant(("read_speedometer",), pk=b"\x02" * 32),))  # same scopes, another recipient
    assert pipe.batches["g"].samples == []
    pipe.offer("Vehicle.Speed", "read_speedometer", 2.0, 51.0)
    same = _grant(("read_speedometer",), pk=b"\x02" * 32)
    pipe.swap((same,))  # identical terms: the open batch stays
    assert len(pipe.batches["g"].samples) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_counted_not_sent(bad: float) -> None:
    pipe = Pipeline(load_catalogue([default_dbc()], default_signal_map()))
    pipe.swap((Grant(id="g", controller="c", purpose="p", scopes=("read_speedometer",),
                     recipient=Recipient("X25519", b"\x01" * 32), limits={"read_speedometer": Limits()}),))
    assert pipe.offer("Vehicle.Speed", "read_speedometer", 1.0, bad) == 0
    assert pipe.counters["samples_not_finite"] == 1
    assert pipe.batches["g"].samples == []


def test_audit_log_appends_after_an_entry_larger_than_any_read_block(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    log.append("small")
    log.append("huge", detail="\u00e9" * 100_000)  # > 64 KiB once escaped
    log.append("after")
    result = log.verify()
    assert result.ok and result.entries == 3


def test_a_replayed_rejected_document_is_counted_not_logged_again(tmp_path: Path, pki) -> None:
    authority = DocAuthority(tmp_path)
    state = State(tmp_path, pki, authority)
    try:
        bad = authority.doc("dev-0002", 1, [authority.grant("g1", ["read_odometer"])])  # another device's
        for _ in range(50):
            assert state.manager.apply(bad, source="mqtt").status == "rejected"
        assert len(state.events("consent-rejected")) == 1
        assert len(state.receipts("consent-rejected")) == 1
        assert state.manager.repeated_rejections == 49
    finally:
        state.close()
