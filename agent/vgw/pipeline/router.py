"""Frame routing, consent policy and batching: the hot path between a source and the outbox.

A :class:`Router` is built from the catalogue and the grants in force, and rebuilt whenever consent changes.
For each frame that carries at least one consented signal it holds one compiled decoder for just those
signals, and for each signal the grants it goes to with their limits. Every other frame is dropped by a
single dict miss, before any decoding. A frame is keyed by (id, is_extended): the standard id 0x123 and the
extended id 0x123 are different frames on the bus (ISO 11898-1 base and extended format), so a DBC message of
one format is never decoded from a frame of the other.

Policy per grant and path (README "Telemetry envelope", docs/guarantees.md):
  * ``max_hz``: a sample is kept only if at least 1/max_hz s (frame time) passed since the last kept one.
  * ``precision_m``: latitude/longitude are snapped to a grid of that size before anything is stored.
  * defaults for read_location (0.2 Hz, 100 m) and read_compass (0.2 Hz) when the grant sets none.

A NaN or infinite value (an IEEE-float signal can carry one) is counted in ``samples_not_finite`` and dropped
before any policy sees it: it has no meaning, no JSON form, and cannot be snapped to a grid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from vgw.contract.consent.model import Grant
from vgw.contract.envelope import us_of
from vgw.contract.rules.vss import VSS_SCOPES
from vgw.pipeline.catalogue import Catalogue, SignalSpec
from vgw.pipeline.decoder import MessageDecoder, compile_sink
from vgw.pipeline.frame import ERROR, Frame
from vgw.pipeline.j1939 import ids as j1939
from vgw.pipeline.j1939.unmatched import J1939Front, filter_keys
from vgw.pipeline.rule_engine import RuleEngine

_M_PER_DEG = 111_320.0
STANDARD_ID_MAX = 0x7FF

#: A frame's identity on the bus: (arbitration id, is_extended).
FrameKey = tuple[int, bool]


@dataclass(slots=True)
class GrantBatch:
    """The open batch of one grant, kept as columns: path -> (frame times in µs, values), in the order kept.

    Columns are what the version 2 plaintext carries (README "Telemetry envelope"): a sample costs two list appends, and
    sealing needs no regrouping. :attr:`samples` is the version 1 view (tests, tools), built on demand.
    """

    grant: Grant
    cols: dict[str, tuple[list[int], list[Any]]] = field(default_factory=dict)
    count: int = 0  # samples in cols
    opened: float = 0.0  # monotonic time of the first sample
    first_t: float = 0.0
    last_kept: dict[str, float] = field(default_factory=dict)  # path -> frame time of the last kept sample
    # path -> the max_hz interval (s) its last kept sample was judged under: a later document with the same or a
    # stricter limit carries the mark over (README "Limits hold across updates"), a looser one starts afresh.
    mark_interval: dict[str, float] = field(default_factory=dict)
    taken_last: dict[str, float] = field(default_factory=dict)  # path -> frame time of its last sample taken out
    rules: RuleEngine | None = None  # the grant's collection rules (None: it has none)
    # Grants with rules only: scope -> [samples decoded, samples the rules let through] (the privacy report).
    rule_counts: dict[str, list[int]] = field(default_factory=dict)

    def append(self, path: str, t: float, value: Any) -> None:
        if not self.count:
            self.opened = time.monotonic()
            self.first_t = t
        col = self.cols.get(path)
        if col is None:
            col = self.cols[path] = ([], [])
        col[0].append(us_of(t))
        col[1].append(value)
        self.count += 1

    @property
    def samples(self) -> list[dict[str, Any]]:
        """The open samples as version 1 objects (``t`` rounded to 1 µs), in time order (stable)."""
        out = [{"t": us / 1e6, "path": path, "value": v}
               for path, (times, vs) in list(self.cols.items()) for us, v in zip(times, vs, strict=False)]
        out.sort(key=lambda s: s["t"])
        return out

    def take(self) -> list[dict[str, Any]]:
        """The open samples as version 1 objects; the batch is empty after."""
        out = self.samples
        self.clear()
        return out

    def take_columns(self) -> tuple[dict[str, tuple[list[int], list[Any]]], int]:
        """The open columns and their sample count; the batch is empty after."""
        cols, n = self.cols, self.count
        self.cols, self.count = {}, 0
        for path, (times, _values) in cols.items():
            if times:  # once per path and batch: the hot path keeps no per-sample time of its own
                self.taken_last[path] = max(self.taken_last.get(path, 0.0), max(times) / 1e6)
        return cols, n

    def clear(self) -> None:
        self.cols = {}
        self.count = 0

    def marks(self) -> dict[str, tuple[float, float]]:
        """path -> (frame time of its last kept sample, the max_hz interval it was judged under; 0: none)."""
        last = dict(self.taken_last)
        for path, (times, _values) in list(self.cols.items()):
            if times:
                last[path] = max(last.get(path, 0.0), max(times) / 1e6)
        for path, t in list(self.last_kept.items()):
            last[path] = max(last.get(path, 0.0), t)
        return {p: (t, self.mark_interval.get(p, 0.0)) for p, t in last.items()}

    def last_sent(self, path: str) -> float | None:
        """The frame time of the latest sample of ``path`` kept for this grant (open, taken or carried)."""
        times = [t for t in (self.last_kept.get(path), self.taken_last.get(path)) if t is not None]
        col = self.cols.get(path)
        if col is not None and col[0]:
            times.append(max(col[0]) / 1e6)
        return max(times) if times else None

    def carry_marks(self, marks: dict[str, tuple[float, float]], scope_of: Callable[[str], str | None]) -> None:
        """Keep the marks whose path is limited at least as strictly by this batch's grant as when they were made.

        A limit that stays or tightens holds across a new document and a restart of the agent: "at most one reading
        every 2 s" stays true for the app, whatever changed beside it, also when it is new (no limit before: the
        interval then was 0). A looser limit (or none) starts afresh.
        """
        self.last_kept, self.mark_interval, self.taken_last = {}, {}, {}
        for path, (t, then) in marks.items():
            scope = scope_of(path)
            if scope is None or scope not in self.grant.scopes:
                continue
            hz = self.grant.limits_for(scope).max_hz
            now = 1.0 / hz if hz else 0.0
            if now >= then - 1e-9:  # the same or stricter (0 and 0: unlimited still, kept for a later limit)
                self.last_kept[path], self.mark_interval[path] = t, now


def _drop_rules(batch: GrantBatch) -> None:
    """Forget a grant's rule state: its pre-trigger history and open windows live in memory only."""
    if batch.rules is not None:
        batch.rules.clear()
        batch.rules = None


@dataclass(frozen=True, slots=True)
class _Target:
    batch: GrantBatch
    min_interval: float  # 0: no rate limit
    precision_m: float  # 0: full resolution
    direct: bool  # no rules, no rate limit, nothing to snap: the sample goes straight into the columns


@dataclass(frozen=True, slots=True)
class _Entry:
    spec: SignalSpec
    coord: str  # "lat", "lon" or ""
    targets: tuple[_Target, ...]


class Router:
    """Immutable routing for one consent state; the batches it feeds are owned by the pipeline."""

    def __init__(self, catalogue: Catalogue, grants: tuple[Grant, ...], batches: dict[str, GrantBatch],
                 counters: dict[str, int] | None = None) -> None:
        # Keyed by (frame id, is_extended); a J1939 message by (route key, True): its PGN, PDU1 destination
        # and source (vgw.pipeline.j1939.ids).
        self.decoders: dict[FrameKey, MessageDecoder] = {}
        self.j1939 = any(j1939.is_j1939(m) for m in catalogue.messages.values())
        wanted: dict[FrameKey, list[tuple[str, object]]] = {}
        message_of: dict[FrameKey, int] = {}
        for spec in catalogue.specs:
            targets = []
            leaf = spec.path.rsplit(".", 1)[-1]
            coord = "lat" if leaf == "Latitude" else "lon" if leaf == "Longitude" else ""
            for g in grants:
                if spec.scope not in g.scopes:
                    continue
                lim = g.limits_for(spec.scope)
                min_interval, precision_m = 1.0 / lim.max_hz if lim.max_hz else 0.0, lim.precision_m or 0.0
                direct = batches[g.id].rules is None and not min_interval and not (precision_m and coord)
                targets.append(_Target(batches[g.id], min_interval, precision_m, direct))
            if not targets:
                continue  # no grant covers it: never decoded
            message = catalogue.messages[spec.frame_id]
            key = (j1939.message_key(message, spec.source_address), True) if j1939.is_j1939(message) else \
                (spec.frame_id, bool(message.is_extended_frame))
            message_of[key] = spec.frame_id
            wanted.setdefault(key, []).append((spec.signal, _Entry(spec, coord, tuple(targets))))
        j1939.widen(wanted)
        for key, signals in wanted.items():
            # Latitude before longitude, so a frame carrying both snaps longitude with its own latitude.
            signals.sort(key=lambda s: 0 if isinstance(s[1], _Entry) and s[1].coord == "lat" else 1)
            self.decoders[key] = MessageDecoder(catalogue.messages[message_of[key]], signals)
        #: Column writers (:func:`_column_writer`) for the messages whose every sample goes straight into columns;
        #: built only with the pipeline's ``counters``, which they update.
        self.writers: dict[FrameKey, Callable[[bytes, float], bool]] = {}
        if counters is not None:
            for key, decoder in self.decoders.items():
                if _writes_columns(decoder):
                    self.writers[key] = self._compile_on_first_frame(key, decoder, counters)
        # A consented J1939 message longer than 8 bytes arrives by transport protocol (vgw.pipeline.j1939.transport).
        self.j1939_long = any(j1939.is_route_key(k) and d.length > 8 for (k, _), d in self.decoders.items())
        scopes = {s for g in grants for s in g.scopes}
        extra = filter_keys(scopes, self.j1939_long) if self.j1939 else frozenset()
        self._extra_filters = frozenset((k, True) for k in extra)

    def _compile_on_first_frame(self, key: FrameKey, decoder: MessageDecoder,
                                counters: dict[str, int]) -> Callable[[bytes, float], bool]:
        """A stand-in that generates the message's column writer at its first frame and replaces itself: a
        consent change (a revocation holds the agent lock while the router is rebuilt) compiles nothing for
        messages that never arrive, and a DBC with hundreds of messages does not lengthen it."""
        def first(data: bytes, t: float) -> bool:
            write = _column_writer(decoder, counters)
            if write is None:  # cannot happen for a message _writes_columns accepted; the decoder path then
                self.writers.pop(key, None)
                return False
            self.writers[key] = write
            return write(data, t)
        return first

    @property
    def frames(self) -> frozenset[FrameKey]:
        """The (id, is_extended) frames that carry a consented signal; J1939 route keys among them
        (vgw.pipeline.j1939.ids), which the kernel filter turns into masked filters."""
        return frozenset(self.decoders) | self._extra_filters

    @property
    def frame_ids(self) -> frozenset[int]:
        return frozenset(fid for fid, _ in self.decoders)


class Pipeline:
    """Decodes frames through the current router into per-grant batches.

    Collection rules (README "Collection rules") apply before the limits: a grant with ``collect`` has a rule engine
    (vgw.pipeline.rule_engine) on its batch, fed every decoded sample of the grant; only what the engine lets
    through meets the limits. A grant without rules takes exactly the path it always did.

    Not thread-safe by itself: the runtime holds one lock around :meth:`process`, :meth:`due` and
    :meth:`swap`, so a revocation can never interleave with a half-processed frame.
    """

    def __init__(self, catalogue: Catalogue | None) -> None:
        # With no catalogue (an OBD-only agent) the pipeline still batches samples offered to it.
        self.catalogue = catalogue if catalogue is not None else Catalogue(messages={}, specs=())
        self.batches: dict[str, GrantBatch] = {}
        self.counters: dict[str, int] = {
            "frames": 0,
            "frames_unrouted": 0,
            "signals_short": 0,
            "samples": 0,
            "samples_rate_limited": 0,
            "samples_not_finite": 0,
        }
        self.router = Router(self.catalogue, (), self.batches, self.counters)
        self._j1939 = J1939Front() if self.router.j1939 else None  # README "SAE J1939"
        self._parts: dict[str, list[bytes | None]] = {}
        self._last_lat: float | None = None
        self._scope_of_path = self.catalogue.scope_of_path()
        self._seeded: dict[str, dict[str, tuple[float, float]]] = {}  # rate marks kept on disk (seed_marks)

    def seed_marks(self, marks: dict[str, dict[str, tuple[float, float]]]) -> None:
        """The rate marks a previous run stored (grant -> path -> (t, interval)): taken by the next :meth:`swap`,
        for each grant whose limits are still the same or stricter."""
        self._seeded = {g: dict(m) for g, m in marks.items()}

    def scope_of(self, path: str) -> str | None:
        return self._scope_of_path.get(path) or VSS_SCOPES.get(path)

    def swap(self, grants: tuple[Grant, ...]) -> list[str]:
        """Route for ``grants`` from now on. Returns ids of grants whose open batches were dropped."""
        dropped = [gid for gid in self.batches if gid not in {g.id for g in grants}]
        keep: dict[str, GrantBatch] = {}
        for g in grants:
            batch = self.batches.get(g.id)
            if batch is not None and batch.grant != g:
                # Same id, new terms (scopes, limits, recipient, controller): what was collected under the old
                # terms must not leave under the new ones.
                batch.clear()
                marks = batch.marks()
                batch.grant = g
                batch.carry_marks(marks, self.scope_of)
                _drop_rules(batch)
            if batch is None:
                batch = GrantBatch(g)
                seeded = self._seeded.get(g.id)
                if seeded:
                    batch.carry_marks(seeded, self.scope_of)
            keep[g.id] = batch
            if keep[g.id].rules is None and g.collect:
                keep[g.id].rules = RuleEngine(g.collect)
        self._seeded = {}  # only the first routing after a start takes them; a later grant starts a new period
        for gid in dropped:
            self.batches[gid].clear()  # in-memory data of a revoked grant go at once
            _drop_rules(self.batches[gid])  # and the rules' pre-trigger history and open windows with them
        self.batches = keep
        self.router = Router(self.catalogue, grants, self.batches, self.counters)
        self._parts.clear()
        if self._j1939 is not None:
            self._j1939.reset({s for g in grants for s in g.scopes}, self.router.j1939_long)
        return dropped

    def process(self, arbitration_id: int, data: bytes, t: float, is_extended: bool | None = None) -> None:
        """Decode one frame into the batches. ``is_extended`` None: inferred from the id (above 0x7FF it can
        only be extended); a live source always passes the frame's own flag."""
        counters = self.counters
        counters["frames"] += 1
        if is_extended is None:
            is_extended = arbitration_id > STANDARD_ID_MAX
        decoder = self.router.decoders.get((arbitration_id, is_extended))
        if decoder is None:
            if self._j1939 is not None and is_extended:
                self._process_j1939(arbitration_id, data, t)
                return
            counters["frames_unrouted"] += 1
            return
        self._decode(decoder, data, t)

    def process_frames(self, frames: Iterable[Frame], on_error: Callable[[Exception], None]) -> tuple[int, int]:
        """Decode a chunk of frame tuples (vgw.sources.canmsg) into the batches, as :meth:`process` would one
        by one. A frame the pipeline fails on goes to ``on_error`` and is skipped. Returns the numbers of error
        and remote frames met (counted by the caller, never decoded)."""
        decoders = self.router.decoders
        writers = self.router.writers
        j1939_front = self._j1939
        decode = self._decode
        errors = remotes = routed = unrouted = 0
        for t, can_id, extended, data, kind in frames:
            if kind:
                if kind == ERROR:
                    errors += 1
                else:
                    remotes += 1
                continue
            key = (can_id, extended)
            write = writers.get(key)
            try:
                if write is not None and write(data, t):
                    routed += 1
                    continue
                decoder = decoders.get(key)
                if decoder is not None:
                    routed += 1
                    decode(decoder, data, t)
                elif j1939_front is not None and extended:
                    routed += 1
                    self._process_j1939(can_id, data, t)
                else:
                    unrouted += 1
            except Exception as exc:  # one frame the pipeline cannot take must not stop collection
                on_error(exc)
        counters = self.counters
        counters["frames"] += routed + unrouted
        counters["frames_unrouted"] += unrouted
        return errors, remotes

    def _process_j1939(self, arbitration_id: int, data: bytes, t: float) -> None:
        """A frame no exact id matched, on a bus with J1939 messages: route it by PGN (agent.j1939)."""
        front = self._j1939
        assert front is not None
        whole = front.message(arbitration_id, data, t)
        if whole is None:
            return  # a transport fragment
        can_id, payload = whole
        builtin = front.builtin(can_id, payload)
        if builtin is not None:
            self.offer(builtin[0].path, builtin[0].scope, t, builtin[1])
        decoders = self.router.decoders
        decoder = decoders.get((j1939.route_key(can_id), True)) or decoders.get((j1939.any_source_key(can_id), True))
        if decoder is None:
            if builtin is None:
                self.counters["frames_unrouted"] += 1
            return
        self._decode(decoder, payload, t)

    def _decode(self, decoder: MessageDecoder, data: bytes, t: float) -> None:
        counters = self.counters
        values, short = decoder.decode(data)
        if short:
            counters["signals_short"] += short
        kept = 0
        whole = int(t)
        t_us = whole * 1_000_000 + round((t - whole) * 1e6)  # us_of(t), once per frame
        for entry, decoded in values:
            spec = entry.spec  # type: ignore[attr-defined]  # keys are the _Entry objects given to the decoder
            value: int | float | str = decoded
            if type(value) is float and not math.isfinite(value):
                counters["samples_not_finite"] += 1
                continue
            if spec.parts is not None:
                assembled = self._assemble(spec, decoded)
                if assembled is None:
                    continue
                value = assembled
            coord = entry.coord  # type: ignore[attr-defined]
            if coord == "lat":
                self._last_lat = float(value)
            for target in entry.targets:  # type: ignore[attr-defined]
                if target.direct:  # the fast path: straight into the grant's columns (GrantBatch.append)
                    batch = target.batch
                    if not batch.count:
                        batch.opened = time.monotonic()
                        batch.first_t = t
                    col = batch.cols.get(spec.path)
                    if col is None:
                        col = batch.cols[spec.path] = ([], [])
                    col[0].append(t_us)
                    col[1].append(value)
                    batch.count += 1
                    kept += 1
                else:  # the slow path: rules, rate limit, precision snapping
                    self._deliver(target.batch, spec.path, spec.scope, coord, t, value, target.min_interval,
                                  target.precision_m)
        if kept:
            counters["samples"] += kept

    def granted_scopes(self) -> frozenset[str]:
        """Scopes at least one grant in force holds (sources poll nothing else: minimisation at the source)."""
        return frozenset(s for b in self.batches.values() for s in b.grant.scopes)

    def _deliver(self, batch: GrantBatch, path: str, scope: str, coord: str, t: float, value: Any,
                 min_interval: float, precision_m: float) -> bool:
        """One sample of one grant: through its collection rules (if any), then its limits. True if kept."""
        engine = batch.rules
        if engine is None:
            return self._emit(batch, path, coord, t, value, min_interval, precision_m)
        counts = batch.rule_counts.setdefault(scope, [0, 0])
        counts[0] += 1
        out = engine.feed(path, scope, t, value)
        return self._release(batch, out) if out else False

    def _release(self, batch: GrantBatch, out: list[tuple[str, float, Any]]) -> bool:
        """What a grant's rules let through, each sample under the limits of its own scope (rules before limits)."""
        assert batch.rules is not None
        kept = False
        for path, t, value in out:
            scope = batch.rules.scope_of(path)
            k = batch.rules.window_index(path, t)
            if k is not None:
                last = batch.last_sent(path)
                if last is not None and batch.rules.window_index(path, last) == k:
                    # This window was sent already: its partial content went at a shutdown (or before new terms),
                    # and the engine that restarted cannot know. One reading per window, as the rule says.
                    continue
            batch.rule_counts.setdefault(scope, [0, 0])[1] += 1
            lim = batch.grant.limits_for(scope)
            leaf = path.rsplit(".", 1)[-1]
            coord = "lat" if leaf == "Latitude" else "lon" if leaf == "Longitude" else ""
            precision_m = lim.precision_m or 0.0
            if isinstance(value, dict):  # an aggregate summary: coarsen each statistic to the grid
                if precision_m and coord:
                    snapped = {k: self._snap(coord, float(v), precision_m) if k != "n" else v
                               for k, v in value.items()}
                    if any(v is None for v in snapped.values()):
                        continue
                    value = snapped
                precision_m = 0.0
            if self._emit(batch, path, coord, t, value, 1.0 / lim.max_hz if lim.max_hz else 0.0, precision_m):
                kept = True
                # Pre-trigger history is older than the batch's first sample: retention counts from the oldest.
                batch.first_t = min(batch.first_t, t)
        return kept

    def rule_counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per grant with rules and scope: samples decoded and samples the rules let through (counts only)."""
        # list() copies in one step under the GIL: safe to call from the status writer while frames flow.
        return {b.grant.id: {scope: {"decoded": c[0], "after_rules": c[1]} for scope, c in list(b.rule_counts.items())}
                for b in list(self.batches.values()) if b.rules is not None}

    def close_windows(self) -> None:
        """Send what every grant's open periodic and aggregate windows hold (end of trace, shutdown)."""
        for batch in self.batches.values():
            if batch.rules is not None:
                out = batch.rules.flush()
                if out:
                    self._release(batch, out)

    def offer(self, path: str, scope: str, t: float, value: Any) -> int:
        """Route one already-decoded sample (e.g. an OBD-II PID answer) through the same policy.

        Returns how many grants took it. Location/compass limits and max_hz apply exactly as for CAN.
        """
        taken = 0
        if isinstance(value, float) and not math.isfinite(value):
            self.counters["samples_not_finite"] += 1
            return 0
        leaf = path.rsplit(".", 1)[-1]
        coord = "lat" if leaf == "Latitude" else "lon" if leaf == "Longitude" else ""
        if coord == "lat":
            self._last_lat = float(value)
        for batch in self.batches.values():
            if scope in batch.grant.scopes:
                lim = batch.grant.limits_for(scope)
                min_interval = 1.0 / lim.max_hz if lim.max_hz else 0.0
                taken += self._deliver(batch, path, scope, coord, t, value, min_interval, lim.precision_m or 0.0)
        return taken

    def _emit(self, batch: GrantBatch, path: str, coord: str, t: float, value: Any,
              min_interval: float, precision_m: float) -> bool:
        """Apply one grant's limits to a finite sample and append it to the grant's batch. True if it was kept."""
        if precision_m and coord:
            snapped = self._snap(coord, float(value), precision_m)
            if snapped is None:
                return False
            value = snapped
        if min_interval:
            # max_hz, judged on frame time: never more than one sample per 1/max_hz s per path.
            last = batch.last_kept.get(path)
            # Too close to the last kept sample, on either side. A frame time further back than the interval is
            # a new time line (a trace replayed again from its start after a restart), not a faster rate: the
            # limit counts afresh in it.
            if last is not None and last - min_interval < t < last + min_interval - 1e-9:
                self.counters["samples_rate_limited"] += 1
                return False
            batch.last_kept[path] = t
            batch.mark_interval[path] = min_interval
        batch.append(path, t, value)
        self.counters["samples"] += 1
        return True

    def _assemble(self, spec: SignalSpec, value: Any) -> str | None:
        parts = self._parts.setdefault(spec.path, [None] * (spec.parts or 1))
        try:
            parts[spec.part or 0] = int(value).to_bytes(spec.byte_len, "big")
        except (OverflowError, ValueError):
            return None
        if spec.part != (spec.parts or 1) - 1 or any(p is None for p in parts):
            return None
        text = b"".join(p for p in parts if p is not None).rstrip(b"\x00")
        self._parts[spec.path] = [None] * (spec.parts or 1)
        return text.decode("ascii", errors="replace")

    def _snap(self, coord: str, value: float, precision_m: float) -> float | None:
        """``value`` on the grid, or None when it has none (no latitude yet; a value the grid cannot hold)."""
        lat_step = precision_m / _M_PER_DEG
        if coord == "lat":
            return _on_grid(value, lat_step)
        if self._last_lat is None:
            return None  # cannot size the longitude grid without a latitude: send nothing rather than too much
        lat = _on_grid(self._last_lat, lat_step)
        if lat is None:
            return None
        step = precision_m / (_M_PER_DEG * max(math.cos(math.radians(min(abs(lat), 89.0))), 1e-3))
        return _on_grid(value, step)

    def due(self, max_samples: int, max_interval_s: float, *, force: bool = False) -> list[GrantBatch]:
        """Batches to flush now: full, old enough, or (``force``) any non-empty one, open rule windows closed."""
        if force:
            self.close_windows()
        now = time.monotonic()
        return [
            b
            for b in self.batches.values()
            if b.count and (force or b.count >= max_samples or now - b.opened >= max_interval_s)
        ]


def _column_writer(decoder: MessageDecoder, counters: dict[str, int]) -> Callable[[bytes, float], bool] | None:
    """One generated function that decodes a frame of ``decoder``'s message and appends every value straight
    to its grants' columns: what :meth:`Pipeline._decode` does on its fast path, without a list of values, a
    loop over them and a loop over targets per frame. Only for messages whose every sample takes that fast
    path (no rules, rate limit, snapping or multi-part string in any target); None for the others.

    The same guarantees, in the same order: a non-finite value is counted in ``samples_not_finite`` and
    dropped (checked only where the signal can hold one: an IEEE float, or a scale that could overflow), each
    kept sample lands in each of its grants' columns in decoder order, ``samples`` counts them, and a batch's
    first sample stamps ``opened``/``first_t``.
    """
    if not _writes_columns(decoder):
        return None
    entries = [out.key for out in decoder.outputs]
    env: dict[str, Any] = {"_counters": counters, "_mono": time.monotonic, "_newcol": _new_column}
    batch_var: dict[int, str] = {}
    static: dict[str, int] = {}  # batch variable -> samples it always takes from a frame of this length
    dynamic: set[str] = set()  # batch variables whose count depends on a guard or a finiteness test
    sinks: list[list[str]] = []
    for i, (out, entry) in enumerate(zip(decoder.outputs, entries, strict=True)):
        assert isinstance(entry, _Entry)
        env[f"P{i}"] = entry.spec.path
        layout = out.layout
        bound = (1 << layout.length) * abs(layout.scale) + abs(layout.offset)
        check = layout.is_float or not math.isfinite(bound) or bound > 1e300
        lines: list[str] = []
        appends: list[str] = []
        names = []
        for target in entry.targets:
            name = batch_var.setdefault(id(target.batch), f"G{len(batch_var)}")
            env[name] = target.batch
            names.append(name)
            appends += [f"c = {name}.cols.get(P{i})",
                        "if c is None:",
                        f"    c = _newcol({name}, P{i})",
                        "c[0].append(t_us)",
                        "c[1].append(v)"]
            if check or out.conditions:
                appends.append(f"n_{name} += 1")
                dynamic.add(name)
            else:
                static[name] = static.get(name, 0) + 1
        if check:
            lines += ["if v - v == 0:", *(f"    {a}" for a in appends),
                      "else:", "    _counters['samples_not_finite'] += 1"]
        else:
            lines += appends
        sinks.append(lines)
    names = list(batch_var.values())
    epilogue = []
    for n in names:
        count = f"n_{n}" if n in dynamic else str(static.get(n, 0))
        stamp = [f"if not {n}.count:", f"    {n}.opened = _mono()", f"    {n}.first_t = t",
                 f"{n}.count += {count}"]
        epilogue += [f"if n_{n}:", *(f"    {line}" for line in stamp)] if n in dynamic else stamp
    if dynamic:
        epilogue += [f"kept = {' + '.join(f'n_{n}' if n in dynamic else str(static.get(n, 0)) for n in names)}",
                     "if kept:", "    _counters['samples'] += kept"]
    else:
        epilogue.append(f"_counters['samples'] += {sum(static.values())}")
    # Once per frame, before any sink: t_us is us_of(t) (vgw.contract.envelope); a batch whose count depends on
    # a guard or a finiteness test starts at the samples it always takes.
    setup = ["_s = int(t)", "t_us = _s * 1000000 + round((t - _s) * 1e6)",
             *(f"n_{n} = {static.get(n, 0)}" for n in names if n in dynamic)]
    return compile_sink(decoder, sinks, epilogue, env, setup=setup)


def _writes_columns(decoder: MessageDecoder) -> bool:
    """True if every sample of ``decoder`` takes the fast path: a column writer can take the message."""
    return all(isinstance(e, _Entry) and e.spec.parts is None and not e.coord and e.targets
               and all(tg.direct for tg in e.targets) for e in (out.key for out in decoder.outputs))


def _new_column(batch: GrantBatch, path: str) -> tuple[list[int], list[Any]]:
    col: tuple[list[int], list[Any]] = ([], [])
    batch.cols[path] = col
    return col


def _on_grid(value: float, step: float) -> float | None:
    """``value`` rounded to a multiple of ``step``; None if that is not a finite float (a value near the float
    range divided by a small step overflows): such a sample is dropped, never sent unsnapped."""
    cells = value / step
    if not math.isfinite(cells):
        return None
    snapped = round(round(cells) * step, 7)
    return snapped if math.isfinite(snapped) else None
