"""`vgw bench`: the pipeline benchmark, with the real components on one machine.

Phases, in one run:

1. trace: ``--frames`` frames from a DBC (the demo vehicle by default: :class:`CanSimulator`; any other DBC:
   every message, simulated or random payloads) written as a candump ``.log``;
2. decode: cantools ``decode_message`` of every frame next to vgw's compiled decoders (every signal), on
   frames already in memory; and the *naive agent*: the same trace read by ``can.LogReader`` and decoded
   by cantools frame by frame;
3. full path: ``vgw run`` semantics (:class:`vgw.daemon.agent.Agent` in a child process, so its RSS and CPU are
   its own) replays the trace as fast as possible (replay_rate 0, replay_exit) -> filter -> decode -> policy
   -> batch -> HPKE -> outbox -> mutual-TLS publish to a private mosquitto, until every batch is
   acknowledged;
4. realtime: a saturated 500 kbit/s bus (``--rt-fps`` frames/s, replay_rate 1) for ``--rt-seconds``: CPU
   share of one core, and frame-to-PUBACK latency measured at the cloud side (sample time vs arrival of its
   batch at a subscribed :class:`CloudPeer`; the broker forwards and acknowledges in the same pass), at
   default batching and at the low-latency setting;
5. revocation: ``--revoke-rows`` buffered outbox rows, then a consent document that drops the grant; the time
   until its data key is gone from the database, seen by a separate SQLite connection;
6. collection rules (demo vehicle; ``--rules-seconds``, 0 leaves it out; ``--rules`` runs it alone): the
   costliest rule document within the agent's budgets against the same grants without rules, the demo drive
   replayed in real time: CPU per decoded sample, share of a core, peak RSS.

Raises :class:`~vgw.base.errors.VgwError` when a part cannot start (no mosquitto, bad DBC, child failure).

Modules, in the order of a run:

- :mod:`vgw.tools.bench.options`: :class:`BenchOptions`, the bench device and the grants' scopes;
- :mod:`vgw.tools.bench.trace`: phase 1, the candump trace and, for a foreign DBC, the synthetic signal map;
- :mod:`vgw.tools.bench.decode`: phase 2, the cantools baseline and the naive agent;
- :mod:`vgw.tools.bench.child`: phases 3 and 4, the agent in a child process and its timings;
- :mod:`vgw.tools.bench.latency`: phase 4, frame-to-arrival latency at the cloud peer;
- :mod:`vgw.tools.bench.revocation`: phase 5;
- :mod:`vgw.tools.bench.rules`: phase 6, the worst-case rule document and its measure;
- :mod:`vgw.tools.bench.run`: :func:`run_bench`, every phase in order with the broker, PKI and consent documents;
- :mod:`vgw.tools.bench.report`: the progress bar, the targets and the human-readable table.

Every public name is re-exported here: ``from vgw.tools.bench import run_bench`` etc.
"""

from __future__ import annotations

from vgw.tools.bench.child import child_main
from vgw.tools.bench.decode import bench_decode
from vgw.tools.bench.options import DEVICE, TYPICAL_SCOPES, BenchOptions
from vgw.tools.bench.report import Progress, format_table
from vgw.tools.bench.revocation import bench_revocation
from vgw.tools.bench.rules import bench_rules, format_rules, worst_case_collect
from vgw.tools.bench.run import run_bench, run_rules_bench
from vgw.tools.bench.trace import frame_source, synthetic_signal_map, write_trace

__all__ = [
    "DEVICE",
    "TYPICAL_SCOPES",
    "BenchOptions",
    "Progress",
    "bench_decode",
    "bench_revocation",
    "bench_rules",
    "child_main",
    "format_rules",
    "format_table",
    "frame_source",
    "run_bench",
    "run_rules_bench",
    "synthetic_signal_map",
    "worst_case_collect",
    "write_trace",
]
