"""The simulated devices of :mod:`vgw_sim.fleet` and the worker threads that drive them.

A :class:`SimDevice` is a device's protocol logic (README "Consent document", "Telemetry envelope", "Receipts")
around a paho client it does not run itself; a :class:`Worker` owns a slice of the fleet and drives all of
its clients from one :mod:`selectors` loop (``loop_read`` / ``loop_write`` / ``loop_misc`` plus paho's
write-interest hooks), publishing each device's batches on its own schedule.

A simulated device speaks the contract through the agent's own code, never a copy of it: consent documents are
judged by the agent's verifier (:func:`vgw.contract.consent.verifier.verify_consent`, every rule: signature, type, this
device, rising version and the highest version accepted, validity window, scopes, recipients), batches are
version 2 plaintexts sealed by :mod:`vgw.contract.envelope`, receipts are signed by
:class:`vgw.contract.receipts.ReceiptSigner`, and topics, receipt types, the replay after a failover and the consent
subscription's backoff come from :mod:`vgw.contract`. What it leaves out is storage: no outbox (a batch is sealed
and published at once, kept in memory for the replay window only), no audit log (its receipts carry no ``audit``
anchor), and a rejected document is counted, not answered with a ``consent-rejected`` receipt.
"""

from __future__ import annotations

import collections
import heapq
import logging
import random
import secrets
import selectors
import ssl
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from vgw.base.errors import ConsentError
from vgw.cloud.mqttclient import make_client
from vgw.contract.backoff import Resubscribe
from vgw.contract.consent.model import Consent
from vgw.contract.consent.verifier import verify_consent
from vgw.contract.envelope import RecipientKey, columnar_plaintext, load_recipient_key, seal, to_us
from vgw.contract.receipt_types import ErasureReason, ReceiptType
from vgw.contract.receipts import ReceiptSigner
from vgw.contract.replay import second_pass_delay
from vgw.contract.topics import PREFIX, consent_topic, data_topic, receipt_topic

log = logging.getLogger("vgw.fleet")

__all__ = ["PREFIX", "SimDevice", "Worker", "connect_client", "make_client"]

_PATHS = ("Vehicle.Speed", "Vehicle.TraveledDistance", "Vehicle.Powertrain.FuelSystem.RelativeLevel",
          "Vehicle.Cabin.HVAC.AmbientAirTemperature", "Vehicle.Powertrain.CombustionEngine.Speed")


def connect_client(c: mqtt.Client, host: str, port: int, protocol: str, persistent: bool) -> None:
    if protocol == "5":
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600 if persistent else 0
        c.connect(host, port, keepalive=60, clean_start=not persistent, properties=props)
    else:
        c.connect(host, port, keepalive=60)


# ---------------------------------------------------------------- one simulated device


class SimDevice:
    """A device's protocol logic; its paho client is driven by the worker that owns it (that thread owns every
    attribute; the fleet's main thread only reads counters and flags)."""

    def __init__(self, device_id: str, key: ec.EllipticCurvePrivateKey, trust: ed25519.Ed25519PublicKey,
                 worker: Worker, client: mqtt.Client) -> None:
        self.id = device_id
        self.signer = ReceiptSigner(device_id, key)
        self.trust = (trust,)
        self.worker = worker
        self.client = client
        self.consent: Consent | None = None  # the document in force, as the verifier returned it
        self.ver = 0  # the highest version accepted (the verifier's floor: no rollback past it)
        self.grants: dict[str, tuple[str, RecipientKey]] = {}  # grant id -> (KEM, HPKE recipient key)
        self.seq: dict[str, int] = {}
        self.epoch = secrets.token_hex(8)  # the simulated outbox's epoch (README "Telemetry envelope")
        self.acked: dict[str, int] = {}
        self.mids: dict[int, tuple[str, int, bytes]] = {}
        # Replay after failover (README "Replay after failover"), as the agent does it: PUBACKed envelopes kept
        # replay_window seconds, re-published at a reconnect and once more (vgw.contract.replay) later.
        self.replay_window = 0.0
        self.kept: collections.deque[tuple[float, str, bytes]] = collections.deque()  # (monotonic acked, grant, env)
        self.replay_again: tuple[float, float] | None = None  # (monotonic due, acked since)
        # Receipts, as the agent keeps them in its outbox: sent again after a reconnect until PUBACKed, and
        # (with a replay window) kept that long after it, like envelopes.
        self.receipt_mids: dict[int, str] = {}  # mid -> receipt not yet acknowledged
        self.kept_receipts: collections.deque[tuple[float, str]] = collections.deque()  # (monotonic acked, token)
        self.ever_connected = False
        self.connected = False
        # Every node of the cluster, this device's first; after a lost connection it tries the next
        # (like the agent's [mqtt] hosts). Empty: the worker's single broker.
        self.endpoints: list[tuple[str, int]] = []
        self.endpoint_index = 0
        self.retry_at = 0.0
        self.failovers = 0
        self.disconnects = 0
        self.rejected: collections.Counter[str] = collections.Counter()  # verifier reason -> documents
        # A refused consent subscription (a loaded NATS cluster cannot always create its consumer in time) is
        # asked for again, backing off, by the agent's rule (vgw.contract.backoff).
        self.sub_mid: int | None = None
        self.resubscribe = Resubscribe()
        self.subscribe_refused = 0
        self.rng = random.Random(device_id)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_register_write = lambda c, u, s: worker.want_write(self, True)
        client.on_socket_unregister_write = lambda c, u, s: worker.want_write(self, False)

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            return
        self.connected = True
        self.resubscribe = Resubscribe()  # a new connection (maybe another node) starts the backoff afresh
        self.subscribe()
        if self.ever_connected:
            unacked, self.receipt_mids = list(self.receipt_mids.values()), {}
            for token in unacked:
                self._publish_receipt(token)
        if self.ever_connected and self.replay_window > 0:
            now = time.monotonic()
            since = now - self.replay_window
            self._replay(since)
            self.replay_again = (now + second_pass_delay(self.replay_window), since)
        self.ever_connected = True

    def subscribe(self) -> None:
        """Subscribe to this device's consent topic (again)."""
        rc, mid = self.client.subscribe(consent_topic(PREFIX, self.id), 1)
        self.sub_mid = mid if rc == 0 else None
        self.resubscribe.sent(time.monotonic(), queued=self.sub_mid is not None)

    def _on_subscribe(self, c: Any, u: Any, mid: int, reason_codes: Any, props: Any) -> None:
        if mid != self.sub_mid:
            return
        self.sub_mid = None
        if any(getattr(rc, "is_failure", False) for rc in reason_codes):
            self.subscribe_refused += 1
            self.resubscribe.refused(time.monotonic())
        else:
            self.resubscribe.granted()

    def _replay(self, since: float) -> None:
        while self.kept and self.kept[0][0] < time.monotonic() - self.replay_window:
            self.kept.popleft()
        for acked, gid, env in list(self.kept):
            if acked >= since and gid in self.grants:
                self.client.publish(data_topic(PREFIX, self.id, gid), env, qos=1)
                self.worker.stats["replayed"] += 1
        while self.kept_receipts and self.kept_receipts[0][0] < time.monotonic() - self.replay_window:
            self.kept_receipts.popleft()
        for acked, token in list(self.kept_receipts):
            if acked >= since:
                self.client.publish(receipt_topic(PREFIX, self.id), token, qos=1)

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if self.connected:
            self.disconnects += 1
        self.connected = False
        self.worker.forget(self)

    def _on_publish(self, c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        token = self.receipt_mids.pop(mid, None)
        if token is not None and self.replay_window > 0 and not getattr(rc, "is_failure", False):
            self.kept_receipts.append((time.monotonic(), token))
        item = self.mids.pop(mid, None)
        if item is not None and not getattr(rc, "is_failure", False):
            gid, _seq, env = item
            self.acked[gid] = self.acked.get(gid, 0) + 1
            self.worker.stats["acked"] += 1
            if self.replay_window > 0:
                self.kept.append((time.monotonic(), gid, env))

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        if not msg.payload:
            return
        try:
            # README "Consent document": every rule, by the agent's own verifier.
            consent = verify_consent(bytes(msg.payload), trust_keys=self.trust, device=self.id, now=time.time(),
                                     in_force=self.consent, floor_ver=self.ver)
        except ConsentError as exc:
            self.rejected[str(exc.reason)] += 1
            return
        if consent is self.consent:
            return  # the document in force again (a retained copy, a QoS 1 re-delivery)
        new = {g.id: (g.recipient.kem, load_recipient_key(g.recipient.kem, g.recipient.pk)) for g in consent.grants}
        revoked = [gid for gid in self.grants if gid not in new]
        self.consent = consent
        self.ver = max(self.ver, consent.ver)
        self.grants = new
        for gid in new:
            self.seq.setdefault(gid, 0)
        self._receipt(ReceiptType.CONSENT_APPLIED, ver=consent.ver)
        for gid in revoked:
            # What the device still holds of the grant is its kept envelopes (the replay window): gone first.
            deleted = sum(1 for _a, g, _e in self.kept if g == gid)
            if deleted:
                self.kept = collections.deque(k for k in self.kept if k[1] != gid)
            self._receipt(ReceiptType.ERASURE, grant=gid, ver=consent.ver, batches_deleted=deleted,
                          key_destroyed=True, reason=ErasureReason.REVOKED)

    def _receipt(self, typ: ReceiptType, **claims: Any) -> None:
        self._publish_receipt(self.signer.sign(typ, **claims))

    def _publish_receipt(self, token: str) -> None:
        info = self.client.publish(receipt_topic(PREFIX, self.id), token, qos=1)
        self.receipt_mids[info.mid] = token

    def tick(self, n_samples: int) -> int:
        """Publish one batch per grant in force (a version 2 envelope, as the agent sends); returns how many."""
        if not self.connected:
            return 0
        if self.replay_again is not None and time.monotonic() >= self.replay_again[0]:
            self._replay(self.replay_again[1])
            self.replay_again = None
        sent = 0
        now_us = to_us([time.time()])
        for gid, (kem, pk) in self.grants.items():
            self.seq[gid] += 1
            seq = self.seq[gid]
            series: dict[str, tuple[list[int], list[Any]]] = {}
            for i in range(n_samples):
                times, values = series.setdefault(_PATHS[i % len(_PATHS)], ([], []))
                times.append(now_us[0])
                values.append(round(self.rng.uniform(0, 100), 2))
            env = seal(kem, pk, self.id, gid, columnar_plaintext(self.id, gid, seq, series, epoch=self.epoch))
            info = self.client.publish(data_topic(PREFIX, self.id, gid), env, qos=1)
            self.mids[info.mid] = (gid, seq, env)
            sent += 1
        return sent


# ---------------------------------------------------------------- a worker thread (many devices, one selector)


def pump(c: mqtt.Client, mask: int) -> bool:
    """Let paho read and write what the selector said is ready on ``c``'s socket; False once it has closed."""
    if mask & selectors.EVENT_READ:
        c.loop_read()
        sock = c.socket()
        # TLS may hold decrypted bytes the kernel socket no longer signals (paho's loop checks this too).
        while sock is not None and hasattr(sock, "pending") and sock.pending() > 0:
            c.loop_read()
            sock = c.socket()
        if sock is None:
            return False
    if mask & selectors.EVENT_WRITE and c.socket() is not None:
        c.loop_write()
    return True


class ClientSelector:
    """paho clients on one selector, one thread driving them: each socket is read always, and written while paho
    has bytes queued (its register/unregister-write callbacks call :meth:`want_write`). ``data`` is what the
    selector hands back for a socket; it has the ``client``."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.masks: dict[int, int] = {}

    def watch(self, data: Any) -> bool:
        """Put ``data.client``'s socket on the selector. False when it has none (the connect failed)."""
        sock = data.client.socket()
        if sock is None:
            return False
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if data.client.want_write() else 0)
        self.sel.register(sock, mask, data)
        self.masks[sock.fileno()] = mask
        return True

    def want_write(self, data: Any, on: bool) -> None:
        sock = data.client.socket()
        if sock is None:
            return
        fd = sock.fileno()
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        if fd in self.masks and self.masks[fd] != mask:
            self.sel.modify(sock, mask, data)
            self.masks[fd] = mask


class Worker(ClientSelector):
    def __init__(self, name: str, period_s: float, n_samples: int) -> None:
        super().__init__()
        self.name = name
        self.period = period_s
        self.n_samples = n_samples
        self.devices: list[SimDevice] = []
        self.stop = threading.Event()
        self.publishing = threading.Event()
        self.stats = {"sent": 0, "acked": 0, "connect_failures": 0, "replayed": 0}
        self.thread = threading.Thread(target=self._run, name=f"vgw-fleet-{name}", daemon=True)
        self.connect_args: tuple[str, int, str, bool] | None = None

    def forget(self, dev: SimDevice) -> None:
        for key in list(self.sel.get_map().values()):
            if key.data is dev:
                self.sel.unregister(key.fileobj)
                self.masks.pop(key.fd, None)

    def _connect(self, dev: SimDevice) -> bool:
        assert self.connect_args is not None
        host, port, protocol, persistent = self.connect_args
        if dev.endpoints:
            host, port = dev.endpoints[dev.endpoint_index % len(dev.endpoints)]
        try:
            connect_client(dev.client, host, port, protocol, persistent)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.stats["connect_failures"] += 1
            log.debug("%s: connect failed: %s", dev.id, exc)
            return False
        return self.watch(dev)

    def _reconnect_lost(self, now: float) -> None:
        """Devices whose connection dropped try the next endpoint (once a second each); paho re-sends their
        unacknowledged QoS 1 messages on the new connection (persistent session)."""
        for dev in self.devices:
            if dev.connected or dev.client.socket() is not None or now < dev.retry_at:
                continue
            dev.retry_at = now + 1.0
            if dev.endpoints:
                dev.endpoint_index = (dev.endpoint_index + 1) % len(dev.endpoints)
                dev.failovers += 1
            self._connect(dev)

    def _run(self) -> None:
        for dev in self.devices:
            if self.stop.is_set():
                break
            dev.retry_at = time.monotonic() + 5.0
            if self._connect(dev):
                self._poll(0)
        # Publishing schedule: each device at its own phase, so the fleet does not publish in lock-step.
        heap = [(time.monotonic() + random.uniform(0, self.period), i) for i in range(len(self.devices))]
        heapq.heapify(heap)
        last_misc = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            if self.publishing.is_set():
                while heap and heap[0][0] <= now:
                    due, i = heapq.heappop(heap)
                    self.stats["sent"] += self.devices[i].tick(self.n_samples)
                    # Keep the schedule, not "period after we got round to it": lag shows up as latency.
                    heapq.heappush(heap, (max(due + self.period, now - self.period), i))
            else:
                heap = [(max(d, now), i) for d, i in heap]
                heapq.heapify(heap)
            timeout = 0.05 if not heap or not self.publishing.is_set() else min(0.05, max(0.0, heap[0][0] - now))
            self._poll(timeout)
            if now - last_misc >= 1.0:
                last_misc = now
                for dev in self.devices:
                    if dev.client.socket() is not None:
                        dev.client.loop_misc()
                self._reconnect_lost(now)
                for dev in self.devices:
                    if dev.connected and dev.resubscribe.is_due(now):
                        dev.subscribe()
        for dev in self.devices:
            try:
                dev.client.disconnect()
                self._poll(0)
            except Exception:  # best effort at shutdown
                log.debug("%s: disconnect failed", dev.id, exc_info=True)
        self.sel.close()

    def _poll(self, timeout: float) -> None:
        if not self.sel.get_map():
            time.sleep(timeout)
            return
        for key, mask in self.sel.select(timeout):
            dev: SimDevice = key.data
            pump(dev.client, mask)
