"""Measurement-only monkeypatches of the hot-path changes proposed in docs/performance.md.

Not part of vgw: they let the proposals be measured with the real agent before they are applied to the files
that own them. Enable in the bench's agent child process with::

    PYTHONPATH=scripts/hotpath_site VGW_PATCH=pace,parser2,loop,process .venv/bin/vgw bench

``pace``     agent/sources/replay.py: sleep at least 2 ms when pacing (replay_rate > 0)
``parser2``  agent/sources/replay.py: a direct candump -L parser with a light frame object for .log traces
``loop``     agent/runtime.py Agent._collect: look for full batches only when one can be full
``process``  agent/pipeline/router.py Pipeline.process: round(t) once per frame, no per-sample assert
"""
import os, time
import can

CAN_ERR_FLAG = 0x20000000

P = set(os.environ.get("VGW_PATCH", "").split(","))
if "pace" in P:
    from agent.sources import replay
    _sleep = time.sleep
    class _T:  # coalesce pacing: never sleep less than 2 ms (frames at most 2 ms late, 4x fewer wake-ups)
        def __getattr__(self, k): return getattr(time, k)
        @staticmethod
        def sleep(s): _sleep(max(s, 0.002))
    replay.time = _T()

class Frame:
    """What the collector reads of a frame (duck-types can.Message for the replay hot path)."""
    __slots__ = ("timestamp", "arbitration_id", "is_extended_id", "data", "channel")
    is_error_frame = False
    is_remote_frame = False
    is_fd = False
    def __init__(self, timestamp, arbitration_id, is_extended_id, data, channel):
        self.timestamp = timestamp; self.arbitration_id = arbitration_id; self.is_extended_id = is_extended_id
        self.data = data; self.channel = channel

def fast_candump2(path):
    fromhex = bytes.fromhex
    with open(path, "r", encoding="ascii", errors="replace") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) < 3 or parts[0][:1] != "(":
                continue
            ident, sep, data = parts[2].partition("#")
            if not sep or data[:1] in ("#", "R") or (len(ident) == 8 and int(ident, 16) & CAN_ERR_FLAG):
                continue  # (a real patch hands these rare lines to python-can's parser)
            yield Frame(float(parts[0][1:-1]), int(ident, 16), len(ident) > 3, fromhex(data), parts[1])

if "parser2" in P:
    from agent.sources import replay
    orig_open2 = replay.ReplaySource._open
    def _open2(self):
        if str(self.path).endswith(".log"):
            return fast_candump2(self.path)
        return orig_open2(self)
    replay.ReplaySource._open = _open2

if "loop" in P:
    from agent import runtime
    from agent.errors import SourceError
    log = runtime.log

    def _collect(self):
        from agent.sources import open_source
        can_cfg = self.cfg.can
        batch_cfg = self.cfg.batch
        max_samples = batch_cfg.max_samples
        max_interval = batch_cfg.max_interval_s
        pipeline = self.pipeline
        counters = pipeline.counters
        lock = self._lock
        stop = self._stop
        monotonic = time.monotonic
        last_check = monotonic()
        while not stop.is_set():
            try:
                self._source = open_source(can_cfg)
            except SourceError as exc:
                self.counters["source_errors"] += 1
                log.error("%s; retrying in %.1f s", exc, can_cfg.reopen_s)
                stop.wait(can_cfg.reopen_s)
                continue
            with lock:
                self._install_filters()
            source = self._source
            recv = source.recv
            process = pipeline.process
            # A batch can only be full once at least (max_samples - largest open batch) samples went in.
            next_full_check = 0
            try:
                while not stop.is_set():
                    msg = recv(0.05)
                    if msg is not None:
                        if msg.is_error_frame:
                            self.counters["error_frames"] += 1
                        elif msg.is_remote_frame:
                            self.counters["remote_frames"] += 1
                        else:
                            with lock:
                                process(msg.arbitration_id, bytes(msg.data), msg.timestamp)
                                if counters["samples"] >= next_full_check:
                                    batches = pipeline.batches.values()
                                    full = [b for b in batches if len(b.samples) >= max_samples]
                                    if full:
                                        self._flush(full)
                                    largest = max((len(b.samples) for b in batches), default=0)
                                    next_full_check = counters["samples"] + max(1, max_samples - largest)
                    now = monotonic()
                    if msg is None or now - last_check >= 0.05:
                        last_check = now
                        with lock:
                            due = pipeline.due(max_samples, max_interval)
                            if due:
                                self._flush(due)
                            next_full_check = 0
                    if source.finished:
                        with lock:
                            self._flush(pipeline.due(1, 0, force=True))
                        self._source_done.set()
                        return
            except SourceError as exc:
                self.counters["source_errors"] += 1
                log.error("%s; reopening in %.1f s", exc, can_cfg.reopen_s)
                stop.wait(can_cfg.reopen_s)
            finally:
                self.counters["rx_overflow"] += source.overflow
                source.close()
                self._source = None
    runtime.Agent._collect = _collect

if "process" in P:
    from agent.pipeline import router
    _monotonic = time.monotonic

    def process(self, arbitration_id, data, t):
        counters = self.counters
        counters["frames"] += 1
        decoder = self.router.decoders.get(arbitration_id)
        if decoder is None:
            counters["frames_unrouted"] += 1
            return
        values, short = decoder.decode(data)
        if short:
            counters["signals_short"] += short
        t6 = round(t, 6)  # once per frame, not per sample
        kept = 0
        for entry, value in values:
            spec = entry.spec
            if spec.parts is not None:
                value = self._assemble(spec, value)
                if value is None:
                    continue
            coord = entry.coord
            if coord == "lat":
                self._last_lat = float(value)
            path = spec.path
            for target in entry.targets:
                batch = target.batch
                if target.min_interval:
                    last = batch.last_kept.get(path)
                    if last is not None and t - last < target.min_interval - 1e-9:
                        counters["samples_rate_limited"] += 1
                        continue
                    batch.last_kept[path] = t
                out_value = value
                if coord and target.precision_m:
                    out_value = self._snap(coord, float(value), target.precision_m)
                    if out_value is None:
                        continue
                samples = batch.samples
                if not samples:
                    batch.opened = _monotonic()
                    batch.first_t = t
                samples.append({"t": t6, "path": path, "value": out_value})
                kept += 1
        if kept:
            counters["samples"] += kept
    router.Pipeline.process = process
