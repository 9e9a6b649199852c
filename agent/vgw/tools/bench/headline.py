"""`vgw bench` headline: the whole process, as a user times it, against the naive process.

Each case is one trace (``--frames`` frames of a DBC, in one of two text forms), one DBC and one consent.
Both processes are started with ``exec`` and timed until they exit:

- ``vgw run --config FILE`` replays the trace (``replay_rate = 0``, ``replay_exit = true``): it ends once every
  batch is acknowledged, so its wall time runs from exec through imports, TLS connect, DBC load, the whole trace,
  sealing and storage, to the last PUBACK and exit;
- the naive process (:mod:`vgw.tools.bench.naive`): ``can.LogReader`` + cantools ``decode_message`` of every
  frame, the consented signals published as JSON per batch with paho over the same mutual-TLS broker, QoS 1,
  until every PUBACK.

Trace forms: ``logger`` is written by python-can's ``can.Logger`` (candump ``-L`` lines with the ``R``/``T``
direction suffix python-can 4.x writes); ``candump`` is plain can-utils ``candump -L``. Consents: ``typical``
is one app with 3 signals; ``all`` is every mapped signal. A ``start`` case (two frames, demo DBC, typical) is
what startup costs.

Per process: wall seconds, CPU seconds (user + system, from ``wait4``), peak RSS (``VmHWM`` of
``/proc/<pid>/status``, read every 5 ms while it runs: ``ru_maxrss`` of a child keeps the parent's high-water
mark). A warm-up run of each comes first, unreported; where ``PYTHONDONTWRITEBYTECODE`` is set, both get a
bytecode cache of their own (:func:`process_env`), as an install has. Rounds alternate which process goes
first; the report gives every round and the medians, and the ratio is naive wall / vgw wall (above 1: vgw is
faster); the CPU ratio is naive CPU seconds / vgw CPU seconds, what a loaded machine (or a Pi's one free core)
is bound by.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vgw.base.errors import VgwError
from vgw.tools.bench.options import DEVICE
from vgw.tools.bench.report import Progress

TRACE_FORMS = ("logger", "candump")
CONSENTS = ("typical", "all")
DEMO_TYPICAL_SCOPES = ["read_speedometer", "read_battery"]  # demo vehicle: speed + battery voltage and current
TYPICAL_SCOPE = "read_speedometer"  # a foreign DBC: the scope of the 3 typical signals (headline_signal_map)
POLL_S = 0.005


# ---------------------------------------------------------------- traces and signal maps


def write_logger_trace(path: Path, frames: Iterator[tuple[float, int, bool, bytes]], count: int) -> int:
    """Write ``count`` frames with python-can's ``can.Logger`` (a ``.log`` file: candump ``-L`` lines with the
    ``R``/``T`` suffix). Returns the frames written."""
    import can

    n = 0
    with can.Logger(str(path)) as logger:
        for t, ident, ext, data in frames:
            if n >= count:
                break
            logger.on_message_received(can.Message(timestamp=t, arbitration_id=ident, is_extended_id=ext,
                                                   data=data, is_fd=len(data) > 8, channel="can0"))
            n += 1
    return n


def headline_signal_map(db: Any) -> tuple[str, list[tuple[str, str]]]:
    """Every signal of ``db`` mapped to a path ``Vehicle.Bench.<Msg>.<Sig>``: 3 signals (the first plain signal
    of 3 messages spread over the DBC that cantools decodes) to :data:`TYPICAL_SCOPE`, every other one to the
    other scopes, round robin. Returns the map's text and the 3 typical (message, signal) pairs."""
    from vgw.tools.bench.trace import synthetic_signal_map

    msgs = [m for m in db.messages if _plain_and_decodable(m)]
    plain = [[(m.name, s.name) for s in m.signals if not s.multiplexer_ids and not s.is_multiplexer]
             for m in msgs[::max(1, len(msgs) // 3)]]
    typical: list[tuple[str, str]] = []
    for depth in range(max((len(p) for p in plain), default=0)):  # one per message first, then the next ones
        typical += [p[depth] for p in plain if depth < len(p)]
    typical = typical[:3]
    return synthetic_signal_map(db, {pair: TYPICAL_SCOPE for pair in typical}), typical


def _plain_and_decodable(msg: Any) -> bool:
    """A message with a signal outside any multiplexing that cantools decodes (it refuses a whole message whose
    one signal runs past the frame, a shape real DBCs have, where vgw decodes the others)."""
    if msg.length <= 0 or not any(not s.multiplexer_ids and not s.is_multiplexer for s in msg.signals):
        return False
    try:
        msg.decode(bytes(msg.length), decode_choices=False, allow_truncated=True)
    except Exception:
        return False
    return True


def consented_signals(signal_map: Path, scopes: set[str]) -> list[tuple[str, str]]:
    """The (message, signal) pairs a consent to ``scopes`` covers under ``signal_map``."""
    doc = tomllib.loads(signal_map.read_text(encoding="utf-8"))
    return [(e["message"], e["signal"]) for e in doc.get("signal", []) if e.get("scope") in scopes]


# ---------------------------------------------------------------- one process, timed


def _vmhwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def process_env() -> dict[str, str]:
    """The environment of both processes: this one's, except that where ``PYTHONDONTWRITEBYTECODE`` is set
    (a CI or sandbox habit) they get a bytecode cache of their own (``vgw-bench-pycache`` in the temporary
    folder, kept between runs): an installed vgw and its libraries start from compiled ``.pyc`` files (pip
    compiles them at install), and compiling vgw's sources at every start costs more than 0.1 s, which no user
    pays."""
    env = dict(os.environ)
    if env.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
        env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "vgw-bench-pycache")
    return env


def measure(cmd: list[str], *, timeout: float, log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Exec ``cmd`` and wait for it: wall seconds from exec to exit, CPU seconds (user + system), peak RSS
    (MB), exit code and its stdout. Raises :class:`VgwError` past ``timeout``."""
    with log.open("wb") as err, tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        hwm = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            hwm = max(hwm, _vmhwm_kb(proc.pid))
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                proc.wait()
                raise VgwError(f"bench: {Path(cmd[1]).name} did not finish within {timeout:.0f} s")
            time.sleep(POLL_S)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read().decode("utf-8", "replace")
    return {"wall_s": round(wall, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_mb": round(hwm / 1024.0, 1) if hwm else None, "exit_code": proc.returncode, "stdout": stdout}


def vgw_command(config: Path) -> list[str]:
    """``vgw run --config FILE``: the console script next to this interpreter, as a user runs it."""
    script = Path(sys.executable).with_name("vgw")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "vgw"]
    return [*head, "run", "--config", str(config)]


def naive_command(dbc: Path, trace: Path, signals: Path, port: int, pki: Any) -> list[str]:
    """The naive process (:mod:`vgw.tools.bench.naive`) as a script: it imports nothing of vgw."""
    from vgw.tools.bench import naive

    dev = pki.devices[DEVICE]
    return [sys.executable, naive.__file__, "--dbc", str(dbc), "--trace", str(trace), "--signals", str(signals),
            "--port", str(port), "--ca", str(pki.ca.cert), "--cert", str(dev.cert), "--key", str(dev.key),
            "--topic", f"vgw/{DEVICE}/data/naive", "--client-id", f"{DEVICE}-naive"]


def _tail(log: Path) -> str:
    lines = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return lines[-1] if lines else "no output"


# ---------------------------------------------------------------- the cases


def _median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def run_headline(*, dbcs: list[tuple[str, Path, bool]], frames: int, rounds: int, seed: int, root: Path,
                 broker: Any, pki: Any, sign: Callable[[list[str]], str],
                 vgw_config: Callable[[str, Path, Path, Path, bool, str], Path], progress: Progress,
                 retain: Callable[[str], None]) -> dict[str, Any]:
    """Every case, ``rounds`` times, alternating which process goes first. ``dbcs``: (label, path, demo).
    ``sign(scopes)`` signs a consent document with one grant of ``scopes``; ``vgw_config(name, dbc, signal_map,
    trace, strict, token)`` writes a fresh state dir and config for one ``vgw run``; ``retain(token)`` leaves
    the token retained at the broker. Returns the report (see the module docstring)."""
    from vgw_sim.paths import default_signal_map

    from vgw.contract.scopes import SCOPES
    from vgw.pipeline.catalogue import load_dbc
    from vgw.tools.bench.trace import frame_source, write_trace

    cases: list[dict[str, Any]] = []
    for label, dbc, demo in dbcs:
        if demo:
            signal_map = default_signal_map()
            typical_scopes = DEMO_TYPICAL_SCOPES
            typical = consented_signals(signal_map, set(typical_scopes))
        else:
            text, typical = headline_signal_map(load_dbc([dbc], strict=False))
            signal_map = root / f"signals-{label}.toml"
            signal_map.write_text(text, encoding="utf-8")
            typical_scopes = [TYPICAL_SCOPE]
        every = consented_signals(signal_map, set(SCOPES))
        traces: dict[str, Path] = {}
        progress.phase(f"headline traces ({label})")
        candump = root / f"{label}-candump.log"
        n, _ = write_trace(candump, frame_source(dbc, demo=demo, seed=seed, start=1.7e9), frames, progress=progress)
        logger = root / f"{label}-logger.log"
        n2 = write_logger_trace(logger, frame_source(dbc, demo=demo, seed=seed, start=1.7e9), frames)
        if n2 != n:
            raise VgwError(f"bench: the two traces of {label} differ in length ({n} and {n2} frames)")
        traces = {"candump": candump, "logger": logger}
        for consent in CONSENTS:
            pairs = typical if consent == "typical" else every
            scopes = typical_scopes if consent == "typical" else sorted(SCOPES)
            chosen = root / f"{label}-{consent}.json"
            chosen.write_text(json.dumps({"signals": pairs}), encoding="utf-8")
            token = sign(scopes)
            for form in TRACE_FORMS:
                cases.append({"dbc": label, "trace": form, "consent": consent, "frames": n,
                              "signals_consented": len(pairs), "_dbc": dbc, "_map": signal_map, "_demo": demo,
                              "_trace": traces[form], "_signals": chosen, "_token": token})
        if demo:
            two = root / f"{label}-two.log"
            write_trace(two, frame_source(dbc, demo=demo, seed=seed, start=1.7e9), 2)
            typical_case = next(c for c in cases if c["dbc"] == label and c["consent"] == "typical")
            cases.append({**typical_case, "trace": "start", "frames": 2, "_trace": two})

    results: list[dict[str, Any]] = []
    env = process_env()
    # A warm-up run of each on the shortest case, not reported: the bytecode cache and the page cache filled.
    warm = min(cases, key=lambda c: c["frames"])
    for who, cmd in (("vgw", vgw_command(vgw_config("warm-up", warm["_dbc"], warm["_map"], warm["_trace"],
                                                    warm["_demo"], warm["_token"]))),
                     ("naive", naive_command(warm["_dbc"], warm["_trace"], warm["_signals"], broker.port, pki))):
        retain(warm["_token"])
        m = measure(cmd, timeout=120, log=root / f"warm-up-{who}.err", env=env)
        if m["exit_code"] != 0:
            raise VgwError(f"bench: the warm-up run of {who} exited {m['exit_code']}: "
                           f"{_tail(root / f'warm-up-{who}.err')}")
    total = rounds * len(cases) * 2
    done = 0
    for case in cases:
        case["rounds"] = []
    for r in range(rounds):
        for i, case in enumerate(cases):
            progress.phase(f"headline round {r + 1}/{rounds}")
            row: dict[str, Any] = {}
            order = ("vgw", "naive") if (r + i) % 2 == 0 else ("naive", "vgw")
            for who in order:
                name = f"hl-{r}-{i}-{who}"
                log = root / f"{name}.err"
                if who == "vgw":
                    retain(case["_token"])
                    cfg = vgw_config(name, case["_dbc"], case["_map"], case["_trace"], case["_demo"], case["_token"])
                    m = measure(vgw_command(cfg), timeout=600, log=log, env=env)
                    if m["exit_code"] != 0:
                        raise VgwError(f"bench: vgw run exited {m['exit_code']} on {case['dbc']}/{case['trace']}/"
                                       f"{case['consent']}: {_tail(log)}")
                    status = json.loads((cfg.parent / f"state-{name}" / "status.json").read_text())
                    c = status["counters"]
                    m.update(frames=c.get("frames"), samples=c.get("samples"), batches=c.get("batches"),
                             acked=status["published"]["batches"])
                else:
                    m = measure(naive_command(case["_dbc"], case["_trace"], case["_signals"], broker.port, pki),
                                timeout=600, log=log, env=env)
                    lines = [ln for ln in m["stdout"].splitlines() if ln.startswith("{")]
                    if m["exit_code"] != 0 or not lines:
                        raise VgwError(f"bench: the naive process exited {m['exit_code']}: {_tail(log)}")
                    m.update(json.loads(lines[-1]))
                del m["stdout"]
                if m["frames"] != case["frames"] or m["acked"] != m["batches"]:
                    raise VgwError(f"bench: {who} on {case['dbc']}/{case['trace']}/{case['consent']} read "
                                   f"{m['frames']} of {case['frames']} frames, {m['acked']} of {m['batches']} "
                                   "batches acknowledged")
                row[who] = m
                done += 1
                progress.update(done / total, f"{case['dbc']} {case['trace']} {case['consent']} {who}")
            row["first"] = order[0]
            row["ratio"] = round(row["naive"]["wall_s"] / row["vgw"]["wall_s"], 3)
            row["cpu_ratio"] = round(row["naive"]["cpu_s"] / row["vgw"]["cpu_s"], 3) if row["vgw"]["cpu_s"] else None
            case["rounds"].append(row)
    for case in cases:
        rows = case["rounds"]
        results.append({
            **{k: v for k, v in case.items() if not k.startswith("_") and k != "rounds"},
            "median": {
                "vgw_wall_s": _median([x["vgw"]["wall_s"] for x in rows]),
                "naive_wall_s": _median([x["naive"]["wall_s"] for x in rows]),
                "ratio": _median([x["ratio"] for x in rows]),
                "cpu_ratio": _median([x["cpu_ratio"] for x in rows]),
                "vgw_cpu_s": _median([x["vgw"]["cpu_s"] for x in rows]),
                "naive_cpu_s": _median([x["naive"]["cpu_s"] for x in rows]),
                "vgw_peak_rss_mb": _median([x["vgw"]["peak_rss_mb"] for x in rows]),
                "naive_peak_rss_mb": _median([x["naive"]["peak_rss_mb"] for x in rows]),
            },
            "rounds": rows,
        })
    return {"rounds": rounds, "frames": frames, "cases": results, "targets": headline_targets(results)}


def headline_targets(cases: list[dict[str, Any]]) -> dict[str, bool]:
    """The targets of docs/performance.md on the medians, on the real DBC where one ran (else the demo): the
    whole process at least 2.5x the naive one with a typical consent and 1.5x with every signal, on both trace
    forms; vgw's peak RSS at most 60 MB in every case."""
    real = [c for c in cases if c["dbc"] != "demo"] or cases
    out: dict[str, bool] = {}
    for consent, floor in (("typical", 2.5), ("all", 1.5)):
        ratios = [c["median"]["ratio"] for c in real if c["consent"] == consent and c["trace"] in TRACE_FORMS]
        out[f"{consent}_ge_{floor}x_naive".replace(".", "_")] = bool(ratios) and min(ratios) >= floor
    out["rss_le_60mb"] = all((c["median"]["vgw_peak_rss_mb"] or 0) <= 60 for c in cases)
    return out


def attach_stage_p99(headline: dict[str, Any], stages: dict[str, Any]) -> None:
    """Give the headline cases of the stages' DBC the stages' frame-to-PUBACK p99 (saturated bus, default
    batching), where the consent is the same: every signal (the stages' typical consent is another one)."""
    if stages.get("consent") != "all":
        return
    p99 = stages["realtime"]["default"]["latency"]["p99_ms"]
    label = "demo" if Path(stages["dbc"]).resolve() == _demo_dbc() else Path(stages["dbc"]).stem
    for case in headline["cases"]:
        if case["dbc"] == label and case["consent"] == "all" and case["trace"] != "start":
            case["p99_frame_to_puback_ms"] = p99


def _demo_dbc() -> Path:
    from vgw_sim.paths import default_dbc

    return default_dbc().resolve()


def format_headline(h: dict[str, Any]) -> str:
    """The headline table: one line per case, medians of the rounds."""
    lines = [f"whole process, exec to last PUBACK and exit: `vgw run` vs the naive process "
             f"(median of {h['rounds']} alternating rounds)",
             f"  {'dbc':<18}{'trace':<9}{'consent':<9}{'frames':>8}{'sig':>5}{'vgw s':>9}{'naive s':>9}"
             f"{'ratio':>8}{'vgw CPU s':>11}{'CPU ratio':>11}{'vgw RSS MB':>12}{'naive RSS':>11}{'p99 ms':>8}"]
    for c in h["cases"]:
        m = c["median"]
        p99 = c.get("p99_frame_to_puback_ms")
        lines.append(f"  {c['dbc'][:17]:<18}{c['trace']:<9}{c['consent']:<9}{c['frames']:>8}{c['signals_consented']:>5}"
                     f"{m['vgw_wall_s']:>9.3f}{m['naive_wall_s']:>9.3f}{m['ratio']:>7.2f}x{m['vgw_cpu_s']:>11.2f}"
                     f"{m['cpu_ratio'] or 0:>10.2f}x"
                     f"{m['vgw_peak_rss_mb'] or 0:>12.1f}{m['naive_peak_rss_mb'] or 0:>11.1f}"
                     f"{'-' if p99 is None else p99:>8}")
    if "targets" in h:
        lines.append("  targets: " + ", ".join(f"{k} {'MET' if v else 'NOT MET'}" for k, v in h["targets"].items()))
    return "\n".join(lines)
