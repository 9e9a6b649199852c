"""The cloud's NATS-native side: workers sharing one durable JetStream pull consumer (``vgw cloud listen
--nats``).

Devices publish over MQTT; the NATS server makes ``vgw/<id>/data/<grant>`` the subject ``vgw.<id>.data.<grant>``.
The server acknowledges an MQTT QoS 1 publish once it has routed it, not once JetStream has stored it (nats-server
2.9), so the stream does not capture device subjects itself: relays (:mod:`vgw.cloud.relay`, ``vgw cloud relay``)
take them with core subscriptions and publish each one again under ``vgw-stored.<id>...`` with JetStream's
acknowledgement, retrying until it is stored. The stream ``VGW`` (:func:`telemetry_stream_config`,
``deploy/nats/stream-vgw.json``) keeps ``vgw-stored.*.data.>`` and ``vgw-stored.*.receipt`` on the cluster
(R3), and the durable consumer ``vgw-workers`` (:func:`telemetry_consumer_config`) hands each message to one of
the workers pulling from it:

- a message is acknowledged (explicit ack, confirmed by the server) only after the handler returned, so a
  batch is handled once in normal operation;
- a worker that dies holding unacknowledged messages has them redelivered to another worker after the
  consumer's ``ack_wait``: at-least-once, so receivers de-duplicate on (device, grant, epoch, seq);
- the consumer lives in the stream, so workers that were all stopped resume where the group left off.

:class:`JetStreamWorker` runs its own asyncio loop on the thread that calls :meth:`JetStreamWorker.run`; the
handler runs on that thread too. nats-py is imported only here, so the MQTT mode needs no NATS client.

Errors: :class:`~vgw.base.errors.UplinkError` (cannot connect, stream or consumer refused),
:class:`~vgw.cloud.cloudkit.CloudKitError` (nats-py missing, unusable TLS files or addresses).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgw.base.errors import UplinkError
from vgw.cloud.cloudkit import CloudKitError
from vgw.transport.tlsctx import client_context

log = logging.getLogger(__name__)

__all__ = ["DURABLE", "STREAM", "JetStreamWorker", "NatsOptions", "connect", "consumer_state", "ensure_stream",
           "parse_servers", "require_nats_py", "stored_prefix", "stream_leader", "telemetry_consumer_config",
           "telemetry_stream_config", "topic_of"]

_FETCH_TIMEOUT_S = 1.0

STREAM = "VGW"
"""The JetStream stream holding devices' telemetry and receipts (``deploy/nats/stream-vgw.json``)."""
DURABLE = "vgw-workers"
"""The durable pull consumer the cloud's listener workers share (``deploy/nats/consumer-vgw-workers.json``)."""


def _check_token(name: str) -> None:
    if not name or any(c in name for c in ".*> \t\n/\"") :
        raise ValueError(f"invalid NATS subject token {name!r}: no '.', '*', '>', '/', quotes or spaces")


def stored_prefix(prefix: str = "vgw") -> str:
    """The subject root under which relays store what devices published under ``prefix``: ``vgw-stored``.
    A root of its own, so no device (allowed only ``vgw.<its id>.…``) can publish into the stream."""
    _check_token(prefix)
    return f"{prefix}-stored"


def topic_of(subject: str, prefix: str = "vgw") -> str:
    """The MQTT topic a device published for a stored subject: ``vgw-stored.d1.data.g`` -> ``vgw/d1/data/g``
    (any other subject only has its dots turned into slashes)."""
    stored = stored_prefix(prefix) + "."
    if subject.startswith(stored):
        subject = f"{prefix}.{subject[len(stored):]}"
    return subject.replace(".", "/")


def telemetry_stream_config(prefix: str = "vgw", *, replicas: int = 3, name: str = STREAM) -> dict[str, Any]:
    """The JetStream stream that keeps what devices publish for the cloud, as the relays store it:
    ``<prefix>-stored.*.data.>`` and ``<prefix>-stored.*.receipt`` (status is latest-value and stays
    retained MQTT). File storage, ``replicas`` copies (3 on a 3-node cluster: it survives a node), limits
    retention so a stopped consumer catches up, and a two-minute duplicate window in which the copies two
    relays store of one device message (same ``Nats-Msg-Id``) are kept once.
    """
    stored = stored_prefix(prefix)
    return {
        "name": name,
        "subjects": [f"{stored}.*.data.>", f"{stored}.*.receipt"],
        "retention": "limits",
        "storage": "file",
        "num_replicas": replicas,
        "max_age": 7 * 24 * 3600 * 10**9,  # ns: a week of catch-up for a consumer that was down
        "discard": "old",
        "duplicate_window": 120 * 10**9,
    }


def telemetry_consumer_config(*, durable: str = DURABLE, ack_wait_s: float = 30.0,
                              max_ack_pending: int = 10000) -> dict[str, Any]:
    """The durable pull consumer that ``vgw cloud listen --nats`` workers share: explicit acks, a batch not
    acknowledged within ``ack_wait_s`` goes to another worker, delivery starts with the stream's first
    message (a new consumer reads the history the stream still holds)."""
    return {
        "durable_name": durable,
        "deliver_policy": "all",
        "ack_policy": "explicit",
        "ack_wait": int(ack_wait_s * 10**9),
        "max_ack_pending": max_ack_pending,
        "max_deliver": -1,
        "replay_policy": "instant",
    }




def require_nats_py() -> Any:
    """The ``nats`` package (nats-py). Raises :class:`CloudKitError` with the install hint if it is missing."""
    try:
        import nats
    except ImportError as exc:
        raise CloudKitError("--nats needs the NATS client: pip install 'vgw[cloud]' (or pip install nats-py)"
                            ) from exc
    return nats


def parse_servers(text: str) -> tuple[str, ...]:
    """``HOST:PORT[,HOST:PORT...]`` (or ``tls://HOST:PORT``) -> NATS URLs. Raises :class:`CloudKitError`."""
    out = []
    for item in text.split(","):
        addr = item.strip().removeprefix("tls://").removeprefix("nats://")
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CloudKitError(f"--nats {text!r}: expected HOST:PORT[,HOST:PORT...]")
        out.append(f"tls://{host}:{port}")
    return tuple(out)


@dataclass(frozen=True)
class NatsOptions:
    """Where the workers connect (every node of the cluster) and which stream/consumer they share."""

    servers: tuple[str, ...]
    ca_file: Path
    cert_file: Path
    key_file: Path
    prefix: str = "vgw"
    stream: str = STREAM
    durable: str = DURABLE
    ack_wait_s: float = 30.0
    replicas: int = 3
    batch: int = 100
    name: str = "vgw-cloud-listen"


def tls_context(opts: NatsOptions) -> ssl.SSLContext:
    """Mutual TLS (>= 1.2) to the cluster's client ports. Raises :class:`CloudKitError` for unusable files."""
    return client_context(opts.ca_file, opts.cert_file, opts.key_file, error=CloudKitError)


async def connect(opts: NatsOptions, *, servers: tuple[str, ...] | None = None) -> Any:
    """A nats-py connection to ``servers`` (default: every node of ``opts``), reconnecting to any node for
    ever. Raises :class:`UplinkError` if none can be reached now."""
    nats = require_nats_py()
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc) or type(exc).__name__)

    urls = list(servers or opts.servers)
    try:
        return await nats.connect(servers=urls, tls=tls_context(opts), name=opts.name, connect_timeout=5,
                                  reconnect_time_wait=0.5, max_reconnect_attempts=-1, allow_reconnect=True,
                                  dont_randomize=servers is not None, error_cb=on_error)
    except CloudKitError:
        raise
    except Exception as exc:
        raise UplinkError(f"cannot connect to NATS {', '.join(urls)}: {errors[-1] if errors else exc}") from exc


async def ensure_stream(js: Any, opts: NatsOptions, *, timeout: float = 30.0) -> None:
    """Create the telemetry stream if it is missing, trying for up to ``timeout`` seconds while JetStream does
    not answer (a cluster that is forming or electing). Raises :class:`UplinkError` if it still cannot, or
    if the stream exists with other subjects (one made before relays stored under ``<prefix>-stored``)."""
    from nats.js import api
    from nats.js.errors import NotFoundError

    cfg = telemetry_stream_config(opts.prefix, replicas=opts.replicas, name=opts.stream)
    deadline = time.monotonic() + timeout
    while True:
        try:
            try:
                info = await js.stream_info(opts.stream)
            except NotFoundError:
                await js.add_stream(api.StreamConfig.from_response(dict(cfg)))
                return
            break
        except Exception as exc:
            if time.monotonic() > deadline:
                raise UplinkError(f"JetStream stream {opts.stream}: {exc or type(exc).__name__}") from exc
            await asyncio.sleep(0.5)
    have = sorted(info.config.subjects or [])
    if have != sorted(cfg["subjects"]):
        raise UplinkError(f"JetStream stream {opts.stream} captures {have}, expected {sorted(cfg['subjects'])}: "
                          f"update it (deploy/nats/stream-vgw.json) and run `vgw cloud relay` (docs/fleet.md)")


class JetStreamWorker:
    """One worker of the shared durable consumer. ``handle(topic, payload)`` gets the MQTT topic form
    (``vgw/<id>/data/<grant>``); when it returns, the message is acknowledged. ``on_status`` (optional) gets
    live status messages (core NATS, not stored: status is a latest-value topic).

    Owned by the thread that calls :meth:`run`; ``handled`` and ``redelivered`` are written only there.
    """

    def __init__(self, opts: NatsOptions, handle: Callable[[str, bytes], None],
                 on_status: Callable[[str, bytes], None] | None = None) -> None:
        self.opts = opts
        self._handle = handle
        self._on_status = on_status
        self.handled = 0
        self.redelivered = 0
        self.connected_url: str | None = None
        self.ready = threading.Event()

    def run(self, stop: threading.Event, *, deadline: float | None = None) -> None:
        """Pull, handle and acknowledge until ``stop`` is set or ``time.monotonic()`` passes ``deadline``.

        Raises :class:`UplinkError` if no server can be reached or the stream/consumer is refused.
        """
        asyncio.run(self._run(stop, deadline))

    async def _run(self, stop: threading.Event, deadline: float | None) -> None:
        from nats.js import api

        nc = await connect(self.opts)
        try:
            js = nc.jetstream()
            await ensure_stream(js, self.opts)
            try:
                c = telemetry_consumer_config(durable=self.opts.durable, ack_wait_s=self.opts.ack_wait_s)
                await js.add_consumer(self.opts.stream, api.ConsumerConfig(
                    name=self.opts.durable, durable_name=self.opts.durable,
                    deliver_policy=api.DeliverPolicy.ALL, ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=self.opts.ack_wait_s, max_ack_pending=c["max_ack_pending"], max_deliver=-1,
                ))
                psub = await js.pull_subscribe_bind(durable=self.opts.durable, stream=self.opts.stream)
            except Exception as exc:
                raise UplinkError(f"JetStream stream {self.opts.stream} / consumer {self.opts.durable}: "
                                  f"{exc}") from exc
            if self._on_status is not None:
                status_cb = self._on_status

                async def status(msg: Any) -> None:
                    status_cb(msg.subject.replace(".", "/"), msg.data)

                await nc.subscribe(f"{self.opts.prefix}.*.status", cb=status)
            self.connected_url = str(nc.connected_url.netloc) if nc.connected_url else None
            self.ready.set()
            await self._pull(nc, psub, stop, deadline)
        finally:
            await nc.close()

    async def _pull(self, nc: Any, psub: Any, stop: threading.Event, deadline: float | None) -> None:
        from nats.errors import TimeoutError as NatsTimeout

        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            try:
                msgs = await psub.fetch(self.opts.batch, timeout=_FETCH_TIMEOUT_S)
            except (TimeoutError, NatsTimeout):
                continue
            except Exception:  # a node went away mid-fetch: the client reconnects to another; pull again
                await asyncio.sleep(0.2)
                continue
            for msg in msgs:
                if stop.is_set():
                    break  # the rest stay unacknowledged: the consumer redelivers them to another worker
                if msg.metadata.num_delivered > 1:
                    self.redelivered += 1
                self._handle(topic_of(msg.subject, self.opts.prefix), msg.data)
                self.handled += 1
                await msg.ack()  # only after the handler returned (explicit ack)
            try:
                await nc.flush(timeout=5)  # the acks reached the server
            except Exception as exc:  # not confirmed: redelivered after ack_wait, de-duplicated downstream
                log.debug("acknowledgements not confirmed: %s", exc)


def _ask(opts: NatsOptions, query: Callable[[Any], Any], timeout: float) -> Any:
    nats = require_nats_py()

    async def ask() -> Any:
        nc = await nats.connect(servers=list(opts.servers), tls=tls_context(opts), connect_timeout=5,
                                max_reconnect_attempts=2)
        try:
            return await query(nc.jetstream())
        finally:
            await nc.close()

    try:
        return asyncio.run(asyncio.wait_for(ask(), timeout))
    except Exception as exc:
        raise UplinkError(f"JetStream stream {opts.stream}: {exc or type(exc).__name__}") from exc


def stream_leader(opts: NatsOptions, timeout: float = 10.0) -> str | None:
    """The server name of the stream's current leader (``None`` while it has none). For tests and the fleet
    simulator, which choose the node they kill by its role. Raises :class:`UplinkError` if unreachable."""

    async def query(js: Any) -> str | None:
        info = await js.stream_info(opts.stream)
        return info.cluster.leader if info.cluster is not None else None

    return _ask(opts, query, timeout)  # type: ignore[no-any-return]


def consumer_state(opts: NatsOptions, timeout: float = 10.0) -> dict[str, Any]:
    """Stream and durable consumer counters: messages stored, pending (not yet delivered), delivered but not
    acknowledged, redelivered, and both leaders. Raises :class:`UplinkError` if unreachable."""

    async def query(js: Any) -> dict[str, Any]:
        si = await js.stream_info(opts.stream)
        ci = await js.consumer_info(opts.stream, opts.durable)
        return {"stream_messages": si.state.messages, "stream_leader": si.cluster.leader if si.cluster else None,
                "consumer_leader": ci.cluster.leader if ci.cluster else None, "num_pending": ci.num_pending,
                "num_ack_pending": ci.num_ack_pending, "num_redelivered": ci.num_redelivered}

    return _ask(opts, query, timeout)  # type: ignore[no-any-return]
