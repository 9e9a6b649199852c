"""The MQTT uplink: mutual TLS (>= 1.2), QoS 1, persistent session, publish from the outbox, delete on PUBACK.

paho-mqtt is a private detail of this module. The uplink connects with jittered exponential backoff (capped),
publishes receipts first and then batches oldest first (bounded in flight and in rate), deletes each outbox
row when its PUBACK arrives, and starts over with a new client after any disconnect, so nothing queued inside
paho for a revoked grant can leak out later: the outbox, not paho, is the only store of unsent data.

Threads (docs/style.md "One owner per socket"): one thread, ``vgw-uplink``, owns the paho client, its socket
and every field of :class:`Uplink` below. It drives paho itself, as aiomqtt does (vgw.uplink.mqttloop): it waits in
``select`` on the client's socket and on a :class:`~vgw.uplink.mqttloop.Doorbell` (a socketpair), then calls paho's
``loop_read``/``loop_write``/``loop_misc``; paho starts no thread of its own. paho's callbacks therefore run
in the owner, between its steps, and only record what arrived on the connection (:class:`_Link`); the owner
acts on it after the step. Other threads never call the client: the writer and the main loop ring the doorbell
(:meth:`Uplink.wake` for new rows or receipts, :meth:`Uplink.publish_status`, :meth:`Uplink.stop`, which
also has the owner publish the offline status before it disconnects). What they read is :meth:`Uplink.view`,
an immutable :class:`LinkView` the owner replaces whole, so a reader needs no lock and always sees one
consistent state. The consent callback hands each document to the bounded intake (vgw.state.consent.intake) from
the owner thread.

The owner sleeps until a packet arrives, the doorbell rings, or the nearest of its timers is due: the MQTT
keepalive, a reconnect backoff, the consent wait after a SUBACK, a subscription retry, the drain rate, the
second replay pass, the replay-window sweep (while acknowledged rows are kept) and certificate renewal. Idle
and connected it wakes once per keepalive (PINGREQ); ``wakeups`` in the view counts every wake-up.

Memory is bounded: paho's queue holds at most ``max_inflight`` + a few messages (``max_queued_messages``;
a refused publish is counted in ``queue_full`` and retried from the outbox), a connection's records only ever
hold PUBACKs of the bounded in-flight window, SUBACKs and renewal answers, and consent messages go straight
to the runtime's bounded intake. No packet larger than ``MAX_PACKET_BYTES`` is ever buffered: MQTT 5
announces it as the Maximum Packet Size in CONNECT, and for both protocols the TLS socket drops an oversized
PUBLISH's payload as it is read (vgw.uplink.packetguard).

Endpoints (README "Configuration (TOML)"): ``[mqtt] hosts`` names several nodes of one broker cluster. A failed
connection attempt or a lost connection moves to the next endpoint (in order, wrapping round) under the same
backoff; the persistent session (client id = device id, kept by the cluster) and the outbox are the same on
every node, and TLS checks each node's certificate against that endpoint's host name (vgw.transport.tlsctx).
``[mqtt] protocol = "auto"`` tries MQTT 5 and falls back to 3.1.1 for the rest of the process on the answers
vgw.transport.mqttversion names, before any CONNECT has succeeded.

Replay after failover (README "Replay after failover"): a cluster node can PUBACK a message and then lose it
(nats-server 2.9 during a stream leader election). With ``[mqtt] replay_window_s`` > 0 an acknowledged row is
kept that long (:meth:`Outbox.mark_sent` with ``keep``), and every reconnect after the first (with several
endpoints, always to another node) re-publishes the rows acknowledged within the window, oldest first and
before anything newer; receivers drop the copies by (epoch, seq). ``replayed_batches`` counts them. Receipts
are kept the same way (in memory: a receipt is deleted from the outbox on PUBACK as before) and published
again first; a receiver treats a receipt it has seen as the same receipt. ``replayed_receipts`` counts them.

Consent first (README "Topics"): after every (re)connect, stored batches (replays included) wait until the
consent at the broker is known: a consent message that arrived after the granted SUBACK has been judged and
applied by the main thread (``consent_settled``, vgw.state.consent.intake; the main thread rings the doorbell when it
is done), or ``[mqtt] consent_wait_s`` passed without one. Status and receipts go first. :class:`ConsentSync`
says where a connection stands.

A failed connection attempt is logged once per distinct reason (repeats go to debug and are summed up when
the reason changes or the link comes back), so a broker that stays down or a TLS fault does not flood the
journal; a refused client certificate is named by its TLS alert (vgw.uplink.tlsfailure).

Topics (README "Topics"), prefix ``vgw``: subscribe ``vgw/<device>/consent`` only (a refused SUBACK is asked
again, backing off from 1 s to 30 s, and counted in ``subscribe_refused``); publish ``.../data/<grant>``,
``.../receipt`` and ``.../status`` (retained, also the last will). The status is published at connect and
again whenever :meth:`Uplink.publish_status` is called (the runtime does on every consent, link or health
change), so the retained copy never describes a consent that is no longer in force.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from vgw.base.errors import ConfigError, StorageError
from vgw.config.settings import MqttConfig
from vgw.contract.backoff import SUBSCRIBE_RETRY_FIRST_S, Resubscribe
from vgw.contract.consent.verifier import MAX_DOCUMENT_BYTES
from vgw.contract.replay import second_pass_delay
from vgw.contract.topics import consent_topic, data_topic, receipt_topic, status_topic
from vgw.state.outbox import Outbox
from vgw.transport.mqttversion import refuses_mqtt5
from vgw.transport.tlsctx import client_context
from vgw.uplink.mqttloop import ClientLoop, Doorbell
from vgw.uplink.packetguard import guard_context
from vgw.uplink.renewal import Renewal
from vgw.uplink.tlsfailure import describe as describe_tls

__all__ = ["MAX_PACKET_BYTES", "ConsentSync", "LinkView", "Uplink"]

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 24 * 3600
# The second replay pass after a failover comes this fraction of the window later (README "Replay after failover").
CONNACK_TIMEOUT_S = 10.0
OFFLINE_WAIT_S = 2.0  # at stop: how long the offline status may wait for its PUBACK
SETTLE_RECHECK_S = 1.0  # while stored batches wait for the consent: look again at least this often
QUEUE_SLACK = 8  # paho queue beyond the in-flight window: the status message and the offline status
# The largest packet the agent reads: a consent document at its limit plus room for the fixed header, the
# topic and (MQTT 5) properties. Larger ones are never buffered (see vgw.uplink.packetguard).
MAX_PACKET_BYTES = MAX_DOCUMENT_BYTES + 1024


def _endpoint_name(cfg: MqttConfig, index: int) -> str:
    host, port = cfg.endpoints[index]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConsentSync(StrEnum):
    """What a connection knows of the consent retained at the broker (``consent_sync`` in `vgw status`)."""

    OFFLINE = "offline"
    WAITING = "waiting"  # connected; stored batches wait
    RETAINED = "retained"  # the retained document was taken
    NONE = "none"  # none came within [mqtt] consent_wait_s of the SUBACK


@dataclass(frozen=True)
class LinkView:
    """What other threads read of the uplink (`vgw status`, health, tests): replaced whole by the owner thread."""

    state: str = "offline"  # offline, connecting, connected
    endpoint: str = ""  # host:port in use, or being tried
    protocol: str = "5"  # the MQTT version in use or being tried: "5" or "3.1.1"
    last_error: str | None = None
    last_publish: float | None = None  # wall time of the last PUBACK
    consent_sync: ConsentSync = ConsentSync.OFFLINE
    consent_subscribed: bool = False  # the broker granted the consent subscription on this connection
    connects: int = 0
    connect_attempts: int = 0
    connect_failures: int = 0
    published_batches: int = 0
    published_receipts: int = 0
    replayed_batches: int = 0  # rows acknowledged before a failover, re-published and acknowledged again
    replayed_receipts: int = 0  # the same for receipts
    status_published: int = 0
    queue_full: int = 0
    ack_store_failures: int = 0
    oversized_dropped: int = 0  # inbound PUBLISH packets over MAX_PACKET_BYTES whose payload was dropped
    subscribe_refused: int = 0  # SUBACKs that refused the consent subscription (each is retried)
    wakeups: int = 0  # times the owner thread woke: a packet, the doorbell or a timer


class _Ask(Enum):
    """What other threads ask of the owner through the doorbell (a ring without one: new rows or receipts)."""

    STATUS = "status"
    STOP = "stop"


@dataclass
class _Link:
    """One connection. The owner's alone; paho's callbacks (which run in the owner, inside ``loop_read``) only
    append to its records, and the owner acts on them after each step."""

    loop: ClientLoop
    on_consent: Callable[[bytes], None]  # the bounded consent intake (vgw.state.consent.intake)
    consent_topic: str
    answer_topic: str | None  # the renewal answers' topic (vgw.uplink.renewal)
    connack: Any = None  # the CONNACK's reason code (a refusal too), once it came
    lost: Any = None  # the disconnect's reason code, once the connection is gone
    tls_error: ssl.SSLError | None = None  # a TLS alert the socket saw (names a failure better than the EOF)
    acks: list[tuple[int, bool]] = field(default_factory=list)  # (mid, accepted) of each PUBACK
    subacks: list[tuple[int, str | None, int]] = field(default_factory=list)  # (mid, refusal, consent_msgs then)
    answers: list[bytes] = field(default_factory=list)  # renewal answers
    oversized: list[int] = field(default_factory=list)  # sizes of inbound messages whose payload was dropped
    consent_msgs: int = 0  # consent messages handed to the intake
    inflight: dict[int, tuple[str, Any]] = field(default_factory=dict)  # mid -> what it carries
    sub_mid: int | None = None  # the consent SUBSCRIBE awaiting its SUBACK
    resub: Resubscribe = field(default_factory=Resubscribe)  # when the consent SUBSCRIBE goes again (monotonic)
    msgs_at_suback: int | None = None  # consent_msgs when the subscription was granted
    sync_deadline: float | None = None  # monotonic: stored batches go without a retained document from then
    renew_sub_mid: int | None = None  # SUBACK awaited for the renewal answer topic
    tokens: float = 0.0  # drain-rate bucket
    refilled: float = field(default_factory=time.monotonic)
    more_at: float | None = None  # monotonic: the bucket allows more then, and more may be waiting
    restage: bool = False  # a renewed pair is staged: reconnect with it

    def on_connect(self, _c: Any, _u: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        self.connack = reason_code

    def on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        self.lost = reason_code

    def on_publish(self, _c: Any, _u: Any, mid: int, reason_code: Any, _props: Any) -> None:
        self.acks.append((mid, not getattr(reason_code, "is_failure", False)))

    def on_subscribe(self, _c: Any, _u: Any, mid: int, reason_codes: Any, _props: Any) -> None:
        refused = [str(rc) for rc in reason_codes if getattr(rc, "is_failure", False)]
        self.subacks.append((mid, ", ".join(refused) or None, self.consent_msgs))

    def on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.consent_topic and message.payload:
            self.on_consent(bytes(message.payload))
            self.consent_msgs += 1  # after the intake holds it (see Uplink._check_consent_sync)
        elif message.topic == self.answer_topic and message.payload:
            self.answers.append(bytes(message.payload))


class Uplink:
    """The device's MQTT link (see the module docstring for the thread that owns it)."""

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
        self.renewal = renewal  # certificate renewal (vgw.uplink.renewal), driven by the owner thread
        self.device = device
        self.outbox = outbox
        self.on_consent = on_consent
        self.status_payload = status_payload
        self.consent_settled = consent_settled
        self.topic_consent = consent_topic(cfg.topic_prefix, device)
        self.topic_receipt = receipt_topic(cfg.topic_prefix, device)
        self.topic_status = status_topic(cfg.topic_prefix, device)
        self.topic_data = data_topic(cfg.topic_prefix, device, "")  # + the grant id
        self._bell = Doorbell()
        self._stop = threading.Event()
        self._progress = threading.Event()  # set by the owner after each group of PUBACKs (for drain)
        self._thread: threading.Thread | None = None
        # Everything below is the owner thread's.
        # [mqtt] protocol: "5", "3.1.1", or "auto" (MQTT 5 first; vgw.transport.mqttversion decides the fallback).
        self._protocol_settled = cfg.protocol != "auto"
        self._endpoint_index = 0  # into cfg.endpoints
        self._view = LinkView(endpoint=_endpoint_name(cfg, 0), protocol="3.1.1" if cfg.protocol == "3.1.1" else "5")
        self._status_due = False
        self._repeats = 0  # failures logged at debug since the last warning
        self._ever_connected = False
        # (wall time of its PUBACK, token) of each receipt acknowledged within the replay window, oldest first
        self._acked_receipts: collections.deque[tuple[float, str]] = collections.deque()
        self._replay_receipts: list[str] = []  # receipts still to publish again in the running replay pass
        self._replay: tuple[float, int] | None = None  # (acked since, last row id sent) while a replay runs
        self._replay_again: tuple[float, float] | None = None  # (monotonic time, acked since) of the second pass
        self._last_sweep = -math.inf
        # Rows of an earlier run may be kept for a window from now; then until a window after the last PUBACK.
        self._kept_until = time.monotonic() + cfg.replay_window

    # -- other threads ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vgw-uplink", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def view(self) -> LinkView:
        """The link's state and counters, one consistent snapshot (any thread)."""
        return self._view

    def wake(self) -> None:
        """New rows or receipts are waiting (any thread)."""
        self._bell.ring()

    def publish_status(self) -> None:
        """Publish the retained status again: now if connected, else at the next connect (any thread)."""
        self._bell.ring(_Ask.STATUS)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the offline status if connected (the will covers crashes), disconnect and end the thread."""
        self._stop.set()
        self._bell.ring(_Ask.STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self, timeout: float) -> bool:
        """Wait until the outbox holds no batch or receipt (all acknowledged). True if it emptied."""
        deadline = time.monotonic() + timeout
        self._bell.ring()
        while True:
            self._progress.clear()
            if not self.outbox.stats() and self.outbox.receipt_count() == 0:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._progress.wait(min(left, 1.0))

    # -- the owner thread ---------------------------------------------------------------------------

    def _show(self, **changes: Any) -> None:
        self._view = dataclasses.replace(self._view, **changes)

    def _count(self, **steps: int) -> None:
        view = self._view
        self._view = dataclasses.replace(view, **{name: getattr(view, name) + n for name, n in steps.items()})

    def _run(self) -> None:
        delay = self.cfg.backoff_min_s
        self._sweep(force=True)  # rows kept by an earlier run (or under a longer window) go now
        try:
            while not self._stop.is_set():
                try:
                    delay = self._cycle(delay)
                except Exception:  # the uplink must outlive any single failure: log it, back off, go on
                    log.exception("uplink: unexpected error; reconnecting")
                    self._show(state="offline", consent_sync=ConsentSync.OFFLINE)
                    self._idle(time.monotonic() + delay)
                    delay = min(self.cfg.backoff_max_s, delay * 2)
        finally:
            self._show(state="offline", consent_sync=ConsentSync.OFFLINE)
            self._bell.close()

    def _cycle(self, delay: float) -> float:
        """One connection: connect (or back off), serve until it drops. Returns the next backoff."""
        link = self._open()
        if link is not None:
            try:
                self._serve(link)
            finally:
                self._close(link)
        elif self.renewal is not None:
            self.renewal.connect_failed()  # a renewed pair the broker refuses is dropped; the old one stays
        if self._stop.is_set():
            return delay
        if len(self.cfg.endpoints) > 1:  # this node failed or dropped us: another node of the cluster may be up
            self._endpoint_index = (self._endpoint_index + 1) % len(self.cfg.endpoints)
            self._show(endpoint=_endpoint_name(self.cfg, self._endpoint_index))
            log.info("uplink: next endpoint %s", self._view.endpoint)
        if link is not None:
            return self.cfg.backoff_min_s
        # Full jitter (AWS architecture blog): spreads a fleet's reconnects after a broker outage.
        self._idle(time.monotonic() + random.uniform(self.cfg.backoff_min_s, delay))
        return min(self.cfg.backoff_max_s, delay * 2)

    def _idle(self, until: float) -> None:
        """Offline until ``until``: only the doorbell and the replay-window sweep (docs/privacy.md) wake us."""
        while not self._stop.is_set() and time.monotonic() < until:
            asks = self._bell.wait(min(until, self._sweep_due()))
            self._count(wakeups=1)
            self._status_due |= _Ask.STATUS in asks
            self._sweep()

    def _open(self) -> _Link | None:
        """Connect to the current endpoint and wait for the CONNACK. The link, or None (the failure recorded)."""
        v5 = self._view.protocol == "5"
        self._show(state="connecting")
        self._count(connect_attempts=1)
        host, port = self.cfg.endpoints[self._endpoint_index]
        link: _Link | None = None
        try:
            link = self._new_link()
            if v5:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = SESSION_EXPIRY_S
                # MQTT 5.0 §3.1.2.11.4: the broker must not send us a larger packet (it discards it instead).
                props.MaximumPacketSize = MAX_PACKET_BYTES
                link.loop.client.connect(host, port, keepalive=self.cfg.keepalive_s, clean_start=False,
                                         properties=props)
            else:
                link.loop.client.connect(host, port, keepalive=self.cfg.keepalive_s)
        except ConfigError as exc:  # a TLS file that is missing, not a regular file of sane size, or unusable
            self._fail(str(exc))
            return None
        except ssl.SSLCertVerificationError as exc:
            self._fail(f"TLS certificate rejected: {describe_tls(exc)}")
            return None
        except ssl.SSLError as exc:
            # An alert the socket saw while paho wrote CONNECT names the failure better than the EOF it raised.
            self._fail(describe_tls(link.tls_error if link is not None and link.tls_error else exc))
            return None
        except (OSError, ValueError) as exc:
            self._fail(f"cannot reach broker {self._view.endpoint}: {exc}")
            return None
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while link.connack is None and link.lost is None and not self._stop.is_set() \
                and time.monotonic() < deadline:
            self._status_due |= _Ask.STATUS in link.loop.wait(deadline)
            self._count(wakeups=1)
        if link.connack is not None and not link.connack.is_failure:
            self._protocol_settled = True
            self._after_connect(link)
            return link
        self._close(link)
        if self._stop.is_set():
            return None
        refused = link.connack if link.connack is not None and link.connack.is_failure else None
        if link.tls_error is not None:  # the disconnect that followed is this alert, not an MQTT answer
            self._fail(describe_tls(link.tls_error))
            return None
        if refused is None and link.lost is None:
            self._fail("broker did not answer CONNECT in time")
            return None
        if v5 and not self._protocol_settled and refuses_mqtt5(refused):
            # Before any successful CONNECT only: a later outage is never taken for a protocol refusal.
            self._protocol_settled = True
            self._show(protocol="3.1.1")
            log.warning("uplink: broker %s refused MQTT 5 (%s); using MQTT 3.1.1 with clean_session=False for "
                        "the rest of this process", self._view.endpoint, refused or link.lost)
            return self._open()  # at most once: the fallback happens once per process
        self._fail(f"broker refused the connection: {refused or link.lost}")
        return None

    def _new_link(self) -> _Link:
        v5 = self._view.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.device,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # MQTT 3.1.1 has no session expiry: clean_session=False keeps the session (and the QoS 1
            # subscription to the consent topic) for as long as the broker keeps it.
            clean_session=None if v5 else False,
        )
        link = _Link(ClientLoop(client, self._bell, self.cfg.keepalive_s), self.on_consent, self.topic_consent,
                     self.renewal.response_topic if self.renewal is not None else None)
        cert, key = self.renewal.credentials() if self.renewal is not None else (self.cfg.cert_file, self.cfg.key_file)
        ctx = client_context(self.cfg.ca_file, cert, key)
        # Both hooks run in the owner thread, inside paho's reads and writes: they only record.
        guard_context(ctx, MAX_PACKET_BYTES, mqtt5=v5, on_drop=link.oversized.append,
                      on_tls_error=lambda exc: setattr(link, "tls_error", exc))
        client.tls_set_context(ctx)
        client.max_inflight_messages_set(self.cfg.max_inflight)
        # 0 would mean "unbounded" to paho; we never hand it more than the window, so this only guards bugs.
        client.max_queued_messages_set(self.cfg.max_inflight + QUEUE_SLACK)
        client.will_set(self.topic_status, json.dumps({"state": "offline", "device": self.device}), qos=1,
                        retain=True)
        client.on_connect = link.on_connect
        client.on_disconnect = link.on_disconnect
        client.on_publish = link.on_publish
        client.on_subscribe = link.on_subscribe
        client.on_message = link.on_message
        return link

    def _close(self, link: _Link) -> None:
        link.loop.close()
        if self._view.state == "connected":
            self._show(state="offline")
        self._show(consent_sync=ConsentSync.OFFLINE, consent_subscribed=False)

    def _fail(self, reason: str) -> None:
        """A connection attempt failed or the connection was lost: record it, log it once per distinct reason."""
        self._count(connect_failures=1)
        if reason != self._view.last_error:
            if self._repeats:
                log.info("uplink: previous failure repeated %d more time(s)", self._repeats)
                self._repeats = 0
            log.warning("uplink: %s (retrying with backoff up to %g s; data stay in the outbox)", reason,
                        self.cfg.backoff_max_s)
        else:
            self._repeats += 1
            log.debug("uplink: %s", reason)
        self._show(state="offline", last_error=reason)

    def _after_connect(self, link: _Link) -> None:
        if self._repeats:
            log.info("uplink: previous failure repeated %d more time(s)", self._repeats)
            self._repeats = 0
        self._count(connects=1)
        self._show(state="connected", last_error=None, consent_sync=ConsentSync.WAITING, consent_subscribed=False)
        log.info("uplink connected to %s", self._view.endpoint)
        window = self.cfg.replay_window
        if self._ever_connected and window > 0:
            # The node we left may have acknowledged rows it then lost: send what it acked within the window again.
            # The cluster may still be electing the leader the dead node held, and the new node acknowledges
            # and loses the same way meanwhile (the replay included), so a second pass follows a third of the
            # window later and sends everything acknowledged since the first pass's start once more.
            since = time.time() - window
            self._start_replay(since)
            self._replay_again = (time.monotonic() + second_pass_delay(window), since)
        self._ever_connected = True
        if self.renewal is not None:
            self.renewal.connected()  # connected with a renewed pair: swap it in now
        link.tokens = float(self.cfg.max_inflight)
        self._subscribe(link)
        self._status_due = False
        self._send_status(link)

    def _serve(self, link: _Link) -> None:
        """Serve one connection until it drops, a renewed pair is staged, or stop (then say offline)."""
        while not self._stop.is_set():
            # 1. what arrived in the last step
            if not self._take_records(link):
                return
            # 2. timers and requests
            now = time.monotonic()
            if self._status_due:
                self._status_due = False
                self._send_status(link)
            if link.resub.is_due(now):
                self._subscribe(link)
            self._sweep()
            if self.renewal is not None:
                self.renewal.tick()
                if link.renew_sub_mid is None and self.renewal.wants_request():
                    link.renew_sub_mid = link.loop.subscribe(self.renewal.response_topic)
            self._check_consent_sync(link)
            again = self._replay_again
            if again is not None and self._replay is None and now >= again[0]:
                self._start_replay(again[1])
                self._replay_again = None
            # 3. publish what is waiting, within the in-flight window and the drain rate
            rate = self.cfg.drain_rate
            link.tokens = min(float(self.cfg.max_inflight), link.tokens + (now - link.refilled) * rate)
            link.refilled = now
            window = self.cfg.max_inflight - len(link.inflight)
            room = min(window, int(link.tokens))
            sent = self._publish_some(link, room) if room > 0 else 0
            link.tokens -= sent
            # Limited by the rate, not the window (whose PUBACKs wake us): look again when a token is there.
            link.more_at = now + (1 - link.tokens % 1) / rate if room < window and sent == room and rate > 0 else None
            # 4. sleep until a packet, the doorbell or the next timer
            asks = link.loop.wait(self._next_due(link))
            self._count(wakeups=1)
            self._status_due |= _Ask.STATUS in asks
        self._say_offline(link)

    def _take_records(self, link: _Link) -> bool:
        """Act on what paho's callbacks recorded in the last step. False: the connection is over (lost, or a
        renewed pair is staged and the link reconnects with it)."""
        if link.acks:  # acknowledged batches are deleted together, in one transaction
            acks, link.acks = link.acks, []
            self._acked([item for mid, ok in acks if (item := link.inflight.pop(mid, None)) is not None and ok])
        for size in link.oversized:
            self._count(oversized_dropped=1)
            dropped = self._view.oversized_dropped
            if dropped == 1 or dropped % 100 == 0:
                log.warning("uplink: dropped an inbound message of %d bytes (limit %d; %d so far)", size,
                            MAX_PACKET_BYTES, dropped)
        link.oversized.clear()
        subacks, link.subacks = link.subacks, []
        for mid, refused, msgs in subacks:
            if mid == link.renew_sub_mid:
                self._renew(link, refused)
            elif mid == link.sub_mid:
                self._suback(link, refused, msgs)
        answers, link.answers = link.answers, []
        if self.renewal is not None and any(self.renewal.answer(answer) for answer in answers):
            return False  # a renewed pair is staged: reconnect with it (the old one stays until it connects)
        if link.lost is not None or link.loop.client.socket() is None:
            reason = describe_tls(link.tls_error) if link.tls_error is not None else link.lost
            self._fail(f"connection lost: {reason}")
            if self.renewal is not None:
                self.renewal.connection_lost()
            return False
        return True

    def _next_due(self, link: _Link) -> float:
        """The nearest of the owner's timers on this connection (monotonic; the keepalive is the loop's)."""
        times = [link.resub.due, link.more_at, self._sweep_due()]
        if self._view.consent_sync is ConsentSync.WAITING and self._view.consent_subscribed:
            deadline = link.sync_deadline or 0.0
            times.append(deadline if deadline > time.monotonic() else time.monotonic() + SETTLE_RECHECK_S)
        if self._replay_again is not None and self._replay is None:
            times.append(self._replay_again[0])
        if self.renewal is not None and link.renew_sub_mid is None:
            times.append(self.renewal.next_check())
        return min((t for t in times if t is not None), default=math.inf)

    def _say_offline(self, link: _Link) -> None:
        """At stop, connected: the retained status says offline (the will covers crashes), PUBACK awaited briefly."""
        info = link.loop.publish(self.topic_status, json.dumps({"state": "offline", "device": self.device}),
                                 retain=True)
        deadline = time.monotonic() + OFFLINE_WAIT_S
        while info.rc == mqtt.MQTT_ERR_SUCCESS and not info.is_published() and link.lost is None \
                and link.loop.client.socket() is not None and time.monotonic() < deadline:
            link.loop.wait(deadline)
            self._count(wakeups=1)

    def _subscribe(self, link: _Link) -> None:
        """Subscribe to the consent topic; the SUBACK is checked in :meth:`_suback` (a refusal is retried)."""
        link.sub_mid = link.loop.subscribe(self.topic_consent)
        self._show(consent_subscribed=False)
        # Asked again if no SUBACK comes (or the subscribe could not even be queued).
        link.resub.sent(time.monotonic(), queued=link.sub_mid is not None)

    def _suback(self, link: _Link, refused: str | None, msgs: int) -> None:
        link.sub_mid = None
        if refused is None:
            self._show(consent_subscribed=True)
            # The broker sends the retained document after this SUBACK; without one, stored batches wait at most
            # [mqtt] consent_wait_s (MQTT has no "nothing retained" answer).
            if link.msgs_at_suback is None:
                link.msgs_at_suback = msgs
                link.sync_deadline = time.monotonic() + self.cfg.consent_wait_s
            if link.resub.delay > SUBSCRIBE_RETRY_FIRST_S:
                log.info("uplink: subscribed to the consent topic after %d refusal(s)", self._view.subscribe_refused)
            link.resub.granted()
            return
        # A cluster node that cannot create the subscription's state in time (nats-server under load: "Unable
        # to add JetStream consumer") refuses it; without the subscription no consent change would reach us on
        # this connection, a revocation included, so ask again, backing off.
        self._count(subscribe_refused=1)
        wait = link.resub.refused(time.monotonic())
        log.warning("uplink: %s refused the consent subscription (%s); retrying in %g s", self._view.endpoint,
                    refused, wait)

    def _renew(self, link: _Link, refused: str | None) -> None:
        """The SUBACK of the renewal answer topic (vgw.uplink.renewal): then, and only then, the request goes out."""
        renewal = self.renewal
        assert renewal is not None
        link.renew_sub_mid = None
        if refused is not None:
            renewal.topic_refused(f"{self._view.endpoint} refused the subscription to {renewal.response_topic} "
                                  f"({refused})")
            return
        # Subscribed first, then the request (README "Enrollment"): the answer cannot pass us by.
        self._publish(link, renewal.request_topic, renewal.request())

    def _check_consent_sync(self, link: _Link) -> None:
        """Open the gate for stored batches once the consent at the broker is known (README "Topics")."""
        if self._view.consent_sync != ConsentSync.WAITING or not self._view.consent_subscribed:
            return
        seen = link.msgs_at_suback is not None and link.consent_msgs > link.msgs_at_suback
        if seen and self.consent_settled():
            self._show(consent_sync=ConsentSync.RETAINED)
        elif link.sync_deadline is not None and time.monotonic() >= link.sync_deadline and self.consent_settled():
            self._show(consent_sync=ConsentSync.NONE)
            log.info("uplink: no consent document retained at %s within %g s; sending stored data",
                     self._view.endpoint, self.cfg.consent_wait_s)

    def _start_replay(self, since: float) -> None:
        """A replay pass: rows and receipts acknowledged at or after ``since`` (wall time) go out again."""
        self._replay = (since, 0)
        self._replay_receipts = [token for at, token in self._acked_receipts if at >= since]

    def _sweep_due(self) -> float:
        """When the next replay-window sweep is due (monotonic): once a second while rows may be kept."""
        if self.cfg.replay_window <= 0 or self._last_sweep > self._kept_until:
            return math.inf
        return self._last_sweep + 1.0

    def _sweep(self, *, force: bool = False) -> None:
        """Delete the rows whose replay window has passed (at most once a second)."""
        now = time.monotonic()
        if not force and now < self._sweep_due():
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
        keep = self.cfg.replay_window > 0
        rows = [value for kind, value in items if kind == "batch"]
        counts = {"published_batches": 0, "published_receipts": 0, "replayed_batches": 0, "replayed_receipts": 0}
        try:
            if rows:
                self.outbox.mark_sent_many(rows, now, keep=keep)
                counts["published_batches"] += len(rows)
            for kind, value in items:
                if kind == "replay":
                    # Counted here only: the privacy report counted it as sent at its first PUBACK, and it keeps
                    # that PUBACK's time, so the window still ends when it would have.
                    counts["replayed_batches"] += 1
                elif kind == "replay-receipt":
                    counts["replayed_receipts"] += 1
                elif kind == "receipt":
                    rid, token = value
                    self.outbox.delete_receipt(rid)
                    counts["published_receipts"] += 1
                    if keep:
                        self._acked_receipts.append((now, token))
        except StorageError as exc:
            # The rows stay and go out again later: duplicates the receiver drops (README "Telemetry envelope"),
            # never a loss.
            counts["ack_store_failures"] = 1
            if self._view.ack_store_failures == 0:
                log.error("uplink: acknowledged row not deleted: %s", exc)
        if keep:
            self._kept_until = time.monotonic() + self.cfg.replay_window
        self._count(**counts)
        self._show(last_publish=now)
        self._progress.set()

    def _publish(self, link: _Link, topic: str, payload: bytes | str) -> int | None:
        info = link.loop.publish(topic, payload)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self._count(queue_full=1)
        return info.mid if info.rc == mqtt.MQTT_ERR_SUCCESS else None

    def _publish_some(self, link: _Link, room: int) -> int:
        inflight = link.inflight
        sent = 0
        while self._replay is not None and self._replay_receipts and sent < room:
            mid = self._publish(link, self.topic_receipt, self._replay_receipts[0])
            if mid is None:
                return sent
            inflight[mid] = ("replay-receipt", self._replay_receipts.pop(0))
            sent += 1
        busy_receipts = {v[1][0] for v in inflight.values() if v[0] == "receipt"}
        for rid, token in self.outbox.pending_receipts(room - sent, busy_receipts):
            mid = self._publish(link, self.topic_receipt, token)
            if mid is None:
                return sent
            inflight[mid] = ("receipt", (rid, token))
            sent += 1
        if sent >= room or self._view.consent_sync not in (ConsentSync.RETAINED, ConsentSync.NONE):
            return sent  # stored batches wait until the consent at the broker is known (README "Topics")
        busy_rows = {v[1].id for v in inflight.values() if v[0] == "batch"}
        # The outbox lock is held across read and publish so a concurrent erasure either happens before
        # (rows gone) or after (already handed to the socket: "already sent").
        with self.outbox.exclusive():
            if self._replay is not None:
                since, after = self._replay
                rows = self.outbox.replayable(since, after, room - sent)
                for row in rows:
                    mid = self._publish(link, self.topic_data + row.grant_id, row.payload)
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
                mid = self._publish(link, self.topic_data + row.grant_id, row.payload)
                if mid is None:
                    break
                self.outbox.mark_attempted(row.id)  # maybe delivered from now on: never a quota victim
                inflight[mid] = ("batch", row)
                sent += 1
        return sent

    def _send_status(self, link: _Link) -> None:
        status = {"state": "online", **self.status_payload()}
        info = link.loop.publish(self.topic_status, json.dumps(status), retain=True)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._count(status_published=1)
        else:
            self._status_due = True  # paho's queue is full: try again on the next turn (a PUBACK wakes us)
