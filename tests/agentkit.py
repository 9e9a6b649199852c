"""Helpers for tests that run the real agent: write a config, run the agent in a thread or a process, stop a
child process, run the vehicle simulator on a virtual bus, connect a cloud peer to a broker."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import can
from vgw.config.settings import Config, load_config
from vgw.daemon.agent import Agent
from vgw.daemon.timing import DEFAULT_TIMING, Timing
from vgw_sim.broker import Mosquitto
from vgw_sim.can_sim import CanSimulator
from vgw_sim.cloud import CloudPeer, RecipientKey, SigningKey, consent_claims, grant, sign_consent
from vgw_sim.nats import NatsMqtt
from vgw_sim.paths import default_dbc, default_signal_map
from vgw_sim.pki import TestPKI
from vgw_sim.vehicle import VehicleModel

ROOT = Path(__file__).resolve().parents[1]


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, step: float = 0.02) -> Any:
    """Poll ``pred`` until it returns something true or ``timeout`` seconds pass; returns that value (falsy on
    timeout, so ``assert wait_until(...)`` fails). The suite's one way to wait: a test waits for a condition,
    never for a fixed time before a positive assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


def write_config(
    tmp: Path,
    pki: TestPKI,
    port: int,
    trust: Path | list[Path],
    *,
    device: str = "dev-0001",
    can: dict[str, Any] | None = None,
    obd: dict[str, Any] | None = None,
    batch: dict[str, Any] | None = None,
    mqtt_extra: dict[str, Any] | None = None,
    outbox: dict[str, Any] | None = None,
    agent: dict[str, Any] | None = None,
    state_dir: Path | None = None,
) -> Path:
    """Write a complete agent config for ``device`` talking to a broker on 127.0.0.1:``port`` (or, with
    ``mqtt_extra={"hosts": [...]}``, to those endpoints instead; ``port`` is then unused)."""
    dev = pki.device(device)
    trusts = trust if isinstance(trust, list) else [trust]
    lines = [
        "[device]",
        f'id = "{device}"',
        f'state_dir = "{state_dir or tmp / "state"}"',
        "",
        "[mqtt]",
        *([] if "hosts" in (mqtt_extra or {}) else ['host = "localhost"', f"port = {port}"]),
        f'ca_file = "{pki.ca.cert}"',
        f'cert_file = "{dev.cert}"',
        f'key_file = "{dev.key}"',
        "backoff_min_s = 0.2",
        "backoff_max_s = 1.0",
    ]
    if "consent_wait_s" not in (mqtt_extra or {}):
        lines.append("consent_wait_s = 0.5")  # most tests retain no consent at the broker: wait briefly
    for k, v in (mqtt_extra or {}).items():
        lines.append(f"{k} = {_toml(v)}")
    lines += ["", "[consent]", "trust_keys = [" + ", ".join(f'"{t}"' for t in trusts) + "]"]
    if can is not None:
        section = {"interface": "virtual", "dbc": [str(default_dbc())], "signal_map": str(default_signal_map())}
        section.update(can)
        lines += ["", "[can]"] + [f"{k} = {_toml(v)}" for k, v in section.items()]
    if obd is not None:
        lines += ["", "[obd]"] + [f"{k} = {_toml(v)}" for k, v in obd.items()]
    lines += ["", "[batch]"] + [f"{k} = {_toml(v)}" for k, v in ({"max_interval_s": 0.2} | (batch or {})).items()]
    if agent:
        lines += ["", "[agent]"] + [f"{k} = {_toml(v)}" for k, v in agent.items()]
    if outbox:
        lines += ["", "[outbox]"] + [f"{k} = {_toml(v)}" for k, v in outbox.items()]
    path = tmp / f"{device}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Authority:
    """The consent authority of a test: one signing key, one recipient key per grant id."""

    def __init__(self, tmp: Path) -> None:
        self.key = SigningKey.generate()
        self.trust = self.key.write_public_pem(tmp / "trust.pem")
        self.recipients: dict[str, RecipientKey] = {}
        self.ver = 0

    def recipient(self, gid: str, kem: str = "X25519") -> RecipientKey:
        if gid not in self.recipients:
            self.recipients[gid] = RecipientKey.generate(kem)
        return self.recipients[gid]

    def doc(self, device: str, grants: dict[str, list[str]], *, ver: int | None = None,
            limits: dict[str, dict[str, Any]] | None = None, **claims: Any) -> str:
        """Sign a consent for ``device`` with grants {id: scopes}; ``ver`` defaults to the next version."""
        self.ver = ver if ver is not None else self.ver + 1
        gs = [grant(gid, scopes, self.recipient(gid), limits=(limits or {}).get(gid)) for gid, scopes in
              grants.items()]
        return sign_consent(consent_claims(device, self.ver, gs, **claims), self.key)


class AgentThread:
    """The real agent, in this process (needed for python-can's in-process virtual bus)."""

    def __init__(self, config: Path | Config, *, timing: Timing = DEFAULT_TIMING) -> None:
        self.cfg = config if isinstance(config, Config) else load_config(config)
        self.agent = Agent(self.cfg, timing=timing)  # shorter periods than the product's: vgw.daemon.timing
        self.thread = threading.Thread(target=self._run, name="test-agent", daemon=True)
        self.exit_code: int | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.exit_code = self.agent.run()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> AgentThread:
        self.thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.agent.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "agent did not stop"
        if self.error is not None:
            raise self.error

    def wait_link(self, timeout: float = 10.0) -> bool:
        return wait_until(lambda: self.agent.uplink.view().state == "connected", timeout)

    def __enter__(self) -> AgentThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def agent_process(config: Path, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """`vgw run --config` as a child process; terminated (SIGTERM, then kill) on exit."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "vgw", "run", "--config", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        yield proc
    finally:
        stop_process(proc, 15)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """End ``proc`` if it still runs (SIGTERM; SIGKILL after ``timeout`` s), reap it, and close its pipes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def vgw(*args: str, timeout: float = 60.0, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `vgw` CLI (as `python -m vgw`) and capture its output."""
    return subprocess.run([sys.executable, "-m", "vgw", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, input=input)


@dataclass(frozen=True)
class Vehicle:
    """The vehicle simulator sending in real time on a virtual CAN channel (see :func:`vehicle_on_bus`)."""

    channel: str
    sim: CanSimulator
    bus: can.BusABC  # the sending side: a test may send more frames on it


@contextmanager
def vehicle_on_bus(channel: str, seed: int) -> Iterator[Vehicle]:
    """Run the simulated vehicle (``VehicleModel(seed=seed)``) on virtual ``channel`` until the block ends."""
    bus = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
    sim = CanSimulator(default_dbc(), VehicleModel(seed=seed))
    stop = threading.Event()
    t = threading.Thread(target=sim.run, args=(bus,), kwargs={"stop_event": stop}, daemon=True)
    t.start()
    try:
        yield Vehicle(channel, sim, bus)
    finally:
        stop.set()
        t.join(5)
        bus.shutdown()


@contextmanager
def connected_cloud(broker: Mosquitto | NatsMqtt, pki: TestPKI, **kwargs: Any) -> Iterator[CloudPeer]:
    """A connected cloud peer on ``broker`` (``kwargs`` go to :class:`CloudPeer`) that verifies the receipts of
    every ``pki`` device; closed when the block ends."""
    peer = CloudPeer.for_broker(broker, pki, **kwargs)  # type: ignore[arg-type]  # NatsMqtt has host and port too
    for device_id, paths in pki.devices.items():
        peer.add_device(device_id, paths.cert)
    try:
        peer.connect()
        yield peer
    finally:
        peer.close()
