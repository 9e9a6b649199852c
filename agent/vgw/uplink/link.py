"""The MQTT uplink: mutual TLS (>= 1.2), QoS 1, persistent session, publish from the outbox, delete on PUBACK.

paho-mqtt is a private detail of this module: callbacks only enqueue. One thread owns the connection: it
connects with jittered exponential backoff (capped), publishes receipts first and then batches oldest first
(bounded in flight and in rate), deletes each outbox row when its PUBACK arrives, and starts over with a new
client after any disconnect, so nothing queued inside paho for a revoked grant can leak out later: the
outbox, not paho, is the only store of unsent data.

Memory is bounded: paho's queue holds at most ``max_inflight`` + a few messages (``max_queued_messages``;
a refused publish is counted in ``queue_full`` and retried from the outbox), the event deque only ever holds
connection events, PUBACKs of the bounded in-flight window and oversized-message notices, and consent
messages go straight to the runtime's bounded intake (vgw.state.consent.intake). No packet larger than
``MAX_PACKET_BYTES`` is ever buffered: MQTT 5 announces it as the Maximum Packet Size in CONNECT, and for
both protocols the TLS socket drops an oversized PUBLISH's payload as it is read (agent.packetguard).

Endpoints (README "Configuration (TOML)"): ``[mqtt] hosts`` names several nodes of one broker cluster. A failed
connection
attempt or a lost connection moves to the next endpoint (in order, wrapping round) under the same backoff;
the persistent session (client id = device id, kept by the cluster) and the outbox are the same on every
node, and TLS checks each node's certificate against that endpoint's host name.

Replay after failover (README "Replay after failover"): a cluster node can PUBACK a message and then lose it
(nats-server 2.9 during a stream leader election). With ``[mqtt] replay_window_s`` > 0 an acknowledged row is
kept that long (:meth:`Outbox.mark_sent` with ``keep``), and every reconnect after the first (with several
endpoints, always to another node) re-publishes the rows acknowledged within the window, oldest first and
before anything newer; receivers drop the copies by (epoch, seq). ``replayed_batches`` counts them. Receipts
are kept the same way (in memory: a receipt is deleted from the outbox on PUBACK as before) and published
again first; a receiver treats a receipt it has seen as the same receipt. ``replayed_receipts`` counts them.

Consent first (README "Topics"): after every (re)connect, stored batches (replays included) wait until the
consent at the broker is known: a consent message that arrived after the granted SUBACK has been judged and
applied by the main thread (``consent_settled``, vgw.state.consent.intake), or ``[mqtt] consent_wait_s`` passed
without one. Status and receipts go first. :class:`ConsentSync` says where a connection stands.

A failed connection attempt is logged once per distinct reason (repeats go to debug and are summed up when
the reason changes or the link comes back), so a broker that stays down or a TLS fault does not flood the
journal.

Topics (README "Topics"), prefix ``vgw``: subscribe ``vgw/<device>/consent`` only (a refused SUBACK is asked
again, backing off from 1 s to 30 s, and counted in ``subscribe_refused``); publish ``.../data/<grant>``,
``.../receipt`` and ``.../status`` (retained, also the last will). The status is published at connect and
again whenever :meth:`Uplink.publish_status` is called (the runtime does on every consent, link or health
change), so the retained copy never describes a consent that is no longer in force.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from vgw.base.config import MqttConfig
from vgw.base.errors import ConfigError, StorageError
from vgw.base.fsutil import MAX_KEY_BYTES, read_small_file
from vgw.contract.consent.verifier import MAX_DOCUMENT_BYTES
from vgw.state.outbox import Outbox
from vgw.uplink.packetguard import guard_context
from vgw.uplink.renewal import Renewal
from vgw.uplink.tlsfailure import describe as describe_tls

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 24 * 3600
# The second replay pass after a failover comes this fraction of the window later (README "Replay after failover").
SECOND_PASS_AFTER = 1 / 3
SUBSCRIBE_RETRY_FIRST_S = 1.0  # a refused consent subscription is asked for again after this, doubling
SUBSCRIBE_RETRY_MAX_S = 30.0
SUBACK_TIMEOUT_S = 30.0  # no answer to the consent SUBSCRIBE this long: subscribe again
QUEUE_SLACK = 8  # paho queue beyond the in-flight window: the status message and the offline status
# The largest packet the agent reads: a consent document at its limit plus room for the fixed header, the
# topic and (MQTT 5) properties. Larger ones are never buffered (see agent.packetguard).
MAX_PACKET_BYTES = MAX_DOCUMENT_BYTES + 1024
UNSUPPORTED_PROTOCOL_VERSION = 0x84  # CONNACK reason code, MQTT 5.0 §3.2.2.2


class ConsentSync(StrEnum):
    """What a connection knows of the consent retained at the broker (``consent_sync`` in `vgw status`)."""

    OFFLINE = "offline"
    WAITING = "waiting"  # connected; stored batches wait
    RETAINED = "retained"  # the retained document was taken
    NONE = "none"  # none came within [mqtt] consent_wait_s of the SUBACK


def tls_context(cfg: MqttConfig, cert_file: Path | None = None, key_file: Path | None = None) -> ssl.SSLContext:
    """Raises ConfigError for a TLS file that is not a regular file of sane size (a FIFO would hang ssl).

    ``cert_file``/``key_file`` replace the config's (a renewed pair being tried, vgw.uplink.renewal)."""
    cert_file = cert_file or cfg.cert_file
    key_file = key_file or cfg.key_file
    for what, path in (("CA file", cfg.ca_file), ("client certificate", cert_file), ("client key", key_file)):
        read_small_file(path, what=what, max_bytes=MAX_KEY_BYTES, error=ConfigError)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


class Uplink:
    def __init__(
        self,
        cfg: MqttConfig,
        device: str,
        outbox: Outbox,
        *,
        on_consent: Callable[[bytes], None],
        status_payload: Callable[[], dict[str, Any]],
        consent_settled: Callable[[], bool] = lambda: True,
        renewal: Renewal | None = None,
    ) -> None:
        self.cfg = cfg
        self.renewal = renewal  # certificate renewal (vgw.uplink.renewal), driven from the connection thread
        self._renew_sub_mid: int | None = None  # SUBACK awaited for the renewal answer topic
        self.device = device
        self.outbox = outbox
        self.on_consent = on_consent
        self.status_payload = status_payload
        self.consent_settled = consent_settled
        base = f"{cfg.topic_prefix}/{device}"
        self.topic_consent = f"{base}/consent"
        self.topic_receipt = f"{base}/receipt"
        self.topic_status = f"{base}/status"
        self.topic_data = f"{base}/data/"
        self.state = "offline"
        self.last_publish: float | None = None
        self.last_error: str | None = None
        self.connects = 0
        self.published_batches = 0
        self.published_receipts = 0
        self.connect_attempts = 0
        self.connect_failures = 0
        self.queue_full = 0
        self.ack_store_failures = 0
        self.oversized_dropped = 0  # inbound PUBLISH packets over MAX_PACKET_BYTES whose payload was dropped
        self.status_published = 0
        self.replayed_batches = 0  # rows acknowledged before a failover, re-published and acknowledged again
        self.replayed_receipts = 0  # the same for receipts
        # (wall time of its PUBACK, token) of each receipt acknowledged within the replay window, oldest first
        self._acked_receipts: collections.deque[tuple[float, str]] = collections.deque()
        self._replay_receipts: list[str] = []  # receipts still to publish again in the running replay pass
        self._replay: tuple[float, int] | None = None  # (acked since, last row id sent) while a replay runs
        self._replay_again: tuple[float, float] | None = None  # (monotonic time, acked since) of the second pass
        self._ever_connected = False
        self.consent_subscribed = False  # the broker granted the consent subscription on this connection
        self.subscribe_refused = 0  # SUBACKs that refused it (each is retried)
        self.consent_sync = ConsentSync.OFFLINE  # what this connection knows of the consent at the broker
        self._consent_msgs = 0  # consent messages handed to the intake (written by paho's thread only)
        self._msgs_at_suback: int | None = None  # that count when the subscription was granted
        self._sync_deadline: float | None = None
        self._sub_mid: int | None = None
        self._sub_delay = SUBSCRIBE_RETRY_FIRST_S
        self._resubscribe_at: float | None = None
        self._last_sweep = 0.0
        self._status_due = threading.Event()
        self._repeats = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._events: collections.deque[tuple[str, Any]] = collections.deque()
        self._client: mqtt.Client | None = None
        # [mqtt] protocol: "5", "3.1.1", or "auto" (MQTT 5 first; see _fall_back_to_311).
        self._protocol = "3.1.1" if cfg.protocol == "3.1.1" else "5"
        self._protocol_settled = cfg.protocol != "auto"
        self._endpoint_index = 0  # into cfg.endpoints; owned by the connection thread

    @property
    def endpoint(self) -> str:
        """``host:port`` of the endpoint in use (or being tried)."""
        host, port = self.cfg.endpoints[self._endpoint_index]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _next_endpoint(self) -> None:
        """After a failed attempt or a lost connection: try the next endpoint of the cluster next time."""
        if len(self.cfg.endpoints) > 1:
            self._endpoint_index = (self._endpoint_index + 1) % len(self.cfg.endpoints)
            log.info("uplink: next endpoint %s", self.endpoint)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vgw-uplink", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """New rows or receipts are waiting."""
        self._wake.set()

    def publish_status(self) -> None:
        """Publish the retained status again (now if connected, else at the next connect)."""
        self._status_due.set()
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self, timeout: float) -> bool:
        """Wait until the outbox holds no batch or receipt (all acknowledged). True if it emptied."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.outbox.stats() and self.outbox.receipt_count() == 0:
                return True
            self._wake.set()
            time.sleep(0.05)
        return False

    # -- the connection thread ----------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.cfg.backoff_min_s
        self._sweep(force=True)  # rows kept by an earlier run (or under a longer window) go now
        while not self._stop.is_set():
            try:
                delay = self._cycle(delay)
            except Exception:  # the uplink must outlive any single failure: log it, back off, go on
                log.exception("uplink: unexpected error; reconnecting")
                self.state = "offline"
                self._stop.wait(delay)
                delay = min(self.cfg.backoff_max_s, delay * 2)
        self.state = "offline"

    def _cycle(self, delay: float) -> float:
        """One connection: connect (or back off), serve until it drops. Returns the next backoff."""
        client = self._connect()
        if client is None:
            if self.renewal is not None:
                self.renewal.connect_failed()  # a renewed pair the broker refuses is dropped; the old one stays
            self._next_endpoint()
            # Full jitter (AWS architecture blog): spreads a fleet's reconnects after a broker outage.
            deadline = time.monotonic() + random.uniform(self.cfg.backoff_min_s, delay)
            while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
                self._stop.wait(min(left, 1.0))
                self._sweep()  # the replay window holds while offline too (docs/privacy.md)
            return min(self.cfg.backoff_max_s, delay * 2)
        try:
            self._serve(client)
        finally:
            self._teardown(client)
        if not self._stop.is_set():
            self._next_endpoint()  # this node dropped us: another node of the cluster may be up
        return self.cfg.backoff_min_s

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.device,
            protocol=mqtt.MQTTv5 if self._protocol == "5" else mqtt.MQTTv311,
            # MQTT 3.1.1 has no session expiry: clean_session=False keeps the session (and the QoS 1
            # subscription to the consent topic) for as long as the broker keeps it.
            clean_session=None if self._protocol == "5" else False,
        )
        ctx = tls_context(self.cfg, *self.renewal.credentials()) if self.renewal is not None else tls_context(self.cfg)
        guard_context(ctx, MAX_PACKET_BYTES, mqtt5=self._protocol == "5",
                      on_drop=lambda size: self._events.append(("oversized", size)),
                      on_tls_error=lambda exc: self._events.append(("tls", exc)))
        client.tls_set_context(ctx)
        client.max_inflight_messages_set(self.cfg.max_inflight)
        # 0 would mean "unbounded" to paho; we never hand it more than the window, so this only guards bugs.
        client.max_queued_messages_set(self.cfg.max_inflight + QUEUE_SLACK)
        client.will_set(self.topic_status, json.dumps({"state": "offline", "device": self.device}), qos=1,
                        retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect(self) -> mqtt.Client | None:
        self.state = "connecting"
        self.connect_attempts += 1
        self._events.clear()
        host, port = self.cfg.endpoints[self._endpoint_index]
        try:
            client = self._new_client()
            if self._protocol == "5":
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = SESSION_EXPIRY_S
                # MQTT 5.0 §3.1.2.11.4: the broker must not send us a larger packet (it discards it instead).
                props.MaximumPacketSize = MAX_PACKET_BYTES
                client.connect(host, port, keepalive=self.cfg.keepalive_s, clean_start=False, properties=props)
            else:
                client.connect(host, port, keepalive=self.cfg.keepalive_s)
        except ConfigError as exc:  # a TLS file that is not a regular file of sane size (tls_context)
            self._fail(str(exc))
            return None
        except ssl.SSLCertVerificationError as exc:
            self._fail(f"TLS certificate rejected: {describe_tls(exc)}")
            return None
        except ssl.SSLError as exc:
            # An alert the socket saw while paho wrote CONNECT names the failure better than the EOF it raised.
            seen = [value for kind, value in self._events if kind == "tls"]
            self._fail(describe_tls(seen[-1] if seen else exc))
            return None
        except (OSError, ValueError) as exc:
            self._fail(f"cannot reach broker {self.endpoint}: {exc}")
            return None
        client.loop_start()
        deadline = time.monotonic() + 10
        tls_error: ssl.SSLError | None = None
        while time.monotonic() < deadline and not self._stop.is_set():
            while self._events:
                kind, value = self._events.popleft()
                if kind == "connected":
                    self._protocol_settled = True
                    self._after_connect(client)
                    return client
                if kind == "tls":
                    tls_error = value  # the disconnect that follows is this alert, not an MQTT answer
                    continue
                if kind in ("refused", "disconnected") and tls_error is not None:
                    self._fail(describe_tls(tls_error))
                    self._teardown(client)
                    return None
                if kind in ("refused", "disconnected") and self._fall_back_to_311(kind, value):
                    self._teardown(client)
                    return self._connect()  # at most once: the fallback happens once per process
                if kind in ("refused", "disconnected"):
                    self._fail(f"broker refused the connection: {value}")
                    self._teardown(client)
                    return None
            time.sleep(0.02)
        self._fail("broker did not answer CONNECT in time")
        self._teardown(client)
        return None

    def _fail(self, reason: str) -> None:
        self.state = "offline"
        self.connect_failures += 1
        if reason != self.last_error:
            self._flush_repeats()
            log.warning("uplink: %s (retrying with backoff up to %g s; data stay in the outbox)", reason,
                        self.cfg.backoff_max_s)
        else:
            self._repeats += 1
            log.debug("uplink: %s", reason)
        self.last_error = reason

    def _fall_back_to_311(self, kind: str, reason: Any) -> bool:
        """``auto`` only, before any successful CONNECT: switch to MQTT 3.1.1 for the rest of the process.

        A 3.1.1-only broker (the NATS server's MQTT support, for one) answers an MQTT 5 CONNECT with CONNACK
        0x84 "Unsupported Protocol Version" (MQTT 5.0 §3.2.2.2; a 3.1.1 broker's return code 1, which paho
        reports as the same reason code) or just closes the connection before any CONNACK. A TLS alert is never
        taken for either (the caller sees it first). Once a CONNECT has succeeded the choice is settled, so a
        later outage is never mistaken for a protocol refusal.
        """
        if self._protocol_settled or self._protocol != "5":
            return False
        if kind == "refused" and getattr(reason, "value", None) != UNSUPPORTED_PROTOCOL_VERSION:
            return False  # refused for another reason (not authorised, bad client id ...): not a version issue
        self._protocol = "3.1.1"
        self._protocol_settled = True
        log.warning("uplink: broker %s refused MQTT 5 (%s); using MQTT 3.1.1 with clean_session=False for "
                    "the rest of this process", self.endpoint, reason)
        return True

    def _flush_repeats(self) -> None:
        if self._repeats:
            log.info("uplink: previous failure repeated %d more time(s)", self._repeats)
            self._repeats = 0

    def _after_connect(self, client: mqtt.Client) -> None:
        self.state = "connected"
        self.connects += 1
        self._flush_repeats()
        self.last_error = None
        log.info("uplink connected to %s", self.endpoint)
        window = self.cfg.replay_window
        if self._ever_connected and window > 0:
            # The node we left may have acknowledged rows it then lost: send what it acked within the window again.
            # The cluster may still be electing the leader the dead node held, and the new node acknowledges
            # and loses the same way meanwhile (the replay included), so a second pass follows a third of the
            # window later and sends everything acknowledged since the first pass's start once more.
            since = time.time() - window
            self._start_replay(since)
            self._replay_again = (time.monotonic() + window * SECOND_PASS_AFTER, since)
        self._ever_connected = True
        self._renew_sub_mid = None
        if self.renewal is not None:
            self.renewal.connected()  # connected with a renewed pair: swap it in now
        self.consent_sync = ConsentSync.WAITING
        self._msgs_at_suback = None
        self._sync_deadline = None
        self._sub_delay = SUBSCRIBE_RETRY_FIRST_S  # a new connection (maybe another node) starts afresh
        self._subscribe(client)
        self._status_due.clear()
        self._send_status(client)

    def _subscribe(self, client: mqtt.Client) -> None:
        """Subscribe to the consent topic; the SUBACK is checked in :meth:`_serve` (a refusal is retried)."""
        rc, mid = client.subscribe(self.topic_consent, qos=1)
        self._sub_mid = mid if rc == mqtt.MQTT_ERR_SUCCESS else None
        self.consent_subscribed = False
        # Asked again if no SUBACK comes (or the subscribe could not even be queued).
        self._resubscribe_at = time.monotonic() + (SUBACK_TIMEOUT_S if self._sub_mid is not None
                                                   else self._sub_delay)

    def _suback(self, mid: int, refused: str | None, msgs: int = 0) -> None:
        if mid != self._sub_mid:
            return
        self._sub_mid = None
        self._resubscribe_at = None
        if refused is None:
            self.consent_subscribed = True
            # The broker sends the retained document after this SUBACK; without one, stored batches wait at most
            # [mqtt] consent_wait_s (MQTT has no "nothing retained" answer).
            if self._msgs_at_suback is None:
                self._msgs_at_suback = msgs
                self._sync_deadline = time.monotonic() + self.cfg.consent_wait_s
            if self._sub_delay > SUBSCRIBE_RETRY_FIRST_S:
                log.info("uplink: subscribed to the consent topic after %d refusal(s)", self.subscribe_refused)
            self._sub_delay = SUBSCRIBE_RETRY_FIRST_S
            return
        # A cluster node that cannot create the subscription's state in time (nats-server under load: "Unable
        # to add JetStream consumer") refuses it; without the subscription no consent change would reach us on
        # this connection, a revocation included, so ask again, backing off.
        self.subscribe_refused += 1
        log.warning("uplink: %s refused the consent subscription (%s); retrying in %g s", self.endpoint, refused,
                    self._sub_delay)
        self._resubscribe_at = time.monotonic() + self._sub_delay
        self._sub_delay = min(self._sub_delay * 2, SUBSCRIBE_RETRY_MAX_S)

    def _send_status(self, client: mqtt.Client) -> None:
        status = {"state": "online", **self.status_payload()}
        info = client.publish(self.topic_status, json.dumps(status), qos=1, retain=True)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self.status_published += 1
        else:
            self._status_due.set()  # paho's queue is full: try again on the next turn

    def _teardown(self, client: mqtt.Client) -> None:
        try:
            client.disconnect()
        except Exception:  # paho raises various errors on a dead socket
            log.debug("disconnect failed", exc_info=True)
        try:
            client.loop_stop()
        except Exception:
            log.debug("loop_stop failed", exc_info=True)
        if self.state == "connected":
            self.state = "offline"
        self.consent_sync = ConsentSync.OFFLINE

    def _serve(self, client: mqtt.Client) -> None:
        inflight: dict[int, tuple[str, Any]] = {}
        tls_error: ssl.SSLError | None = None
        tokens = float(self.cfg.max_inflight)
        last_refill = time.monotonic()
        while not self._stop.is_set():
            # 1. events from paho's thread; acknowledged batches are deleted together, in one transaction
            acked: list[tuple[str, Any]] = []
            while self._events:
                kind, value = self._events.popleft()
                if kind == "puback":
                    mid, ok = value
                    item = inflight.pop(mid, None)
                    if item is None:
                        continue
                    if ok:
                        acked.append(item)
                elif kind == "tls":
                    tls_error = value
                elif kind == "disconnected":
                    self._fail(f"connection lost: {describe_tls(tls_error) if tls_error is not None else value}")
                    if self.renewal is not None:
                        self.renewal.connection_lost()
                    return
                elif kind == "cert":
                    if self.renewal is not None and self.renewal.answer(value):
                        return  # a renewed pair is staged: reconnect with it (the old one stays until it connects)
                elif kind == "oversized":
                    self._oversized(value)
                elif kind == "suback" and value[0] == self._renew_sub_mid:
                    self._renew_suback(client, value[1])
                elif kind == "suback":
                    self._suback(*value)
            if acked:
                self._acked(acked)
            if self._status_due.is_set():
                self._status_due.clear()
                self._send_status(client)
            if self._resubscribe_at is not None and time.monotonic() >= self._resubscribe_at:
                self._resubscribe_at = None
                self._subscribe(client)
            self._sweep()
            if self.renewal is not None:
                self._renew_step(client)
            self._check_consent_sync()
            again = self._replay_again
            if again is not None and self._replay is None and time.monotonic() >= again[0]:
                self._start_replay(again[1])
                self._replay_again = None
            # 2. publish what is waiting, within the in-flight window and the drain rate
            now = time.monotonic()
            tokens = min(float(self.cfg.max_inflight), tokens + (now - last_refill) * self.cfg.drain_rate)
            last_refill = now
            room = min(self.cfg.max_inflight - len(inflight), int(tokens))
            if room > 0:
                sent = self._publish_some(client, inflight, room)
                tokens -= sent
            self._wake.wait(0.02)
            self._wake.clear()

    def _renew_step(self, client: mqtt.Client) -> None:
        """Renewal (vgw.uplink.renewal): subscribe to the answer topic, then publish the request once it is granted."""
        renewal = self.renewal
        assert renewal is not None
        renewal.tick()
        if self._renew_sub_mid is None and renewal.wants_request():
            rc, mid = client.subscribe(renewal.response_topic, qos=1)
            if rc == mqtt.MQTT_ERR_SUCCESS:
                self._renew_sub_mid = mid

    def _renew_suback(self, client: mqtt.Client, refused: str | None) -> None:
        renewal = self.renewal
        assert renewal is not None
        self._renew_sub_mid = None
        if refused is not None:
            renewal.topic_refused(f"{self.endpoint} refused the subscription to {renewal.response_topic} ({refused})")
            return
        # Subscribed first, then the request (README "Enrollment"): the answer cannot pass us by.
        self._publish(client, renewal.request_topic, renewal.request())

    def _check_consent_sync(self) -> None:
        """Open the gate for stored batches once the consent at the broker is known (README "Topics")."""
        if self.consent_sync != ConsentSync.WAITING or not self.consent_subscribed:
            return
        seen = self._msgs_at_suback is not None and self._consent_msgs > self._msgs_at_suback
        if seen and self.consent_settled():
            self.consent_sync = ConsentSync.RETAINED
        elif self._sync_deadline is not None and time.monotonic() >= self._sync_deadline and self.consent_settled():
            self.consent_sync = ConsentSync.NONE
            log.info("uplink: no consent document retained at %s within %g s; sending stored data", self.endpoint,
                     self.cfg.consent_wait_s)
        else:
            return
        self._wake.set()

    def _start_replay(self, since: float) -> None:
        """A replay pass: rows and receipts acknowledged at or after ``since`` (wall time) go out again."""
        self._replay = (since, 0)
        self._replay_receipts = [token for at, token in self._acked_receipts if at >= since]

    def _oversized(self, size: int) -> None:
        self.oversized_dropped += 1
        if self.oversized_dropped == 1 or self.oversized_dropped % 100 == 0:
            log.warning("uplink: dropped an inbound message of %d bytes (limit %d; %d so far)", size,
                        MAX_PACKET_BYTES, self.oversized_dropped)

    def _sweep(self, *, force: bool = False) -> None:
        """Delete the rows whose replay window has passed (at most once a second)."""
        now = time.monotonic()
        if not force and (self.cfg.replay_window <= 0 or now - self._last_sweep < 1.0):
            return
        self._last_sweep = now
        horizon = time.time() - self.cfg.replay_window
        while self._acked_receipts and self._acked_receipts[0][0] < horizon:
            self._acked_receipts.popleft()
        try:
            self.outbox.sweep_acked(horizon)
        except StorageError as exc:
            log.debug("uplink: replay window sweep failed: %s", exc)

    def _acked(self, items: list[tuple[str, Any]]) -> None:
        now = time.time()
        rows = [value for kind, value in items if kind == "batch"]
        try:
            if rows:
                self.outbox.mark_sent_many(rows, now, keep=self.cfg.replay_window > 0)
                self.published_batches += len(rows)
            for kind, value in items:
                if kind == "replay":
                    # Counted here only: the privacy report counted it as sent at its first PUBACK, and it keeps
                    # that PUBACK's time, so the window still ends when it would have.
                    self.replayed_batches += 1
                elif kind == "replay-receipt":
                    self.replayed_receipts += 1
                elif kind == "receipt":
                    rid, token = value
                    self.outbox.delete_receipt(rid)
                    self.published_receipts += 1
                    if self.cfg.replay_window > 0:
                        self._acked_receipts.append((now, token))
        except StorageError as exc:
            # The rows stay and go out again later: duplicates the receiver drops (README "Telemetry envelope"),
            # never a loss.
            self.ack_store_failures += 1
            if self.ack_store_failures == 1:
                log.error("uplink: acknowledged row not deleted: %s", exc)
        self.last_publish = now

    def _publish(self, client: mqtt.Client, topic: str, payload: bytes | str) -> int | None:
        info = client.publish(topic, payload, qos=1)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self.queue_full += 1
        return info.mid if info.rc == mqtt.MQTT_ERR_SUCCESS else None

    def _publish_some(self, client: mqtt.Client, inflight: dict[int, tuple[str, Any]], room: int) -> int:
        sent = 0
        while self._replay is not None and self._replay_receipts and sent < room:
            mid = self._publish(client, self.topic_receipt, self._replay_receipts[0])
            if mid is None:
                return sent
            inflight[mid] = ("replay-receipt", self._replay_receipts.pop(0))
            sent += 1
        busy_receipts = {v[1][0] for v in inflight.values() if v[0] == "receipt"}
        for rid, token in self.outbox.pending_receipts(room - sent, busy_receipts):
            mid = self._publish(client, self.topic_receipt, token)
            if mid is None:
                return sent
            inflight[mid] = ("receipt", (rid, token))
            sent += 1
        if sent >= room or self.consent_sync not in (ConsentSync.RETAINED, ConsentSync.NONE):
            return sent  # stored batches wait until the consent at the broker is known (README "Topics")
        busy_rows = {v[1].id for v in inflight.values() if v[0] == "batch"}
        # The outbox lock is held across read and publish so a concurrent erasure either happens before
        # (rows gone) or after (already handed to the socket: "already sent").
        with self.outbox.exclusive():
            if self._replay is not None:
                since, after = self._replay
                rows = self.outbox.replayable(since, after, room - sent)
                for row in rows:
                    mid = self._publish(client, self.topic_data + row.grant_id, row.payload)
                    if mid is None:
                        return sent
                    inflight[mid] = ("replay", row)
                    self._replay = (since, row.id)
                    sent += 1
                if sent >= room:
                    return sent  # more may follow: newer rows wait until the replay is done
                log.info("uplink: replayed the rows acknowledged in the last %g s", self.cfg.replay_window)
                self._replay = None
            for row in self.outbox.pending(room - sent, busy_rows):
                mid = self._publish(client, self.topic_data + row.grant_id, row.payload)
                if mid is None:
                    break
                self.outbox.mark_attempted(row.id)  # maybe delivered from now on: never a quota victim
                inflight[mid] = ("batch", row)
                sent += 1
        return sent

    def publish_offline(self) -> None:
        """Best effort on clean shutdown: mark the device offline (the will covers crashes)."""
        client = self._client
        if client is not None and self.state == "connected":
            try:
                client.publish(self.topic_status, json.dumps({"state": "offline", "device": self.device}), qos=1,
                               retain=True).wait_for_publish(2.0)
            except Exception:
                log.debug("offline status not published", exc_info=True)

    # -- paho callbacks (paho's thread: enqueue only) -----------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._events.append(("refused", reason_code))
        else:
            self._client = client
            self._events.append(("connected", None))
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._client = None
        self._events.append(("disconnected", reason_code))
        self._wake.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        ok = not getattr(reason_code, "is_failure", False)
        self._events.append(("puback", (mid, ok)))
        self._wake.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        refused = [str(rc) for rc in reason_codes if getattr(rc, "is_failure", False)]
        self._events.append(("suback", (mid, ", ".join(refused) or None, self._consent_msgs)))
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.topic_consent and message.payload:
            self.on_consent(bytes(message.payload))  # the bounded consent intake (vgw.state.consent.intake)
            self._consent_msgs += 1  # after the intake holds it (see _check_consent_sync); paho's thread only
            self._wake.set()
        elif self.renewal is not None and message.topic == self.renewal.response_topic and message.payload:
            self._events.append(("cert", bytes(message.payload)))
            self._wake.set()
