"""A private 3-node NATS cluster on loopback: routes, clustered JetStream and an MQTT listener (mutual TLS)
on every node, the per-device users of :mod:`vgw_sim.nats` on each.

Every node is a :class:`~vgw_sim.nats.NatsMqtt` in its own work directory with fixed ports (MQTT, NATS
client, cluster route), so :meth:`NatsCluster.kill` (SIGKILL, no clean shutdown) followed by
:meth:`NatsCluster.start_node` brings a node back on the same ports with the same JetStream store, as a
restarted machine would. The MQTT session, retained and QoS 1 streams are replicated to all three nodes
(``mqtt { stream_replicas: 3 }``), so a cluster that lost one node keeps its quorum and its sessions.
:meth:`NatsCluster.restore` starts whatever was killed and waits until every node's monitoring listener says
it is current with the JetStream metadata leader and every stream's leader reports its replicas current: one
cluster can then serve a whole test module, each test finding it whole.

Routes are plain TCP on loopback here; ``deploy/nats/nats.conf`` protects them with TLS.

Errors: :class:`~vgw_sim.nats.NatsNotFound` (no binary), :class:`~vgw_sim.broker.BrokerStartError` (a
node did not start or the cluster did not elect a JetStream leader in time).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from vgw_sim.broker import HOST, BrokerStartError
from vgw_sim.nats import NatsMqtt, find_nats_server

if TYPE_CHECKING:
    from vgw_sim.pki import TestPKI

__all__ = ["NatsCluster", "cluster_block", "stable_port"]

_START_TIMEOUT = 30.0
_LEADER = "JetStream cluster new metadata leader"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def stable_port(host: str = HOST, taken: set[int] | None = None) -> int:
    """A free port *below* the kernel's ephemeral range. A node killed and restarted must get its ports back,
    and a port from the ephemeral range (``bind(0)``) can meanwhile become the local port of one of the
    thousands of outgoing connections a fleet test opens. Raises ``OSError`` if none is found."""
    low, _high = _ephemeral_range()
    start, end = (10000, low) if low > 11000 else (61000, 65535)
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(start, end)
        if taken and port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        if taken is not None:
            taken.add(port)
        return port
    raise OSError(f"no free port in {start}..{end} on {host}")


def cluster_block(name: str, listen: str, routes: Iterable[str]) -> str:
    """The ``cluster { ... }`` block of one node: its route listener and every node's route URL."""
    urls = "\n".join(f'    "nats-route://{r}"' for r in routes)
    return f"cluster {{\n  name: {name}\n  listen: {listen}\n  routes: [\n{urls}\n  ]\n}}"


class NatsCluster:
    """``size`` nats-server processes forming one cluster (JetStream R``size`` for MQTT state).

    Owned by the test (main) thread; :meth:`start` starts the nodes in parallel threads because a node is
    only ready once the cluster has a JetStream leader, which needs a quorum of nodes running.
    """

    def __init__(self, *, ca_file: str | os.PathLike[str], cert_file: str | os.PathLike[str],
                 key_file: str | os.PathLike[str], devices: Iterable[str] = (), size: int = 3,
                 ack_wait: str = "5s", workdir: str | os.PathLike[str] | None = None, name: str = "vgw") -> None:
        if size < 1:
            raise ValueError(f"cluster size {size}: must be >= 1")
        find_nats_server()
        self.name = name
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vgw-natsc-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        taken: set[int] = set()
        route_ports = [stable_port(self.host, taken) for _ in range(size)]
        routes = [f"{self.host}:{p}" for p in route_ports]
        self.nodes: list[NatsMqtt] = []
        for i in range(size):
            self.nodes.append(NatsMqtt(
                ca_file=ca_file, cert_file=cert_file, key_file=key_file, devices=devices, ack_wait=ack_wait,
                workdir=self.workdir / f"node-{i + 1}", server_name=f"nats-{i + 1}",
                port=stable_port(self.host, taken), client_port=stable_port(self.host, taken),
                cluster=cluster_block(name, routes[i], routes), stream_replicas=min(3, size),
                http_port=stable_port(self.host, taken),
            ))

    @classmethod
    def from_pki(cls, pki: TestPKI, *, devices: Iterable[str] | None = None, **kwargs: object) -> NatsCluster:
        """A cluster trusting ``pki``'s CA with its server certificate; users for ``devices`` (default: all
        of ``pki``'s devices) and ``cloud``."""
        return cls(ca_file=pki.ca.cert, cert_file=pki.server.cert, key_file=pki.server.key,
                   devices=list(pki.devices) if devices is None else devices, **kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------ addresses

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """(host, MQTT port) of every node, in node order."""
        return [(n.host, n.port) for n in self.nodes]

    @property
    def nats_urls(self) -> list[str]:
        """The NATS client URLs of every node (``tls://127.0.0.1:<port>``)."""
        return [n.nats_url for n in self.nodes]

    def node_of_port(self, port: int) -> int:
        """Index of the node whose MQTT port is ``port``. Raises ``ValueError`` for another port."""
        for i, n in enumerate(self.nodes):
            if n.port == port:
                return i
        raise ValueError(f"port {port} is not an MQTT port of this cluster")

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = _START_TIMEOUT) -> NatsCluster:
        """Start every stopped node (in parallel) and wait until each is ready and JetStream has a leader.

        Raises :class:`BrokerStartError` naming the node that failed.
        """
        errors: list[str] = []
        lock = threading.Lock()

        def run(node: NatsMqtt) -> None:
            try:
                node.start(timeout)
            except Exception as exc:
                with lock:
                    errors.append(f"{node.server_name}: {exc}")

        threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in self.nodes if not n.running]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 5)
        if errors:
            self.stop()
            raise BrokerStartError("; ".join(errors))
        self.wait_leader(timeout)
        return self

    def wait_leader(self, timeout: float = _START_TIMEOUT) -> None:
        """Wait until a running node has logged a JetStream metadata leader. Raises :class:`BrokerStartError`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(n.running and _LEADER in n.log_text() for n in self.nodes):
                return
            time.sleep(0.05)
        raise BrokerStartError(f"NATS cluster {self.name}: no JetStream metadata leader after {timeout:.0f}s")

    def problems(self) -> list[str]:
        """Why the cluster is not healthy (empty when it is): a node down, out of contact or not current with
        the JetStream metadata leader, a stream without a leader, or a replica its leader does not report
        current. (Consumers are left out: nats-server 2.9 can report an MQTT consumer of a killed node's
        former self as not current for ever.)"""
        out: list[str] = []
        seen: set[str] = set()
        reported: set[str] = set()
        for node in self.nodes:
            why = node.healthz()
            streams = node.streams() if why is None else why
            if isinstance(streams, str):
                out.append(f"{node.server_name}: {streams}")
                continue
            for st in streams:
                key = f"{st['account']} > {st['name']}"
                seen.add(key)
                leader = st["cluster"].get("leader")
                if not leader:
                    out.append(f"{node.server_name}: stream {key} has no leader")
                elif leader == node.server_name:
                    reported.add(key)
                    out += [f"stream {key}: replica {r.get('name')} not current"
                            for r in st["cluster"].get("replicas") or []
                            if r.get("offline") or not r.get("current")]
        out += [f"stream {key}: its leader does not say so" for key in sorted(seen - reported)]
        return out

    def wait_healthy(self, timeout: float = _START_TIMEOUT) -> None:
        """Wait until every node runs, is in contact and current with the JetStream metadata leader, and every
        stream has a leader that reports all its replicas current (:meth:`problems`). Raises
        :class:`BrokerStartError` with what is still wrong."""
        deadline = time.monotonic() + timeout
        while True:
            bad = self.problems()
            if not bad:
                return
            if time.monotonic() >= deadline:
                raise BrokerStartError(f"NATS cluster {self.name} not healthy after {timeout:.0f}s: "
                                       + "; ".join(bad))
            time.sleep(0.1)

    def restore(self, timeout: float = 60.0) -> NatsCluster:
        """Start every node that is down (a test killed it) and wait until the whole cluster is healthy
        (:meth:`wait_healthy`). Raises :class:`BrokerStartError`."""
        self.start(timeout)
        self.wait_healthy(timeout)
        return self

    def start_node(self, index: int, timeout: float = _START_TIMEOUT) -> NatsMqtt:
        """Start node ``index`` again (same ports, same JetStream store). Raises :class:`BrokerStartError`."""
        return self.nodes[index].start(timeout)

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (no clean shutdown: clients see the connection drop). Idempotent."""
        self.nodes[index].kill()

    def add_devices(self, devices: Iterable[str]) -> None:
        """Give more device ids a user on every node (config reload on the running ones)."""
        ids = list(devices)
        for n in self.nodes:
            n.add_devices(ids)

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL). Idempotent."""
        for n in self.nodes:
            n.stop()

    def close(self) -> None:
        """Stop every node and remove the work directory if this object created it. Idempotent."""
        for n in self.nodes:
            n.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        states = ",".join("up" if n.running else "down" for n in self.nodes)
        return f"<NatsCluster {self.name} [{states}] workdir={self.workdir}>"
