"""The cloud's MQTT side for ``vgw cloud``: :class:`CloudLink` (one mutual-TLS connection, MQTT 5 or 3.1.1)
and :class:`Listener` (messages -> JSON-ready events: decrypted batches, duplicates, seq gaps, verified
receipts, status, rejects). Keys, documents and receipt files are in :mod:`vgw.cloud.cloudkit`.

Errors: :class:`~vgw.base.errors.UplinkError` (broker refused or silent), :class:`vgw.cloud.cloudkit.CloudKitError`
(unusable TLS files or options).
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric import ec

from vgw.base.errors import UplinkError
from vgw.cloud.cloudkit import CloudKitError
from vgw.cloud.consent_authority import HpkePrivateKey
from vgw.cloud.envelopes import EnvelopeError, ReceiptError, open_envelope, verify_receipt
from vgw.cloud.mqttclient import make_client
from vgw.contract.consent.verifier import MAX_GRANTS
from vgw.contract.topics import Stream, data_topic, device_filters, parse_device_topic
from vgw.transport.mqttversion import refuses_mqtt5
from vgw.transport.tlsctx import client_context

__all__ = ["BrokerOptions", "CloudLink", "Listener"]

_RECEIPTS_REMEMBERED = 100_000  # receipt digests a listener keeps to report a repeat as a duplicate
# De-duplication memory (README "Telemetry envelope", docs/fleet.md "Parts"): per device, grant and
# epoch, the highest seq up to which every seq arrived and a bitmap of the SEQ_WINDOW seqs above it (512 bytes);
# per stream the EPOCHS_KEPT epochs used last; per device the STREAMS_PER_DEVICE grants used last (a consent
# document holds at most 64 grants).
SEQ_WINDOW = 4096
EPOCHS_KEPT = 4
STREAMS_PER_DEVICE = MAX_GRANTS


# ---------------------------------------------------------------- the MQTT link


@dataclass(frozen=True)
class BrokerOptions:
    """Where and how to connect: ``protocol`` is ``"auto"``, ``"5"`` or ``"3.1.1"``."""

    host: str
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    protocol: str = "auto"
    prefix: str = "vgw"
    client_id: str = "vgw-cloud"
    persistent: bool = False

    @staticmethod
    def parse_address(text: str) -> tuple[str, int]:
        """``HOST:PORT`` -> (host, port). Raises :class:`CloudKitError`."""
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CloudKitError(f"--broker {text!r}: expected HOST:PORT")
        return host, int(port)


class CloudLink:
    """One MQTT connection of the cloud over mutual TLS; paho is private, its callbacks only record.

    ``on_message(topic, payload)`` runs on paho's network thread. Raises :class:`UplinkError` from
    :meth:`connect`, :meth:`publish` and :meth:`subscribe` when the broker refuses or does not answer.
    """

    def __init__(self, opts: BrokerOptions, on_message: Callable[[str, bytes], None] | None = None) -> None:
        self.opts = opts
        self.protocol = "5" if opts.protocol in ("auto", "5") else "3.1.1"
        self._on_message_cb = on_message
        self._cond = threading.Condition()
        self._connected = False
        self._error: str | None = None
        self._version_refused = False  # the last attempt's answer says: not this MQTT version
        self._acks: dict[int, str | None] = {}
        self._subacks: dict[int, list[str]] = {}
        self._client: mqtt.Client | None = None
        self._subscriptions: list[tuple[str, int]] = []

    def _make(self) -> mqtt.Client:
        ctx = client_context(self.opts.ca_file, self.opts.cert_file, self.opts.key_file, error=CloudKitError)
        client = make_client(self.opts.client_id, self.protocol, ctx, self.opts.persistent)
        client.reconnect_delay_set(1, 4)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def connect(self, timeout: float = 10.0) -> CloudLink:
        """Connect (``auto``: MQTT 5, else 3.1.1 if the broker refuses 5). Raises :class:`UplinkError`."""
        ok = self._try(timeout)
        # A 3.1.1-only broker (NATS) refuses MQTT 5 (vgw.transport.mqttversion); a TLS failure raises in connect and
        # is not that.
        if not ok and self.opts.protocol == "auto" and self.protocol == "5" and self._version_refused:
            self.protocol = "3.1.1"
            ok = self._try(timeout)
        if not ok:
            raise UplinkError(f"cannot connect to {self.opts.host}:{self.opts.port}: {self._error or 'timeout'}")
        return self

    def _try(self, timeout: float) -> bool:
        self.close()
        self._error = None
        self._version_refused = False
        client = self._make()
        self._client = client
        try:
            if self.protocol == "5":
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties
                props = None
                if self.opts.persistent:
                    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                    props.SessionExpiryInterval = 3600
                client.connect(self.opts.host, self.opts.port, keepalive=30,
                               clean_start=not self.opts.persistent, properties=props)
            else:
                client.connect(self.opts.host, self.opts.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            self._error = str(exc)
            self._client = None
            return False
        client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._connected or self._error is not None, timeout)
            ok = self._connected
        if not ok:
            self.close()
        return ok

    def publish(self, topic: str, payload: bytes, *, retain: bool = True, timeout: float = 10.0) -> None:
        """Publish at QoS 1 and wait for the PUBACK. Raises :class:`UplinkError`."""
        if self._client is None:
            raise RuntimeError("not connected")
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        with self._cond:
            if not self._cond.wait_for(lambda: info.mid in self._acks, timeout):
                raise UplinkError(f"no PUBACK for {topic} within {timeout:g} s")
            refused = self._acks.pop(info.mid)
        if refused is not None:
            raise UplinkError(f"broker refused publish to {topic}: {refused}")

    def subscribe(self, topics: list[tuple[str, int]], timeout: float = 10.0) -> list[str]:
        """Subscribe (kept across reconnects); returns the granted/failed reason per topic."""
        if self._client is None:
            raise RuntimeError("not connected")
        self._subscriptions = list(topics)
        _rc, sub_mid = self._client.subscribe(topics)
        if sub_mid is None:
            raise UplinkError("subscribe failed: not connected")
        mid: int = sub_mid
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                raise UplinkError("no SUBACK within timeout")
            return self._subacks.pop(mid)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            finally:
                client.loop_stop()
        with self._cond:
            self._connected = False

    # paho callbacks (network thread)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._cond:
            if rc.is_failure:
                self._error = f"CONNACK {rc}"
                self._version_refused = refuses_mqtt5(rc)
            else:
                self._connected = True
            self._cond.notify_all()
        if not rc.is_failure and self._subscriptions:
            client.subscribe(self._subscriptions)  # re-subscribe after a reconnect

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._cond:
            if not self._connected and self._error is None:
                self._error = f"disconnected before CONNACK: {rc}"
                self._version_refused = refuses_mqtt5(None)
            self._connected = False
            self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self._cond:
            self._acks[mid] = str(rc) if getattr(rc, "is_failure", False) else None
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        with self._cond:
            self._subacks[mid] = [str(r) for r in rcs]
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if self._on_message_cb is not None:
            self._on_message_cb(message.topic, bytes(message.payload))


# ---------------------------------------------------------------- the listener


def decimal_value(value: Any) -> Any:
    """A decoded value as a person reads it: each float to 15 significant digits (C's ``DBL_DIG``: every decimal
    of up to 15 digits survives a double exactly), so the noise of binary arithmetic goes (a DBC's
    ``raw * scale + offset``: 3266 * 0.01 is 32.660000000000004, written 32.66) while a value with up to 15
    significant digits, such as any raw value times a decimal scale that fit in them, is written as it is.
    Objects (an aggregate) and lists element by element; anything else as it is. Frame times are not values:
    they keep their microseconds."""
    if isinstance(value, float):
        return float(f"{value:.15g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: decimal_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decimal_value(v) for v in value]
    return value


@dataclass
class _SeqWindow:
    """Which seqs of one epoch arrived: every seq up to ``floor``, and seq ``floor + 1 + i`` if bit i of ``bits``.

    Memory is bounded whatever arrives: a seq more than SEQ_WINDOW above ``floor`` slides the window up, and the
    seqs it passes that never arrived are given up (a copy of one, or the seq itself arriving later, is then
    taken for a duplicate: it is below ``floor``).
    """

    floor: int = 0
    bits: int = 0
    first: int = 0  # the lowest seq accepted (a listener started mid-stream has not lost what came before it)
    high: int = 0

    def add(self, seq: int) -> bool:
        """Record ``seq``; False if it arrived before (or is below the window)."""
        if seq <= self.floor:
            return False
        k = seq - self.floor - 1
        if k >= SEQ_WINDOW:
            shift = k - SEQ_WINDOW + 1
            self.bits >>= shift
            self.floor += shift
            k -= shift
        if (self.bits >> k) & 1:
            return False
        self.bits |= 1 << k
        run = (~self.bits & (self.bits + 1)).bit_length() - 1  # the seqs now contiguous with floor
        self.bits >>= run
        self.floor += run
        self.first = min(self.first, seq) if self.first else seq
        self.high = max(self.high, seq)
        return True

    def missing(self) -> list[list[int]]:
        """Seqs from ``first`` to ``high`` that did not arrive (within the window), as inclusive ranges."""
        ranges: list[list[int]] = []
        for n in range(max(self.first, self.floor + 1), self.high + 1):
            if not (self.bits >> (n - self.floor - 1)) & 1:
                if ranges and ranges[-1][1] == n - 1:
                    ranges[-1][1] = n
                else:
                    ranges.append([n, n])
        return ranges


@dataclass
class _Stream:
    # (epoch, seq): de-duplication key (README "Telemetry envelope"); the epochs used last, newest at the end
    windows: collections.OrderedDict[str, _SeqWindow] = field(default_factory=collections.OrderedDict)
    batches: int = 0
    duplicates: int = 0
    epochs: int = 0  # epochs seen (one forgotten and seen again counts again)
    epoch: str = ""  # of the newest accepted batch

    def window(self, epoch: str) -> _SeqWindow:
        win = self.windows.get(epoch)
        if win is None:
            win = self.windows[epoch] = _SeqWindow()
            self.epochs += 1
            if len(self.windows) > EPOCHS_KEPT:
                self.windows.popitem(last=False)
        self.windows.move_to_end(epoch)
        return win


class Listener:
    """Turns messages into events (dicts, one JSON line each); thread-safe.

    Events: ``batch`` (decrypted), ``duplicate`` (an (epoch, seq) seen before: QoS 1 re-delivery or a replay after
    failover, dropped; also a seq more than SEQ_WINDOW below the highest of its epoch, which cannot be told from
    one), ``duplicate-receipt`` (a receipt token this listener reported before, among the last
    100,000; other listeners and a restarted one do not know it, so downstream de-duplicates too), ``gap``
    (seqs skipped: ``from``..``to``; off with ``detect_gaps=False``, e.g. for one of several ``--share``
    workers that sees only part of each stream), ``receipt`` / ``bad-receipt``, ``status``, ``rejected``.
    """

    def __init__(self, prefix: str, recipients: Mapping[str, HpkePrivateKey],
                 device_keys: Mapping[str, ec.EllipticCurvePublicKey], emit: Callable[[dict[str, Any]], None],
                 *, detect_gaps: bool = True) -> None:
        self.prefix = prefix
        self._recipients = dict(recipients)
        self._keys = dict(device_keys)
        self._emit = emit
        self.detect_gaps = detect_gaps
        self._lock = threading.Lock()
        self._streams: dict[str, collections.OrderedDict[str, _Stream]] = {}  # device -> grant -> stream
        self._key_of: dict[tuple[str, str], str] = {}
        self._receipts_seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.counts: dict[str, int] = {}

    def topics(self, share: str | None = None) -> list[tuple[str, int]]:
        return [(topic, 1) for topic in device_filters(self.prefix, share)]

    def handle(self, topic: str, payload: bytes) -> None:
        """Classify one message and emit its event(s). Never raises (a listener must not die on input)."""
        arrived = time.time()
        parsed = parse_device_topic(self.prefix, topic)
        try:
            if parsed is None:
                pass
            elif parsed.stream is Stream.DATA and parsed.grant is not None:
                self._data(parsed.device, parsed.grant, payload, arrived)
            elif parsed.stream is Stream.RECEIPT:
                self._receipt(parsed.device, payload, arrived)
            elif parsed.stream is Stream.STATUS:
                self._status(parsed.device, payload, arrived)
        except Exception as exc:
            self._out({"type": "rejected", "topic": topic, "reason": "internal", "detail": repr(exc),
                       "arrived": arrived})

    def _out(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.counts[event["type"]] = self.counts.get(event["type"], 0) + 1
        self._emit(event)

    def _data(self, device: str, grant: str, payload: bytes, arrived: float) -> None:
        with self._lock:
            cached = self._key_of.get((device, grant))
        names = ([cached] if cached else []) + [n for n in self._recipients if n != cached]
        batch = None
        last: EnvelopeError | None = None
        for name in names:
            try:
                batch = open_envelope(payload, self._recipients[name], device, grant)
            except EnvelopeError as exc:
                last = exc
                if exc.reason != "hpke":
                    break  # opened but malformed: another key would not help
                continue
            with self._lock:
                self._key_of[(device, grant)] = name
            break
        if batch is None:
            reason = last.reason if last else "no-key"
            self._out({"type": "rejected", "topic": data_topic(self.prefix, device, grant), "reason": reason,
                       "detail": str(last) if last else "no recipient key", "arrived": arrived})
            return
        seq: int = batch["seq"]
        epoch: str = batch.get("epoch", "")
        events: list[dict[str, Any]] = []
        with self._lock:
            st = self._stream(device, grant)
            # De-duplicate on (epoch, seq) (README "Telemetry envelope"): a wiped or re-provisioned device starts a new
            # epoch at seq 1, which is new data, not a re-delivery.
            win = st.window(epoch)
            high = win.high
            if not win.add(seq):
                st.duplicates += 1
                events.append({"type": "duplicate", "device": device, "grant": grant, "epoch": epoch, "seq": seq,
                               "arrived": arrived})
            else:
                # A first-seen seq above high + 1 means seqs in between were lost (or are late). The first
                # message of an epoch only counts from 1 when seq restarts there: a listener started
                # mid-stream has not "lost" the history it never subscribed to.
                if self.detect_gaps and high and seq > high + 1:
                    events.append({"type": "gap", "device": device, "grant": grant, "epoch": epoch,
                                   "from": high + 1, "to": seq - 1, "arrived": arrived})
                st.batches += 1
                st.epoch = epoch
                samples = [{**s, "value": decimal_value(s["value"])} if "value" in s else s for s in batch["samples"]]
                events.append({"type": "batch", "device": device, "grant": grant, "epoch": epoch, "seq": seq,
                               "samples": samples, "arrived": arrived, "bytes": len(payload)})
        for e in events:
            self._out(e)

    def _stream(self, device: str, grant: str) -> _Stream:
        """The stream of ``device``/``grant`` (under the lock); a device's least recently used grant is forgotten
        beyond STREAMS_PER_DEVICE."""
        grants = self._streams.setdefault(device, collections.OrderedDict())
        st = grants.get(grant)
        if st is None:
            st = grants[grant] = _Stream()
            if len(grants) > STREAMS_PER_DEVICE:
                grants.popitem(last=False)
        grants.move_to_end(grant)
        return st

    def _receipt(self, device: str, payload: bytes, arrived: float) -> None:
        token = payload.decode("ascii", errors="replace")
        key = self._keys.get(device)
        try:
            if key is None:
                raise ReceiptError(f"receipt from device {device!r} without a known certificate")
            claims = verify_receipt(token, key, device=device)
        except ReceiptError as exc:
            self._out({"type": "bad-receipt", "device": device, "reason": str(exc), "token": token,
                       "arrived": arrived})
            return
        digest = hashlib.sha256(payload).digest()
        with self._lock:
            seen = digest in self._receipts_seen
            if not seen:
                self._receipts_seen[digest] = None
                if len(self._receipts_seen) > _RECEIPTS_REMEMBERED:
                    self._receipts_seen.popitem(last=False)
        if seen:  # the same signed receipt again (QoS 1 re-delivery, a replay after failover)
            self._out({"type": "duplicate-receipt", "device": device, "receipt": claims.get("typ"),
                       "arrived": arrived})
            return
        self._out({"type": "receipt", "device": device, "receipt": claims.get("typ"), "claims": claims,
                   "token": token, "arrived": arrived})

    def _status(self, device: str, payload: bytes, arrived: float) -> None:
        status: Any = None
        if payload:
            try:
                status = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                status = {"unparsable": True}
        self._out({"type": "status", "device": device, "status": status, "arrived": arrived})

    def summary(self) -> dict[str, Any]:
        """Per stream: batches, duplicates, epochs, and for the newest epoch its first and highest seq and
        missing ranges (if gap detection is on)."""
        with self._lock:
            streams = {}
            for d, g, st in sorted((d, g, st) for d, grants in self._streams.items() for g, st in grants.items()):
                win = st.windows.get(st.epoch) or _SeqWindow()
                streams[f"{d}/{g}"] = {"batches": st.batches, "duplicates": st.duplicates, "epochs": st.epochs,
                                       "epoch": st.epoch, "first": win.first, "high": win.high,
                                       **({"missing": win.missing()} if self.detect_gaps else {})}
            return {"streams": streams, "events": dict(self.counts)}
