"""The agent on real SocketCAN (vcan0): kernel filters follow consent. Skipped where the kernel has no vcan0
(create it: modprobe vcan; ip link add dev vcan0 type vcan; ip link set up vcan0)."""

from __future__ import annotations

import os
import socket
import threading

import can
import pytest
from vgw_sim.can_sim import CanSimulator
from vgw_sim.paths import default_dbc
from vgw_sim.vehicle import VehicleModel

from tests.agentkit import AgentThread, Authority, wait_until, write_config

pytestmark = [
    pytest.mark.vcan,
    pytest.mark.skipif(not hasattr(socket, "AF_CAN") or not os.path.exists("/sys/class/net/vcan0"),
                       reason="no AF_CAN/vcan0 in this kernel"),
]
DEV = "dev-0001"


def test_agent_on_vcan0_with_kernel_filters(tmp_path, pki, broker, cloud) -> None:
    auth = Authority(tmp_path)
    cloud.add_recipient("g-v", auth.recipient("g-v"))
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"interface": "socketcan", "channel": "vcan0"})
    bus = can.Bus(interface="socketcan", channel="vcan0")
    stop = threading.Event()
    sim = CanSimulator(default_dbc(), VehicleModel(seed=2))
    t = threading.Thread(target=sim.run, args=(bus,), kwargs={"stop_event": stop}, daemon=True)
    t.start()
    try:
        with AgentThread(cfg) as runner:
            assert runner.wait_link()
            cloud.publish_consent(DEV, auth.doc(DEV, {"g-v": ["read_speedometer"]}))
            assert cloud.wait_for(lambda: len(cloud.batches(DEV, "g-v")) >= 3, 15)
            assert wait_until(lambda: runner.agent.status()["counters"]["frames"] > 0, 10)
            counters = runner.agent.status()["counters"]
            # The kernel filter passes only the consented message id: nothing unrouted reaches the agent.
            assert counters["frames_unrouted"] <= counters["frames"] * 0.05
        assert {s.path for s in cloud.samples(DEV, "g-v")} == {"Vehicle.Speed"}
    finally:
        stop.set()
        t.join(5)
        bus.shutdown()
