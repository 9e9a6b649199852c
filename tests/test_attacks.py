"""The consent attack suite: each hostile document goes through ``ConsentManager.apply(source="mqtt")``,
the path a document from the cloud takes, on a real state directory (SQLite outbox, audit log, cache file).

Every case must be rejected whole: the consent in force is unchanged (version, digest, cache file bytes, active
grants, data keys), a ``consent-rejected`` receipt signed ES256 by the device is queued with the reason, and
the audit log holds a ``consent-rejected`` entry with the same reason and still verifies. A few cases also go
through the real broker to a running agent, and a document on another device's topic never reaches it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vgw.base import errors
from vgw_sim.cloud import SigningKey, b64url

from tests.consentkit import Authority, State

DEVICE = "dev-0001"


@pytest.fixture
def world(tmp_path: Path, pki: Any) -> Iterator[dict[str, Any]]:
    """A device with v4 (g-a, g-b) then v5 (g-a only: g-b revoked) in force, g-a holding one stored batch."""
    auth = Authority(tmp_path)
    s = State(tmp_path, pki, auth)
    now = int(time.time())
    v4 = auth.doc(DEVICE, 4, [auth.grant("g-a", ["read_odometer"]), auth.grant("g-b", ["read_location"])],
                  iat=now - 120)
    assert s.manager.apply(v4, source="mqtt").status == "applied"
    v5 = auth.doc(DEVICE, 5, [auth.grant("g-a", ["read_odometer"])], iat=now - 60)
    assert s.manager.apply(v5, source="mqtt").status == "applied"
    s.outbox.commit_batch("g-a", lambda seq: b"sealed-envelope-%d" % seq, first_t=now, samples=1)
    try:
        yield {"auth": auth, "state": s, "now": now, "v4": v4, "v5": v5}
    finally:
        s.close()


# ---------------------------------------------------------------- forging helpers


def _b64json(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def _claims(w: dict[str, Any], ver: int = 6, **kw: Any) -> dict[str, Any]:
    auth: Authority = w["auth"]
    grants = kw.pop("grants", None)
    if grants is None:
        grants = [auth.grant("g-a", ["read_odometer"]), auth.grant("g-c", ["read_fuel"])]
    return auth.claims(DEVICE, ver, grants, **{"iat": w["now"], **kw})


def _sign(w: dict[str, Any], claims: dict[str, Any], **kw: Any) -> str:
    return w["auth"].sign(claims, **kw)


def _sign_raw_payload(w: dict[str, Any], payload: bytes) -> str:
    return jwt.PyJWS().encode(payload, w["auth"].key.private_key, algorithm="EdDSA",
                              headers={"typ": "vgw-consent+jwt"})


def _bad_signature(w: dict[str, Any]) -> str:
    h, p, sig = _sign(w, _claims(w)).split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[10] ^= 0x01
    return f"{h}.{p}.{b64url(bytes(raw))}"


def _spliced_signature(w: dict[str, Any]) -> str:
    # The signature of a genuine document (v5) on a forged payload that grants more.
    h, p, _ = _sign(w, _claims(w, grants=[w["auth"].grant("g-a", ["read_odometer", "read_location"])])).split(".")
    return f"{h}.{p}.{w['v5'].split('.')[2]}"


def _alg_none(w: dict[str, Any], sig: str = "") -> str:
    return f"{_b64json({'alg': 'none', 'typ': 'vgw-consent+jwt'})}.{_b64json(_claims(w))}.{sig}"


def _hs256_public_key(w: dict[str, Any]) -> str:
    # Key confusion: HMAC keyed with the signer's *public* key (which every device holds) as the secret.
    secret = w["auth"].key.public_pem()
    signing_input = f"{_b64json({'alg': 'HS256', 'typ': 'vgw-consent+jwt'})}.{_b64json(_claims(w))}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def _grant_with(w: dict[str, Any], **fields: Any) -> dict[str, Any]:
    g = w["auth"].grant("g-c", ["read_fuel"])
    for k, v in fields.items():
        if v is None:
            g.pop(k, None)
        else:
            g[k] = v
    return g


def _rolled_back_after_expiry(w: dict[str, Any]) -> str:
    # The device has already seen time pass beyond this document's exp; then its clock is set back so the
    # wall clock alone would call the document valid. The persisted floor must still call it expired.
    s: State = w["state"]
    s.store.raise_floor(w["now"] + 200)
    return _sign(w, _claims(w, iat=w["now"] - 1000, exp=w["now"] + 100))


def _flattened_json(w: dict[str, Any]) -> str:
    h, p, sig = _sign(w, _claims(w)).split(".")
    return json.dumps({"protected": h, "payload": p, "signature": sig})


Forge = Callable[[dict[str, Any]], "str | bytes"]

# (case id, forge, accepted reasons, receipt/audit must carry ver)
CASES: list[tuple[str, Forge, set[str], int | None]] = [
    ("bad-signature", _bad_signature, {"signature"}, 6),
    ("unknown-signing-key", lambda w: _sign(w, _claims(w), key=SigningKey.generate()), {"signature"}, 6),
    ("signature-spliced-from-genuine-doc", _spliced_signature, {"signature"}, 6),
    ("alg-none-empty-signature", _alg_none, {"malformed", "alg"}, 6),
    ("alg-none-with-signature", lambda w: _alg_none(w, "AAAA"), {"alg"}, 6),
    ("hs256-public-key-as-secret", _hs256_public_key, {"alg"}, 6),
    ("wrong-typ", lambda w: _sign(w, _claims(w), headers={"typ": "JWT"}), {"typ"}, 6),
    ("missing-typ", lambda w: _sign(w, _claims(w), headers={"typ": None}), {"typ"}, 6),
    ("unknown-crit-header", lambda w: _sign(w, _claims(w), headers={"crit": ["exp"]}), {"crit"}, 6),
    ("sub-of-another-device", lambda w: _sign(w, {**_claims(w), "sub": "dev-0002"}), {"subject"}, 6),
    ("replay-older-version-after-revocation", lambda w: w["v4"], {"version-rollback"}, 4),
    ("same-version-different-content", lambda w: _sign(w, _claims(w, ver=5)), {"version-conflict"}, 5),
    ("expired", lambda w: _sign(w, _claims(w, iat=w["now"] - 2 * 86400, exp=w["now"] - 86400)), {"expired"}, 6),
    ("iat-in-future-beyond-skew", lambda w: _sign(w, _claims(w, iat=w["now"] + 3600)), {"not-yet-valid"}, 6),
    ("clock-rolled-back-after-expiry", _rolled_back_after_expiry, {"expired"}, 6),
    ("exp-not-after-iat", lambda w: _sign(w, _claims(w, exp=w["now"])), {"validity"}, 6),
    ("unknown-scope", lambda w: _sign(w, _claims(w, grants=[_grant_with(w, scopes=["read_fuel", "read_mind"])])),
     {"unknown-scope"}, 6),
    ("control-scope-beside-a-good-grant",
     lambda w: _sign(w, _claims(w, grants=[w["auth"].grant("g-a", ["read_odometer"]),
                                           _grant_with(w, scopes=["control_lock"])])), {"control-scope"}, 6),
    ("duplicate-grant-ids", lambda w: _sign(w, _claims(w, grants=[_grant_with(w), _grant_with(w)])),
     {"duplicate-grant"}, 6),
    ("missing-recipient", lambda w: _sign(w, _claims(w, grants=[_grant_with(w, recipient=None)])), {"recipient"}, 6),
    ("recipient-key-31-bytes",
     lambda w: _sign(w, _claims(w, grants=[_grant_with(w, recipient={"kem": "X25519", "pk": b64url(b"k" * 31)})])),
     {"recipient"}, 6),
    ("recipient-unsupported-kem",
     lambda w: _sign(w, _claims(w, grants=[_grant_with(w, recipient={"kem": "P-256", "pk": b64url(b"k" * 32)})])),
     {"recipient"}, 6),
    ("recipient-mlkem-with-x25519-length",
     lambda w: _sign(w, _claims(w, grants=[_grant_with(w, recipient={"kem": "MLKEM768-X25519",
                                                                     "pk": b64url(b"k" * 32)})])),
     {"recipient"}, 6),
    ("oversized-document-64KiB", lambda w: _sign(w, _claims(w, grants=[_grant_with(w, purpose="p" * 70_000)])),
     {"too-large"}, None),
    ("too-many-grants", lambda w: _sign(w, _claims(w, grants=[w["auth"].grant(f"g{i}", ["read_fuel"])
                                                              for i in range(65)])), {"too-large"}, 6),
    ("truncated-jws", lambda w: w["v5"][: w["v5"].index(".") + 20], {"malformed"}, None),
    ("truncated-signature", lambda w: _sign(w, _claims(w))[:-12], {"signature", "malformed"}, 6),
    ("non-json-payload", lambda w: _sign_raw_payload(w, b"grants: everything"), {"payload"}, None),
    ("json-array-payload", lambda w: _sign_raw_payload(w, b'[{"ver": 6}]'), {"payload"}, None),
    ("ver-as-string", lambda w: _sign(w, {**_claims(w), "ver": "6"}), {"claims"}, None),
    ("ver-as-bool", lambda w: _sign(w, {**_claims(w), "ver": True}), {"claims"}, None),
    ("exp-as-float", lambda w: _sign(w, {**_claims(w), "exp": w["now"] + 86400.5}), {"claims"}, 6),
    ("grants-as-object", lambda w: _sign(w, {**_claims(w), "grants": {"g-a": ["read_odometer"]}}), {"claims"}, 6),
    ("scopes-as-string", lambda w: _sign(w, _claims(w, grants=[_grant_with(w, scopes="read_fuel")])), {"claims"}, 6),
    ("limits-for-ungranted-scope",
     lambda w: _sign(w, _claims(w, grants=[_grant_with(w, limits={"read_location": {"max_hz": 1}})])), {"claims"}, 6),
    ("negative-max-hz",
     lambda w: _sign(w, _claims(w, grants=[_grant_with(w, limits={"read_fuel": {"max_hz": -1}})])), {"claims"}, 6),
    ("negative-retention", lambda w: _sign(w, _claims(w, grants=[_grant_with(w, retention_s=-5)])), {"claims"}, 6),
    ("grant-id-with-topic-wildcard", lambda w: _sign(w, _claims(w, grants=[_grant_with(w, id="g/#")])), {"claims"}, 6),
    ("non-ascii-bytes", lambda w: "é".encode() + w["v5"].encode(), {"malformed"}, None),
    ("json-serialised-jws", _flattened_json, {"malformed"}, None),
    ("empty-document", lambda w: b"", {"malformed"}, None),
]


# One exception class per rule (vgw.base.errors), so a caller can catch e.g. a rollback by type; the reason it
# carries is the receipt's, unchanged.
ERROR_OF: dict[str, type[errors.ConsentError]] = {
    "signature": errors.BadSignatureError, "malformed": errors.MalformedError, "alg": errors.AlgorithmError,
    "typ": errors.TypeHeaderError, "crit": errors.CriticalHeaderError, "subject": errors.WrongDeviceError,
    "version-rollback": errors.RollbackError, "version-conflict": errors.VersionConflictError,
    "expired": errors.ExpiredError, "not-yet-valid": errors.NotYetValidError, "validity": errors.ValidityError,
    "unknown-scope": errors.UnknownScopeError, "control-scope": errors.ControlScopeError,
    "duplicate-grant": errors.DuplicateGrantError, "recipient": errors.RecipientError,
    "too-large": errors.TooLargeError, "payload": errors.PayloadError, "claims": errors.BadClaimError,
}
GROUP_OF = {errors.SignatureError: {"signature", "malformed", "alg", "typ", "crit"},
            errors.FreshnessError: {"version-rollback", "version-conflict", "expired", "not-yet-valid"}}


@pytest.mark.parametrize(("forge", "reasons", "ver"), [pytest.param(f, r, v, id=i) for i, f, r, v in CASES])
def test_attack_raises_the_class_of_its_rule(world: dict[str, Any], forge: Forge, reasons: set[str],
                                             ver: int | None) -> None:
    token = forge(world)
    with pytest.raises(errors.ConsentError) as info:
        world["state"].manager.verify(token)
    exc = info.value
    assert type(exc) is ERROR_OF[exc.reason] and exc.reason in reasons
    assert isinstance(exc.reason, str) and json.dumps(exc.reason) == f'"{exc.reason}"'  # the wire form
    for group, members in GROUP_OF.items():
        assert isinstance(exc, group) == (exc.reason in members), (group, exc)


def test_a_rollback_is_caught_by_type(world: dict[str, Any]) -> None:
    with pytest.raises(errors.RollbackError) as info:
        world["state"].manager.verify(world["v4"])
    assert info.value.reason == "version-rollback" and info.value.version == 4


@pytest.mark.parametrize(("forge", "reasons", "ver"), [pytest.param(f, r, v, id=i) for i, f, r, v in CASES])
def test_attack_rejected_whole(world: dict[str, Any], forge: Forge, reasons: set[str], ver: int | None) -> None:
    s: State = world["state"]
    token = forge(world)
    before = s.snapshot()
    receipts_before = len(s.receipts())
    audit_before = len(s.events())

    result = s.manager.apply(token, source="mqtt")

    assert result.status == "rejected"
    assert result.error is not None and result.error.reason in reasons, result.error
    # The consent in force is exactly what it was: version, payload digest, cache bytes, grants, keys.
    assert s.snapshot() == before
    assert s.manager.in_force is not None and s.manager.in_force.ver == 5
    # One new receipt: consent-rejected, ES256 under the device certificate key, naming the reason.
    new = s.receipts()[receipts_before:]
    assert [r["typ"] for r in new] == ["consent-rejected"]
    assert new[0]["reason"] == result.error.reason and new[0]["sub"] == DEVICE
    if ver is not None:
        assert new[0]["ver"] == ver
    # One new audit entry, with the reason and no effect besides it; the chain still verifies.
    entries = s.events()[audit_before:]
    assert [e["event"] for e in entries] == ["consent-rejected"]
    assert entries[0]["reason"] == result.error.reason and entries[0]["source"] == "mqtt"
    assert s.audit.verify().ok
    # ...and it survives a restart: the cache still re-verifies to v5 with g-a in force.
    s.reopen()
    assert s.manager.in_force is not None and s.manager.in_force.ver == 5
    assert s.outbox.has_key("g-a") and s.outbox.active_grants() == {"g-a"}


def test_attack_case_count() -> None:
    assert len(CASES) >= 20
    assert len({c[0] for c in CASES}) == len(CASES)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                      st.lists(st.text("ABCDEFabcdef0123456789-_", max_size=80), min_size=3, max_size=3)
                      .map(lambda parts: ".".join(parts).encode())))
def test_random_bytes_never_crash_or_apply(world: dict[str, Any], data: bytes) -> None:
    s: State = world["state"]
    before = s.snapshot()
    result = s.manager.apply(data, source="mqtt")
    assert result.status == "rejected"
    assert s.snapshot() == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(min_value=0), char=st.sampled_from("AQgw_-.x=9"))
def test_mutated_genuine_document_never_changes_consent(world: dict[str, Any], pos: int, char: str) -> None:
    # A one-character change to a genuine, newer document: rejected, or (base64 padding bits) the same
    # signed content; never a different consent.
    s: State = world["state"]
    auth: Authority = world["auth"]
    v6 = auth.doc(DEVICE, 6, [auth.grant("g-a", ["read_odometer"])], iat=world["now"])
    i = pos % len(v6)
    mutated = v6[:i] + char + v6[i + 1:]
    before = s.snapshot()
    result = s.manager.apply(mutated, source="mqtt")
    if result.status == "applied":
        assert result.consent is not None and result.consent.digest == hashlib.sha256(
            base64.urlsafe_b64decode(v6.split(".")[1] + "==")).hexdigest()
    else:
        assert s.snapshot() == before


# ---------------------------------------------------------------- through the real broker


@pytest.fixture
def subscriptions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every topic any paho client in this process subscribes to (the agent's uplink, the cloud peer)."""
    seen: list[str] = []
    original = paho.Client.subscribe

    def spy(self: paho.Client, topic: Any, *args: Any, **kwargs: Any) -> Any:
        if self._client_id == DEVICE.encode():
            seen.extend([topic] if isinstance(topic, str) else [t[0] if isinstance(t, tuple) else t for t in topic])
        return original(self, topic, *args, **kwargs)

    monkeypatch.setattr(paho.Client, "subscribe", spy)
    return seen


def test_attacks_through_broker_to_running_agent(tmp_path: Path, pki: Any, broker: Any, cloud: Any,
                                                 subscriptions: list[str]) -> None:
    from tests.agentkit import AgentThread, write_config

    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, broker.port, auth.trust[0], can={"channel": f"atk-{uuid.uuid4().hex[:8]}"})
    now = int(time.time())
    with AgentThread(cfg) as agent:
        cloud.publish_consent(DEVICE, auth.doc(DEVICE, 1, [auth.grant("g-a", ["read_odometer"])], iat=now))
        assert cloud.wait_for(lambda: bool(cloud.receipts(DEVICE, "consent-applied")))
        cache = (agent.cfg.state_dir / "consent.jws").read_bytes()

        forged = auth.sign(auth.claims(DEVICE, 2, [auth.grant("g-a", ["read_odometer", "read_location"])], iat=now),
                           key=SigningKey.generate())
        cloud.publish_consent(DEVICE, forged)
        assert cloud.wait_for(lambda: len(cloud.receipts(DEVICE, "consent-rejected")) >= 1)

        control = auth.doc(DEVICE, 3, [auth.grant("g-a", ["read_odometer", "control_unlock"])], iat=now)
        cloud.publish_consent(DEVICE, control)
        assert cloud.wait_for(lambda: len(cloud.receipts(DEVICE, "consent-rejected")) >= 2)

        rejected = cloud.receipts(DEVICE, "consent-rejected")
        assert [(r.claims["ver"], r.claims["reason"]) for r in rejected] == [(2, "signature"), (3, "control-scope")]
        assert agent.agent.manager.in_force is not None and agent.agent.manager.in_force.ver == 1
        assert (agent.cfg.state_dir / "consent.jws").read_bytes() == cache
        reasons = [e["reason"] for e in agent.agent.audit.entries() if e["event"] == "consent-rejected"]
        assert reasons == ["signature", "control-scope"]
    assert not cloud.bad_receipts()
    assert set(subscriptions) == {f"vgw/{DEVICE}/consent"}


def test_document_on_another_devices_topic_never_reaches_agent(tmp_path: Path, pki: Any, broker: Any, cloud: Any,
                                                               subscriptions: list[str]) -> None:
    from tests.agentkit import AgentThread, write_config

    auth = Authority(tmp_path)
    now = int(time.time())
    # Validly signed by the trusted key and even naming dev-0001 as sub: only the topic is wrong. If the agent
    # subscribed to it (a wildcard, or another device's topic) it would apply; so subscription is the defence.
    lure = auth.doc(DEVICE, 9, [auth.grant("g-lure", ["read_location"])], iat=now)
    cloud.publish_consent("dev-0002", lure)
    cfg = write_config(tmp_path, pki, broker.port, auth.trust[0], can={"channel": f"atk-{uuid.uuid4().hex[:8]}"})
    with AgentThread(cfg) as agent:
        assert agent.wait_link()
        cloud.publish_consent(DEVICE, auth.doc(DEVICE, 1, [auth.grant("g-a", ["read_odometer"])], iat=now))
        assert cloud.wait_for(lambda: bool(cloud.receipts(DEVICE, "consent-applied")))
        time.sleep(0.5)  # room for a wrongly routed retained message to arrive
        assert subscriptions == [f"vgw/{DEVICE}/consent"]
        assert agent.agent.manager.in_force is not None and agent.agent.manager.in_force.ver == 1
        entries = agent.agent.audit.entries()
        assert not [e for e in entries if e.get("ver") == 9]
        assert [e["event"] for e in entries if e["event"].startswith("consent-")] == ["consent-applied"]
    assert [r.claims["ver"] for r in cloud.receipts(DEVICE)] == [1]
