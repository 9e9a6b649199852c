"""`vgw demo`: the whole system on one machine, no hardware, no cloud account.

A private mosquitto with mutual TLS on a free loopback port and throwaway certificates; the vehicle
simulator on a python-can virtual bus; the owner's consent service (docs/consent-service.md), where two apps
ask through OAuth 2.0 and the owner allows both; the reference cloud peer, which opens what each app receives;
and the real agent. Half-way through, the owner withdraws one app's grant on the owner's page; the demo
shows its data stop, its outbox rows and key go, and the car's erasure receipt arrive, at the cloud and on
the owner's page. The browser is played over HTTP (:mod:`vgw.tools.service_play`); the URLs are printed to
open in a real one meanwhile. Without the ``service`` extra the cloud peer signs the consent itself, and the
demo says so in one line (:mod:`vgw.tools.demo_consent`). The summary is checked, not just printed: exit 0
only if every guarantee held.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from vgw.base.errors import VgwError
from vgw.base.logs import quieted
from vgw.config.settings import load_config
from vgw.pipeline.catalogue import load_catalogue
from vgw.tools.demo_consent import DEVICE, REVOKED_APP, LiveGrant, PeerConsent, ServiceConsent
from vgw.tools.progress import Progress


def _config_text(state_dir: Path, dbc: Path, signal_map: Path, channel: str, broker_port: int, ca: Path,
                 cert: Path, key: Path, trust: Path) -> str:
    return f"""# written by `vgw demo`
[device]
id = "{DEVICE}"
state_dir = "{state_dir}"

[can]
interface = "virtual"
channel = "{channel}"
dbc = ["{dbc}"]
signal_map = "{signal_map}"

[mqtt]
host = "localhost"
port = {broker_port}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"

[consent]
trust_keys = ["{trust}"]

[batch]
max_interval_s = 0.5
"""


class _Screen:
    """Live view: redraws in place on a terminal, prints plain progress lines otherwise."""

    def __init__(self, out: IO[str], *, live: bool) -> None:
        self.out = out
        self.live = live and out.isatty()
        self.events: list[str] = []
        self._last_plain = 0.0

    def event(self, t: float, text: str) -> None:
        line = f"[{t:5.1f}s] {text}"
        self.events.append(line)
        if not self.live:
            print(line, file=self.out, flush=True)

    def draw(self, lines: list[str], t: float) -> None:
        if self.live:
            body = "\n".join([*lines, "", *self.events[-8:]])
            self.out.write("\x1b[H\x1b[2J" + body + "\n")
            self.out.flush()
        elif t - self._last_plain >= 5.0:
            self._last_plain = t
            for line in lines[2:]:
                print("        " + line, file=self.out, flush=True)


def run_demo(duration: float = 20.0, *, as_json: bool = False, out: IO[str] | None = None,
             keep: Path | None = None) -> int:
    """Run the demo for ``duration`` seconds. Returns 0 if every guarantee held, 1 otherwise."""
    from vgw_sim.broker import Mosquitto, MosquittoNotFound
    from vgw_sim.can_sim import CanSimulator, open_output
    from vgw_sim.cloud import CloudPeer
    from vgw_sim.paths import default_dbc, default_signal_map
    from vgw_sim.pki import TestPKI
    from vgw_sim.vehicle import VehicleModel

    from vgw.daemon.agent import Agent
    from vgw.tools.service_play import service_missing

    if duration < 8:
        raise VgwError(f"demo duration {duration:g} s is too short: use at least 8 s")
    out = out or sys.stdout
    screen = _Screen(sys.stderr if as_json else out, live=not as_json)
    setup = Progress()  # set-up steps on a terminal only; a pipe gets the narrative and the summary alone
    keep_dir = keep.expanduser().absolute() if keep is not None else None
    if keep_dir is not None:
        # Kept: the demo works in DIR/demo (config with relative paths, state, PKI with 0600 keys, broker and
        # agent logs), and DIR becomes a dev stack (README "Your own dev stack").
        root = keep_dir / "demo"
        if root.exists() or (keep_dir / "vgw.toml").exists():
            raise VgwError(f"--keep {keep}: it already holds a demo or a dev stack; give a new directory")
        root.mkdir(parents=True)
        os.chmod(root, 0o700)
    else:
        root = Path(tempfile.mkdtemp(prefix="vgw-demo-"))
        os.chmod(root, 0o755)  # noqa: S103 - the broker (dropped to user mosquitto) reads the PKI below it
    logs = _kept_log(root / "demo.log") if keep_dir is not None else quieted("vgw")
    logs.__enter__()
    t0 = time.monotonic()
    stop = threading.Event()
    broker = agent = cloud = bus = None
    consent: PeerConsent | ServiceConsent | None = None
    sim_thread = agent_thread = None
    try:
        setup.step("setting up: certificates")
        pki = TestPKI(root / "pki", devices=[DEVICE], key_mode=0o600 if keep_dir else 0o644)
        setup.step("setting up: private mosquitto (mutual TLS)")
        try:
            if keep_dir is not None:
                # It reads the 0600 keys as their owner (started as root it would drop to `mosquitto`).
                broker = Mosquitto.from_pki(pki, workdir=root / "broker",
                                            extra_config=f"user {pwd.getpwuid(os.geteuid()).pw_name}").start()
            else:
                broker = Mosquitto.from_pki(pki).start()
        except MosquittoNotFound as exc:
            raise VgwError(str(exc)) from exc
        screen.event(0.0, f"private mosquitto up on 127.0.0.1:{broker.port} (mutual TLS, per-device ACL)")

        cloud = CloudPeer.for_broker(broker, pki)
        cloud.add_device(DEVICE, pki.devices[DEVICE].cert)
        setup.step("setting up: cloud peer")
        cloud.connect()
        missing = service_missing()
        if missing is None:
            setup.step("setting up: the owner's consent service")
            consent = ServiceConsent(root, pki, broker.port, cloud)
        else:
            consent = PeerConsent(root, cloud, missing)
        screen.event(time.monotonic() - t0, "cloud peer connected (one HPKE key per app: it opens what each app "
                     "receives)")
        if missing is not None:
            screen.event(time.monotonic() - t0, f"consent service not shown: its extra is not installed ({missing} "
                         "missing: pip install 'vgw[service]'); the cloud peer signs the consent itself")

        channel = f"vgw-demo-{os.getpid()}"
        state_dir = root / "state"
        cfg_path = root / "vgw.toml"
        dev = pki.devices[DEVICE]
        def rel(p: Path) -> Path:  # a kept config stays valid wherever DIR goes
            return p.relative_to(root) if keep_dir is not None and p.is_relative_to(root) else p

        cfg_path.write_text(_config_text(rel(state_dir), default_dbc(), default_signal_map(), channel, broker.port,
                                         rel(pki.ca.cert), rel(dev.cert), rel(dev.key), rel(consent.trust)))
        cfg = load_config(cfg_path)
        catalogue = load_catalogue(cfg.can.dbc, cfg.can.signal_map) if cfg.can else None
        assert catalogue is not None
        scope_of = catalogue.scope_of_path()

        bus = open_output("virtual", channel)
        model = VehicleModel(seed=7)
        model.step(11.0)  # skip the standstill at the start of the drive cycle: the car pulls away at once
        sim = CanSimulator(default_dbc(), model)
        sim_thread = threading.Thread(target=sim.run, args=(bus,), kwargs={"stop_event": stop}, name="demo-sim",
                                      daemon=True)
        sim_thread.start()
        screen.event(time.monotonic() - t0, f"vehicle simulator on virtual CAN bus '{channel}' "
                     f"({len(sim.messages)} messages, 10 ms - 1 s periods)")

        # The consent first, retained at the broker: the agent takes it when it connects (README "Topics"). Each
        # app's grant id is known (and its key registered with the cloud peer) before any of its data can come.
        grants = consent.allow(lambda text: screen.event(time.monotonic() - t0, text))
        setup.close()
        setup.step("setting up: agent")
        agent = Agent(cfg)
        agent_thread = threading.Thread(target=agent.run, name="demo-agent", daemon=True)
        agent_thread.start()
        setup.close()
        started = time.monotonic() - t0
        screen.event(started, f"agent {DEVICE} started; it takes the retained consent from the broker and decodes "
                     "only what it grants")

        # The story runs from the agent's start: half of it with both grants, half after the withdrawal.
        live = max(duration - started, 6.0)
        end, revoke_at = started + live, started + live * 0.5
        revoked = next(g for g in grants if g.app == REVOKED_APP)
        revoked_wall: float | None = None
        receipt_wall: float | None = None
        receipt_claims: dict[str, Any] | None = None
        rows_after: int | None = None
        key_after: bool | None = None
        while (elapsed := time.monotonic() - t0) < end:
            if revoked_wall is None and elapsed >= revoke_at:
                revoked_wall = time.time()  # before the request: the car may apply it before the answer comes
                consent.withdraw(revoked, lambda text: screen.event(time.monotonic() - t0, text))
            if revoked_wall is not None and receipt_wall is None:
                for r in cloud.receipts(DEVICE, "erasure"):
                    if r.claims.get("grant") == revoked.id:
                        receipt_wall, receipt_claims = r.arrived, r.claims
                        stats = agent.outbox.stats()
                        rows_after = stats.get(revoked.id, {}).get("rows", 0)
                        key_after = agent.outbox.has_key(revoked.id)
                        screen.event(elapsed, f"agent stopped {revoked.id}: dropped its batch in memory, deleted "
                                     f"{r.claims.get('batches_deleted')} outbox batch(es), destroyed its data key")
                        screen.event(elapsed, f"erasure receipt for {revoked.id} arrived; ES256 signature verified "
                                     f"against the device certificate (outbox rows now {rows_after}, key "
                                     f"{'PRESENT' if key_after else 'gone'})")
            screen.draw(_view(cloud, agent, grants, elapsed, end, revoked, revoked_wall), elapsed)
            time.sleep(0.5)

        service_checks = consent.checks(revoked, receipt_wall is not None)
        if service_checks:
            screen.event(time.monotonic() - t0, consent.verdict(service_checks))
        stop.set()
        agent.stop()
        agent_thread.join(10)
        # Let the last acknowledged batches land at the cloud.
        time.sleep(0.5)
        summary = _summary(cloud, grants, scope_of, revoked, revoked_wall, receipt_wall, receipt_claims, rows_after,
                           key_after, agent)
        summary["consent_service"] = consent.describe(service_checks)
        if service_checks:
            summary["ok"] = summary["ok"] and all(service_checks.values())
        summary["broker_port"] = broker.port
        summary["duration_s"] = duration
        if as_json:
            print(json.dumps(summary, indent=2), file=out)
        else:
            _print_summary(summary, out)
        if keep_dir is not None:
            _keep(keep_dir, root, summary, sys.stderr if as_json else out)
        return 0 if summary["ok"] else 1
    finally:
        setup.close()
        logs.__exit__(None, None, None)
        stop.set()
        if agent is not None:
            agent.stop()
        if agent_thread is not None:
            agent_thread.join(10)
        if sim_thread is not None:
            sim_thread.join(5)
        if bus is not None:
            bus.shutdown()
        if consent is not None:
            consent.close()
        if cloud is not None:
            cloud.close()
        if broker is not None:
            broker.close()
        if keep_dir is None:
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _kept_log(path: Path) -> Iterator[None]:
    """The agent's log of a kept demo goes to ``path`` (INFO and up, never values), not over the live screen."""
    logger = logging.getLogger("vgw")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(level)
        logger.propagate = propagate


def _keep(keep_dir: Path, root: Path, summary: dict[str, Any], out: IO[str]) -> None:
    """Write the summary next to the kept demo and lay out a dev stack in ``keep_dir``."""
    from vgw.tools.devstack import init

    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    init(keep_dir)
    print(f"kept in {keep_dir}:\n"
          f"  demo/      the demo's config, state, PKI (keys 0600), broker and agent logs, summary.json,\n"
          f"             service/: the consent service's config, keys and database (when it ran)\n"
          f"             (vgw report --config {root / 'vgw.toml'}; vgw audit show --config ...)\n"
          f"  a dev stack of your own: vgw dev up {keep_dir}   (README \"Your own dev stack\")", file=out)


def _view(cloud: Any, agent: Any, grants: list[LiveGrant], elapsed: float, end: float, revoked: LiveGrant,
          revoked_wall: float | None) -> list[str]:
    lines = [f"vgw demo  {elapsed:5.1f} s / {end:.0f} s   device {DEVICE}   link: {agent.uplink.view().state}",
             "what the cloud receives, per grant (each app decrypts only its own grant with its HPKE key):"]
    stats = agent.outbox.stats()
    for g in grants:
        samples = cloud.samples(DEVICE, g.id)
        by_path: dict[str, list[Any]] = {}
        for s in samples:
            by_path.setdefault(s.path, []).append(s)
        is_revoked = g.id == revoked.id and revoked_wall is not None
        ob = stats.get(g.id, {"rows": 0})
        state = "REVOKED" if is_revoked else "active"
        lines.append(f"  {g.id} [{state}] {g.controller} / {g.purpose}: {len(cloud.batches(DEVICE, g.id))} batches, "
                     f"outbox {ob['rows']} row(s)")
        if g.limits:
            lines.append("      limits enforced on the car: " + "; ".join(
                f"{scope} at most {lim['max_hz']:g} Hz" + (f" on a {lim['precision_m']:g} m grid"
                                                           if lim.get("precision_m") else "")
                for scope, lim in g.limits.items() if lim.get("max_hz")))
        for path in sorted(by_path):
            got = by_path[path]
            last = got[-1].value
            shown = f"{last:.5f}" if isinstance(last, float) and "Location" in path else (
                f"{last:.2f}" if isinstance(last, float) else str(last))
            after = sum(1 for x in got if revoked_wall is not None and x.arrived > revoked_wall + 1.0) \
                if is_revoked else 0
            extra = f"   {after} after revocation" if is_revoked else ""
            lines.append(f"      {path:<58} {len(got):>6} samples  last {shown:>12}{extra}")
    return lines


def _summary(cloud: Any, grants: list[LiveGrant], scope_of: dict[str, str], revoked: LiveGrant,
             revoked_wall: float | None, receipt_wall: float | None, receipt_claims: dict[str, Any] | None,
             rows_after: int | None, key_after: bool | None, agent: Any) -> dict[str, Any]:
    applied_after: float | None = None  # when the agent applied the withdrawal (its audit's consent-applied)
    for audit_entry in agent.audit.entries():
        t = audit_entry.get("t")
        if (audit_entry.get("event") == "consent-applied" and revoked_wall is not None and isinstance(t, int | float)
                and t >= revoked_wall and applied_after is None):
            applied_after = float(t)
    grants_out: dict[str, Any] = {}
    ok = True
    for g in grants:
        samples = cloud.samples(DEVICE, g.id)
        by_path: dict[str, int] = {}
        outside = 0
        for s in samples:
            by_path[s.path] = by_path.get(s.path, 0) + 1
            if scope_of.get(s.path) not in g.scopes:
                outside += 1
        entry: dict[str, Any] = {
            "app": g.app,
            "controller": g.controller,
            "scopes": g.scopes,
            "limits": g.limits,
            "batches": len(cloud.batches(DEVICE, g.id)),
            "samples_by_path": dict(sorted(by_path.items())),
            "samples_outside_consent": outside,
            "seq_gaps": [list(r) for r in cloud.gaps(DEVICE, g.id)],
            "duplicates_dropped": cloud.duplicates(DEVICE, g.id),
        }
        good = bool(samples) and outside == 0 and not entry["seq_gaps"]
        if g.id == revoked.id:
            after = 0
            for s in samples:
                if receipt_wall is not None and s.arrived > receipt_wall:
                    after += 1
                elif applied_after is not None and s.t > applied_after:
                    after += 1
            entry.update({
                "revoked": revoked_wall is not None,
                "samples_after_revocation": after,
                "erasure_receipt_verified": receipt_claims is not None,
                "erasure_receipt": receipt_claims,
                "outbox_rows_after_revocation": rows_after,
                "key_destroyed": key_after is False,
                "revocation_to_receipt_s": round(receipt_wall - revoked_wall, 3)
                if receipt_wall and revoked_wall else None,
            })
            good = good and after == 0 and receipt_claims is not None and rows_after == 0 and key_after is False
        else:
            late = [s for s in samples if revoked_wall is not None and s.arrived > revoked_wall + 1]
            entry["samples_after_other_revocation"] = len(late)
            entry["samples_after_revocation"] = 0
            good = good and bool(late)  # the remaining grant kept flowing
        entry["ok"] = good
        ok = ok and good
        grants_out[g.id] = entry
    return {"device": DEVICE, "ok": ok, "revoked_grant": revoked.id, "grants": grants_out,
            "undecryptable": cloud.undecryptable, "bad_receipts": len(cloud.bad_receipts())}


def _print_summary(summary: dict[str, Any], out: IO[str]) -> None:
    print("", file=out)
    print("summary", file=out)
    for gid, g in summary["grants"].items():
        print(f"  {gid} ({g['controller']}): {g['batches']} batches, {sum(g['samples_by_path'].values())} samples; "
              f"outside consent {g['samples_outside_consent']}; seq gaps {len(g['seq_gaps'])}", file=out)
        if g.get("revoked"):
            print(f"    revoked: after-revocation samples {g['samples_after_revocation']}, outbox rows "
                  f"{g['outbox_rows_after_revocation']}, key destroyed {g['key_destroyed']}, erasure receipt "
                  f"verified {g['erasure_receipt_verified']} ({g['revocation_to_receipt_s']} s after the revoke)",
                  file=out)
    service = summary.get("consent_service") or {}
    if service.get("shown"):
        print(f"  consent service {service['url']}: owner's page shows the erasure receipt "
              f"{service['owner_page_shows_erasure_receipt']}, withdrawn app's token refused "
              f"{service['withdrawn_app_token_refused']}, other app's token valid {service['other_app_token_valid']}",
              file=out)
    print(f"RESULT: {'PASS: every guarantee held' if summary['ok'] else 'FAIL'}", file=out)
