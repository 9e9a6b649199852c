"""`vgw bench`: the naive process the headline measures `vgw run` against.

What a user writes in an afternoon: python-can's ``can.LogReader`` reads the trace, cantools'
``decode_message`` decodes every frame, the consented signals of each frame are kept, and every batch (at most
5000 samples or 0.2 s, vgw's default ``[batch]``) is published as JSON over mutual-TLS MQTT with paho, QoS 1;
the process ends when every batch is acknowledged. No sealing, no storage: a floor for what an agent costs.

The bench runs this file as a script in its own interpreter (``python naive.py ...``), never through the
``vgw`` package, so the process imports what such a program imports (python-can, cantools, paho) and nothing
of vgw. It prints one JSON line: frames, decoded samples, batches and acknowledged batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import can
import cantools
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

MAX_SAMPLES = 5000  # vgw's default [batch] max_samples
MAX_INTERVAL_S = 0.2  # vgw's default [batch] max_interval_s


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="naive", description=__doc__)
    p.add_argument("--dbc", required=True)
    p.add_argument("--trace", required=True)
    p.add_argument("--signals", required=True, help='JSON file: {"all": true} or {"signals": [[message, signal]]}')
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--client-id", required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    db: Any = cantools.database.load_file(args.dbc, strict=False)
    with open(args.signals, encoding="utf-8") as fh:
        chosen = json.load(fh)
    # frame id -> (message name, the names of its consented signals)
    wanted: dict[int, tuple[str, set[str]]] = {}
    pairs = {(m, s) for m, s in chosen.get("signals", [])}
    for msg in db.messages:
        names = {s.name for s in msg.signals if chosen.get("all") or (msg.name, s.name) in pairs}
        if names:
            wanted[msg.frame_id] = (msg.name, names)

    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id)
    client.on_connect = lambda *_a: connected.set()
    client.tls_set(ca_certs=args.ca, certfile=args.cert, keyfile=args.key)
    client.connect(args.host, args.port)
    client.loop_start()
    if not connected.wait(30):
        print("naive: no CONNACK within 30 s", file=sys.stderr)
        return 1

    sent: list[Any] = []
    batch: list[list[Any]] = []
    batch_start = time.monotonic()

    def flush() -> None:
        nonlocal batch, batch_start
        if batch:
            sent.append(client.publish(args.topic, json.dumps({"samples": batch}), qos=1))
        batch = []
        batch_start = time.monotonic()

    frames = samples = 0
    decode = db.decode_message
    for msg in can.LogReader(args.trace):
        frames += 1
        try:
            values: dict[str, Any] = decode(msg.arbitration_id, msg.data, decode_choices=False, allow_truncated=True)
        except Exception:  # noqa: S112 - an unknown id or a frame cantools cannot decode: skipped
            continue
        target = wanted.get(msg.arbitration_id)
        if target is not None:
            name, names = target
            for sig, value in values.items():
                if sig in names:
                    batch.append([msg.timestamp, f"{name}.{sig}", value])
                    samples += 1
        if len(batch) >= MAX_SAMPLES or (frames % 256 == 0 and time.monotonic() - batch_start >= MAX_INTERVAL_S):
            flush()
    flush()
    acked = 0
    for info in sent:
        info.wait_for_publish(120)
        acked += info.is_published()
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"frames": frames, "samples": samples, "batches": len(sent), "acked": acked}), flush=True)
    return 0 if acked == len(sent) else 1


if __name__ == "__main__":
    sys.exit(main())
