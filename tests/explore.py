"""The fault-schedule explorer: seeded random schedules of faults against the real agent, invariants after each.

In the spirit of FoundationDB's simulation, TigerBeetle's VOPR and Jepsen, but over the real parts: the `vgw run`
process, two real mosquitto brokers over mutual TLS (failover between them), real SQLite on a real (tmpfs) file
system. A schedule (tests/explore_model.py) mixes consent changes, broker outages, kill -9, a full disk, cache
damage and a cloud whose clock steps; after it the agent is brought to a calm state (brokers up, disk free,
newest consent retained) and stopped with SIGTERM, and tests/explore_oracle.py checks the invariants of
docs/guarantees.md ("The fault-schedule explorer"). A failing schedule is printed with its seed and shrunk
(delta debugging over its steps) to a minimal step list that still fails the same way; kept ones are replayed by
tests/test_explore.py.

    python -m tests.explore -n 200 -j 2       # 200 schedules on two workers (`make explore N=200 J=2`)
    python -m tests.explore --seed 1234       # one schedule again (`make explore SEED=1234`)
    python -m tests.explore --steps '[...]' --seed 1234   # a step list (as printed) with that seed's grants
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.agentkit import vgw, wait_until, write_config
from tests.explore_model import ConsentModel, Step, generate
from tests.explore_oracle import Evidence, check, expected_erasures, read_disk, status_of
from tests.explore_world import AgentProc, World

SEAL_WORKERS_ENV = "VGW_EXPLORE_SEAL_WORKERS"  # [agent] seal_workers of the agents (--seal-workers)
SIGTERM_S = 20.0  # a stop must end the process within this (systemd's TimeoutStopSec is 90 s; we ask less)
CONNECT_S = 40.0
CONVERGE_S = 40.0


@dataclass
class Outcome:
    seed: int
    initial: dict[str, list[str]]
    steps: list[Step]
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    def kinds(self) -> set[str]:
        return {v.split(":", 1)[0] for v in self.violations}


class Runner:
    """Runs schedules in one :class:`World` (one worker's brokers, PKI and tmpfs)."""

    def __init__(self, world: World, worker: str = "w0") -> None:
        self.world = world
        self.worker = worker
        self.runs = 0

    # -- one schedule ---------------------------------------------------------------------------------

    def run(self, seed: int, initial: dict[str, list[str]], steps: list[Step]) -> Outcome:
        self.runs += 1
        t0 = time.monotonic()
        out = Outcome(seed, initial, steps)
        device = f"x{self.worker}-{seed}-{self.runs}"
        s = _Schedule(self.world, device)
        try:
            s.setup(initial)
            for step in steps:
                s.step(step)
            s.converge()
            evidence = s.finish()
            out.violations = s.violations + check(evidence)
        except Exception as exc:  # the explorer itself failed: report it, never hide it as a pass
            out.violations = [*s.violations, f"explorer: {type(exc).__name__}: {exc}",
                              traceback.format_exc(limit=4)]
        finally:
            s.cleanup()
        out.seconds = time.monotonic() - t0
        return out

    # -- shrinking ------------------------------------------------------------------------------------

    def shrink(self, failed: Outcome, budget: int = 40) -> Outcome:
        """Delta debugging (Zeller's ddmin) over the steps: the smallest list found that fails the same way."""
        kinds = failed.kinds()
        best = failed
        steps = list(failed.steps)
        n = 2
        tries = 0
        while len(steps) >= 1 and tries < budget:
            chunk = max(1, len(steps) // n)
            reduced = False
            for i in range(0, len(steps), chunk):
                candidate = steps[:i] + steps[i + chunk:]
                tries += 1
                res = self.run(failed.seed, failed.initial, candidate)
                if not res.ok and res.kinds() & kinds:
                    best, steps = res, candidate
                    n = max(n - 1, 2)
                    reduced = True
                    break
                if tries >= budget:
                    break
            if not reduced:
                if chunk == 1:
                    break
                n = min(len(steps), n * 2)
        return best


class _Schedule:
    """One schedule's device, config, model and agent process; executes steps and gathers the evidence."""

    def __init__(self, world: World, device: str) -> None:
        self.world = world
        self.device = device
        self.violations: list[str] = []
        world.pki.device(device)
        base = world.disk if world.tmpfs else world.root / "state"
        self.state = base / device
        self.cfg_dir = world.root / "cfg" / device
        self.cfg_dir.mkdir(parents=True)
        hosts = [f"127.0.0.1:{b.mosq.port}" for b in world.brokers.values()]
        self.cfg = write_config(self.cfg_dir, world.pki, 0, world.trust, device=device,
                                can={"replay": str(world.trace), "replay_rate": 2.0, "replay_loop": True},
                                batch={"max_interval_s": 0.2}, mqtt_extra={"hosts": hosts},
                                agent={"seal_workers": int(os.environ.get(SEAL_WORKERS_ENV, "0"))},
                                state_dir=self.state)
        self.agent = AgentProc(self.cfg, world.logs / f"{device}.log")
        self.model = ConsentModel(device, world.signer, world.forger)
        self.retained: dict[str, str] = {}  # broker -> the consent document retained there
        self.wanted = ""  # what the cloud wants retained everywhere (the last document it published)
        self.local: list[tuple[float, int]] = []  # (monotonic, ver) of `vgw consent apply` runs that applied
        self.wall0 = time.time() - time.monotonic()

    # -- the parts ------------------------------------------------------------------------------------

    def _mark(self, label: str, brokers: tuple[str, ...] = ("A", "B")) -> None:
        for name in brokers:
            self.world.brokers[name].observer.mark(label)

    def publish(self, token: str) -> None:
        self.wanted = token
        for name, b in self.world.brokers.items():
            if b.up and b.observer.wait_connected(20):
                b.observer.publish_consent(self.device, token, timeout=20)
                self.retained[name] = token

    def newest_status(self) -> dict[str, Any] | None:
        """The newest "online" status on any broker (a restarted broker may still deliver an old last will)."""
        found = [(m.arrived, status_of(m)) for b in self.world.brokers.values()
                 for m in b.observer.of_device(self.device) if m.topic.endswith("/status")]
        found = [f for f in found if f[1] is not None and f[1].get("state") == "online"]
        return max(found, key=lambda f: f[0])[1] if found else None

    def applied(self, ver: int) -> bool:
        """The agent reported ``ver`` in force (on any broker: one that was down delivers older statuses late)."""
        return any(st.get("state") == "online" and st.get("consent_version") == ver
                   for b in self.world.brokers.values() for m in b.observer.of_device(self.device)
                   if (st := status_of(m) or {}))

    # -- steps ----------------------------------------------------------------------------------------

    def setup(self, initial: dict[str, list[str]]) -> None:
        self.publish(self.model.first(initial).token)
        self.agent.start()
        self._mark("start")
        if not wait_until(lambda: self.applied(1), CONNECT_S, 0.05):
            self.violations.append(f"d: the agent did not connect and apply v1 within {CONNECT_S:g} s")
        # Data flowing before the faults begin (bounded: a grant of a rare signal may take a while).
        wait_until(lambda: any("/data/" in m.topic for b in self.world.brokers.values()
                               for m in b.observer.of_device(self.device)), 8.0, 0.05)

    def step(self, step: Step) -> None:
        op = step["op"]
        w = self.world
        if op in ("grant", "revoke", "rotate", "revoke_all"):
            doc = self.model.change(step)
            if doc is not None:
                self.publish(doc.token)
        elif op == "burst":
            for sub in step["steps"]:
                self.step(sub)
        elif op == "local":
            self._local()
        elif op == "forge":
            self.publish(self.model.forged())
        elif op == "replay":
            old = self.model.docs.get(self.model.ver - int(step["back"]))
            if old is not None:
                self.publish(old.token)
        elif op == "skew":
            self.model.skew = int(step["s"])
        elif op == "down":
            b = w.brokers[step["b"]]
            if b.up:
                b.stop()
                self._mark("down", (step["b"],))
        elif op == "up":
            self._up(step["b"])
        elif op == "kill":
            if self.agent.running:
                self.agent.kill()
                self._mark("kill")
        elif op == "stop":
            if self.agent.running:
                self._terminate("stop")
        elif op == "start":
            self._start()
        elif op == "restart":
            if self.agent.running:
                self._terminate("restart")
            self._start()
        elif op == "fill":
            w.fill_disk()
        elif op == "free":
            w.free_disk()
        elif op == "damage":
            self._damage(step["how"])
        elif op == "wait":
            time.sleep(float(step["s"]))
        elif op == "settle":
            if self.agent.running and any(b.up for b in w.brokers.values()):
                wait_until(lambda: self.applied(self.model.ver), 6.0, 0.05)
        else:
            raise ValueError(f"unknown step {op!r}")
        self._check_alive()

    def _check_alive(self) -> None:
        """The agent must not exit by itself (a supervisor restarts it, but systemd gives up after 10 starts in
        10 minutes, so a loop of exits is an agent that is gone); the explorer, as its supervisor, starts it
        again and goes on."""
        before = self.agent.unexpected_exit
        was_running = self.agent.proc is not None
        self.agent.check_alive()
        if was_running and self.agent.proc is None:
            self._mark("kill")
            if before is None:
                tail = self.agent.log.read_text(errors="replace").strip().splitlines()[-1:]
                self.violations.append(f"d: the agent exited by itself (rc {self.agent.unexpected_exit}): "
                                       f"{tail[0][:300] if tail else ''}")
            self._start()

    def _start(self) -> None:
        if not self.agent.running:
            self.agent.start()
            self._mark("start")

    def _terminate(self, why: str) -> None:
        t0 = time.monotonic()
        rc = self.agent.terminate(SIGTERM_S)
        self._mark("kill")
        if rc is None:
            self.violations.append(f"d: {why}: still running {SIGTERM_S:g} s after SIGTERM (killed)")
        elif rc not in (0, -signal.SIGTERM):  # killed by SIGTERM before its handler exists: a clean stop too
            self.violations.append(f"d: {why}: exit code {rc} after SIGTERM ({time.monotonic() - t0:.1f} s)")

    def _up(self, name: str) -> None:
        b = self.world.brokers[name]
        if not b.up:
            b.start()
            self._mark("up", (name,))
        # The cloud's consent service puts what it wants retained on a node that missed it.
        if self.wanted and self.retained.get(name) != self.wanted and b.observer.wait_connected(20):
            b.observer.publish_consent(self.device, self.wanted, timeout=20)
            self.retained[name] = self.wanted

    def _local(self) -> None:
        doc = self.model.latest
        if self.agent.running or doc is None:
            return
        path = self.cfg_dir / f"consent-v{doc.ver}.jws"
        path.write_text(doc.token)
        r = vgw("consent", "apply", "--config", str(self.cfg), str(path), timeout=60)
        if r.returncode == 0:
            self.local.append((time.monotonic(), doc.ver))

    def _damage(self, how: str) -> None:
        self.agent.kill()
        self._mark("kill")
        cache = self.state / "consent.jws"
        if cache.exists():
            if how == "delete":
                cache.unlink()
            elif how == "truncate":
                data = cache.read_bytes()
                with contextlib.suppress(OSError):
                    cache.write_bytes(data[: len(data) // 2])
            else:
                data = bytearray(cache.read_bytes())
                for i in range(len(data) // 3, len(data) // 3 + 16):
                    data[i % len(data)] ^= 0x5A
                with contextlib.suppress(OSError):
                    cache.write_bytes(bytes(data))
        self._start()

    # -- the calm end -----------------------------------------------------------------------------------

    def _reports_now(self, ver: int) -> bool:
        """The agent running now (not the one before the last kill: its retained status may already name ``ver``)
        holds ``ver`` in force: its own status.json, with its pid."""
        proc = self.agent.proc
        try:
            st = json.loads((self.state / "status.json").read_text())
        except (OSError, ValueError):
            return False
        return proc is not None and st.get("pid") == proc.pid and st.get("consent_version") == ver

    def converge(self) -> None:
        """Space back, both brokers up with the newest genuine document retained, the agent running: it must
        reach the newest version and send every erasure receipt it owes."""
        self.world.free_disk()
        latest = self.model.latest
        assert latest is not None
        self.wanted = latest.token
        for name in self.world.brokers:
            self._up(name)
        self._start()
        def converged() -> bool:
            self._check_alive()
            return self.applied(latest.ver) and self._reports_now(latest.ver)

        if not wait_until(converged, CONVERGE_S, 0.1):
            st = self.newest_status()
            self.violations.append(
                f"b: not converged: {CONVERGE_S:g} s after the calm began the agent reports consent "
                f"v{(st or {}).get('consent_version')} ({(st or {}).get('state')}), the cloud's newest is "
                f"v{latest.ver}")
            return
        audit = self.state / "audit.log"

        def receipts_in() -> bool:
            ev = self._evidence(None)
            want = expected_erasures(ev)
            return all(ev.erasure_receipts_for(gid) >= n for gid, n in want.items())

        wait_until(receipts_in, 20.0, 0.2) if audit.exists() else None

    def finish(self) -> Evidence:
        if self.agent.running:
            self._terminate("final stop")
        for b in self.world.brokers.values():
            b.observer.barrier()
        return self._evidence(read_disk(self.state))

    def _evidence(self, disk: Any) -> Evidence:
        streams = {name: b.observer.of_device(self.device) for name, b in self.world.brokers.items()}
        return Evidence(device=self.device, model=self.model, streams=streams, local=list(self.local),
                        audit_path=self.state / "audit.log", wall0=self.wall0, disk=disk,
                        device_cert=self.world.pki.device(self.device).cert)

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.agent.kill()
        self.world.free_disk()
        for b in self.world.brokers.values():
            with contextlib.suppress(Exception):
                if not b.up:
                    b.start()
                b.observer.clear_consent(self.device, timeout=10)
            b.observer.forget(self.device)
        shutil.rmtree(self.state, ignore_errors=True)
        shutil.rmtree(self.cfg_dir, ignore_errors=True)


# ---------------------------------------------------------------- reporting, workers, command line


def describe(out: Outcome) -> str:
    lines = [f"schedule seed {out.seed}: {'ok' if out.ok else 'FAILED'} ({out.seconds:.1f} s)",
             f"  initial grants: {json.dumps(out.initial)}",
             f"  steps: {json.dumps(out.steps)}"]
    lines += [f"  violation {v}" for v in out.violations]
    return "\n".join(lines)


def replay_command(out: Outcome) -> str:
    return f"python -m tests.explore --seed {out.seed} --steps '{json.dumps(out.steps)}'"


def _worker(name: str, seeds: list[int], shrink: bool, results_path: str) -> None:
    # SIGTERM (a stopped `make explore`) ends the worker through its finally blocks: agent, brokers, tmpfs go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    world = World(name)
    try:
        runner = Runner(world, name)
        for seed in seeds:
            initial, steps = generate(seed)
            out = runner.run(seed, initial, steps)
            record: dict[str, Any] = {"seed": seed, "ok": out.ok, "seconds": round(out.seconds, 1),
                                      "steps": len(steps), "end": round(time.time(), 1), "violations": out.violations}
            if not out.ok:
                print(describe(out), flush=True)
                if shrink:
                    small = runner.shrink(out)
                    record["shrunk"] = small.steps
                    record["shrunk_violations"] = small.violations
                    print(f"  shrunk to {len(small.steps)} step(s): {json.dumps(small.steps)}\n"
                          f"  replay: {replay_command(small)}", flush=True)
            with open(results_path, "a") as f:
                f.write(json.dumps({"worker": name, **record}) + "\n")
    finally:
        world.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.explore", description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20, help="how many schedules (seeds first..first+n-1)")
    ap.add_argument("-j", type=int, default=1, help="workers in parallel (each has its own brokers)")
    ap.add_argument("--first", type=int, default=1, help="the first seed")
    ap.add_argument("--seed", type=int, help="run this one seed (with --steps: that step list)")
    ap.add_argument("--steps", help="a step list as JSON (as a failing run prints it)")
    ap.add_argument("--seal-workers", type=int, choices=(0, 1), default=0,
                    help="[agent] seal_workers of the agents under test (default 0)")
    ap.add_argument("--no-shrink", action="store_true", help="do not shrink failing schedules")
    ap.add_argument("--results", default="build/explore-results.jsonl", help="one JSON line per schedule")
    args = ap.parse_args(argv)
    os.environ[SEAL_WORKERS_ENV] = str(args.seal_workers)  # read by each worker's Runner (inherited)
    if args.seed is not None:
        world = World("replay")
        try:
            initial, steps = generate(args.seed)
            if args.steps:
                steps = json.loads(args.steps)
            runner = Runner(world, "r")
            out = runner.run(args.seed, initial, steps)
            print(describe(out))
            if not out.ok and not args.no_shrink and not args.steps:
                small = runner.shrink(out)
                print(f"shrunk: {json.dumps(small.steps)}\nreplay: {replay_command(small)}")
            return 0 if out.ok else 1
        finally:
            world.close()
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.first, args.first + args.n))
    results_path = Path(args.results)
    done_before = len(results_path.read_text().splitlines()) if results_path.exists() else 0
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_worker, args=(f"w{i}", seeds[i::args.j], not args.no_shrink, args.results),
                           name=f"explore-w{i}") for i in range(args.j)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
                w.join(60)
    took = time.monotonic() - t0
    results = [json.loads(line) for line in results_path.read_text().splitlines()[done_before:]]
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results)} schedule(s) in {took:.0f} s ({60 * len(results) / max(took, 1e-9):.1f}/min), "
          f"{len(failed)} failed: seeds {[r['seed'] for r in failed]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
