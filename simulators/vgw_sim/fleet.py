"""Fleet load simulator: N lightweight devices in one process against a real broker.

Each simulated device has its own client id and certificate (from a throwaway CA), a real mutual-TLS MQTT connection,
and speaks the contract through the agent's own code (:mod:`vgw_sim.fleet_device`): it verifies consent
documents with the agent's verifier, seals version 2 HPKE envelopes (README "Telemetry envelope") with the agent's
sealer at ``rate_hz`` per grant and signs ES256 receipts (README "Receipts") with the agent's receipt signer. A
cloud side pushes consent (retained), changes it at ``churn_hz`` across the fleet (revoke a grant / grant a new
one), and consumes everything with the cloud kit: it opens every envelope and verifies every receipt.

Threads, not per device: ``threads`` workers (:mod:`vgw_sim.fleet_device`) each own a slice of the
devices and drive their paho clients with one :mod:`selectors` loop (``loop_read`` / ``loop_write`` /
``loop_misc``, paho's external event loop hooks for write interest), so 1,000 devices are a few threads
and ~1,000 sockets. ``RLIMIT_NOFILE`` is
raised to its hard limit first (brokers started here inherit it).

Reported (:meth:`FleetSim.run` returns a dict): broker ingress (PUBACKed publishes/s) and egress (messages/s
delivered to the consumer), end-to-end latency percentiles (seal on the device -> opened by the consumer),
consent push -> ``consent-applied`` and revocation push -> ``erasure`` receipt latencies, and loss (batches
PUBACKed to a device but never delivered to the consumer) and duplicates.

``broker="nats-cluster"``: three nats-server nodes (:mod:`vgw_sim.nats_cluster`), devices spread over
them and failing over like the agent's ``[mqtt] hosts``, and the cloud side as ``consumers`` worker
processes on the durable JetStream consumer (:mod:`vgw_sim.fleet_cluster`); ``kill_at_s`` kills one node
(SIGKILL) in the middle of the run and restarts it ``down_s`` later.

Errors: ``ValueError`` for bad parameters, :class:`vgw_sim.broker.BrokerError` if a broker cannot start,
:class:`vgw.base.errors.UplinkError` if the cloud side cannot connect.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import resource
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from vgw.base.errors import UplinkError
from vgw.contract.certs import device_public_key_from_cert, load_private_key
from vgw.contract.receipt_types import ReceiptType
from vgw.contract.sealing import SENT_VERSION
from vgw.contract.topics import PREFIX, Stream, consent_topic, data_filter, parse_device_topic, receipt_filter
from vgw.transport.tlsctx import client_context

from vgw_sim.broker import CLAIM_USER
from vgw_sim.cloud import (
    RecipientKey,
    SigningKey,
    consent_claims,
    grant,
    open_envelope,
    sign_consent,
    verify_receipt,
)
from vgw_sim.fleet_device import SimDevice, Worker, connect_client, make_client
from vgw_sim.fleet_enroll import EnrollService, enroll_fleet
from vgw_sim.pki import CertPaths, TestPKI

log = logging.getLogger("vgw.fleet")

__all__ = ["FleetConfig", "FleetSim", "format_report", "raise_nofile"]



def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass
class FleetConfig:
    """Parameters of one run. ``broker``: ``mosquitto``, ``nats`` (private instances) or ``HOST:PORT`` (then
    ``pki_dir`` must hold ``ca.crt``, ``cloud.crt/.key`` and ``sim-NNNNN.crt/.key``, see ``make_pki``)."""

    devices: int = 100
    rate_hz: float = 1.0
    duration_s: float = 10.0
    churn_hz: float = 1.0
    broker: str = "mosquitto"
    pki_dir: Path | None = None
    threads: int = 4
    samples: int = 5
    protocol: str | None = None  # None: 5 for mosquitto, 3.1.1 for nats, 5 for HOST:PORT
    connect_timeout_s: float = 120.0
    drain_s: float = 5.0
    # nats-cluster only: consumer worker processes on the durable consumer, and one node killed (SIGKILL)
    # kill_at_s into the measured run, restarted down_s later; kill_role picks it: "follower" (a node that
    # does not lead the telemetry stream) or "leader" (the one that does).
    consumers: int = 1
    kill_at_s: float | None = None
    down_s: float = 10.0
    kill_role: str = "follower"
    # nats-cluster only: keep PUBACKed batches this long and replay them after a failover, as the agent does
    # with several [mqtt] hosts (README "Replay after failover"); 0: delete on PUBACK.
    replay_window_s: float = 0.0
    # Devices start with no certificate and enroll through `vgw cloud enroll serve` first (README "Enrollment";
    # private mosquitto only): the report gains "enrollment".
    enroll: bool = False
    enroll_timeout_s: float = 300.0

    def validate(self) -> None:
        if self.devices < 1 or self.devices > 100_000:
            raise ValueError(f"--devices {self.devices}: expected 1..100000")
        if not 0 < self.rate_hz <= 100:
            raise ValueError(f"--rate {self.rate_hz}: expected 0 < HZ <= 100")
        if self.duration_s <= 0:
            raise ValueError(f"--duration {self.duration_s}: must be > 0")
        if self.churn_hz < 0:
            raise ValueError(f"--churn {self.churn_hz}: must be >= 0")
        if not 1 <= self.threads <= 64:
            raise ValueError(f"--threads {self.threads}: expected 1..64")
        if self.protocol not in (None, "5", "3.1.1"):
            raise ValueError(f"--protocol {self.protocol!r}: expected 5 or 3.1.1")
        if not 1 <= self.consumers <= 16:
            raise ValueError(f"--consumers {self.consumers}: expected 1..16")
        if self.kill_role not in ("follower", "leader"):
            raise ValueError(f"--kill-role {self.kill_role!r}: expected follower or leader")
        if self.kill_at_s is not None and self.broker != "nats-cluster":
            raise ValueError("--kill-at needs --broker nats-cluster")
        if self.enroll and (self.broker != "mosquitto" or self.pki_dir is not None):
            raise ValueError("--enroll needs the private mosquitto (--broker mosquitto, no --pki)")
        if self.kill_at_s is not None and not 0 <= self.kill_at_s < self.duration_s:
            raise ValueError(f"--kill-at {self.kill_at_s}: must be within the run (0 .. --duration)")


def device_ids(n: int) -> list[str]:
    return [f"sim-{i:05d}" for i in range(1, n + 1)]


def make_pki(directory: Path, n: int) -> TestPKI:
    """A CA with server, cloud and ``n`` device certificates (for an external broker to trust); private keys
    0600, readable by whoever runs that broker only."""
    return TestPKI(directory, devices=device_ids(n), key_mode=0o600)


def _pct(values: list[float], ps: tuple[float, ...] = (50, 90, 99)) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, **{f"p{int(p)}": None for p in ps}, "max": None}
    s = sorted(values)
    out: dict[str, float | int | None] = {"n": len(s)}
    for p in ps:
        out[f"p{int(p)}"] = round(s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] * 1000, 1)
    out["max"] = round(s[-1] * 1000, 1)
    return out


# ---------------------------------------------------------------- the cloud side


@dataclass
class _Cloud:
    recipient: RecipientKey
    device_keys: dict[str, ec.EllipticCurvePublicKey]
    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: dict[tuple[str, str], set[tuple[str, int]]] = field(default_factory=dict)  # (epoch, seq) per stream
    duplicates: int = 0
    delivered: int = 0
    delivered_bytes: int = 0
    latencies: list[float] = field(default_factory=list)
    undecryptable: int = 0
    receipts: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)
    bad_receipts: int = 0
    measuring: bool = False

    def on_message(self, c: Any, u: Any, msg: Any) -> None:
        arrived = time.time()
        topic = parse_device_topic(PREFIX, msg.topic)
        payload = bytes(msg.payload)
        if topic is None:
            return
        if topic.stream is Stream.DATA and topic.grant is not None:
            device, gid = topic.device, topic.grant
            try:
                batch = open_envelope(payload, self.recipient, device, gid)
            except Exception:
                with self.lock:
                    self.undecryptable += 1
                return
            with self.lock:
                s = self.seen.setdefault((device, gid), set())
                # README "Telemetry envelope": de-duplicate on (epoch, seq)
                dedup = (str(batch.get("epoch", "")), int(batch["seq"]))
                if dedup in s:
                    self.duplicates += 1
                    return
                s.add(dedup)
                if self.measuring:
                    self.delivered += 1
                    self.delivered_bytes += len(payload)
                    self.latencies.append(arrived - batch["samples"][0]["t"] if batch["samples"] else 0.0)
        elif topic.stream is Stream.RECEIPT:
            key = self.device_keys.get(topic.device)
            try:
                if key is None:
                    raise ValueError("unknown device")
                claims = verify_receipt(payload.decode("ascii"), key, device=topic.device)
            except Exception:
                with self.lock:
                    self.bad_receipts += 1
                return
            with self.lock:
                self.receipts.append((topic.device, claims, arrived))


class FleetSim:
    """One run of the fleet simulator. ``progress`` gets human-readable progress lines."""

    def __init__(self, cfg: FleetConfig, progress: Callable[[str], None] | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.progress = progress or (lambda _m: None)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        nofile = raise_nofile()
        t_setup = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix="vgw-fleet-"))
        os.chmod(tmp, 0o755)  # noqa: S103 - a root-started mosquitto reads the PKI as its own user
        broker: Any = None
        closers: list[Callable[[], object]] = []
        try:
            ids = device_ids(cfg.devices)
            if cfg.pki_dir is not None:
                if cfg.broker in ("mosquitto", "nats", "nats-cluster"):
                    raise ValueError("--pki is for an external --broker HOST:PORT; private brokers make their own")
                pki_root = cfg.pki_dir
                ca, cloud_cert, cloud_key = pki_root / "ca.crt", pki_root / "cloud.crt", pki_root / "cloud.key"
                dev_files = {d: (pki_root / f"{d}.crt", pki_root / f"{d}.key") for d in ids}
            elif cfg.enroll:
                # Only the CA, the server, the cloud and the batch's claim identity: devices enroll themselves.
                pki = TestPKI(tmp / "pki", days=3650)
                claim = pki.client_cert(CLAIM_USER, name="claim")
                ca, cloud_cert, cloud_key = pki.ca.cert, pki.cloud.cert, pki.cloud.key
                dev_files = {}
            else:
                self.progress(f"issuing {cfg.devices} device certificates")
                # Throwaway keys in a temp dir for a private broker that drops to its own user: 0644 here.
                pki = TestPKI(tmp / "pki", devices=device_ids(cfg.devices))
                ca, cloud_cert, cloud_key = pki.ca.cert, pki.cloud.cert, pki.cloud.key
                dev_files = {d: (p.cert, p.key) for d, p in pki.devices.items()}
            engine = cfg.broker
            if engine == "mosquitto":
                from vgw_sim.broker import Mosquitto

                broker = Mosquitto.from_pki(pki, extra_config="max_queued_messages 10000")
                host, protocol = "localhost", cfg.protocol or "5"
            elif engine == "nats":
                from vgw_sim.nats import NatsMqtt

                broker = NatsMqtt.from_pki(pki)
                host, protocol = "localhost", cfg.protocol or "3.1.1"
            elif engine == "nats-cluster":
                from vgw_sim.nats_cluster import NatsCluster

                broker = NatsCluster.from_pki(pki, ack_wait="30s")
                host, protocol = "localhost", cfg.protocol or "3.1.1"
            else:
                if cfg.pki_dir is None:
                    raise ValueError("--broker HOST:PORT needs --pki DIR (see --make-pki)")
                host, _, port_s = engine.rpartition(":")
                if not host or not port_s.isdigit():
                    raise ValueError(f"--broker {engine!r}: expected mosquitto, nats, nats-cluster or HOST:PORT")
                protocol = cfg.protocol or "5"
            if broker is not None:
                self.progress(f"starting private {engine}")
                broker.start()
                closers.append(broker.close)
                port = broker.endpoints[0][1] if engine == "nats-cluster" else broker.port
            else:
                port = int(port_s)

            enrollment: dict[str, Any] | None = None
            if cfg.enroll:
                dev_files, enrollment = self._enroll(tmp, pki, claim, ids, host, port, protocol)
                if len(dev_files) < len(ids):
                    ids = [d for d in ids if d in dev_files]  # the run goes on with those enrolled; the report says
            signer = SigningKey.generate()
            recipient = RecipientKey.generate()
            device_keys = {}
            for d, (cert, _key) in dev_files.items():
                device_keys[d] = device_public_key_from_cert(cert)
            cloud = _Cloud(recipient, device_keys)
            cloud_ctx = client_context(ca, cloud_cert, cloud_key)

            sub_ok = threading.Event()
            kill_node: int | None = None
            group = None
            if engine == "nats-cluster":
                from vgw.cloud.jetstream import NatsOptions, stream_leader

                from vgw_sim.fleet_cluster import ConsumerGroup

                group = ConsumerGroup(cfg.consumers, tmp / "consumers", nats_urls=broker.nats_urls, ca=ca,
                                      cert=cloud_cert, key=cloud_key, recipient=recipient,
                                      device_cert_dir=pki.dir, sink=cloud, ack_wait_s=5.0)
                self.progress(f"starting {group.n_relays} relays and {cfg.consumers} consumer worker(s) on the "
                              "durable consumer")
                closers.append(group.close)
                group.start()
                sub_ok.set()
                names = [n.server_name for n in broker.nodes]
                leader = names.index(stream_leader(NatsOptions(tuple(broker.nats_urls), ca, cloud_cert, cloud_key)))
                if cfg.kill_at_s is not None:
                    kill_node = leader if cfg.kill_role == "leader" else (leader + 1) % len(names)
                # The consent service talks to a node that stays up.
                port = broker.endpoints[(kill_node + 1) % len(names) if kill_node is not None else 0][1]
            else:
                consumer = make_client(f"fleet-consumer-{os.getpid()}", protocol, cloud_ctx, False)
                consumer.on_message = cloud.on_message
                consumer.on_connect = lambda c, u, f, rc, p: c.subscribe(
                    [(data_filter(PREFIX), 1), (receipt_filter(PREFIX), 1)])
                consumer.on_subscribe = lambda *a: sub_ok.set()
                connect_client(consumer, host, port, protocol, False)
                consumer.loop_start()
                closers.append(lambda: (consumer.disconnect(), consumer.loop_stop()))
            pusher = make_client(f"fleet-pusher-{os.getpid()}", protocol, client_context(ca, cloud_cert, cloud_key),
                                 False)
            pusher_ready = threading.Event()
            pusher.on_connect = lambda *a: pusher_ready.set()
            connect_client(pusher, host, port, protocol, False)
            pusher.loop_start()
            closers.append(lambda: (pusher.disconnect(), pusher.loop_stop()))
            if not (sub_ok.wait(15) and pusher_ready.wait(15)):
                raise UplinkError(f"fleet cloud side could not connect/subscribe to {host}:{port}")

            # Consent authority: every device starts with one grant; versions rise per device.
            vers = dict.fromkeys(ids, 1)
            grant_no = dict.fromkeys(ids, 1)
            active = dict.fromkeys(ids, True)
            pushed_at: dict[tuple[str, int], float] = {}

            def push(device: str, with_grant: bool) -> None:
                gs = [grant(f"g-{grant_no[device]}", ["read_speedometer", "read_odometer"], recipient)] \
                    if with_grant else []
                token = sign_consent(consent_claims(device, vers[device], gs), signer)
                pushed_at[(device, vers[device])] = time.time()
                pusher.publish(consent_topic(PREFIX, device), token, qos=1, retain=True)

            self.progress(f"pushing consent to {cfg.devices} devices (retained)")
            for d in ids:
                push(d, True)

            # Devices and workers.
            n_threads = min(cfg.threads, cfg.devices)
            workers = [Worker(str(i), 1.0 / cfg.rate_hz, cfg.samples) for i in range(n_threads)]
            trust = signer.public_key
            persistent = True
            for i, d in enumerate(ids):
                w = workers[i % n_threads]
                cert, key = dev_files[d]
                client = make_client(d, protocol, client_context(ca, cert, key), persistent)
                dev = SimDevice(d, load_private_key(key), trust, w, client)
                if engine == "nats-cluster":  # spread over the nodes; each device knows all of them
                    eps = [("localhost", p) for _h, p in broker.endpoints]
                    dev.endpoints = eps[i % len(eps):] + eps[:i % len(eps)]
                    dev.replay_window = cfg.replay_window_s
                w.devices.append(dev)
            setup_s = time.monotonic() - t_setup
            self.progress(f"connecting {cfg.devices} devices with {n_threads} threads")
            t_conn = time.monotonic()
            for w in workers:
                w.connect_args = (host, port, protocol, persistent)
                w.thread.start()
            def stop_workers() -> None:
                for w in workers:
                    w.stop.set()

            closers.append(stop_workers)
            all_devs = [dev for w in workers for dev in w.devices]
            deadline = time.monotonic() + cfg.connect_timeout_s
            while time.monotonic() < deadline:
                ready = sum(1 for dev in all_devs if dev.connected and dev.ver >= 1)
                if ready == cfg.devices:
                    break
                time.sleep(0.1)
            connect_s = time.monotonic() - t_conn
            ready = sum(1 for dev in all_devs if dev.connected and dev.ver >= 1)
            self.progress(f"{ready}/{cfg.devices} devices connected with consent in {connect_s:.1f} s; "
                          f"running {cfg.duration_s:g} s at {cfg.rate_hz:g} Hz")

            # Measured run.
            with cloud.lock:
                cloud.measuring = True
                receipts_before = len(cloud.receipts)
            base_sent = {(dev.id, g): dev.seq.get(g, 0) for dev in all_devs for g in dev.seq}
            for w in workers:
                w.publishing.set()
            t0 = time.monotonic()
            wall0 = time.time()
            rng = random.Random(1)
            churn_events: list[tuple[str, str, int]] = []
            next_churn = t0 + (1.0 / cfg.churn_hz if cfg.churn_hz else cfg.duration_s + 1)
            failure: dict[str, Any] | None = None
            while time.monotonic() - t0 < cfg.duration_s:
                now = time.monotonic()
                if kill_node is not None and cfg.kill_at_s is not None:
                    if failure is None and now - t0 >= cfg.kill_at_s:
                        on_node = sum(1 for dev in all_devs if dev.connected and dev.endpoints
                                      and dev.endpoints[dev.endpoint_index][1] == broker.endpoints[kill_node][1])
                        broker.kill(kill_node)
                        failure = {"node": broker.nodes[kill_node].server_name, "role": cfg.kill_role,
                                   "killed_at_s": round(now - t0, 1), "devices_on_node": on_node}
                        self.progress(f"killed {failure['node']} ({cfg.kill_role} of the telemetry stream) "
                                      f"with {on_node} devices on it")
                    elif failure is not None and "restarted_at_s" not in failure \
                            and now - t0 >= cfg.kill_at_s + cfg.down_s:
                        broker.start_node(kill_node)
                        failure["restarted_at_s"] = round(time.monotonic() - t0, 1)
                        self.progress(f"restarted {failure['node']}")
                if cfg.churn_hz and now >= next_churn:
                    next_churn += 1.0 / cfg.churn_hz
                    # Alternate: revoke a granted device, then grant a new grant to a revoked one.
                    revoking = len(churn_events) % 2 == 0 or all(active.values())
                    pool = [x for x in ids if active[x] == revoking] or ids
                    d = rng.choice(pool)
                    vers[d] += 1
                    if active[d]:
                        active[d] = False
                        churn_events.append(("revoke", d, vers[d]))
                        push(d, False)
                    else:
                        active[d] = True
                        grant_no[d] += 1
                        churn_events.append(("grant", d, vers[d]))
                        push(d, True)
                time.sleep(min(0.01, max(0.0, next_churn - time.monotonic())) if cfg.churn_hz else 0.05)
            for w in workers:
                w.publishing.clear()
            run_s = time.monotonic() - t0
            acked_run = sum(w.stats["acked"] for w in workers)
            # Drain: wait until the consumer has everything the broker acknowledged (or drain_s passes).
            sent_streams = {(dev.id, g): (base_sent.get((dev.id, g), 0), dev.seq[g]) for dev in all_devs
                            for g in dev.seq}
            expected = sum(hi - lo for lo, hi in sent_streams.values())
            end = time.monotonic() + cfg.drain_s
            js_state: dict[str, Any] | None = None
            next_state = time.monotonic() + 1.0
            revoked = sum(1 for e in churn_events if e[0] == "revoke")
            relay_counts: list[dict[str, Any]] | None = None  # set when the relays were stopped
            while time.monotonic() < end:
                with cloud.lock:
                    got = cloud.delivered
                    erasures = len({(d, c.get("grant"), c.get("ver")) for d, c, _a in cloud.receipts[receipts_before:]
                                    if c.get("typ") == ReceiptType.ERASURE})  # distinct: a receipt may come twice
                if got >= expected and erasures >= revoked:  # data and the erasure receipts of the run
                    break
                if group is not None and time.monotonic() >= next_state:
                    # The durable consumer has handed out everything the stream holds and every worker has
                    # acknowledged it: what is still missing never reached the stream (lost, not late).
                    next_state = time.monotonic() + 1.0
                    js_state = _js_state_of(broker, ca, cloud_cert, cloud_key)
                    # Devices quiet too: nothing in flight, no replay pass still due.
                    quiet = all(not dev.mids and not dev.receipt_mids and dev.replay_again is None
                                for dev in all_devs)
                    if js_state.get("num_pending") == 0 and js_state.get("num_ack_pending") == 0 \
                            and erasures >= revoked and quiet:
                        if relay_counts is None:
                            # Devices are quiet: the relays store what they still hold and exit; then the
                            # consumer must be empty once more.
                            relay_counts = group.stop_relays(max(5.0, end - time.monotonic()))
                            next_state = time.monotonic()
                            continue
                        time.sleep(0.5)
                        group.read_once()
                        break
                time.sleep(0.05)
            time.sleep(0.2)
            if group is not None:
                if relay_counts is None:
                    relay_counts = group.stop_relays(10.0)
                group.read_once()
                js_state = _js_state_of(broker, ca, cloud_cert, cloud_key)
            wall1 = time.time()

            # Results.
            with cloud.lock:
                delivered, dbytes, lat = cloud.delivered, cloud.delivered_bytes, list(cloud.latencies)
                seen = {k: set(v) for k, v in cloud.seen.items()}
                receipts = list(cloud.receipts[receipts_before:])
                dups, undec, bad = cloud.duplicates, cloud.undecryptable, cloud.bad_receipts
            lost = 0
            for (d, g), (lo, hi) in sent_streams.items():
                s = {n for _epoch, n in seen.get((d, g), set())}  # one epoch per simulated device
                lost += sum(1 for n in range(lo + 1, hi + 1) if n not in s)
            rev_lat, grant_lat = [], []
            counted: set[tuple[str, str, str, int]] = set()  # a receipt sent again after a failover counts once
            for d, claims, arrived in receipts:
                at = pushed_at.get((d, int(claims.get("ver", -1))))
                receipt_key = (d, str(claims.get("typ")), str(claims.get("grant", "")), int(claims.get("ver", -1)))
                if at is None or receipt_key in counted:
                    continue
                counted.add(receipt_key)
                if claims.get("typ") == ReceiptType.ERASURE:
                    rev_lat.append(arrived - at)
                elif claims.get("typ") == ReceiptType.CONSENT_APPLIED and (d, int(claims["ver"])) in {
                        (e[1], e[2]) for e in churn_events if e[0] == "grant"}:
                    grant_lat.append(arrived - at)
            revokes = sum(1 for e in churn_events if e[0] == "revoke")
            # A grant pushed while its device was away and revoked again before it came back was never in force
            # there (the retained consent holds only the newest document): nothing to erase, no receipt owed.
            applied = {(d, int(c["ver"])) for d, c, _a in receipts if c.get("typ") == ReceiptType.CONSENT_APPLIED}
            granted = {(e[1], e[2]) for e in churn_events if e[0] == "grant"}
            never_in_force = sum(1 for e in churn_events if e[0] == "revoke" and (e[1], e[2] - 1) in granted
                                 and (e[1], e[2] - 1) not in applied)
            report = {
                "broker": engine if broker is None else f"{engine} (private, 127.0.0.1, mTLS)",
                "protocol": f"MQTT {protocol}",
                "devices": cfg.devices,
                "devices_ready": ready,
                "threads": n_threads,
                "rate_hz": cfg.rate_hz,
                "duration_s": round(run_s, 2),
                "churn_hz": cfg.churn_hz,
                "nofile": nofile[0],
                "setup_s": round(setup_s, 2),
                "enrollment": enrollment,
                "connect_s": round(connect_s, 2),
                "offered_msgs_per_s": round(cfg.devices * cfg.rate_hz, 1),
                "ingress_msgs_per_s": round(acked_run / run_s, 1),
                "egress_msgs_per_s": round(delivered / max(run_s, wall1 - wall0 - 0.2), 1),
                "egress_kib_per_s": round(dbytes / 1024 / max(run_s, wall1 - wall0 - 0.2), 1),
                "batches_sent": expected,
                "batches_delivered": delivered,
                "lost": lost,
                "loss_pct": round(100.0 * lost / expected, 3) if expected else 0.0,
                "duplicates": dups,
                "undecryptable": undec,
                "bad_receipts": bad,
                "e2e_latency_ms": _pct(lat),
                "revocations": revokes,
                "revocations_owing_a_receipt": revokes - never_in_force,
                "revocation_to_receipt_ms": _pct(rev_lat),
                "grant_to_applied_ms": _pct(grant_lat),
                "device_disconnects": sum(dev.disconnects for dev in all_devs),
                "device_failovers": sum(dev.failovers for dev in all_devs),
                "consent_subscribe_refused": sum(dev.subscribe_refused for dev in all_devs),
                # documents the agent's verifier refused, by reason (none expected: the fleet signs only valid ones)
                "consent_rejected": dict(sum((dev.rejected for dev in all_devs), collections.Counter())),
                "envelope_version": SENT_VERSION,
                "consumers": cfg.consumers if group is not None else 1,
                "consumer_kind": "durable JetStream consumer (vgw cloud listen --nats processes)"
                if group is not None else "one MQTT subscriber (in process)",
                "failure": failure,
                "jetstream": js_state,
                "relays": relay_counts or [],
                "connect_failures": sum(w.stats["connect_failures"] for w in workers),
                "replayed": sum(w.stats["replayed"] for w in workers),  # README "Replay after failover"
            }
            return report
        finally:
            for close in reversed(closers):
                try:
                    close()
                except Exception:
                    log.debug("fleet teardown step failed", exc_info=True)
            for w in locals().get("workers", []):
                w.thread.join(10)
            shutil.rmtree(tmp, ignore_errors=True)

    def _enroll(self, tmp: Path, pki: TestPKI, claim: CertPaths, ids: list[str], host: str, port: int,
                protocol: str) -> tuple[dict[str, tuple[Path, Path]], dict[str, Any]]:
        """Every device enrolls through a real `vgw cloud enroll serve` (README "Enrollment"); returns the enrolled
        pairs and the "enrollment" part of the report."""
        cfg = self.cfg
        tokens = {d: secrets.token_urlsafe(16) for d in ids}
        allow = tmp / "allow.toml"
        allow.write_text("".join(f'[[device]]\nid = "{d}"\ntoken = "{t}"\n' for d, t in tokens.items()))
        service = EnrollService(["--broker", f"{host}:{port}", "--ca", str(pki.ca.cert), "--cert", str(pki.cloud.cert),
                                 "--tls-key", str(pki.cloud.key), "--ca-cert", str(pki.ca.cert), "--ca-key",
                                 str(pki.ca.key), "--allow", str(allow), "--ledger", str(tmp / "ledger.jsonl"),
                                 "--days", "30"], self.progress)
        try:
            service.wait_ready()
            self.progress(f"enrolling {len(ids)} devices through vgw cloud enroll ({cfg.threads} lanes)")
            report = enroll_fleet(tokens, host=host, port=port, protocol=protocol, ca=pki.ca.cert,
                                  claim_cert=claim.cert, claim_key=claim.key, out=tmp / "enrolled", lanes=cfg.threads,
                                  timeout_s=cfg.enroll_timeout_s)
        finally:
            summary = service.close()
        out = {"devices": len(ids), "enrolled": report.enrolled, "refused": report.refused,
               "no_answer": report.no_answer, "refusal_reasons": report.reasons,
               "time_to_all_s": None if report.time_to_all_s is None else round(report.time_to_all_s, 2),
               "per_device_ms": _pct(report.latencies), "resent": report.resent,
               "connect_failures": report.connect_failures, "service": summary}
        self.progress(f"enrolled {report.enrolled}/{len(ids)} (refused {report.refused}, no answer {report.no_answer})"
                      + (f" in {report.time_to_all_s:.1f} s" if report.time_to_all_s is not None else ""))
        files = {d: (tmp / "enrolled" / f"{d}.crt", tmp / "enrolled" / f"{d}.key") for d in ids
                 if (tmp / "enrolled" / f"{d}.crt").exists()}
        return files, out


def _js_state_of(broker: Any, ca: Path, cert: Path, key: Path) -> dict[str, Any]:
    from vgw.cloud.jetstream import NatsOptions, consumer_state

    try:
        return consumer_state(NatsOptions(tuple(broker.nats_urls), ca, cert, key), timeout=5)
    except UplinkError as exc:
        return {"error": str(exc)}


def format_report(r: dict[str, Any]) -> str:
    """The report as a few human-readable lines."""
    def lat(d: dict[str, Any]) -> str:
        if not d.get("n"):
            return "n/a"
        return f"p50 {d['p50']} ms, p90 {d['p90']} ms, p99 {d['p99']} ms, max {d['max']} ms (n={d['n']})"

    e = r.get("enrollment")
    enrollment = [] if not e else [
        f"  enrollment: {e['enrolled']}/{e['devices']} enrolled through vgw cloud enroll in {e['time_to_all_s']} s, "
        f"refused {e['refused']}, no answer {e['no_answer']}; per device (connect -> certificate checked) "
        f"p50 {e['per_device_ms']['p50']} ms, p99 {e['per_device_ms']['p99']} ms, max {e['per_device_ms']['max']} ms"]
    return "\n".join([
        f"fleet: {r['devices_ready']}/{r['devices']} devices on {r['broker']} ({r['protocol']}), "
        f"{r['threads']} threads, {r['rate_hz']:g} Hz, {r['duration_s']:g} s",
        *enrollment,
        f"  setup {r['setup_s']} s, connect+consent {r['connect_s']} s, RLIMIT_NOFILE {r['nofile']}",
        f"  throughput: offered {r['offered_msgs_per_s']} msg/s, broker ingress (PUBACKed) "
        f"{r['ingress_msgs_per_s']} msg/s, egress to consumer {r['egress_msgs_per_s']} msg/s "
        f"({r['egress_kib_per_s']} KiB/s)",
        f"  end-to-end latency: {lat(r['e2e_latency_ms'])}",
        f"  revocation -> erasure receipt: {lat(r['revocation_to_receipt_ms'])} ({r['revocations']} revocations)",
        f"  grant -> consent-applied: {lat(r['grant_to_applied_ms'])}",
        *([f"  failure: {r['failure']['node']} ({r['failure']['role']} of the telemetry stream) killed at "
           f"{r['failure']['killed_at_s']} s with {r['failure']['devices_on_node']} devices on it, restarted at "
           f"{r['failure'].get('restarted_at_s', '-')} s; device failovers {r['device_failovers']}"]
          if r.get("failure") else []),
        f"  cloud side: {r.get('consumers', 1)} x {r.get('consumer_kind', 'MQTT subscriber')}",
        f"  loss: {r['lost']}/{r['batches_sent']} ({r['loss_pct']} %), duplicates {r['duplicates']}, "
        f"undecryptable {r['undecryptable']}, bad receipts {r['bad_receipts']}, "
        f"disconnects {r['device_disconnects']}, connect failures {r['connect_failures']}",
    ])
