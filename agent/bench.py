"""`vgw bench`: the pipeline benchmark (issue 7), with the real components on one machine.

Phases, in one run:

1. trace: ``--frames`` frames from a DBC (the demo vehicle by default: :class:`CanSimulator`; any other DBC:
   every message, simulated or random payloads) written as a candump ``.log``;
2. decode: cantools ``decode_message`` of every frame next to vgw's compiled decoders (every signal), on
   frames already in memory; and the *naive agent*: the same trace read by ``can.LogReader`` and decoded
   by cantools frame by frame;
3. full path: ``vgw run`` semantics (:class:`agent.runtime.Agent` in a child process, so its RSS and CPU are
   its own) replays the trace as fast as possible (replay_rate 0, replay_exit) -> filter -> decode -> policy
   -> batch -> HPKE -> outbox -> mutual-TLS publish to a private mosquitto, until every batch is
   acknowledged;
4. realtime: a saturated 500 kbit/s bus (``--rt-fps`` frames/s, replay_rate 1) for ``--rt-seconds``: CPU
   share of one core, and frame-to-PUBACK latency measured at the cloud side (sample time vs arrival of its
   batch at a subscribed :class:`CloudPeer`; the broker forwards and acknowledges in the same pass), at
   default batching and at the low-latency setting;
5. revocation: ``--revoke-rows`` buffered outbox rows, then a consent document that drops the grant; the time
   until its data key is gone from the database, seen by a separate SQLite connection.

Raises :class:`~agent.errors.VgwError` when a part cannot start (no mosquitto, bad DBC, child failure).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent.config import BatchConfig
from agent.errors import ConfigError, VgwError
from agent.logs import quieted

DEVICE = "bench-car-01"
TYPICAL_SCOPES = {
    # The demo's two apps: a fleet manager and an insurer (a few scopes each).
    "g-fleet": ["read_odometer", "read_fuel", "read_tires", "read_location"],
    "g-insurer": ["read_speedometer", "read_odometer", "read_battery"],
}
_PRIVACY_SCOPES = ("read_location", "read_compass")  # rate-limited by default: kept off synthetic maps
_CHUNK = 20_000


@dataclass(frozen=True)
class BenchOptions:
    frames: int = 300_000
    dbc: Path | None = None
    consent: str = "typical"  # or "all"
    rt_fps: float = 4000.0
    rt_seconds: float = 5.0
    revoke_rows: int = 100_000
    low_latency_interval_s: float = 0.05
    seed: int = 7


class Progress:
    """A one-line progress bar on a terminal (stderr); silent otherwise."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out if out is not None else sys.stderr
        self.live = self.out.isatty()
        self._phase = ""

    def phase(self, name: str) -> None:
        self._phase = name
        self.update(0.0)

    def update(self, fraction: float, note: str = "") -> None:
        if not self.live:
            return
        width = 30
        done = int(max(0.0, min(1.0, fraction)) * width)
        self.out.write(f"\r\x1b[2K{self._phase:<22} [{'#' * done}{'.' * (width - done)}] {note}")
        self.out.flush()

    def close(self) -> None:
        if self.live:
            self.out.write("\r\x1b[2K")
            self.out.flush()


# ---------------------------------------------------------------- trace and signal map


def _vss_leaf(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9]", "", name) or "X"
    if not clean[0].isalpha():
        clean = "X" + clean
    return clean[0].upper() + clean[1:]


def synthetic_signal_map(db: Any) -> str:
    """Map every signal of ``db`` to a scope (round robin) and the path ``Vehicle.Bench.<Msg>.<Sig>``."""
    from agent.scopes import SCOPES

    scopes = sorted(s for s in SCOPES if s not in _PRIVACY_SCOPES)
    lines = ["# written by `vgw bench`: every signal, synthetic VSS paths"]
    seen_paths: set[str] = set()
    i = 0
    for msg in db.messages:
        for sig in msg.signals:
            path = f"Vehicle.Bench.{_vss_leaf(msg.name)}.{_vss_leaf(sig.name)}"
            n = 2
            while path in seen_paths:
                path = f"Vehicle.Bench.{_vss_leaf(msg.name)}.{_vss_leaf(sig.name)}{n}"
                n += 1
            seen_paths.add(path)
            lines += ["[[signal]]", f"message = {json.dumps(msg.name)}", f"signal = {json.dumps(sig.name)}",
                      f'path = "{path}"', f'scope = "{scopes[i % len(scopes)]}"', ""]
            i += 1
    return "\n".join(lines)


def _random_frames(db: Any, seed: int, start: float) -> Iterator[tuple[float, int, bool, bytes]]:
    """Every message of ``db`` at its cycle time (100 ms if none), random payloads, forever."""
    import heapq

    rng = random.Random(seed)
    msgs = [m for m in db.messages if m.length > 0]
    if not msgs:
        raise ConfigError("DBC has no message with a payload")
    heap = [((i % (m.cycle_time or 100)), i) for i, m in enumerate(msgs)]
    heapq.heapify(heap)
    while True:
        due, i = heapq.heappop(heap)
        m = msgs[i]
        heapq.heappush(heap, (due + (m.cycle_time or 100), i))
        yield start + due / 1000.0, m.frame_id, m.is_extended_frame, rng.randbytes(min(m.length, 64))


def _sim_frames(dbc: Path, seed: int, start: float, all_messages: bool) -> Iterator[tuple[float, int, bool, bytes]]:
    from simulators.can_sim import CanSimulator
    from simulators.vehicle import VehicleModel

    sim = CanSimulator(dbc, VehicleModel(seed=seed), all_messages=all_messages)
    for m in sim.frames(None, start_time=start):
        yield m.timestamp, m.arbitration_id, m.is_extended_id, bytes(m.data)


def frame_source(dbc: Path, *, demo: bool, seed: int, start: float) -> Iterator[tuple[float, int, bool, bytes]]:
    """(t, id, extended, data) in time order, forever: the simulator, or random payloads if it cannot."""
    if demo:
        return _sim_frames(dbc, seed, start, all_messages=False)
    try:
        gen = _sim_frames(dbc, seed, start, all_messages=True)
        first = next(gen)
    except Exception:  # the simulator is strict (nested mux, odd DBCs): random payloads instead
        from agent.catalogue import load_dbc

        return _random_frames(load_dbc([dbc], strict=False), seed, start)

    def chain() -> Iterator[tuple[float, int, bool, bytes]]:
        yield first
        yield from gen

    return chain()


def write_trace(path: Path, frames: Iterator[tuple[float, int, bool, bytes]], count: int, *,
                time_scale: float = 1.0, progress: Progress | None = None) -> tuple[int, float]:
    """Write ``count`` frames as candump ``-L`` lines, time compressed by ``time_scale``.

    Returns (frames written, trace duration in seconds).
    """
    t0: float | None = None
    t_last = 0.0
    lines: list[str] = []
    n = 0
    with path.open("w", encoding="ascii", newline="\n") as fh:
        for t, ident, ext, data in frames:
            if n >= count:
                break
            if t0 is None:
                t0 = t
            t_last = t0 + (t - t0) / time_scale
            lines.append(f"({t_last:.6f}) can0 {ident:08X}#{data.hex().upper()}\n" if ext
                         else f"({t_last:.6f}) can0 {ident:03X}#{data.hex().upper()}\n")
            n += 1
            if len(lines) >= 8192:
                fh.writelines(lines)
                lines.clear()
                if progress is not None:
                    progress.update(n / count, f"{n} frames")
        fh.writelines(lines)
    return n, (t_last - t0) if t0 is not None else 0.0


# ---------------------------------------------------------------- phase 2: decoding


def _read_chunks(trace: Path) -> Iterator[list[tuple[int, bytes]]]:
    import can

    chunk: list[tuple[int, bytes]] = []
    for msg in can.LogReader(str(trace)):
        chunk.append((msg.arbitration_id, bytes(msg.data)))
        if len(chunk) >= _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def bench_decode(db: Any, trace: Path, frames: int, progress: Progress) -> dict[str, Any]:
    """cantools vs compiled decoders (every signal) on in-memory frames, and the naive agent end to end."""
    import can

    from agent.pipeline.decoder import MessageDecoder

    by_id = {m.frame_id: m for m in db.messages}
    compiled = {fid: MessageDecoder(m, [(s.name, s.name) for s in m.signals]) for fid, m in by_id.items()}
    decode = db.decode_message
    t_cantools = t_vgw = 0.0
    signals_cantools = signals_vgw = errors = done = 0
    for chunk in _read_chunks(trace):
        t = time.perf_counter()
        for fid, data in chunk:
            try:
                signals_cantools += len(decode(fid, data, decode_choices=False, allow_truncated=True))
            except Exception:
                errors += 1
        t_cantools += time.perf_counter() - t
        t = time.perf_counter()
        for fid, data in chunk:
            dec = compiled.get(fid)
            if dec is not None:
                signals_vgw += len(dec.decode(data)[0])
        t_vgw += time.perf_counter() - t
        done += len(chunk)
        progress.update(done / max(frames, 1) / 2, "decode only")
    # The naive agent: read the same trace with python-can and decode every frame with cantools.
    t = time.perf_counter()
    n = 0
    for msg in can.LogReader(str(trace)):
        try:
            decode(msg.arbitration_id, msg.data, decode_choices=False, allow_truncated=True)
        except Exception:  # noqa: S110 - counted in the decode-only pass above
            pass
        n += 1
        if n % _CHUNK == 0:
            progress.update(0.5 + n / max(frames, 1) / 2, "naive agent")
    t_naive = time.perf_counter() - t
    return {
        "frames": done,
        "cantools_decode_fps": done / t_cantools if t_cantools else 0.0,
        "vgw_decode_fps": done / t_vgw if t_vgw else 0.0,
        "decode_ratio": t_cantools / t_vgw if t_vgw else 0.0,
        "signals_cantools": signals_cantools,
        "signals_vgw": signals_vgw,
        "cantools_errors": errors,
        "naive_agent_fps": n / t_naive if t_naive else 0.0,
    }


# ---------------------------------------------------------------- the agent in a child process


def _config_text(state_dir: Path, dbc: Path, signal_map: Path, trace: Path, rate: float, port: int, pki: Any,
                 trust: Path, *, strict: bool, max_interval_s: float | None) -> str:
    dev = pki.devices[DEVICE]
    batch = f"\n[batch]\nmax_interval_s = {max_interval_s}\n" if max_interval_s is not None else ""
    return f"""# written by `vgw bench`
[device]
id = "{DEVICE}"
state_dir = "{state_dir}"

[can]
interface = "virtual"
dbc = ["{dbc}"]
dbc_strict = {"true" if strict else "false"}
signal_map = "{signal_map}"
replay = "{trace}"
replay_rate = {rate}
replay_exit = true

[mqtt]
host = "localhost"
port = {port}
ca_file = "{pki.ca.cert}"
cert_file = "{dev.cert}"
key_file = "{dev.key}"

[consent]
trust_keys = ["{trust}"]
{batch}"""


def child_main(config: str) -> int:
    """Run the agent on ``config`` until the trace is acknowledged; print timings as one JSON line.

    Runs in a fresh interpreter (``vgw bench`` starts it) so RSS and CPU are the agent's alone.
    """
    import resource

    from agent.config import load_config
    from agent.runtime import Agent

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    cfg = load_config(config)
    agent = Agent(cfg)
    profile_to = os.environ.get("VGW_BENCH_PROFILE")
    if profile_to:
        # Developer aid: cProfile the collector thread (the hot path) and dump pstats to this file.
        import cProfile

        collect = agent._collect
        prof = cProfile.Profile()

        def profiled() -> None:
            try:
                prof.runcall(collect)
            finally:
                prof.dump_stats(f"{profile_to}.{Path(config).stem}")

        agent._collect = profiled  # type: ignore[method-assign]
    rc: list[int] = []
    thread = threading.Thread(target=lambda: rc.append(agent.run()), name="bench-agent")
    mono0, cpu0 = time.monotonic(), time.process_time()
    thread.start()
    start = done = acked = None
    cpu_start = cpu_done = 0.0
    replay_start: tuple[float, float] | None = None
    snap_start: dict[str, float] = {}
    snap_last: dict[str, float] = {}
    last_snap = 0.0
    while thread.is_alive():
        now = time.monotonic()
        if start is not None and done is None and now - last_snap >= 0.1:
            last_snap = now
            snap_last = _thread_cpu()
            if not snap_start:
                snap_start = snap_last
        src = agent._source
        if start is None and src is not None:
            start, cpu_start = now, time.process_time()
        if replay_start is None and src is not None and getattr(src, "_start_wall", None) is not None:
            # ReplaySource maps trace time to monotonic time at its first frame (replay_rate > 0).
            replay_start = (src._start_wall + time.time() - time.monotonic(), src._start_trace)
        if done is None and agent._source_done.is_set():
            done, cpu_done = now, time.process_time()
        if done is not None and acked is None and agent.uplink.published_batches >= agent.counters["batches"]:
            acked = now
        thread.join(0.003)
    end, cpu_end = time.monotonic(), time.process_time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    counters = agent.status()["counters"]
    out = {
        "exit_code": rc[0] if rc else 1,
        "startup_s": (start or end) - mono0,
        "ingest_s": (done or end) - (start or mono0),
        "acked_s": (acked or end) - (start or mono0),
        "total_s": end - mono0,
        "cpu_startup_s": cpu_start - cpu0 if start else 0.0,
        "cpu_ingest_s": cpu_done - cpu_start if done else 0.0,
        "cpu_total_s": cpu_end - cpu0,
        "cpu_user_s": usage.ru_utime,
        "cpu_system_s": usage.ru_stime,
        "maxrss_mb": usage.ru_maxrss / 1024.0,
        "replay_start": replay_start,
        "counters": counters,
        "published_batches": agent.uplink.published_batches,
        "thread_cpu_ingest_s": {k: round(v - snap_start.get(k, 0.0), 3) for k, v in snap_last.items()},
    }
    print(json.dumps(out), flush=True)
    return 0


def _thread_cpu() -> dict[str, float]:
    """CPU seconds per live thread of this process, by thread name (psutil; empty without it)."""
    try:
        import psutil
    except ImportError:
        return {}
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for th in psutil.Process().threads():
        name = names.get(th.id, "other")
        out[name] = out.get(name, 0.0) + th.user_time + th.system_time
    return out


def _run_child(config: Path, frames: int, progress: Progress, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-c", "import sys; from agent.bench import child_main; sys.exit(child_main(sys.argv[1]))",
           str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status_file = None
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                raise VgwError(f"bench: agent did not finish within {timeout:.0f} s")
            if status_file is None:
                for line in config.read_text().splitlines():
                    if line.startswith("state_dir"):
                        status_file = Path(line.split('"')[1]) / "status.json"
            try:
                frames_done = json.loads(status_file.read_text())["counters"]["frames"] if status_file else 0
                progress.update(frames_done / max(frames, 1), f"{frames_done} frames")
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = err.strip().splitlines()[-1:] or ["no output"]
        raise VgwError(f"bench: agent child exited {proc.returncode}: {tail[0]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


# ---------------------------------------------------------------- phase 5: revocation


def bench_revocation(cfg_path: Path, docs: tuple[str, str], rows: int, progress: Progress) -> dict[str, Any]:
    """Fill the outbox with ``rows`` rows of one grant, revoke it; time until its key row is gone."""
    from agent.config import load_config
    from agent.crypto.envelope import batch_plaintext, load_recipient_key, seal
    from agent.runtime import Agent

    cfg = load_config(cfg_path)
    agent = Agent(cfg)
    try:
        agent.manager.apply(docs[0], source="bench")
        grant = next(g for g in agent.manager.active_grants() if g.id == "g-insurer")
        recipient = load_recipient_key(grant.recipient.kem, grant.recipient.pk)
        samples = [{"t": 1.7e9 + i / 50, "path": "Vehicle.Speed", "value": 50.0 + i % 7} for i in range(100)]
        agent.outbox.commit_batch(grant.id, lambda seq: seal(grant.recipient.kem, recipient, DEVICE, grant.id,
                                  batch_plaintext(DEVICE, grant.id, seq, samples)), 1.7e9, len(samples))
        db_path = agent.outbox.path
        fill = sqlite3.connect(db_path, timeout=30, isolation_level=None)
        blob_len = fill.execute("SELECT LENGTH(blob) FROM batches WHERE grant_id = ?", (grant.id,)).fetchone()[0]
        step = 10_000
        for base in range(2, rows + 1, step):
            n = min(step, rows + 1 - base)
            # Copies of the real sealed row (distinct seq): the erasure cost depends on count and size only.
            fill.execute("BEGIN IMMEDIATE")
            fill.execute(
                "WITH RECURSIVE s(k) AS (SELECT ? UNION ALL SELECT k + 1 FROM s WHERE k < ?) "
                "INSERT INTO batches (grant_id, seq, created, first_t, samples, blob) "
                "SELECT grant_id, k, created, first_t, samples, blob FROM s, "
                "(SELECT * FROM batches WHERE grant_id = ? AND seq = 1)",
                (base, base + n - 1, grant.id))
            fill.execute("COMMIT")
            progress.update(base / rows * 0.9, f"{base + n - 1} rows")
        buffered = fill.execute("SELECT COUNT(*) FROM batches WHERE grant_id = ?", (grant.id,)).fetchone()[0]
        gone, ready = threading.Event(), threading.Event()
        seen: list[float] = []

        def watch() -> None:
            # Its own connection, as any other reader of the file would see it (WAL: sees each commit).
            conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
            try:
                ready.set()
                while not gone.is_set():
                    row = conn.execute("SELECT 1 FROM grant_keys WHERE grant_id = ?", (grant.id,)).fetchone()
                    if row is None:
                        seen.append(time.perf_counter())
                        return
                    time.sleep(0.0005)
            finally:
                conn.close()

        watcher = threading.Thread(target=watch, name="bench-key-watch", daemon=True)
        watcher.start()
        ready.wait(5)
        t0 = time.perf_counter()
        agent.manager.apply(docs[1], source="bench")
        t_done = time.perf_counter()
        gone.set()
        watcher.join(5)
        rows_after = fill.execute("SELECT COUNT(*) FROM batches WHERE grant_id = ?", (grant.id,)).fetchone()[0]
        fill.close()
        progress.update(1.0)
        return {
            "rows": int(buffered),
            "row_bytes": int(blob_len),
            "key_destroyed_ms": round((seen[0] - t0) * 1000.0, 1) if seen else None,
            "all_erased_ms": round((t_done - t0) * 1000.0, 1),
            "rows_after": int(rows_after),
        }
    finally:
        agent.outbox.close()
        agent.lock_file.release()


# ---------------------------------------------------------------- orchestration


def run_bench(opts: BenchOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run every phase; return the results (see module docstring)."""
    from agent.catalogue import load_dbc
    from agent.consent.store import ConsentStore
    from agent.scopes import SCOPES
    from simulators.broker import Mosquitto, MosquittoNotFound
    from simulators.cloud import CloudPeer, RecipientKey, SigningKey, consent_claims, grant, sign_consent
    from simulators.paths import default_dbc, default_signal_map
    from simulators.pki import TestPKI

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
    quiet = quieted("vgw", "agent")
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
        pki = TestPKI(root / "pki", devices=[DEVICE])
        try:
            broker = Mosquitto.from_pki(pki).start()
        except MosquittoNotFound as exc:
            raise VgwError(str(exc)) from exc
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

        def config(name: str, trace_path: Path, rate: float, interval: float | None) -> Path:
            state = root / f"state-{name}"
            state.mkdir(mode=0o700)
            ConsentStore(state).write_token(doc1)  # in force from the agent's first moment, as after a restart
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
        result["targets"] = _targets(result)
        return result
    finally:
        quiet.__exit__(None, None, None)
        progress.close()
        if cloud is not None:
            cloud.close()
        if broker is not None:
            broker.close()
        shutil.rmtree(root, ignore_errors=True)


def _latencies(cloud: Any, replay_start: list[float] | None) -> dict[str, Any]:
    """Frame-to-arrival latency of every sample the peer received (frame time mapped to wall time)."""
    if not replay_start:
        return {"samples": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    wall0, trace0 = replay_start
    lat = [(s.arrived - (wall0 + (s.t - trace0))) * 1000.0 for s in cloud.samples(DEVICE)]
    return {"samples": len(lat), "p50_ms": round(_percentile(lat, 0.50), 1),
            "p99_ms": round(_percentile(lat, 0.99), 1), "max_ms": round(max(lat), 1) if lat else None}


def _targets(r: dict[str, Any]) -> dict[str, Any]:
    fp, rt, rv = r["full_path"], r["realtime"]["default"], r["revocation"]
    out: dict[str, Any] = {}
    if r["consent"] == "typical":
        out["full_path_100k_fps"] = fp["fps_ingest"] >= 100_000
    else:
        out["full_path_ge_cantools_decode"] = fp["ratio_vs_cantools_decode"] >= 1.0
        out["full_path_ge_naive_agent"] = fp["ratio_vs_naive_agent"] >= 1.0
    p99 = rt["latency"]["p99_ms"]
    out["p99_le_300ms_default"] = p99 is not None and p99 <= 300
    p99_ll = r["realtime"]["low_latency"]["latency"]["p99_ms"]
    out["p99_le_300ms_low_latency"] = p99_ll is not None and p99_ll <= 300
    out["rss_le_60mb"] = fp["peak_rss_mb"] <= 60
    out["cpu_le_10pct_at_4k"] = rt["cpu_pct_one_core"] is not None and rt["cpu_pct_one_core"] <= 10
    out["revocation_le_100ms"] = rv["key_destroyed_ms"] is not None and rv["key_destroyed_ms"] <= 100
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def format_table(r: dict[str, Any]) -> str:
    """The human-readable report."""
    d, fp, rv = r["decode"], r["full_path"], r["revocation"]
    lines = [
        f"vgw bench  dbc={Path(r['dbc']).name}  consent={r['consent']}  frames={r['trace']['frames']}"
        f"  ({r['cpu']}, Python {r['python']})",
        "",
        f"{'decode only (frames in memory)':<44}{'frames/s':>14}",
        f"  {'cantools decode_message, every signal':<42}{d['cantools_decode_fps']:>14,.0f}",
        f"  {'vgw compiled decoders, every signal':<42}{d['vgw_decode_fps']:>14,.0f}   x{d['decode_ratio']:.2f}",
        f"  {'naive agent: LogReader + cantools':<42}{d['naive_agent_fps']:>14,.0f}",
        "",
        "full path: replay -> decode -> policy -> batch -> HPKE -> outbox -> mTLS MQTT -> PUBACK",
        f"  {'frames/s (replay to end of trace)':<42}{fp['fps_ingest']:>14,.0f}"
        f"   x{fp['ratio_vs_cantools_decode']:.2f} cantools decode, x{fp['ratio_vs_naive_agent']:.2f} naive agent",
        f"  {'frames/s (to the last PUBACK)':<42}{fp['fps_to_last_puback']:>14,.0f}",
        f"  {'frames routed / samples / batches':<42}{fp['frames_routed']:>14,} / {fp['samples']:,} / {fp['batches']}",
        f"  {'CPU s (whole agent process) / peak RSS':<42}{fp['cpu_s']:>14} s / {fp['peak_rss_mb']} MB",
        "",
        "realtime: saturated bus (replay_rate 1)",
    ]
    for label, rt in r["realtime"].items():
        lat = rt["latency"]
        lines.append(f"  {label + ' (max_interval_s ' + str(rt['max_interval_s']) + ')':<42}"
                     f"{rt['fps']:>10,.0f} fps  CPU {rt['cpu_pct_one_core']}% of a core  "
                     f"frame->PUBACK p50 {lat['p50_ms']} ms  p99 {lat['p99_ms']} ms  (RSS {rt['peak_rss_mb']} MB)")
    lines += [
        "",
        f"revocation with {rv['rows']:,} buffered rows ({rv['row_bytes']} B each): key destroyed after "
        f"{rv['key_destroyed_ms']} ms, all rows erased after {rv['all_erased_ms']} ms (rows left {rv['rows_after']})",
        "",
        "targets: " + ", ".join(f"{k} {'MET' if v else 'NOT MET'}" for k, v in r["targets"].items()),
    ]
    return "\n".join(lines)

