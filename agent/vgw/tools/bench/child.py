"""`vgw bench` phases 3 and 4: the agent in a child process (its own RSS and CPU), its config and timings."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vgw.base.errors import VgwError
from vgw.tools.bench.options import DEVICE
from vgw.tools.bench.report import Progress

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

    from vgw.config.settings import load_config
    from vgw.daemon.agent import Agent

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    cfg = load_config(config)
    agent = Agent(cfg)
    profile_to = os.environ.get("VGW_BENCH_PROFILE")
    if profile_to:
        # Developer aid: cProfile the collector thread (the hot path) and dump pstats to this file.
        import cProfile

        assert agent.collector is not None
        collector = agent.collector
        collect = collector.run
        prof = cProfile.Profile()

        def profiled() -> None:
            try:
                prof.runcall(collect)
            finally:
                prof.dump_stats(f"{profile_to}.{Path(config).stem}")

        collector.run = profiled  # type: ignore[method-assign]
    # At replay_rate 0 the end of the trace and the last PUBACK are timed to 3 ms and the threads' CPU sampled;
    # a realtime run measures the agent's share of a core, which a 3 ms poll and the samples in this same process
    # would add to (about a point at 4k frames/s): it polls every 50 ms and samples nothing.
    realtime = bool(cfg.can and cfg.can.replay_rate)
    poll_s = 0.05 if realtime else 0.003
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
        if not realtime and start is not None and done is None and now - last_snap >= 0.1:
            last_snap = now
            snap_last = _thread_cpu()
            if not snap_start:
                snap_start = snap_last
        src = agent.guard.source
        if start is None and src is not None:
            start, cpu_start = now, time.process_time()
        if replay_start is None and src is not None and getattr(src, "_start_wall", None) is not None:
            # ReplaySource maps trace time to monotonic time at its first frame (replay_rate > 0).
            replay_start = (src._start_wall + time.time() - time.monotonic(), src._start_trace)
        if done is None and agent.collector is not None and agent.collector.done.is_set():
            done, cpu_done = now, time.process_time()
        if done is not None and acked is None and agent.uplink.view().published_batches >= agent.counters["batches"]:
            acked = now
        thread.join(poll_s)
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
        "maxrss_mb": _own_peak_rss_mb(usage.ru_maxrss),
        "replay_start": replay_start,
        "counters": counters,
        "published_batches": agent.uplink.view().published_batches,
        "thread_cpu_ingest_s": {k: round(v - snap_start.get(k, 0.0), 3) for k, v in snap_last.items()},
    }
    print(json.dumps(out), flush=True)
    return 0


def _own_peak_rss_mb(ru_maxrss_kb: int) -> float:
    """This process's own peak RSS in MB: VmHWM from /proc/self/status (Linux, proc(5)).

    ``ru_maxrss`` of a process started by ``subprocess`` (fork, then exec) keeps the parent's high-water mark
    when the parent was larger (a child of a 213 MB parent reported 213 MB while its VmHWM was 13.6 MB);
    VmHWM is reset by exec. ``ru_maxrss`` only where /proc is missing.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return ru_maxrss_kb / 1024.0


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
    code = "import sys; from vgw.tools.bench import child_main; sys.exit(child_main(sys.argv[1]))"
    cmd = [sys.executable, "-c", code, str(config)]
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
