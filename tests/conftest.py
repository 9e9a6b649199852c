"""Fixtures shared by the whole suite.

- ``pki`` (session): a throwaway CA with server, ``cloud`` and device certificates for ``dev-0001`` and
  ``dev-0002`` in a 0755 temp dir (mosquitto, dropped to its own user, must read it).
- ``broker`` (function): a started private :class:`~vgw_sim.broker.Mosquitto` with mutual TLS and the
  per-device ACL on a free loopback port; stopped after the test.
- ``cloud`` (function): a connected :class:`~vgw_sim.cloud.CloudPeer` on ``broker`` that knows both
  devices' certificates; closed after the test.
- ``db`` (module): the demo DBC as a cantools database (strict).
- ``channel`` (function): a virtual CAN channel name of the test's own.
- ``vehicle`` (function): the vehicle simulator sending in real time on ``channel`` (a
  :class:`~tests.agentkit.Vehicle`), with ``VehicleModel(seed=vehicle_seed)``; ``vehicle_seed`` is 3 unless a
  module overrides the fixture or a test parametrizes it. ``vehicle_on(channel, seed)`` starts more (or later).
- ``--runslow`` enables tests marked ``@pytest.mark.slow`` (skipped otherwise).
- An autouse guard fails any test that leaves a new non-daemon thread, a ``vgw-*`` thread or a paho network
  thread alive (after a 2 s grace), a child process running (which it then kills, so one leak does not
  cascade) or a python-can bus open (which it then shuts down).
- ``shared_processes`` (session): where a module- or session-scoped fixture registers the servers it owns
  (``shared_processes.add(lambda: pids)``), so the guard leaves them to that fixture even when a test
  restarted one (a NATS node killed and started again has a new pid).

Modules add their own fixtures next to their tests; keep this file generic.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import can
import cantools
import psutil
import pytest
from cantools.database.can import Database
from vgw_sim.broker import Mosquitto
from vgw_sim.cloud import CloudPeer
from vgw_sim.paths import default_dbc
from vgw_sim.pki import TestPKI

from tests.agentkit import Vehicle, connected_cloud, vehicle_on_bus, vgw

DEVICES = ("dev-0001", "dev-0002")
_THREAD_GRACE_S = 2.0
_PROCESS_GRACE_S = 2.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


# ---------------------------------------------------------------- leak guard


def _counts(thread: threading.Thread) -> bool:
    # Non-daemon threads block interpreter exit; paho's network threads are daemons but a left-over one is an
    # MQTT client nobody closed (loop_stop missing), which keeps publishing into the next test; a ``vgw-*``
    # thread (collector, uplink, a fleet device) is an agent part nobody stopped.
    return thread.is_alive() and (not thread.daemon or thread.name.startswith(("paho-mqtt-client-", "vgw-")))


# Every python-can bus made in this process (any interface), to find the ones a test left open.
_BUSES: weakref.WeakSet[can.BusABC] = weakref.WeakSet()
_bus_init = can.BusABC.__init__


def _tracked_init(self: can.BusABC, *args: object, **kwargs: object) -> None:
    _bus_init(self, *args, **kwargs)  # type: ignore[arg-type]
    _BUSES.add(self)


can.BusABC.__init__ = _tracked_init  # type: ignore[method-assign]


def _open_buses() -> set[can.BusABC]:
    return {b for b in list(_BUSES) if not getattr(b, "_is_shutdown", True)}


def _live_children() -> dict[int, psutil.Process]:
    out: dict[int, psutil.Process] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                out[proc.pid] = proc
        except psutil.NoSuchProcess:
            continue
    return out


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} {' '.join(proc.cmdline())[:120]}"
    except psutil.Error:
        return f"pid {proc.pid}"


class SharedProcesses:
    """The child processes that fixtures wider than one test own (their pids, asked for at each check)."""

    def __init__(self) -> None:
        self._owners: list[Callable[[], Iterable[int | None]]] = []

    def add(self, pids: Callable[[], Iterable[int | None]]) -> Callable[[], None]:
        """Register ``pids`` (called at every check); returns the function that unregisters it."""
        self._owners.append(pids)
        return lambda: self._owners.remove(pids)

    def pids(self) -> set[int]:
        return {pid for owner in self._owners for pid in owner() if pid is not None}


_SHARED = SharedProcesses()


@pytest.fixture(scope="session")
def shared_processes() -> SharedProcesses:
    """Register the servers a module- or session-scoped fixture owns, so the leak guard leaves them alone."""
    return _SHARED


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Fail the test if it leaves a new non-daemon or ``vgw-*`` thread, a running child process (other than
    the ``shared_processes``) or an open python-can bus behind."""
    threads_before = set(threading.enumerate())
    children_before = set(_live_children())
    buses_before = _open_buses()
    yield
    deadline = time.monotonic() + _THREAD_GRACE_S
    while True:
        leaked = [t for t in threading.enumerate() if t not in threads_before and _counts(t)]
        if not leaked or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    deadline = time.monotonic() + _PROCESS_GRACE_S
    while True:
        shared = _SHARED.pids()
        procs = [p for pid, p in _live_children().items() if pid not in children_before and pid not in shared]
        if not procs or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    described = [_describe(p) for p in procs]
    for proc in procs:  # kill what this test started, so the next test starts clean
        try:
            proc.kill()
            proc.wait(5)
        except psutil.Error:
            pass
    buses = [b for b in _open_buses() if b not in buses_before]
    for bus in buses:
        bus.shutdown()
    problems = [f"thread {t.name!r} still alive" for t in leaked]
    problems += [f"python-can bus still open: {bus.channel_info}" for bus in buses]
    problems += [f"child process still running: {d}" for d in described]
    if problems:
        pytest.fail("test leaked: " + "; ".join(problems), pytrace=False)


# ---------------------------------------------------------------- PKI, broker, cloud


@pytest.fixture(scope="session")
def pki() -> Iterator[TestPKI]:
    """A throwaway PKI: CA, server (localhost/127.0.0.1), ``cloud``, ``dev-0001`` and ``dev-0002``."""
    # Not tmp_path_factory: its directories are 0700 and mosquitto (dropped to its own user) could not read.
    root = Path(tempfile.mkdtemp(prefix="vgw-pki-"))
    os.chmod(root, 0o755)  # noqa: S103 - mkdtemp makes it 0700
    try:
        yield TestPKI(root / "pki", devices=DEVICES)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def broker(pki: TestPKI) -> Iterator[Mosquitto]:
    """A started mosquitto with mutual TLS and the per-device ACL on a free loopback port."""
    mosq = Mosquitto.from_pki(pki)
    try:
        mosq.start()
        yield mosq
    finally:
        mosq.close()


@pytest.fixture
def cloud(broker: Mosquitto, pki: TestPKI) -> Iterator[CloudPeer]:
    """A connected, subscribed cloud peer on ``broker`` that verifies receipts of every ``pki`` device."""
    with connected_cloud(broker, pki) as peer:
        yield peer


# ---------------------------------------------------------------- the vehicle: its DBC, on a virtual bus


@pytest.fixture(scope="module")
def db() -> Database:
    """The demo vehicle's DBC, loaded by cantools in strict mode."""
    loaded = cantools.database.load_file(str(default_dbc()), strict=True)
    assert isinstance(loaded, Database)
    return loaded


@pytest.fixture
def channel() -> str:
    """A virtual CAN channel of this test's own (python-can's virtual channels are process-wide, by name)."""
    return f"vgw-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def vehicle_on() -> Iterator[Callable[[str, int], Vehicle]]:
    """Start the vehicle simulator on a channel with a seed: ``vehicle_on(channel, seed)``; stopped after the test."""
    with ExitStack() as stack:
        yield lambda channel, seed: stack.enter_context(vehicle_on_bus(channel, seed))


@pytest.fixture
def vehicle_seed() -> int:
    """The seed of the ``vehicle`` fixture's model (override the fixture in a module, or parametrize it)."""
    return 3


@pytest.fixture
def vehicle(channel: str, vehicle_seed: int, vehicle_on: Callable[[str, int], Vehicle]) -> Vehicle:
    """The vehicle simulator sending in real time on ``channel`` for the whole test."""
    return vehicle_on(channel, vehicle_seed)


@pytest.fixture
def foreign_stack() -> Iterator[Path]:
    """A stack laid out, then given to the service user (a uid without a passwd entry), in a folder that user
    can reach (pytest's own folders are 0700)."""
    import shutil
    import tempfile

    from tests.test_provision import SERVICE

    top = Path(tempfile.mkdtemp(prefix="vgw-devstack-"))
    os.chmod(top, 0o755)  # noqa: S103 - the stack's owner must reach its folder, as it reaches its home
    d = top / "stack"
    try:
        assert vgw("dev", "init", str(d), timeout=60).returncode == 0
        for p in [d, *d.rglob("*")]:
            os.lchown(p, SERVICE, SERVICE)
        yield d
    finally:
        vgw("dev", "down", str(d), timeout=60)
        shutil.rmtree(top, ignore_errors=True)
