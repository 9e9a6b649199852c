"""Property-based privacy tests (hypothesis): random consents x random traffic over the demo DBC.

Each example signs a random consent (1-3 grants, random scope subsets, random limits, X25519 or the
MLKEM768-X25519 hybrid), verifies it with the real verifier, runs simulated CAN traffic through the real
Pipeline, seals batches with the real envelope code into a real outbox, "publishes" them by reading the outbox
as the uplink does, and opens every envelope with the recipient's private key (the cloud's independent
implementation). Optionally one grant is revoked at a random moment, exactly as the runtime does it (swap the
router under the lock, then erase the grant on disk).

Properties, for every sample that came out:
  * its path's scope is held by the grant it was sent under, and that grant was in force when the frame was read;
  * per grant and path, samples are at least 1/max_hz apart (frame time), defaults included (location and
    compass 0.2 Hz);
  * latitude/longitude lie on the grid of the grant's precision (default 100 m), never finer;
  * the VIN appears only under a grant with read_vin;
  * after the revocation no sample of that grant exists and its rows and key are gone;
  * with no consent nothing is decoded, stored or sent.

Bounded in CI (``VGW_HYPOTHESIS_EXAMPLES``, default 25); ``--runslow`` runs 200.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vgw.contract.consent.model import Consent, Grant, Limits
from vgw.contract.consent.verifier import verify_consent
from vgw.contract.envelope import batch_plaintext, load_recipient_key, seal
from vgw.contract.scopes import SCOPES
from vgw.pipeline.catalogue import load_catalogue
from vgw.pipeline.router import Pipeline
from vgw.state.keys import load_or_create_storage_key
from vgw.state.outbox import GrantNotActive, Outbox
from vgw_sim.can_sim import CanSimulator
from vgw_sim.cloud import RecipientKey, SigningKey, consent_claims, grant, open_envelope, sign_consent
from vgw_sim.paths import default_dbc, default_signal_map
from vgw_sim.vehicle import DEFAULT_VIN, VehicleModel

DEVICE = "dev-0001"
T0 = 1_800_000_000.0
_M_PER_DEG = 111_320.0
_SIGNER = SigningKey.generate()
_CATALOGUE = load_catalogue([default_dbc()], default_signal_map())
_SCOPE_OF = _CATALOGUE.scope_of_path()
_SCOPES = sorted(SCOPES)


def _examples() -> int:
    if "--runslow" in sys.argv:
        return 200
    return int(os.environ.get("VGW_HYPOTHESIS_EXAMPLES", "25"))


PROFILE = settings(max_examples=_examples(), deadline=None, derandomize="CI" in os.environ,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- strategies

_limit = st.fixed_dictionaries({}, optional={
    "max_hz": st.sampled_from([0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0]),
    "precision_m": st.sampled_from([1.0, 10.0, 100.0, 500.0, 2000.0]),
})


@st.composite
def _grant_specs(draw: Any) -> list[dict[str, Any]]:
    n = draw(st.integers(min_value=1, max_value=3))
    out = []
    for i in range(n):
        scopes = draw(st.lists(st.sampled_from(_SCOPES), min_size=1, max_size=6, unique=True))
        limits = {s: lim for s in scopes if (lim := draw(_limit)) and draw(st.booleans())}
        kem = draw(st.sampled_from(["X25519", "X25519", "X25519", "MLKEM768-X25519"]))
        out.append({"id": f"g-{i}", "scopes": scopes, "limits": limits, "kem": kem})
    return out


@dataclass
class Scenario:
    consent: Consent
    keys: dict[str, RecipientKey]
    seed: int
    duration: float
    revoke: str | None
    revoke_at: float | None


@st.composite
def scenarios(draw: Any) -> Scenario:
    specs = draw(_grant_specs())
    keys = {s["id"]: RecipientKey.generate(s["kem"]) for s in specs}
    grants = [grant(s["id"], s["scopes"], keys[s["id"]], limits=s["limits"] or None) for s in specs]
    token = sign_consent(consent_claims(DEVICE, 1, grants, iat=int(T0) - 10), _SIGNER)
    consent = verify_consent(token, trust_keys=[_SIGNER.public_key], device=DEVICE, now=T0)
    duration = draw(st.floats(min_value=3.0, max_value=30.0))
    revoke = draw(st.one_of(st.none(), st.sampled_from([s["id"] for s in specs])))
    revoke_at = T0 + draw(st.floats(min_value=0.0, max_value=duration)) if revoke else None
    return Scenario(consent, keys, draw(st.integers(min_value=0, max_value=10_000)), duration, revoke, revoke_at)


# ---------------------------------------------------------------- the run


@dataclass
class Outcome:
    sent: dict[str, list[dict[str, Any]]]  # grant -> samples, as opened by the recipient
    revoked_at: float | None
    outbox_stats: dict[str, dict[str, int]]
    keys_left: set[str]
    refused_after_revocation: bool


def run(sc: Scenario | None, folder: Path, *, seed: int = 1, duration: float = 10.0) -> Outcome:
    grants: tuple[Grant, ...] = sc.consent.grants if sc else ()
    seed = sc.seed if sc else seed
    duration = sc.duration if sc else duration
    outbox = Outbox(folder / "outbox.sqlite", load_or_create_storage_key(folder / "storage.key"), DEVICE)
    # Durability is not the property here: skip the fsync per commit to keep examples fast.
    outbox._db.execute("PRAGMA synchronous=OFF")
    try:
        outbox.set_active_grants({g.id for g in grants})
        pipeline = Pipeline(_CATALOGUE)
        pipeline.swap(grants)
        recipients = {g.id: load_recipient_key(g.recipient.kem, g.recipient.pk) for g in grants}
        sent: dict[str, list[dict[str, Any]]] = defaultdict(list)
        revoked_at: float | None = None
        refused = False

        def flush() -> None:
            for batch in list(pipeline.batches.values()):
                samples = batch.take()
                if not samples:
                    continue
                g = batch.grant

                def make(seq: int, _s: list[dict[str, Any]] = samples, _g: Grant = g) -> bytes:
                    return seal(_g.recipient.kem, recipients[_g.id], DEVICE, _g.id,
                                batch_plaintext(DEVICE, _g.id, seq, _s, epoch=outbox.epoch))

                outbox.commit_batch(g.id, make, batch.first_t, len(samples))
            # The uplink: oldest first, publish, delete on PUBACK; the cloud opens with its own code.
            for row in outbox.pending(1000):
                doc = open_envelope(row.payload, sc.keys[row.grant_id], DEVICE, row.grant_id)  # type: ignore[union-attr]
                assert doc["seq"] == row.seq
                sent[row.grant_id].extend(doc["samples"])
                outbox.delete_batch(row.id)

        sim = CanSimulator(default_dbc(), VehicleModel(seed=seed, start_time=T0))
        next_flush = T0 + 1.0
        for msg in sim.frames(duration, start_time=T0):
            if sc and sc.revoke and revoked_at is None and msg.timestamp >= sc.revoke_at:  # type: ignore[operator]
                # As Agent._on_revoke + ConsentManager._erase: stop collecting (memory first), then erase.
                revoked_at = msg.timestamp
                pipeline.swap(tuple(g for g in grants if g.id != sc.revoke))
                outbox.set_active_grants({g.id for g in grants if g.id != sc.revoke})
                outbox.erase_grant(sc.revoke)
                try:
                    outbox.commit_batch(sc.revoke, lambda seq: b"late", T0, 1)
                except GrantNotActive:
                    refused = True
            pipeline.process(msg.arbitration_id, bytes(msg.data), msg.timestamp)
            if msg.timestamp >= next_flush:
                next_flush += 1.0
                flush()
        flush()
        keys_left = {gid for gid in {g.id for g in grants} if outbox.has_key(gid)}
        return Outcome(dict(sent), revoked_at, outbox.stats(), keys_left, refused)
    finally:
        outbox.close()


# The defaults (EDPB 01/2020), restated here independently of vgw.contract.consent.model.
_DEFAULTS = {"read_location": (0.2, 100.0), "read_compass": (0.2, None)}


def _expected_limits(g: Grant, scope: str) -> Limits:
    """What the grant asks for, field by field, else the privacy default: never looser than either."""
    own = g.limits.get(scope)
    hz, precision = _DEFAULTS.get(scope, (None, None))
    return Limits(max_hz=own.max_hz if own and own.max_hz else hz,
                  precision_m=own.precision_m if own and own.precision_m else precision)


def _on_grid(value: float, step: float) -> bool:
    return abs(value - round(value / step) * step) <= 1e-6


# ---------------------------------------------------------------- properties


@PROFILE
@given(sc=scenarios())
def test_every_sent_sample_is_consented_limited_and_stops_at_revocation(sc: Scenario) -> None:
    with tempfile.TemporaryDirectory(prefix="vgw-prop-") as tmp:
        out = run(sc, Path(tmp))
    by_id = {g.id: g for g in sc.consent.grants}
    for gid, samples in out.sent.items():
        g = by_id[gid]
        last: dict[str, float] = {}
        lat_at: dict[float, float] = {}
        for s in samples:
            scope = _SCOPE_OF[s["path"]]
            # 1. Covered by this grant's scopes (the VIN only under read_vin, location only under read_location).
            assert scope in g.scopes, (gid, s["path"])
            # 2. In force when the frame was read.
            if gid == sc.revoke and out.revoked_at is not None:
                assert s["t"] < out.revoked_at
            lim = _expected_limits(g, scope)
            # 3. Rate: never faster than max_hz on frame time (defaults for location and compass).
            if lim.max_hz:
                if s["path"] in last:
                    assert s["t"] - last[s["path"]] >= 1.0 / lim.max_hz - 1e-6, (gid, s["path"], lim)
                last[s["path"]] = s["t"]
            # 4. Precision: on the grid of precision_m (100 m by default for location), never finer.
            if s["path"].endswith(".Latitude"):
                assert lim.precision_m is not None
                assert _on_grid(s["value"], lim.precision_m / _M_PER_DEG)
                lat_at[s["t"]] = s["value"]
            elif s["path"].endswith(".Longitude"):
                assert lim.precision_m is not None
                lat = lat_at[s["t"]]  # same GNSS frame, snapped first
                cos = max(math.cos(math.radians(min(abs(lat), 89.0))), 1e-3)
                assert _on_grid(s["value"], lim.precision_m / (_M_PER_DEG * cos))
            if s["path"].endswith(".VIN"):
                assert "read_vin" in g.scopes and s["value"] == DEFAULT_VIN
    # Sanity: the scenario produced something whenever a granted scope is on the bus (catches a silent pipeline).
    bus_scopes = set(_SCOPE_OF.values())
    for g in sc.consent.grants:
        if (g.id != sc.revoke or out.revoked_at is None) and set(g.scopes) & bus_scopes and sc.duration >= 3:
            assert out.sent.get(g.id), f"grant {g.id} {g.scopes} got nothing"
    # 5. Revocation: nothing stored afterwards, key and rows gone, and a late batch is refused.
    if sc.revoke:
        if out.revoked_at is not None:  # None: the random moment fell after the last frame
            assert sc.revoke not in out.outbox_stats and sc.revoke not in out.keys_left
            assert out.refused_after_revocation
    assert out.outbox_stats == {}  # everything else was "acknowledged"


@settings(max_examples=max(5, _examples() // 5), deadline=None)
@given(seed=st.integers(min_value=0, max_value=10_000), duration=st.floats(min_value=1.0, max_value=20.0))
def test_no_consent_nothing_decoded_stored_or_sent(seed: int, duration: float) -> None:
    with tempfile.TemporaryDirectory(prefix="vgw-prop-") as tmp:
        folder = Path(tmp)
        out = run(None, folder, seed=seed, duration=duration)
        assert out.sent == {} and out.outbox_stats == {} and out.keys_left == set()
        # Not even a key or a sequence number exists, and a batch for a made-up grant is refused.
        outbox = Outbox(folder / "outbox.sqlite", load_or_create_storage_key(folder / "storage.key"), DEVICE)
        try:
            with pytest.raises(GrantNotActive):
                outbox.commit_batch("g-any", lambda seq: b"x", time.time(), 1)
            assert outbox.orphan_grants(set()) == set() and outbox.receipt_count() == 0
        finally:
            outbox.close()


def test_no_consent_pipeline_decodes_nothing() -> None:
    pipeline = Pipeline(_CATALOGUE)
    sim = CanSimulator(default_dbc(), VehicleModel(seed=3, start_time=T0))
    for msg in sim.frames(5.0, start_time=T0):
        pipeline.process(msg.arbitration_id, bytes(msg.data), msg.timestamp)
    assert pipeline.router.frame_ids == frozenset()
    assert pipeline.counters["samples"] == 0 and pipeline.counters["frames_unrouted"] == pipeline.counters["frames"]
    assert not pipeline.batches
