"""One thread owns a paho client and drives its socket itself (aiomqtt's pattern): no ``loop_start`` thread.

:class:`ClientLoop` waits in ``select`` on the client's socket and on a :class:`Doorbell`, then calls paho's
``loop_read``, ``loop_write`` and ``loop_misc``, so paho's callbacks run in the owner thread, between its steps.
Other threads never call the client: they ring the doorbell, with a request or without one (new work), and the
owner acts on it.

The owner sleeps until something happens or a timer of its own is due (``until``); the only timer of the
connection itself is the MQTT keepalive (MQTT 3.1.1 §3.1.2.10, MQTT 5.0 §3.1.2.10): paho sends PINGREQ once
``keepalive`` seconds passed since it last wrote a packet or read a byte, and only ``loop_misc`` does that. paho
keeps those two times privately; the loop keeps its own copy, stamped after each call that may write or read,
so it wakes at the keepalive or a moment after it (never before), and an idle connection costs one wake-up per
keepalive.
"""

from __future__ import annotations

import logging
import math
import select
import socket
import threading
import time
from collections.abc import Hashable
from typing import Any

import paho.mqtt.client as mqtt

__all__ = ["ClientLoop", "Doorbell"]

log = logging.getLogger(__name__)


class Doorbell:
    """Wakes the owner thread from any thread, with the requests rung since it last answered (a set: asking twice
    is asking once). One byte on a socketpair, written only while none is unread, so a thread that rings a
    thousand times costs the owner one wake-up. Thread-safe; :meth:`answer` and :meth:`wait` are the owner's."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._lock = threading.Lock()
        self._asks: set[Hashable] = set()
        self._rung = False

    def fileno(self) -> int:
        return self._r.fileno()

    def ring(self, *asks: Hashable) -> None:
        with self._lock:
            self._asks.update(asks)
            if self._rung:
                return
            self._rung = True
        try:
            self._w.send(b"\0")
        except OSError:  # closed: the owner has ended; a full buffer: it is awake anyway
            pass

    def answer(self) -> set[Hashable]:
        """Take the byte and the requests (the owner, after select said the bell rang)."""
        with self._lock:
            asks, self._asks = self._asks, set()
            self._rung = False
            try:
                self._r.recv(64)
            except OSError:
                pass
        return asks

    def wait(self, until: float) -> set[Hashable]:
        """Sleep until the bell rings or ``until`` (monotonic; ``inf``: no timer); the requests rung."""
        timeout = None if math.isinf(until) else max(0.0, until - time.monotonic())
        ready, _, _ = select.select([self._r], [], [], timeout)
        return self.answer() if ready else set()

    def close(self) -> None:
        self._r.close()
        self._w.close()


class ClientLoop:
    """Drives one connected paho client from the thread that owns it (see the module docstring).

    Only the owner calls it. :meth:`publish` and :meth:`subscribe` are paho's, stamped for the keepalive.
    ``wakeups`` counts the times :meth:`wait` returned (a packet, the bell or a timer).
    """

    def __init__(self, client: mqtt.Client, bell: Doorbell, keepalive: float) -> None:
        self.client = client
        self.bell = bell
        self.keepalive = keepalive
        self.wakeups = 0
        now = time.monotonic()
        self._wrote = now  # no earlier than paho's own "last packet written" (a keepalive estimate, see above)
        self._heard = now  # no earlier than paho's "last byte read"

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._wrote = time.monotonic()
        return info

    def subscribe(self, topic: str) -> int | None:
        """Subscribe at QoS 1; the message id of the SUBSCRIBE, or None if it could not even be queued."""
        rc, mid = self.client.subscribe(topic, qos=1)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        self._wrote = time.monotonic()
        return mid

    def keepalive_due(self) -> float:
        """When paho must next look at the keepalive (monotonic; ``inf`` without one)."""
        return min(self._wrote, self._heard) + self.keepalive if self.keepalive > 0 else math.inf

    def wait(self, until: float) -> set[Hashable]:
        """Sleep until the socket is ready, the bell rings, the keepalive or ``until`` is due; then let paho read,
        write and keep the connection alive (its callbacks run here). Returns the requests rung."""
        client = self.client
        sock: Any = client.socket()
        if sock is None:
            return self.bell.wait(until)
        # TLS may hold decrypted bytes the kernel socket no longer signals (paho's own loop checks this too).
        pending = sock.pending() if hasattr(sock, "pending") else 0
        due = min(until, self.keepalive_due())
        timeout = 0.0 if pending else (None if math.isinf(due) else max(0.0, due - time.monotonic()))
        try:
            readable, writable, _ = select.select([sock, self.bell], [sock] if client.want_write() else [], [],
                                                  timeout)
        except (OSError, ValueError):  # paho closed the socket under us: the next loop_read reports it
            readable, writable = [sock], []
        self.wakeups += 1
        asks = self.bell.answer() if self.bell in readable else set()
        if sock in readable or pending:
            client.loop_read()
            self._heard = time.monotonic()
            sock = client.socket()
            while sock is not None and hasattr(sock, "pending") and sock.pending() > 0:
                client.loop_read()
                sock = client.socket()
        if writable and client.socket() is not None:
            client.loop_write()
            self._wrote = time.monotonic()
        if client.socket() is not None and time.monotonic() >= self.keepalive_due():
            client.loop_misc()  # PINGREQ, or the connection is closed for a missing PINGRESP
            self._wrote = self._heard = time.monotonic()
        return asks

    def close(self) -> None:
        """Send DISCONNECT if the socket takes it now, and close the socket either way."""
        client = self.client
        sock: Any = client.socket()
        try:
            client.disconnect()  # written at once if the socket takes it; paho then closes the socket
        except Exception:  # paho raises various errors on a dead socket
            log.debug("disconnect failed", exc_info=True)
        if client.socket() is not None and sock is not None:
            sock.close()  # the DISCONNECT did not fit: the client is dropped, so close its socket here
