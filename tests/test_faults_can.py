"""CAN-side faults: a flood of random frames with malformed ones, the interface going down, error frames.

The vehicle and the flood share one sending bus on the in-process virtual channel, so the only receive queue
that fills is the agent's (bounded at vgw.sources.canbus.RX_QUEUE_FRAMES, overflow counted).
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import can
import psutil
import pytest

from tests.agentkit import AgentThread, Authority, wait_until, write_config
from tests.faultkit import DEV

FLOOD_S = 8.0
RSS_BOUND_MB = 16.0  # growth of the whole test process (agent + simulator + flood) during the flood


@pytest.fixture
def auth(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


@pytest.fixture
def vehicle_seed() -> int:
    return 11  # the seed these tests were written against


def _start(tmp_path: Path, pki, broker, cloud, auth: Authority, channel: str, **can_extra) -> AgentThread:
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel, **can_extra})
    cloud.add_recipient("g-speed", auth.recipient("g-speed"))
    runner = AgentThread(cfg).start()
    assert runner.wait_link()
    cloud.publish_consent(DEV, auth.doc(DEV, {"g-speed": ["read_speedometer"]}))
    assert cloud.wait_for(lambda: len(cloud.batches(DEV, "g-speed")) >= 3, 15)
    return runner


def test_flood_of_random_and_short_frames_bounded_memory_and_data_keep_flowing(
        tmp_path, pki, broker, cloud, auth, channel, vehicle):
    runner = _start(tmp_path, pki, broker, cloud, auth, channel)
    try:
        agent = runner.agent
        consented = sorted(agent.pipeline.router.frame_ids)  # the ids carrying consented signals
        proc = psutil.Process()
        time.sleep(1.0)
        rss0 = proc.memory_info().rss
        peak = rss0
        sent = 0
        rng = random.Random(1)
        stop = threading.Event()

        def flood() -> None:
            nonlocal sent
            while not stop.is_set():
                for _ in range(200):
                    if rng.random() < 0.05:  # a consented id with data shorter than its DBC length
                        msg = can.Message(arbitration_id=rng.choice(consented), is_extended_id=False,
                                          data=bytes(rng.randrange(256) for _ in range(rng.randrange(0, 2))))
                    else:
                        ext = rng.random() < 0.5
                        dlc = rng.randrange(0, 9)
                        msg = can.Message(arbitration_id=rng.randrange(1 << (29 if ext else 11)), is_extended_id=ext,
                                          data=rng.randbytes(dlc))
                    vehicle.bus.send(msg)
                    sent += 1

        before = len(cloud.batches(DEV, "g-speed"))
        t0 = time.time()
        flooder = threading.Thread(target=flood, name="flood", daemon=True)
        flooder.start()
        deadline = time.monotonic() + FLOOD_S
        while time.monotonic() < deadline:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.1)
        stop.set()
        flooder.join(5)
        during = [b for b in cloud.batches(DEV, "g-speed") if t0 <= b.arrived <= t0 + FLOOD_S]
        growth_mb = (peak - rss0) / 2**20
        counters = agent.status()["counters"]
        print(f"flood: {sent} frames in {FLOOD_S:.0f} s ({sent / FLOOD_S:.0f}/s), RSS growth {growth_mb:.1f} MB, "
              f"rx_overflow {counters['rx_overflow']}, signals_short {counters['signals_short']}, "
              f"batches during flood {len(during)}")
        assert sent > 10_000
        assert growth_mb < RSS_BOUND_MB, f"RSS grew {growth_mb:.1f} MB during the flood"
        # The uplink was not starved: consented data kept arriving during the flood (max_interval_s 0.2).
        assert len(during) >= FLOOD_S / 0.2 / 4, len(during)
        assert counters["frames_unrouted"] > 1000
        assert counters["signals_short"] > 0  # short frames counted, never a crash
        assert runner.thread.is_alive() and agent.healthy
        assert cloud.wait_for(lambda: len(cloud.batches(DEV, "g-speed")) > before + len(during), 5)
    finally:
        runner.stop()
    assert cloud.undecryptable == 0
    assert {s.path for s in cloud.samples(DEV, "g-speed")} == {"Vehicle.Speed"}


def test_interface_down_reopens_and_error_frames_are_counted(tmp_path, pki, broker, cloud, auth, channel, vehicle):
    runner = _start(tmp_path, pki, broker, cloud, auth, channel, reopen_s=0.3)
    try:
        agent = runner.agent
        for _ in range(5):  # bus-off / error-passive notices from the controller
            vehicle.bus.send(can.Message(arbitration_id=0x40, is_error_frame=True, is_extended_id=False, data=bytes(8)))
        assert wait_until(lambda: agent.counters["error_frames"] == 5, 5)

        # The interface goes down under the agent (bus-off without auto-restart, adapter unplugged).
        collector = agent.collector
        assert collector is not None
        assert wait_until(lambda: collector.source is not None, 5)
        collector.source.bus.shutdown()
        assert wait_until(lambda: agent.counters["source_errors"] >= 1, 5)
        t_down = time.time()
        # ... it waits reopen_s, opens it again, and data flow again.
        assert cloud.wait_for(lambda: len([b for b in cloud.batches(DEV, "g-speed") if b.arrived > t_down + 0.3]) >= 3,
                              10)
        assert runner.thread.is_alive() and agent.healthy
    finally:
        runner.stop()
    assert cloud.missing(DEV, "g-speed") == []
