"""`vgw bench`: :func:`run_bench`, every phase in order (see :mod:`vgw.tools.bench`), around one private broker."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vgw.base.errors import ConfigError, VgwError
from vgw.base.logs import quieted
from vgw.config.settings import BatchConfig
from vgw.tools.bench.child import _config_text, _run_child
from vgw.tools.bench.decode import bench_decode
from vgw.tools.bench.latency import _latencies
from vgw.tools.bench.options import _PRIVACY_SCOPES, DEVICE, TYPICAL_SCOPES, BenchOptions
from vgw.tools.bench.report import Progress, _cpu_name, _targets
from vgw.tools.bench.revocation import bench_revocation
from vgw.tools.bench.rules import bench_rules, rules_targets
from vgw.tools.bench.trace import frame_source, synthetic_signal_map, write_trace

# ---------------------------------------------------------------- orchestration


def _broker(root: Path) -> tuple[Any, Any]:
    """A throwaway PKI for the bench device and a private mosquitto with mutual TLS on a free port."""
    from vgw_sim.broker import Mosquitto, MosquittoNotFound
    from vgw_sim.pki import TestPKI

    pki = TestPKI(root / "pki", devices=[DEVICE])
    try:
        return pki, Mosquitto.from_pki(pki).start()
    except MosquittoNotFound as exc:
        raise VgwError(str(exc)) from exc


def _retain(broker: Any, pki: Any, token: str) -> None:
    """Leave ``token`` retained on the device's consent topic, as the cloud does in a deployment: an agent
    publishes stored batches only once it has the broker's retained consent (README "MQTT topics"), so with
    none there it would wait ``[mqtt] consent_wait_s`` after connecting, a wait no deployment has."""
    from vgw_sim.cloud import CloudPeer

    peer = CloudPeer.for_broker(broker, pki)
    try:
        peer.connect()
        peer.publish_consent(DEVICE, token)
    finally:
        peer.close()


def _sign(signer: Any, grants: list[dict[str, Any]], now: int) -> str:
    """A consent document for the bench device holding ``grants`` (id, scopes, collect), each with a fresh
    recipient key (the bench reads no envelope of these)."""
    from vgw.cloud.consent_authority import RecipientKey, consent_claims, grant, sign_consent

    claims = []
    for g in grants:
        out = grant(g["id"], g["scopes"], RecipientKey.generate())
        if "collect" in g:
            out["collect"] = g["collect"]
        claims.append(out)
    return sign_consent(consent_claims(DEVICE, 1, claims, iat=now), signer)


def run_rules_bench(opts: BenchOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Only phase 6 (`vgw bench --rules`): the costliest accepted collection rules against none."""
    from vgw_sim.paths import default_dbc, default_signal_map

    from vgw.cloud.consent_authority import SigningKey
    from vgw.state.consent.store import ConsentStore

    if opts.dbc is not None:
        raise VgwError("--rules runs on the demo vehicle: leave out --dbc")
    if not opts.rules_seconds > 0:
        raise VgwError(f"--rules-seconds {opts.rules_seconds}: must be > 0")
    progress = progress or Progress()
    quiet = quieted("vgw")
    quiet.__enter__()
    root = Path(tempfile.mkdtemp(prefix="vgw-bench-"))
    os.chmod(root, 0o755)  # noqa: S103 - the broker (dropped to user mosquitto) reads the PKI below it
    broker = None
    try:
        pki, broker = _broker(root)
        signer = SigningKey.generate()
        trust = signer.write_public_pem(root / "consent-signer.pub.pem")
        now = int(time.time())

        def config(name: str, trace: Path, token: str) -> Path:
            state = root / f"state-{name}"
            state.mkdir(mode=0o700)
            ConsentStore(state).write_token(token)
            _retain(broker, pki, token)
            path = root / f"{name}.toml"
            path.write_text(_config_text(state, default_dbc(), default_signal_map(), trace, 1, broker.port, pki,
                                         trust, strict=True, max_interval_s=None))
            return path

        result = bench_rules(lambda grants: _sign(signer, grants, now), config, root, opts.rules_seconds,
                             opts.seed + 2, progress)
        return {"python": sys.version.split()[0], "cpu": _cpu_name(), "cores": os.cpu_count(), "rules": result,
                "targets": rules_targets(result)}
    finally:
        quiet.__exit__(None, None, None)
        progress.close()
        if broker is not None:
            broker.close()
        shutil.rmtree(root, ignore_errors=True)


def run_headline_bench(opts: BenchOptions, progress: Progress | None = None) -> dict[str, Any]:
    """The headline (:mod:`vgw.tools.bench.headline`): ``vgw run`` and the naive process, whole process, on the
    demo DBC and on ``opts.dbc`` if given, each trace form and consent, ``opts.rounds`` alternating rounds."""
    from vgw_sim.paths import default_dbc

    from vgw.cloud.consent_authority import RecipientKey, SigningKey, consent_claims, grant, sign_consent
    from vgw.state.consent.store import ConsentStore
    from vgw.tools.bench.headline import run_headline

    if opts.frames < 1000:
        raise VgwError(f"--frames {opts.frames}: use at least 1000")
    if not 1 <= opts.rounds <= 20:
        raise VgwError(f"--rounds {opts.rounds}: use 1 to 20")
    dbcs: list[tuple[str, Path, bool]] = [("demo", default_dbc().resolve(), True)]
    if opts.dbc is not None:
        real = opts.dbc.resolve()
        if not real.is_file():
            raise ConfigError(f"{real}: DBC file not found")
        dbcs.append((real.stem, real, False))
    progress = progress or Progress()
    quiet = quieted("vgw")
    quiet.__enter__()
    root = Path(tempfile.mkdtemp(prefix="vgw-bench-"))
    os.chmod(root, 0o755)  # noqa: S103 - the broker (dropped to user mosquitto) reads the PKI below it
    broker = None
    try:
        pki, broker = _broker(root)
        signer = SigningKey.generate()
        trust = signer.write_public_pem(root / "consent-signer.pub.pem")
        now = int(time.time())
        retained: list[str] = []

        def sign(scopes: list[str]) -> str:
            return sign_consent(consent_claims(DEVICE, 1, [grant("g-app", scopes, RecipientKey.generate())],
                                               iat=now), signer)

        def retain(token: str) -> None:
            if retained != [token]:  # the broker keeps it: only a change of document is published
                _retain(broker, pki, token)
                retained[:] = [token]

        def vgw_config(name: str, dbc: Path, signal_map: Path, trace: Path, strict: bool, token: str) -> Path:
            state = root / f"state-{name}"
            state.mkdir(mode=0o700)
            ConsentStore(state).write_token(token)
            path = root / f"{name}.toml"
            path.write_text(_config_text(state, dbc, signal_map, trace, 0, broker.port, pki, trust, strict=strict,
                                         max_interval_s=None))
            return path

        headline = run_headline(dbcs=dbcs, frames=opts.frames, rounds=opts.rounds, seed=opts.seed, root=root,
                                broker=broker, pki=pki, sign=sign, vgw_config=vgw_config, progress=progress,
                                retain=retain)
        return {"python": sys.version.split()[0], "cpu": _cpu_name(), "cores": os.cpu_count(), "headline": headline}
    finally:
        quiet.__exit__(None, None, None)
        progress.close()
        if broker is not None:
            broker.close()
        shutil.rmtree(root, ignore_errors=True)


def run_bench(opts: BenchOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run every phase; return the results (see module docstring)."""
    from vgw_sim.cloud import CloudPeer
    from vgw_sim.paths import default_dbc, default_signal_map

    from vgw.cloud.consent_authority import RecipientKey, SigningKey, consent_claims, grant, sign_consent
    from vgw.contract.scopes import SCOPES
    from vgw.pipeline.catalogue import load_dbc
    from vgw.state.consent.store import ConsentStore

    if opts.consent not in ("typical", "all"):
        raise VgwError(f"--consent {opts.consent!r}: use 'typical' or 'all'")
    if opts.frames < 1000:
        raise VgwError(f"--frames {opts.frames}: use at least 1000")
    progress = progress or Progress()
    demo = opts.dbc is None
    dbc = (opts.dbc or default_dbc()).resolve()
    if not dbc.is_file():
        raise ConfigError(f"{dbc}: DBC file not found")
    db = load_dbc([dbc], strict=demo)
    quiet = quieted("vgw")
    quiet.__enter__()

    root = Path(tempfile.mkdtemp(prefix="vgw-bench-"))
    os.chmod(root, 0o755)  # noqa: S103 - the broker (dropped to user mosquitto) reads the PKI below it
    broker = cloud = None
    result: dict[str, Any] = {"dbc": str(dbc), "consent": opts.consent, "frames": opts.frames,
                              "python": sys.version.split()[0], "cpu": _cpu_name(), "cores": os.cpu_count()}
    try:
        if demo:
            signal_map = default_signal_map()
        else:
            signal_map = root / "signals.toml"
            signal_map.write_text(synthetic_signal_map(db), encoding="utf-8")
        progress.phase("trace")
        trace = root / "trace.log"
        start = 1.7e9
        n, span = write_trace(trace, frame_source(dbc, demo=demo, seed=opts.seed, start=start), opts.frames,
                              progress=progress)
        result["trace"] = {"frames": n, "bus_seconds": round(span, 1), "bus_fps": round(n / span, 1) if span else 0}

        progress.phase("decode (baseline)")
        result["decode"] = bench_decode(db, trace, n, progress)

        # PKI, broker, consent signer and one HPKE key per grant.
        pki, broker = _broker(root)
        signer = SigningKey.generate()
        trust = signer.write_public_pem(root / "consent-signer.pub.pem")
        if opts.consent == "typical":
            if demo:
                scopes = TYPICAL_SCOPES
            else:
                picked = sorted(s for s in SCOPES if s not in _PRIVACY_SCOPES)
                scopes = {"g-fleet": picked[0:3], "g-insurer": picked[3:5]}
        else:
            scopes = {"g-fleet": sorted(SCOPES), "g-insurer": sorted(SCOPES)[:1]}
        recipients = {gid: RecipientKey.generate() for gid in scopes}
        grants = [grant(gid, sc, recipients[gid]) for gid, sc in scopes.items()]
        now = int(time.time())
        doc1 = sign_consent(consent_claims(DEVICE, 1, grants, iat=now), signer)
        doc2 = sign_consent(consent_claims(DEVICE, 2, [g for g in grants if g["id"] != "g-insurer"], iat=now),
                            signer)

        def config(name: str, trace_path: Path, rate: float, interval: float | None, token: str = doc1) -> Path:
            state = root / f"state-{name}"
            state.mkdir(mode=0o700)
            ConsentStore(state).write_token(token)  # in force from the agent's first moment, as after a restart
            _retain(broker, pki, token)
            path = root / f"{name}.toml"
            path.write_text(_config_text(state, dbc, signal_map, trace_path, rate, broker.port, pki, trust,
                                         strict=demo, max_interval_s=interval))
            return path

        progress.phase("full path (rate 0)")
        child = _run_child(config("full", trace, 0, None), n, progress, timeout=600)
        counters = child["counters"]
        result["full_path"] = {
            "fps_ingest": n / child["ingest_s"] if child["ingest_s"] else 0.0,
            "fps_to_last_puback": n / child["acked_s"] if child["acked_s"] else 0.0,
            "ingest_s": round(child["ingest_s"], 3),
            "to_last_puback_s": round(child["acked_s"], 3),
            "startup_s": round(child["startup_s"], 3),
            "cpu_s": round(child["cpu_total_s"], 2),
            "cpu_ingest_s": round(child["cpu_ingest_s"], 2),
            "peak_rss_mb": round(child["maxrss_mb"], 1),
            "samples": counters.get("samples"),
            "frames_routed": counters.get("frames", 0) - counters.get("frames_unrouted", 0),
            "batches": counters.get("batches"),
            "published_batches": child["published_batches"],
            "exit_code": child["exit_code"],
        }
        d = result["decode"]
        fp = result["full_path"]
        fp["ratio_vs_cantools_decode"] = fp["fps_ingest"] / d["cantools_decode_fps"] if d["cantools_decode_fps"] else 0
        fp["ratio_vs_naive_agent"] = fp["fps_ingest"] / d["naive_agent_fps"] if d["naive_agent_fps"] else 0

        # Realtime: the same bus, time-compressed to a saturated 500 kbit/s bus, at replay_rate 1.
        rt_frames = int(opts.rt_fps * opts.rt_seconds)
        bus_fps = result["trace"]["bus_fps"] or opts.rt_fps
        rt_trace = root / "rt.log"
        write_trace(rt_trace, frame_source(dbc, demo=demo, seed=opts.seed + 1, start=start), rt_frames,
                    time_scale=opts.rt_fps / bus_fps)
        result["realtime"] = {}
        for label, interval in (("default", None), ("low_latency", opts.low_latency_interval_s)):
            progress.phase(f"realtime {label}")
            # A fresh peer per run: each run's agent starts at seq 1, which a peer that saw seq 1 drops.
            if cloud is not None:
                cloud.close()
            cloud = CloudPeer.for_broker(broker, pki)
            cloud.add_device(DEVICE, pki.devices[DEVICE].cert)
            for gid, rk in recipients.items():
                cloud.add_recipient(gid, rk)
            cloud.connect()
            child = _run_child(config(f"rt-{label}", rt_trace, 1, interval), rt_frames, progress,
                               timeout=opts.rt_seconds + 120)
            time.sleep(0.3)  # the last batches' copies reach the cloud peer
            lat = _latencies(cloud, child.get("replay_start"))
            result["realtime"][label] = {
                "max_interval_s": interval if interval is not None else BatchConfig().max_interval_s,
                "fps": round(rt_frames / child["ingest_s"], 1) if child["ingest_s"] else 0.0,
                "cpu_pct_one_core": round(100.0 * child["cpu_ingest_s"] / child["ingest_s"], 1)
                if child["ingest_s"] else None,
                "peak_rss_mb": round(child["maxrss_mb"], 1),
                "batches": child["counters"].get("batches"),
                "latency": lat,
            }

        progress.phase("revocation")
        result["revocation"] = bench_revocation(config("revoke", trace, 0, None), (doc1, doc2), opts.revoke_rows,
                                                progress)
        if demo and opts.rules_seconds:
            # Phase 6: the costliest collection rules the agent accepts, against none (docs/guarantees.md "Budgets").
            result["rules"] = bench_rules(lambda grants: _sign(signer, grants, now), lambda name, trace_path, token:
                                          config(name, trace_path, 1, None, token), root, opts.rules_seconds,
                                          opts.seed + 2, progress)
        result["targets"] = _targets(result)
        if "rules" in result:
            result["targets"].update(rules_targets(result["rules"]))
        return result
    finally:
        quiet.__exit__(None, None, None)
        progress.close()
        if cloud is not None:
            cloud.close()
        if broker is not None:
            broker.close()
        shutil.rmtree(root, ignore_errors=True)
