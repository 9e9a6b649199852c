"""Relays: what devices publish gets into the telemetry stream with JetStream's acknowledgement
(``vgw cloud relay``, docs/fleet.md "PUBACK is not storage").

nats-server 2.9 acknowledges a device's MQTT QoS 1 publish once it has routed the message. A stream that
captured device subjects itself would lose what arrives while its leader is being re-elected, although every
device holds a PUBACK for it. A relay instead takes ``vgw.*.data.>`` and ``vgw.*.receipt`` with plain core
subscriptions (routing works throughout an election) and publishes each message again under
``vgw-stored.<id>...`` as a JetStream publish, which the stream acknowledges only once a quorum has stored it.
Until then the relay keeps the message in memory and tries again.

Run two or more relays, each on another node (``--prefer``): every relay receives every message (not a queue
group), and all of them publish it with the same ``Nats-Msg-Id`` (a SHA-256 of subject and payload), so the
stream keeps one copy within its duplicate window. A relay that dies, or whose node dies, loses only what it
held; the others had it too. What the node a device is connected to acknowledged but never routed before it
died is the device's to send again (the agent's replay after failover).

:class:`JetStreamRelay` runs its own asyncio loop on the thread that calls :meth:`JetStreamRelay.run`.
Stopping (``stop`` set) first unsubscribes, then stores what is held, for at most ``drain_s``.

Errors: :class:`~vgw.base.errors.UplinkError` (no server reachable, stream refused or made for other subjects),
:class:`~vgw.cloud.cloudkit.CloudKitError` (nats-py missing, unusable TLS files).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from vgw.cloud.jetstream import NatsOptions, connect, ensure_stream, stored_prefix

log = logging.getLogger(__name__)

__all__ = ["JetStreamRelay", "RelayCounts", "message_id"]

_PUBLISH_TIMEOUT_S = 2.0
_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 1.0
_CLOSE_TIMEOUT_S = 5.0


def message_id(subject: str, payload: bytes) -> str:
    """The ``Nats-Msg-Id`` every relay gives one device message: equal copies (another relay's, or a device's
    replay of the same sealed batch) are stored once within the stream's duplicate window."""
    return hashlib.sha256(subject.encode() + b"\0" + payload).hexdigest()


@dataclass
class RelayCounts:
    """What a relay did. ``received``: messages its subscriptions delivered; ``stored``: acknowledged by the
    stream as new; ``duplicates``: acknowledged as a copy already stored (another relay was first, or a device
    replayed it); ``retries``: publishes tried again; ``rejected``: messages the stream can never take (too
    large once the relay's header is added, or refused as a bad request), logged and counted, not retried;
    ``dropped``: refused because ``max_held`` messages or ``max_held_bytes`` were held (logged);
    ``unstored_at_exit``: still held when the relay stopped."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    retries: int = 0
    rejected: int = 0
    dropped: int = 0
    unstored_at_exit: int = 0


def _header_bytes(headers: dict[str, str]) -> int:
    """Size of the NATS header block nats-py sends for ``headers`` (``NATS/1.0`` line, one line each, blank)."""
    return len("NATS/1.0\r\n") + sum(len(f"{k}: {v}\r\n") for k, v in headers.items()) + len("\r\n")


def _permanent(exc: Exception) -> bool:
    """True if publishing the same message again can never succeed: the client refuses it as too large, or the
    JetStream API answers 400 (bad request) or 413 (too large). 503 (no leader), 404 (stream missing: an
    operator may be re-creating it), timeouts and lost connections are worth retrying."""
    from nats.errors import MaxPayloadError
    from nats.js.errors import APIError

    if isinstance(exc, MaxPayloadError):
        return True
    return isinstance(exc, APIError) and exc.code in (400, 413)


class JetStreamRelay:
    """One relay. ``opts.servers`` are every node; ``prefer`` (optional) is the node to connect to first, so
    that relays started with different ``prefer`` start on different nodes (after a failover a relay stays
    where it reconnected: run one relay per node to keep two on different nodes through a second failure).

    Owned by the thread that calls :meth:`run`; ``counts`` is written only there (read it after ``run``).
    """

    def __init__(self, opts: NatsOptions, *, prefer: int | None = None, publishers: int = 32,
                 max_held: int = 200_000, max_held_bytes: int = 512 * 2**20, drain_s: float = 30.0) -> None:
        if publishers < 1 or max_held < 1 or max_held_bytes < 1 or drain_s < 0:
            raise ValueError("publishers, max_held and max_held_bytes must be >= 1, drain_s >= 0")
        self.opts = opts
        servers = opts.servers
        self._servers = None if prefer is None else servers[prefer % len(servers):] + servers[:prefer % len(servers)]
        self.publishers = publishers
        self.max_held = max_held
        self.max_held_bytes = max_held_bytes
        self.drain_s = drain_s
        self.counts = RelayCounts()
        self._storing = 0
        self._held_bytes = 0
        self.connected_url: str | None = None
        self.ready = threading.Event()

    def run(self, stop: threading.Event, *, deadline: float | None = None) -> None:
        """Relay until ``stop`` is set or ``time.monotonic()`` passes ``deadline``, then store what is held.

        Raises :class:`UplinkError` if no server can be reached or the stream is refused.
        """
        asyncio.run(self._run(stop, deadline))

    async def _run(self, stop: threading.Event, deadline: float | None) -> None:
        nc = await connect(self.opts, servers=self._servers)
        try:
            js = nc.jetstream()
            await ensure_stream(js, self.opts)
            held: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

            async def on_message(msg: Any) -> None:
                self.counts.received += 1
                size = len(msg.data)
                if held.qsize() >= self.max_held or self._held_bytes + size > self.max_held_bytes:
                    self.counts.dropped += 1
                    if self.counts.dropped == 1 or self.counts.dropped % 1000 == 0:
                        log.error("relay: %d messages (%d bytes) held, the stream is not storing: dropped %d so "
                                  "far; another relay may still store them", held.qsize(), self._held_bytes,
                                  self.counts.dropped)
                    return
                self._held_bytes += size
                held.put_nowait((msg.subject, msg.data))

            prefix = self.opts.prefix
            # The client may buffer as much as we may hold, so it never drops a message as a slow consumer.
            subs = [await nc.subscribe(s, cb=on_message, pending_msgs_limit=self.max_held,
                                       pending_bytes_limit=self.max_held_bytes)
                    for s in (f"{prefix}.*.data.>", f"{prefix}.*.receipt")]
            await nc.flush(timeout=5)
            tasks = [asyncio.create_task(self._publisher(nc, js, held)) for _ in range(self.publishers)]
            self.connected_url = str(nc.connected_url.netloc) if nc.connected_url else None
            self.ready.set()
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                await asyncio.sleep(0.1)
            await self._stop_taking(subs)
            try:
                await asyncio.wait_for(held.join(), self.drain_s)
            except TimeoutError:
                log.error("relay: messages still not stored after %g s of draining", self.drain_s)
            self.counts.unstored_at_exit = held.qsize() + self._storing
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            try:
                await asyncio.wait_for(nc.close(), _CLOSE_TIMEOUT_S)
            except Exception as exc:  # a node going away as we close: the process is ending anyway
                log.debug("relay: close failed: %s", exc or type(exc).__name__)

    async def _stop_taking(self, subs: list[Any]) -> None:
        """End both subscriptions together: drain (messages the client already has still reach the queue), or,
        if that cannot finish (the connection is reconnecting), unsubscribe."""
        async def end(sub: Any) -> None:
            try:
                await asyncio.wait_for(sub.drain(), _CLOSE_TIMEOUT_S)
            except Exception as exc:
                log.debug("relay: drain failed (%s); unsubscribing", exc or type(exc).__name__)
                try:
                    await asyncio.wait_for(sub.unsubscribe(), _CLOSE_TIMEOUT_S)
                except Exception as exc2:  # the connection is gone: nothing more arrives anyway
                    log.debug("relay: unsubscribe failed: %s", exc2 or type(exc2).__name__)

        await asyncio.gather(*(end(sub) for sub in subs))

    async def _publisher(self, nc: Any, js: Any, held: asyncio.Queue[tuple[str, bytes]]) -> None:
        while True:
            subject, payload = await held.get()
            self._storing += 1
            try:
                await self._store(nc, js, subject, payload)
            finally:
                self._storing -= 1
                self._held_bytes -= len(payload)
                held.task_done()

    async def _store(self, nc: Any, js: Any, subject: str, payload: bytes) -> None:
        target = stored_prefix(self.opts.prefix) + subject[len(self.opts.prefix):]
        headers = {"Nats-Msg-Id": message_id(subject, payload)}
        if len(payload) + _header_bytes(headers) > nc.max_payload:
            self._reject(f"{len(payload)} bytes, over the server's max_payload {nc.max_payload} with the header")
            return
        delay = _RETRY_FIRST_S
        while True:
            try:
                ack = await js.publish(target, payload, timeout=_PUBLISH_TIMEOUT_S, headers=headers)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no leader yet, node gone, timeout: the stream has not stored it
                if _permanent(exc):
                    self._reject(str(exc) or type(exc).__name__)
                    return
                self.counts.retries += 1
                if self.counts.retries == 1 or self.counts.retries % 1000 == 0:
                    log.warning("relay: stream %s did not store a message (%s); retrying (%d retries so far)",
                                self.opts.stream, str(exc) or type(exc).__name__, self.counts.retries)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            if ack.duplicate:
                self.counts.duplicates += 1
            else:
                self.counts.stored += 1
            return

    def _reject(self, why: str) -> None:
        self.counts.rejected += 1
        if self.counts.rejected == 1 or self.counts.rejected % 100 == 0:
            log.error("relay: a message the stream %s can never take was left out (%s; %d so far)",
                      self.opts.stream, why, self.counts.rejected)
