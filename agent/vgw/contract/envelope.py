"""The telemetry envelope (README "Telemetry envelope").

``payload = 0x01 || enc || ct``: RFC 9180 HPKE single-shot seal, base mode, to the grant's recipient key;
suite DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM (or the MLKEM768-X25519 hybrid KEM when the
grant asks for it); ``info = b"vgw/1 " + device + b"/" + grant``; empty aad. The plaintext is zlib
(RFC 1950) compressed UTF-8 JSON: version 1 (one object per sample) or version 2 (columnar: ``t0_us`` and one
series of ``dt_us``/``value`` arrays per path), README "Telemetry envelope". The agent sends version 2;
every receiver reads both through :func:`plaintext_samples`. The version byte, the suites and ``info`` are
:mod:`vgw.contract.sealing`'s, which the cloud's opener reads too.

JSON is written with orjson where it is installed (about 8x cheaper per sample than the stdlib), else the
stdlib ``json`` (same bytes up to float formatting: both write the shortest round-trip form).
"""

from __future__ import annotations

import json
import operator
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from vgw.contract.sealing import ENVELOPE_VERSION, KEM_MLKEM768_X25519, KEM_X25519, SENT_VERSION, SUITES, hpke_info

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - a platform without an orjson wheel
    _orjson = None  # type: ignore[assignment]

#: zlib's level is not on the wire (RFC 1950 streams of every level inflate alike). Measured on 20k-frame
#: batches (docs/performance.md "Performance v3"): level 4 costs 0.06 µs per sample on the demo vehicle and
#: 0.22 on random high-entropy values (level 6: 0.12 and 0.58) for 3-7 % more bytes.
ZLIB_LEVEL = 4
#: A series as the collector keeps it: frame times (whole microseconds since the Unix epoch, see
#: :func:`to_us`) and values, in the order they were kept.
Series = tuple[list[int], list[Any]]


def dumps(doc: Any) -> bytes:
    """Compact UTF-8 JSON. A value orjson cannot write (an integer over 64 bits) goes through the stdlib;
    a non-finite float never gets here (the pipeline drops it) and raises ValueError in the stdlib path."""
    if _orjson is not None:
        try:
            return _orjson.dumps(doc)
        except TypeError:
            pass
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")


def loads(data: bytes) -> Any:
    """Parse UTF-8 JSON. Raises ValueError (or its subclass json.JSONDecodeError / orjson.JSONDecodeError)."""
    if _orjson is not None:
        return _orjson.loads(data)
    return json.loads(data.decode("utf-8"))
_MLKEM768_PK = 1184

RecipientKey = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey


def load_recipient_key(kem: str, pk: bytes) -> RecipientKey:
    """Parse a raw recipient public key. Raises ValueError if it is not a valid key of that KEM."""
    if kem == KEM_X25519:
        return x25519.X25519PublicKey.from_public_bytes(pk)
    if kem == KEM_MLKEM768_X25519:
        if len(pk) != _MLKEM768_PK + 32:
            raise ValueError("MLKEM768-X25519 public key must be 1216 bytes")
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(pk[:_MLKEM768_PK]),
            x25519.X25519PublicKey.from_public_bytes(pk[_MLKEM768_PK:]),
        )
    raise ValueError(f"unsupported KEM {kem!r}")


def batch_plaintext(device: str, grant: str, seq: int, samples: Sequence[dict[str, Any]], *, epoch: str) -> bytes:
    """The version 1 plaintext (README "Telemetry envelope"). ``epoch`` is the outbox's: receivers de-duplicate on
    (device, grant, epoch, seq), so a wiped device that starts ``seq`` at 1 again is not taken for a replay."""
    doc = {"v": 1, "device": device, "grant": grant, "seq": seq, "epoch": epoch, "samples": list(samples)}
    return zlib.compress(json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8"), ZLIB_LEVEL)


def columnar_plaintext(device: str, grant: str, seq: int, series: Mapping[str, Series], *, epoch: str) -> bytes:
    """The version 2 plaintext (README "Telemetry envelope") of ``series``: path -> (frame times in µs, values).

    Collection rules may keep a path's samples out of time order (pre-trigger history is released after
    the sample that triggered it); such a series is put in time order first (stable), as README "Telemetry
    envelope" requires.
    """
    cols: list[tuple[str, int, list[int], list[Any]]] = []
    t0_us: int | None = None
    for path, (us, values) in series.items():
        if not us:
            continue
        # The steps between times, by C-level map and min: a Python loop per sample cost the writer thread
        # about a third of its time with every signal consented (docs/performance.md).
        dt = list(map(operator.sub, us[1:], us[:-1]))
        if dt and min(dt) < 0:
            order = sorted(range(len(us)), key=us.__getitem__)
            us = [us[i] for i in order]
            values = [values[i] for i in order]
            dt = list(map(operator.sub, us[1:], us[:-1]))
        if t0_us is None or us[0] < t0_us:
            t0_us = us[0]
        cols.append((path, us[0], dt, values))
    out = []
    for path, first, dt, values in cols:
        assert t0_us is not None
        dt.insert(0, first - t0_us)
        out.append({"path": path, "dt_us": dt, "value": values})
    doc = {"v": SENT_VERSION, "device": device, "grant": grant, "seq": seq, "epoch": epoch, "t0_us": t0_us or 0,
           "series": out}
    return zlib.compress(dumps(doc), ZLIB_LEVEL)


def to_us(times: Sequence[float]) -> list[int]:
    """Frame times in whole microseconds, each as :func:`us_of` gives it."""
    return [(s := int(t)) * 1_000_000 + round((t - s) * 1e6) for t in times]


def us_of(t: float) -> int:
    """A frame time in whole microseconds, exactly as ``round(t, 6)`` would round it (so ``us / 1e6`` is the
    version 1 time to the bit): the fraction is scaled apart from the whole seconds, where ``t * 1e6`` would
    round a fifth of all times the other way. Also several times cheaper than ``round(t, 6)``."""
    s = int(t)
    return s * 1_000_000 + round((t - s) * 1e6)


def plaintext_samples(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The samples of a parsed plaintext of either version, as version 1 sample objects (README "Telemetry envelope").

    Version 2 sample i of a series is ``{"t": (t0_us + sum(dt_us[0..i])) / 1e6, "path", "value": value[i]}``.
    Raises ValueError naming what breaks the schema.
    """
    version = batch.get("v")
    if version == 1:
        samples = batch.get("samples")
        if not isinstance(samples, list) or not all(
                isinstance(s, dict) and isinstance(s.get("path"), str) and isinstance(s.get("t"), int | float)
                for s in samples):
            raise ValueError("samples must be a list of {t, path, value} objects")
        return samples
    if version != 2:
        raise ValueError("batch must be an object with v = 1 or 2")
    t0 = batch.get("t0_us")
    series = batch.get("series")
    if not _is_int(t0) or not isinstance(series, list):
        raise ValueError("a v2 batch needs an integer t0_us and a list of series")
    out: list[dict[str, Any]] = []
    for s in series:
        if not isinstance(s, dict) or not isinstance(s.get("path"), str):
            raise ValueError("each series must be an object with a string path")
        dts, values = s.get("dt_us"), s.get("value")
        if not isinstance(dts, list) or not isinstance(values, list) or len(dts) != len(values) \
                or not all(_is_int(d) for d in dts):
            raise ValueError("each series needs integer dt_us and value arrays of one length")
        if any(d < 0 for d in dts[1:]):
            raise ValueError("a series must be in time order (dt_us after the first >= 0)")
        path, t = s["path"], t0
        for dt, value in zip(dts, values, strict=True):
            t += dt
            out.append({"t": t / 1e6, "path": path, "value": value})
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)



def seal(kem: str, recipient: RecipientKey, device: str, grant: str, plaintext: bytes) -> bytes:
    """Seal an already-compressed plaintext into an envelope."""
    return bytes([ENVELOPE_VERSION]) + SUITES[kem].encrypt(plaintext, recipient, info=hpke_info(device, grant))
