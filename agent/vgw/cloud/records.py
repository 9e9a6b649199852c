"""What a cloud receiver (``vgw cloud listen``, the reference cloud peer) received, and how a received message
becomes a record. No MQTT, no I/O.

- records: :class:`ReceivedBatch`, :class:`ReceivedSample`, :class:`RejectedMessage`, :class:`Receipt`,
  :class:`BadReceipt`;
- :class:`CloudRecorder`: the recipient keys and device keys it opens messages with, the handling of one
  ``<prefix>/<device>/data/<grant>``, ``.../receipt`` or ``.../status`` message (envelopes opened and
  de-duplicated by (epoch, seq), receipts verified, status parsed), and the thread-safe accessors (batches, samples,
  gaps, receipts, status, summary). :class:`~vgw_sim.cloud.CloudPeer` is this recorder fed by MQTT.

:mod:`vgw_sim.cloud` re-exports the record types.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from vgw.cloud.consent_authority import HpkePrivateKey, RecipientKey
from vgw.cloud.envelopes import EnvelopeError, ReceiptError, open_envelope, verify_receipt
from vgw.contract.certs import device_public_key_from_cert
from vgw.contract.topics import Stream, parse_device_topic

__all__ = [
    "BadReceipt",
    "CloudRecorder",
    "Receipt",
    "ReceivedBatch",
    "ReceivedSample",
    "RejectedMessage",
]


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class ReceivedBatch:
    """One accepted (decrypted, first-seen) telemetry batch."""

    device: str
    grant: str
    seq: int
    samples: tuple[dict[str, Any], ...]
    arrived: float
    size: int
    # the outbox epoch (README "Telemetry envelope"): (epoch, seq) identifies a batch, seq alone does not
    epoch: str = ""


@dataclass(frozen=True)
class ReceivedSample:
    """One sample of an accepted batch, with the batch's seq and arrival time (``time.time()``)."""

    device: str
    grant: str
    seq: int
    t: float
    path: str
    value: Any
    arrived: float


@dataclass(frozen=True)
class RejectedMessage:
    """A data or status message that could not be opened or parsed."""

    topic: str
    reason: str
    detail: str
    arrived: float


@dataclass(frozen=True)
class Receipt:
    """A receipt whose signature verified under its device's certificate key."""

    device: str
    claims: dict[str, Any]
    token: str
    arrived: float

    @property
    def typ(self) -> str:
        return str(self.claims.get("typ"))


@dataclass(frozen=True)
class BadReceipt:
    """A receipt that did not verify (unknown device, bad signature, wrong subject, malformed)."""

    device: str
    reason: str
    token: str
    arrived: float


@dataclass
class _Stream:
    seen: set[tuple[str, int]] = field(default_factory=set)  # (epoch, seq)
    batches: list[ReceivedBatch] = field(default_factory=list)
    duplicates: int = 0
    epoch: str = ""  # of the newest accepted batch


class CloudRecorder:
    """The recording half of :class:`~vgw_sim.cloud.CloudPeer`: messages in (topic, payload, arrival time),
    records out. Every method is thread-safe; accessors return copies.
    """

    def __init__(self, prefix: str = "vgw") -> None:
        self.prefix = prefix
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._recipients: dict[tuple[str | None, str], HpkePrivateKey] = {}
        self._device_keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._rejected: list[RejectedMessage] = []
        self._receipts: list[Receipt] = []
        self._bad_receipts: list[BadReceipt] = []
        self._status: dict[str, list[dict[str, Any] | None]] = {}

    # ------------------------------------------------------------ registration

    def add_recipient(
        self, grant_id: str, key: HpkePrivateKey | RecipientKey, device: str | None = None
    ) -> None:
        """Open envelopes of ``grant_id`` with ``key`` (for every device, or only ``device``)."""
        sk = key.private_key if isinstance(key, RecipientKey) else key
        with self._lock:
            self._recipients[(device, grant_id)] = sk

    def add_device(self, device_id: str, cert: str | os.PathLike[str] | ec.EllipticCurvePublicKey) -> None:
        """Verify ``device_id``'s receipts with the key of its certificate (a path) or a given public key.

        Raises ``OSError``/``ValueError`` if the certificate cannot be read or has no P-256 key.
        """
        key = cert if isinstance(cert, ec.EllipticCurvePublicKey) else device_public_key_from_cert(cert)
        with self._lock:
            self._device_keys[device_id] = key

    # ------------------------------------------------------------ message handling

    def record(self, topic: str, payload: bytes, arrived: float | None = None) -> None:
        """Handle one message from any transport (MQTT, or a JetStream worker: :mod:`vgw.cloud.jetstream`)."""
        self._handle(topic, payload, time.time() if arrived is None else arrived)

    def _handle(self, topic: str, payload: bytes, arrived: float) -> None:
        parsed = parse_device_topic(self.prefix, topic)
        if parsed is None:
            return
        if parsed.stream is Stream.DATA and parsed.grant is not None:
            self._handle_data(topic, parsed.device, parsed.grant, payload, arrived)
        elif parsed.stream is Stream.RECEIPT:
            self._handle_receipt(parsed.device, payload, arrived)
        elif parsed.stream is Stream.STATUS:
            self._handle_status(topic, parsed.device, payload, arrived)

    def _handle_data(self, topic: str, device: str, grant_id: str, payload: bytes, arrived: float) -> None:
        with self._lock:
            sk = self._recipients.get((device, grant_id)) or self._recipients.get((None, grant_id))
        if sk is None:
            self._record_rejected(topic, "no-key", f"no recipient key for grant {grant_id!r}", arrived)
            return
        try:
            batch = open_envelope(payload, sk, device, grant_id)  # outside the lock: HPKE + zlib + JSON
        except EnvelopeError as exc:
            self._record_rejected(topic, exc.reason, str(exc), arrived)
            return
        seq: int = batch["seq"]
        epoch: str = batch.get("epoch", "")
        record = ReceivedBatch(device, grant_id, seq, tuple(batch["samples"]), arrived, len(payload), epoch)
        with self._cond:
            stream = self._streams.setdefault((device, grant_id), _Stream())
            # An (epoch, seq) seen before is a QoS 1 re-delivery (or a replay): drop the copy (README "Telemetry
            # envelope"). The same seq in another epoch is new data: a wiped or re-provisioned device starts again at 1.
            if (epoch, seq) in stream.seen:
                stream.duplicates += 1
            else:
                stream.seen.add((epoch, seq))
                stream.batches.append(record)
                stream.epoch = epoch
            self._cond.notify_all()

    def _handle_receipt(self, device: str, payload: bytes, arrived: float) -> None:
        token = payload.decode("ascii", errors="replace")
        with self._lock:
            key = self._device_keys.get(device)
        try:
            if key is None:
                raise ReceiptError(f"receipt from unregistered device {device!r}")
            claims = verify_receipt(token, key, device=device)
        except ReceiptError as exc:
            with self._cond:
                self._bad_receipts.append(BadReceipt(device, str(exc), token, arrived))
                self._cond.notify_all()
            return
        with self._cond:
            self._receipts.append(Receipt(device, claims, token, arrived))
            self._cond.notify_all()

    def _handle_status(self, topic: str, device: str, payload: bytes, arrived: float) -> None:
        status: dict[str, Any] | None = None
        if payload:
            try:
                parsed = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                self._record_rejected(topic, "status-json", str(exc), arrived)
                return
            if not isinstance(parsed, dict):
                self._record_rejected(topic, "status-json", "status is not a JSON object", arrived)
                return
            status = parsed
        with self._cond:
            self._status.setdefault(device, []).append(status)
            self._cond.notify_all()

    def _record_rejected(self, topic: str, reason: str, detail: str, arrived: float) -> None:
        with self._cond:
            self._rejected.append(RejectedMessage(topic, reason, detail, arrived))
            self._cond.notify_all()

    # ------------------------------------------------------------ accessors

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate()`` is true (re-checked on every recorded message and every 50 ms).

        ``predicate`` may call this peer's accessors. Returns False if ``timeout`` passed first.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
            return True

    def streams(self) -> list[tuple[str, str]]:
        """The (device, grant) pairs that delivered at least one batch."""
        with self._lock:
            return sorted(self._streams)

    def batches(self, device: str | None = None, grant: str | None = None) -> list[ReceivedBatch]:
        """Accepted batches (duplicates dropped) in arrival order, optionally for one device/grant."""
        with self._lock:
            out = [
                b
                for (d, g), s in self._streams.items()
                if (device is None or d == device) and (grant is None or g == grant)
                for b in s.batches
            ]
        return sorted(out, key=lambda b: b.arrived)

    def samples(self, device: str | None = None, grant: str | None = None) -> list[ReceivedSample]:
        """Every sample of the accepted batches, in arrival order."""
        return [
            ReceivedSample(b.device, b.grant, b.seq, float(s["t"]), s["path"], s.get("value"), b.arrived)
            for b in self.batches(device, grant)
            for s in b.samples
        ]

    def seqs(self, device: str, grant: str) -> list[int]:
        """The accepted seqs of one stream, in arrival order."""
        return [b.seq for b in self.batches(device, grant)]

    def duplicates(self, device: str | None = None, grant: str | None = None) -> int:
        """How many re-delivered copies were dropped."""
        with self._lock:
            return sum(
                s.duplicates
                for (d, g), s in self._streams.items()
                if (device is None or d == device) and (grant is None or g == grant)
            )

    def epochs(self, device: str, grant: str) -> list[str]:
        """The outbox epochs of one stream, in the order they first arrived."""
        return list(dict.fromkeys(b.epoch for b in self.batches(device, grant)))

    def missing(self, device: str, grant: str, first: int = 1, *, epoch: str | None = None) -> list[int]:
        """Seqs in ``first`` .. highest seen that never arrived (data lost). ``seq`` starts at 1 per epoch
        (README "Telemetry envelope"); ``epoch`` defaults to the one of the newest accepted batch."""
        with self._lock:
            stream = self._streams.get((device, grant))
            want = stream.epoch if stream is not None and epoch is None else epoch
            seen = {n for e, n in stream.seen if e == want} if stream is not None else set()
        if not seen:
            return []
        return [n for n in range(first, max(seen) + 1) if n not in seen]

    def gaps(self, device: str, grant: str, first: int = 1, *, epoch: str | None = None) -> list[tuple[int, int]]:
        """:meth:`missing` as inclusive ranges, e.g. ``[(4, 6)]`` when 4, 5 and 6 never arrived."""
        out: list[tuple[int, int]] = []
        for n in self.missing(device, grant, first, epoch=epoch):
            if out and out[-1][1] == n - 1:
                out[-1] = (out[-1][0], n)
            else:
                out.append((n, n))
        return out

    def rejected(self) -> list[RejectedMessage]:
        """Data and status messages that could not be opened or parsed."""
        with self._lock:
            return list(self._rejected)

    @property
    def undecryptable(self) -> int:
        """How many data messages could not be opened (no key, bad version, HPKE, zlib, JSON, mismatch)."""
        with self._lock:
            return sum(1 for r in self._rejected if r.reason != "status-json")

    def receipts(self, device: str | None = None, typ: str | None = None) -> list[Receipt]:
        """Verified receipts in arrival order, optionally of one device and/or ``typ``."""
        with self._lock:
            return [
                r
                for r in self._receipts
                if (device is None or r.device == device) and (typ is None or r.claims.get("typ") == typ)
            ]

    def bad_receipts(self, device: str | None = None) -> list[BadReceipt]:
        """Receipts that did not verify."""
        with self._lock:
            return [r for r in self._bad_receipts if device is None or r.device == device]

    def status(self, device: str) -> dict[str, Any] | None:
        """The latest status of ``device`` (``None`` if none, or the retained status was cleared)."""
        with self._lock:
            history = self._status.get(device)
            return dict(history[-1]) if history and history[-1] is not None else None

    def status_history(self, device: str) -> list[dict[str, Any] | None]:
        """Every status message of ``device`` in arrival order (``None`` for a cleared retained status)."""
        with self._lock:
            return [dict(s) if s is not None else None for s in self._status.get(device, [])]

    def clear(self) -> None:
        """Forget everything recorded (keys and registrations stay)."""
        with self._cond:
            self._streams.clear()
            self._rejected.clear()
            self._receipts.clear()
            self._bad_receipts.clear()
            self._status.clear()

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary: per stream batches, samples by path, duplicates, gaps; receipt counts."""
        with self._lock:
            streams = {}
            for d, g in sorted(self._streams):
                by_path: dict[str, int] = {}
                for s in self.samples(d, g):
                    by_path[s.path] = by_path.get(s.path, 0) + 1
                streams[f"{d}/{g}"] = {
                    "batches": len(self._streams[(d, g)].batches),
                    "samples_by_path": by_path,
                    "duplicates": self._streams[(d, g)].duplicates,
                    "gaps": [list(r) for r in self.gaps(d, g)],
                }
            return {
                "streams": streams,
                "undecryptable": self.undecryptable,
                "receipts": len(self._receipts),
                "bad_receipts": len(self._bad_receipts),
            }
