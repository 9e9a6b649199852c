"""`vgw bench --drive-cycle`: bytes sent per hour per grant under each collection mode (README "Collection rules")
against
streaming every sample, on the demo vehicle's simulated drive (simulators/vgw_sim/vehicle.py).

One pass over the drive, in simulated time (no waiting, no broker): the frames go through the real pipeline
(catalogue, compiled decoders, rule engines, limits) into one grant per mode, all holding the same scopes.
Every ``[batch] max_interval_s`` of frame time each grant's open batch is sealed exactly as the agent seals
it (zlib JSON, HPKE to the grant's recipient key), and the envelope's bytes are counted: what would be
published on ``vgw/<device>/data/<grant>``, without the MQTT header.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import x25519

from vgw.contract.consent.model import KEM_X25519, Grant, Recipient
from vgw.contract.rules.rules import parse_rules

DRIVE_SCOPES = ("read_speedometer", "read_fuel", "read_thermometer", "read_climate")
START = 1_795_920_000.0

# One grant per mode, every one over DRIVE_SCOPES. The deadbands are what a fleet or insurer app needs:
# 1 km/h of speed, 1 % of tank, half a degree of temperature.
MODES: dict[str, list[dict[str, Any]]] = {
    "raw": [],
    "on_change": [
        {"scope": "read_speedometer", "mode": "on_change", "deadband": 1.0, "heartbeat_s": 60},
        {"scope": "read_fuel", "mode": "on_change", "deadband": 1.0, "heartbeat_s": 60},
        {"scope": "read_thermometer", "mode": "on_change", "deadband": 0.5, "heartbeat_s": 60},
        {"scope": "read_climate", "mode": "on_change", "deadband": 0.5, "heartbeat_s": 60},
    ],
    "periodic": [{"scope": s, "mode": "periodic", "period_s": 10} for s in DRIVE_SCOPES],
    "aggregate": [{"scope": s, "mode": "aggregate", "window_s": 60} for s in DRIVE_SCOPES],
    "trigger": [{"scope": s, "mode": "trigger", "when": "rising(Vehicle.Speed < 5)", "pre_s": 10, "post_s": 5}
                for s in DRIVE_SCOPES],
}


@dataclass
class _Tally:
    samples: int = 0
    batches: int = 0
    bytes: int = 0


def drive_cycle(seconds: float = 1800.0, *, seed: int = 7, batch_interval_s: float | None = None) -> dict[str, Any]:
    """Run the measure over ``seconds`` of simulated driving. Returns a JSON-ready dict (see module docstring)."""
    from vgw_sim.can_sim import CanSimulator
    from vgw_sim.paths import default_dbc, default_signal_map
    from vgw_sim.vehicle import VehicleModel

    from vgw.config.settings import BatchConfig
    from vgw.contract.envelope import batch_plaintext, load_recipient_key, seal
    from vgw.pipeline.catalogue import load_catalogue
    from vgw.pipeline.router import Pipeline

    if seconds <= 0:
        raise ValueError("seconds must be > 0")
    interval = batch_interval_s if batch_interval_s is not None else BatchConfig().max_interval_s
    catalogue = load_catalogue([default_dbc()], default_signal_map())
    keys = {}
    grants = []
    for mode, rules in MODES.items():
        pk = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
        gid = f"g-{mode.replace('_', '-')}"
        keys[gid] = load_recipient_key(KEM_X25519, pk)
        grants.append(Grant(id=gid, controller="bench", purpose=mode, scopes=DRIVE_SCOPES,
                            recipient=Recipient(KEM_X25519, pk), collect=parse_rules(rules, DRIVE_SCOPES)))
    pipeline = Pipeline(catalogue)
    pipeline.swap(tuple(grants))
    tally = {g.id: _Tally() for g in grants}
    seqs = dict.fromkeys(tally, 0)

    def seal_all() -> None:
        for gid, batch in pipeline.batches.items():
            samples = batch.take()
            if samples:
                seqs[gid] += 1
                envelope = seal(KEM_X25519, keys[gid], "bench-car-01", gid,
                                batch_plaintext("bench-car-01", gid, seqs[gid], samples, epoch="0123456789abcdef"))
                tally[gid].samples += len(samples)
                tally[gid].batches += 1
                tally[gid].bytes += len(envelope)

    sim = CanSimulator(default_dbc(), VehicleModel(seed=seed))
    started = time.perf_counter()
    next_seal = START + interval
    frames = 0
    for msg in sim.frames(seconds, start_time=START):
        if msg.timestamp >= next_seal:
            seal_all()
            next_seal += interval * (1 + int((msg.timestamp - next_seal) // interval))
        pipeline.process(msg.arbitration_id, bytes(msg.data), msg.timestamp)
        frames += 1
    pipeline.close_windows()
    seal_all()
    hours = seconds / 3600.0
    raw_bytes = tally["g-raw"].bytes or 1
    per_grant = {}
    for g in grants:
        t = tally[g.id]
        per_grant[g.id] = {"mode": g.purpose, "samples": t.samples, "batches": t.batches, "bytes": t.bytes,
                           "bytes_per_hour": round(t.bytes / hours), "samples_per_hour": round(t.samples / hours),
                           "raw_over_mode": round(raw_bytes / t.bytes, 1) if t.bytes else None}
    return {"drive_seconds": seconds, "frames": frames, "scopes": list(DRIVE_SCOPES), "batch_interval_s": interval,
            "seed": seed, "elapsed_s": round(time.perf_counter() - started, 2), "grants": per_grant,
            "rules": MODES}


def format_drive(result: dict[str, Any]) -> str:
    """The drive-cycle measure as a table."""
    lines = [f"drive cycle: {result['drive_seconds']:g} s of the demo drive ({result['frames']} frames), scopes "
             f"{', '.join(result['scopes'])}; batches sealed every {result['batch_interval_s']:g} s",
             f"{'grant':<14} {'mode':<10} {'samples/h':>10} {'bytes/h':>12} {'raw / mode':>10}"]
    for gid, g in result["grants"].items():
        ratio = "-" if g["raw_over_mode"] is None else f"{g['raw_over_mode']:g}x"
        lines.append(f"{gid:<14} {g['mode']:<10} {g['samples_per_hour']:>10} {g['bytes_per_hour']:>12} {ratio:>10}")
    return "\n".join(lines) + "\n"
