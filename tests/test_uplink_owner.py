"""The uplink's threading (vgw.uplink.link, vgw.uplink.mqttloop): one thread owns paho's client and socket, and it
sleeps while there is nothing to do; the rules every client shares (vgw.transport.tlsctx, vgw.transport.mqttversion)."""

from __future__ import annotations

import dataclasses
import os
import ssl
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import paho.mqtt.client as mqtt
import pytest
import vgw.uplink.link
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from vgw.base.errors import CloudKitError, ConfigError
from vgw.config.settings import load_config
from vgw.transport.mqttversion import UNSUPPORTED_PROTOCOL_VERSION, refuses_mqtt5
from vgw.transport.tlsctx import client_context
from vgw.uplink.link import ConsentSync
from vgw.uplink.mqttloop import Doorbell
from vgw_sim.broker import Mosquitto

from tests.agentkit import AgentThread, Authority, wait_until, write_config

DEV = "dev-0001"


def _quiet(up: vgw.uplink.link.Uplink, for_s: float, timeout: float) -> bool:
    """The owner thread has not woken for ``for_s`` (the traffic of the connect is over)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = up.view().wakeups
        time.sleep(for_s)
        if up.view().wakeups == before:
            return True
    return False


def test_an_idle_connected_uplink_does_not_wake_up(tmp_path: Path, pki, broker: Mosquitto, channel: str) -> None:
    # A keepalive longer than the test: an idle link then has nothing to do at all. The old uplink woke every
    # 20 ms to poll a deque (about 100 wake-ups in these 2 s).
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel, "silent_s": 0},
                       mqtt_extra={"keepalive_s": 60})
    with AgentThread(cfg) as runner:
        up = runner.agent.uplink
        assert runner.wait_link(10)
        assert wait_until(lambda: up.view().consent_sync == ConsentSync.NONE, 10)  # the consent wait is over
        assert _quiet(up, 0.3, 10), "the uplink never went quiet after connecting"
        before = up.view().wakeups
        time.sleep(2.0)  # a negative check: nothing may happen meanwhile
        assert up.view().wakeups - before == 0
        assert up.view().state == "connected"


def test_an_idle_uplink_wakes_for_the_keepalive_only(tmp_path: Path, pki, broker: Mosquitto, channel: str) -> None:
    # keepalive 1 s (below what a config may say, so set on the loaded one): PINGREQ/PINGRESP keep the link
    # up, each costing a wake-up or two, not 50 a second.
    auth = Authority(tmp_path)
    loaded = load_config(write_config(tmp_path, pki, broker.port, auth.trust,
                                      can={"channel": channel, "silent_s": 0}))
    cfg = dataclasses.replace(loaded, mqtt=dataclasses.replace(loaded.mqtt, keepalive_s=1))
    with AgentThread(cfg) as runner:
        up = runner.agent.uplink
        assert runner.wait_link(10)
        assert wait_until(lambda: up.view().consent_sync == ConsentSync.NONE, 10)
        before = up.view().wakeups
        connects = up.view().connects
        time.sleep(3.0)  # three keepalive periods
        woke = up.view().wakeups - before
        assert 2 <= woke <= 12, woke  # the PINGREQ timer and the PINGRESP, per period
        assert up.view().connects == connects and up.view().state == "connected"  # the pings kept it up


class _Recording(mqtt.Client):
    """A paho client that notes the thread of every call made on it (paho's own internal calls included)."""

    touched: ClassVar[dict[int, set[str]]] = {}  # thread ident -> attribute names, for clients of DEV
    lock = threading.Lock()

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("__"):
            try:
                mine = object.__getattribute__(self, "_client_id") == DEV.encode()
            except AttributeError:
                mine = True  # still in __init__
            if mine:
                with _Recording.lock:
                    _Recording.touched.setdefault(threading.get_ident(), set()).add(name)
        return super().__getattribute__(name)


def test_only_the_uplink_thread_touches_the_paho_client(tmp_path: Path, pki, broker: Mosquitto, cloud,
                                                       channel: str, vehicle, monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    auth = Authority(tmp_path)
    cloud.add_recipient("g-speed", auth.recipient("g-speed"))
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel})
    _Recording.touched = {}
    monkeypatch.setattr(vgw.uplink.link.mqtt, "Client", _Recording)
    with AgentThread(cfg) as runner:
        assert runner.wait_link(10)
        owners = [t.ident for t in threading.enumerate() if t.name == "vgw-uplink"]
        # consent in, batches and a receipt out, PUBACKs back: the client's whole life
        cloud.publish_consent(DEV, auth.doc(DEV, {"g-speed": ["read_speedometer"]}))
        assert cloud.wait_for(lambda: len(cloud.batches(DEV, "g-speed")) >= 3, 15)
        assert cloud.wait_for(lambda: cloud.receipts(DEV, "consent-applied"), 10)
        assert not [t.name for t in threading.enumerate() if t.name == f"paho-mqtt-client-{DEV}"]
    # stop() had the owner publish the offline status before it disconnected
    assert cloud.wait_for(lambda: (cloud.status(DEV) or {}).get("state") == "offline", 5)
    assert len(owners) == 1
    assert set(_Recording.touched) == set(owners), {k: sorted(v)[:5] for k, v in _Recording.touched.items()}
    assert {"connect", "publish", "subscribe", "loop_read", "loop_write", "disconnect"} <= _Recording.touched[owners[0]]


def test_the_doorbell_wakes_once_for_many_rings_and_carries_the_requests() -> None:
    bell = Doorbell()
    try:
        assert bell.wait(time.monotonic() + 0.05) == set()  # no ring: the timer
        for _ in range(1000):
            bell.ring()
        bell.ring("status")
        bell.ring("status")
        assert bell.wait(float("inf")) == {"status"}
        assert bell.wait(time.monotonic()) == set()  # one byte was written for all of them
    finally:
        bell.close()
    bell.ring("late")  # after close: ignored, never raises


def test_mqtt5_falls_back_on_the_reason_code_or_no_connack_never_on_tls() -> None:
    refused_version = ReasonCode(PacketTypes.CONNACK, identifier=UNSUPPORTED_PROTOCOL_VERSION)
    not_authorized = ReasonCode(PacketTypes.CONNACK, identifier=0x87)
    assert refuses_mqtt5(refused_version)
    assert refuses_mqtt5(None)  # closed before any CONNACK
    assert not refuses_mqtt5(not_authorized)
    alert = ssl.SSLError(1, "alert")
    assert not refuses_mqtt5(None, alert)
    assert not refuses_mqtt5(refused_version, alert)


def test_the_tls_context_names_an_unusable_file_in_the_callers_error(tmp_path: Path, pki) -> None:
    dev = pki.device(DEV)
    ctx = client_context(pki.ca.cert, dev.cert, dev.key)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.check_hostname
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ConfigError, match="not found"):
        client_context(tmp_path / "nope.pem", dev.cert, dev.key)
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)
    with pytest.raises(CloudKitError, match="not a regular file"):
        client_context(fifo, dev.cert, dev.key, error=CloudKitError)
    with pytest.raises(ConfigError, match="not a usable"):
        client_context(pki.ca.cert, dev.key, dev.cert)  # certificate and key swapped
