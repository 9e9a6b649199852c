"""`vgw bench`: the pipeline benchmark (issue 7), with the real components on one machine.

Phases, in one run:

1. trace: ``--frames`` frames from a DBC (the demo vehicle by default: :class:`CanSimulator`; any other DBC:
   every message, simulated or random payloads) written as a candump ``.log``;
2. decode: cantools ``decode_message`` of every frame next to vgw's compiled decoders (every signal), on
   frames already in memory; and the *naive agent*: the same trace read by ``can.LogReader`` and decoded
   by cantools frame by frame;
3. full path: ``vgw run`` semantics (:class:`vgw.runtime.Agent` in a child process, so its RSS and CPU are
   its own) replays the trace as fast as possible (replay_rate 0, replay_exit) -> filter -> decode -> policy
   -> batch -> HPKE -> outbox -> mutual-TLS publish to a private mosquitto, until every batch is
   acknowledged;
4. realtime: a saturated 500 kbit/s bus (``--rt-fps`` frames/s, replay_rate 1) for ``--rt-seconds``: CPU
   share of one core, and frame-to-PUBACK latency measured at the cloud side (sample time vs arrival of its
   batch at a subscribed :class:`CloudPeer`; the broker forwards and acknowledges in the same pass), at
   default batching and at the low-latency setting;
5. revocation: ``--revoke-rows`` buffered outbox rows, then a consent document that drops the grant; the time
   until its data key is gone from the database, seen by a separate SQLite connection.

Raises :class:`~vgw.errors.VgwError` when a part cannot start (no mosquitto, bad DBC, child failure).

Modules, in the order of a run:

- :mod:`vgw.bench.options`: :class:`BenchOptions`, the bench device and the grants' scopes;
- :mod:`vgw.bench.trace`: phase 1, the candump trace and, for a foreign DBC, the synthetic signal map;
- :mod:`vgw.bench.decode`: phase 2, the cantools baseline and the naive agent;
- :mod:`vgw.bench.child`: phases 3 and 4, the agent in a child process and its timings;
- :mod:`vgw.bench.latency`: phase 4, frame-to-arrival latency at the cloud peer;
- :mod:`vgw.bench.revocation`: phase 5;
- :mod:`vgw.bench.run`: :func:`run_bench`, every phase in order with the broker, PKI and consent documents;
- :mod:`vgw.bench.report`: the progress bar, the targets and the human-readable table.

Every public name is re-exported here: ``from vgw.bench import run_bench`` etc.
"""

from __future__ import annotations

from vgw.bench.child import child_main
from vgw.bench.decode import bench_decode
from vgw.bench.options import DEVICE, TYPICAL_SCOPES, BenchOptions
from vgw.bench.report import Progress, format_table
from vgw.bench.revocation import bench_revocation
from vgw.bench.run import run_bench
from vgw.bench.trace import frame_source, synthetic_signal_map, write_trace

__all__ = [
    "DEVICE",
    "TYPICAL_SCOPES",
    "BenchOptions",
    "Progress",
    "bench_decode",
    "bench_revocation",
    "child_main",
    "format_table",
    "frame_source",
    "run_bench",
    "synthetic_signal_map",
    "write_trace",
]
