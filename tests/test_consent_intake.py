"""Consent intake under bursts and hostile input (README "The contract, in our words", docs/guarantees.md
"Consent intake"): the newest genuine document always wins, floods of invalid documents are coalesced,
oversized messages never reach memory, and the retained status follows the consent in force.

Through the real mosquitto over mutual TLS, with the real agent (in a thread, or as a process when its memory
is measured) and the real state directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from vgw.state.consent.intake import SLOTS, ConsentIntake
from vgw.state.consent.manager import load_trust_keys
from vgw.uplink.packetguard import PacketSizeGuard, PacketTooLarge
from vgw_sim.broker import Mosquitto
from vgw_sim.cloud import SigningKey

from tests import consentkit
from tests.agentkit import AgentThread, agent_process, connected_cloud, vehicle_on_bus, wait_until, write_config
from tests.faultkit import live_status

DEVICE = "dev-0001"
BOTH = ["g-keep", "g-drop"]


def _scopes(gid: str) -> list[str]:
    return ["read_speedometer"] if gid == "g-keep" else ["read_odometer", "read_speedometer"]


def _docs(auth: consentkit.Authority, n: int, *, revoke_last: bool = True, start: int = 1) -> list[str]:
    """Versions start..start+n-1 granting g-keep and g-drop; the last one drops g-drop (a revocation)."""
    now = int(time.time())
    docs = []
    for ver in range(start, start + n):
        gids = ["g-keep"] if (revoke_last and ver == start + n - 1) else BOTH
        docs.append(auth.doc(DEVICE, ver, [auth.grant(g, _scopes(g)) for g in gids], iat=now - 60))
    return docs


@pytest.fixture
def auth(tmp_path: Path) -> consentkit.Authority:
    return consentkit.Authority(tmp_path)


def _in_force(agent: AgentThread) -> int | None:
    c = agent.agent.manager.in_force
    return c.ver if c else None


# ---------------------------------------------------------------- the newest document wins


def test_31_versions_back_to_back_end_with_the_newest_in_force(tmp_path: Path, pki: Any, broker: Mosquitto,
                                                              cloud: Any, auth: consentkit.Authority,
                                                              channel: str) -> None:
    for gid in BOTH:
        cloud.add_recipient(gid, auth.recipient(gid))
    cfg = write_config(tmp_path, pki, broker.port, auth.trust[0], can={"channel": channel})
    with vehicle_on_bus(channel, 3), AgentThread(cfg) as agent:
        assert agent.wait_link()
        first, *rest = _docs(auth, 31)
        cloud.publish_consent(DEVICE, first)
        assert wait_until(lambda: len(cloud.batches(DEVICE, "g-drop")) >= 2, 20), "g-drop never delivered data"
        for doc in rest:  # QoS 1, retained, back to back
            cloud.publish_consent(DEVICE, doc)
        assert wait_until(lambda: _in_force(agent) == 31, 15), f"in force: v{_in_force(agent)}, not v31"
        assert wait_until(lambda: any(r.claims.get("grant") == "g-drop" for r in cloud.receipts(DEVICE, "erasure")),
                          15)
        assert {g.id for g in agent.agent.manager.active_grants()} == {"g-keep"}
        # The revoked grant's data stop: after its erasure receipt, g-keep goes on and g-drop sends nothing.
        dropped = len(cloud.batches(DEVICE, "g-drop"))
        kept = len(cloud.batches(DEVICE, "g-keep"))
        assert wait_until(lambda: len(cloud.batches(DEVICE, "g-keep")) >= kept + 3, 20)
        assert len(cloud.batches(DEVICE, "g-drop")) == dropped
    assert not cloud.bad_receipts()


def test_a_persistent_sessions_backlog_ends_with_the_newest_in_force(tmp_path: Path, pki: Any, broker: Mosquitto,
                                                                    cloud: Any, auth: consentkit.Authority) -> None:
    cfg = write_config(tmp_path, pki, broker.port, auth.trust[0], can={"channel": f"intake-{time.time_ns()}"})
    docs = _docs(auth, 31)
    with AgentThread(cfg) as agent:  # the first run makes the persistent session and applies v1
        cloud.publish_consent(DEVICE, docs[0])
        assert wait_until(lambda: _in_force(agent) == 1, 10)
    for doc in docs[1:]:  # offline: the broker queues all 30 for the session (QoS 1)
        cloud.publish_consent(DEVICE, doc)
    with AgentThread(cfg) as agent:  # back online: the backlog arrives in one burst
        assert wait_until(lambda: _in_force(agent) == 31, 15), f"in force: v{_in_force(agent)}, not v31"
        assert {g.id for g in agent.agent.manager.active_grants()} == {"g-keep"}
        assert wait_until(lambda: any(r.claims.get("grant") == "g-drop" for r in cloud.receipts(DEVICE, "erasure")),
                          15)


def test_a_revocation_inside_a_burst_is_carried_out(tmp_path: Path, pki: Any, broker: Mosquitto, cloud: Any,
                                                   auth: consentkit.Authority) -> None:
    cfg = write_config(tmp_path, pki, broker.port, auth.trust[0], can={"channel": f"intake-{time.time_ns()}"})
    now = int(time.time())
    docs = [auth.doc(DEVICE, v, [auth.grant(g, _scopes(g)) for g in (["g-keep"] if v == 16 else BOTH)], iat=now - 60)
            for v in range(1, 32)]
    with AgentThread(cfg) as agent:
        assert agent.wait_link()
        cloud.publish_consent(DEVICE, docs[0])
        assert wait_until(lambda: _in_force(agent) == 1, 10)
        for doc in docs[1:]:  # v16 revokes g-drop, v17..v31 grant it again
            cloud.publish_consent(DEVICE, doc)
        assert wait_until(lambda: _in_force(agent) == 31, 15)
        # Whether v16 was applied or skipped in the burst, g-drop was erased under v16 and then granted afresh.
        assert wait_until(lambda: [(r.claims["grant"], r.claims["ver"]) for r in cloud.receipts(DEVICE, "erasure")]
                          == [("g-drop", 16)], 10)
        assert {g.id for g in agent.agent.manager.active_grants()} == set(BOTH)
        assert agent.agent.outbox.active_grants() == set(BOTH)


def test_forged_high_version_junk_never_pushes_out_the_genuine_newest(tmp_path: Path, pki: Any, broker: Mosquitto,
                                                                      cloud: Any, auth: consentkit.Authority) -> None:
    cfg = write_config(tmp_path, pki, broker.port, auth.trust[0], can={"channel": f"intake-{time.time_ns()}"})
    v1, v2 = _docs(auth, 2)
    forger = SigningKey.generate()
    now = int(time.time())
    junk = [auth.sign(auth.claims(DEVICE, 10**6 + i, [auth.grant("g-drop", ["read_location"])], iat=now),
                      key=forger) for i in range(200)]
    with AgentThread(cfg) as agent:
        assert agent.wait_link()
        cloud.publish_consent(DEVICE, v1)
        assert wait_until(lambda: _in_force(agent) == 1, 10)
        cloud.publish_consent(DEVICE, v2)  # the genuine newest (revokes g-drop) ...
        for doc in junk:  # ... then a flood of distinct forged documents with far higher versions
            cloud.publish_consent(DEVICE, doc)
        assert wait_until(lambda: _in_force(agent) == 2, 15), f"in force: v{_in_force(agent)}, not v2"
        # Every document was judged on arrival (an attribute of the intake, which the old queue lacked).
        wait_until(lambda: getattr(agent.agent, "intake", None) is not None and agent.agent.intake.offered >= 202, 15)
        assert wait_until(lambda: len(cloud.receipts(DEVICE, "consent-rejected")) >= 1, 10)
        # Coalesced: one entry and one receipt at once for the reason, the rest summed up later.
        entries = [e for e in agent.agent.audit.entries() if e["event"] == "consent-rejected"]
        assert len(entries) == 1 and entries[0]["reason"] == "signature", f"{len(entries)} entries"
        assert len(cloud.receipts(DEVICE, "consent-rejected")) == 1
        audit = agent.agent.audit
    entries = [e for e in audit.entries() if e["event"] == "consent-rejected"]
    assert len(entries) <= 2, "at shutdown what is still pending is written as one more entry"
    assert sum(e.get("count", 1) for e in entries) == 200
    assert audit.verify().ok


# ---------------------------------------------------------------- the intake and the manager, in process


def _intake(auth: consentkit.Authority) -> ConsentIntake:
    return ConsentIntake(trust_keys=load_trust_keys(auth.trust), device=DEVICE, clock=time.time)


def test_the_intake_keeps_the_highest_verified_versions_and_drops_nothing_newer(auth: consentkit.Authority) -> None:
    intake = _intake(auth)
    for doc in _docs(auth, 31):
        intake.offer(doc.encode())
    taken = intake.take()
    assert [c.ver for c in taken.candidates] == list(range(31, 31 - SLOTS, -1))
    assert taken.superseded == 31 - SLOTS and not taken.rejected
    assert not intake.take()


def test_forged_documents_never_take_a_slot(auth: consentkit.Authority) -> None:
    intake = _intake(auth)
    (genuine,) = _docs(auth, 1, start=5)
    intake.offer(genuine.encode())
    forger = SigningKey.generate()
    now = int(time.time())
    for i in range(100):
        intake.offer(auth.sign(auth.claims(DEVICE, 10**9 - i, [], iat=now), key=forger).encode())
    intake.offer(b"x" * (1 << 20))
    taken = intake.take()
    assert [c.ver for c in taken.candidates] == [5]
    assert {r: t.count for r, t in taken.rejected.items()} == {"signature": 100, "too-large": 1}


def test_a_revocation_in_a_skipped_version_is_not_lost(tmp_path: Path, pki: Any, auth: consentkit.Authority) -> None:
    # v1 grants both; v2 (revokes g-drop) is superseded in the intake by v3..v6, which grant both again.
    intake = _intake(auth)
    now = int(time.time())
    docs = [auth.doc(DEVICE, v, [auth.grant(g, _scopes(g)) for g in (["g-keep"] if v == 2 else BOTH)], iat=now - 60)
            for v in range(1, 7)]
    state = consentkit.State(tmp_path, pki, auth)
    try:
        assert state.manager.apply(docs[0], source="mqtt").status == "applied"
        state.outbox.commit_batch("g-drop", lambda seq: b"sealed-%d" % seq, first_t=now, samples=1)
        intake.set_in_force(state.manager.in_force)
        for doc in docs[1:]:
            intake.offer(doc.encode())
        taken = intake.take()
        assert [c.ver for c in taken.candidates] == [6, 5, 4, 3] and taken.skipped == [(2, frozenset({"g-keep"}))]
        newest = taken.candidates[0]
        skipped = taken.skipped + [(c.ver, c.grant_ids) for c in taken.candidates[1:]]
        result = state.manager.apply(newest.token, source="mqtt", skipped=skipped)
        assert result.status == "applied" and state.manager.in_force.ver == 6
        erasures = state.receipts("erasure")
        assert [(r["grant"], r["ver"], r["batches_deleted"]) for r in erasures] == [("g-drop", 2, 1)]
        assert state.revoked_hook == [frozenset({"g-drop"})]
        # Granted afresh by v6: active again, with a new data key at its next batch.
        assert state.outbox.active_grants() == set(BOTH)
        state.outbox.commit_batch("g-drop", lambda seq: b"sealed-%d" % seq, first_t=now, samples=1)
        assert state.outbox.has_key("g-drop")
        # A replayed older version (below the one in force) never erases anything.
        state.manager.apply(auth.doc(DEVICE, 7, [auth.grant(g, _scopes(g)) for g in BOTH], iat=now - 60),
                            source="mqtt", skipped=[(2, frozenset({"g-keep"}))])
        assert len(state.receipts("erasure")) == 1
    finally:
        state.close()


def test_distinct_invalid_documents_are_coalesced_per_reason(tmp_path: Path, pki: Any,
                                                             auth: consentkit.Authority) -> None:
    state = consentkit.State(tmp_path, pki, auth)
    try:
        forger = SigningKey.generate()
        now = int(time.time())
        for i in range(50):  # 50 distinct documents, all with a bad signature
            doc = auth.sign(auth.claims(DEVICE, 2 + i, [], iat=now), key=forger)
            assert state.manager.apply(doc, source="mqtt").status == "rejected"
        other = auth.doc("dev-0002", 3, [])
        assert state.manager.apply(other, source="mqtt").status == "rejected"  # another reason: its own entry
        assert [e["reason"] for e in state.events("consent-rejected")] == ["signature", "subject"]
        assert len(state.receipts("consent-rejected")) == 2
        state.manager.flush_rejections(force=True)
        entries = state.events("consent-rejected")
        assert [(e["reason"], e.get("count", 1)) for e in entries] == [("signature", 1), ("subject", 1),
                                                                       ("signature", 49)]
        receipts = state.receipts("consent-rejected")
        assert receipts[-1]["reason"] == "signature" and receipts[-1]["count"] == 49
        state.manager.flush_rejections(force=True)  # nothing pending: nothing written
        assert len(state.events("consent-rejected")) == 3
    finally:
        state.close()


# ---------------------------------------------------------------- size


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return psutil.Process(pid).memory_info().rss


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_oversized_consent_messages_never_reach_memory(tmp_path: Path, pki: Any, broker: Mosquitto, cloud: Any,
                                                       auth: consentkit.Authority, protocol: str) -> None:
    cfg = write_config(tmp_path, pki, broker.port, auth.trust[0], mqtt_extra={"protocol": protocol},
                       can={"channel": f"intake-{time.time_ns()}"})
    state_dir = tmp_path / "state"
    with agent_process(cfg) as proc:
        assert wait_until(lambda: (live_status(state_dir, proc.pid) or {}).get("link") == "connected", 20)
        (v1,) = _docs(auth, 1, revoke_last=False)
        cloud.publish_consent(DEVICE, v1)
        assert wait_until(lambda: (live_status(state_dir, proc.pid) or {}).get("consent_version") == 1, 10)
        before = _peak_rss(proc.pid)
        big = b"A" * (32 * 1024 * 1024)
        for _ in range(3):
            cloud.publish_consent(DEVICE, big, timeout=60)
        # The agent is still connected and working: a genuine document after the big ones applies.
        (v2,) = _docs(auth, 1, revoke_last=False, start=2)
        cloud.publish_consent(DEVICE, v2)
        assert wait_until(lambda: (live_status(state_dir, proc.pid) or {}).get("consent_version") == 2, 30)
        grown = _peak_rss(proc.pid) - before
        status = live_status(state_dir, proc.pid) or {}
        assert grown < 16 * 1024 * 1024, f"peak RSS grew by {grown >> 20} MiB"
        if protocol == "3.1.1":  # no Maximum Packet Size in 3.1.1: the socket filter dropped the payloads
            assert status["counters"]["mqtt_oversized_dropped"] == 3
        assert status["counters"]["connect_attempts"] == 1, "the big messages must not cost a reconnect"


def _publish(topic: bytes, payload: bytes, *, qos: int = 1, mid: int = 7, mqtt5: bool = False) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"") + \
        (b"\x00" if mqtt5 else b"") + payload
    n, length = len(body), bytearray()
    while True:
        byte, n = n % 128, n // 128
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes([0x30 | (qos << 1) | 1]) + bytes(length) + body


@pytest.mark.parametrize("mqtt5", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_the_packet_guard_passes_small_packets_and_strips_big_payloads(mqtt5: bool, chunk: int) -> None:
    small = _publish(b"vgw/dev-0001/consent", b"x" * 100, mqtt5=mqtt5)
    big = _publish(b"vgw/dev-0001/consent", b"y" * 300_000, mid=9, mqtt5=mqtt5)
    puback = b"\x40\x02\x00\x07"
    stream = small + big + puback + small
    sizes: list[int] = []
    guard = PacketSizeGuard(65_536, mqtt5=mqtt5, on_drop=sizes.append)
    out = b"".join(guard.feed(stream[i:i + chunk]) for i in range(0, len(stream), chunk))
    assert out == small + _publish(b"vgw/dev-0001/consent", b"", mid=9, mqtt5=mqtt5) + puback + small
    assert sizes == [len(big)] and guard.dropped == 1


def test_the_packet_guard_ends_the_connection_on_other_oversized_or_malformed_packets() -> None:
    with pytest.raises(PacketTooLarge):
        PacketSizeGuard(1024, mqtt5=True).feed(b"\x90\xff\xff\x03")  # a SUBACK of 64 KiB
    with pytest.raises(PacketTooLarge):
        PacketSizeGuard(1024, mqtt5=True).feed(b"\x30\xff\xff\xff\xff\x01")  # five length bytes


# ---------------------------------------------------------------- the retained status


def test_the_retained_status_follows_every_consent_change(tmp_path: Path, pki: Any, broker: Mosquitto, cloud: Any,
                                                          auth: consentkit.Authority) -> None:
    cfg = write_config(tmp_path, pki, broker.port, auth.trust[0], can={"channel": f"intake-{time.time_ns()}"})
    v1, v2 = _docs(auth, 2)
    with AgentThread(cfg) as agent:
        assert wait_until(lambda: (cloud.status(DEVICE) or {}).get("state") == "online", 10)
        assert cloud.status(DEVICE)["consent_version"] is None
        cloud.publish_consent(DEVICE, v1)
        assert wait_until(lambda: (cloud.status(DEVICE) or {}).get("consent_version") == 1, 10), cloud.status(DEVICE)
        assert sorted(cloud.status(DEVICE)["grants"]) == sorted(BOTH)
        cloud.publish_consent(DEVICE, v2)
        assert wait_until(lambda: (cloud.status(DEVICE) or {}).get("consent_version") == 2, 10)
        assert cloud.status(DEVICE)["grants"] == ["g-keep"] and cloud.status(DEVICE)["healthy"] is True
        assert agent.agent.uplink.view().connects == 1  # no reconnect was needed
        # A subscriber arriving now gets the retained copy: it names v2, not what was true at connect.
        with connected_cloud(broker, pki, client_id="late") as late:
            assert late.wait_for(lambda: late.status(DEVICE) is not None, 10)
            assert late.status(DEVICE)["consent_version"] == 2
