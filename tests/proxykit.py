"""A TCP relay between the agent and the broker that a test can cut and restore (a link down, real sockets).

The agent connects to :attr:`LinkRelay.port` on 127.0.0.1; every connection is relayed byte for byte to the
broker (TLS stays end to end). :meth:`LinkRelay.cut` closes every relayed connection and refuses new ones
until :meth:`LinkRelay.restore`, so the broker stays up (and a cloud peer keeps using it directly) while the
agent is offline. :attr:`LinkRelay.latency` delays what the broker sends to the agent (a slow mobile link:
the agent's own packets reach the broker at once, the broker's answers come late).
"""

from __future__ import annotations

import queue
import socket
import threading
import time


class LinkRelay:
    """Relays 127.0.0.1:``port`` to 127.0.0.1:``target``; one thread accepts, two per connection copy."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self._open = threading.Event()
        self._open.set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.accepted = 0
        self.latency = 0.0  # seconds added to every chunk from the broker to the agent
        self._acceptor = threading.Thread(target=self._accept, name="link-relay", daemon=True)

    def __enter__(self) -> LinkRelay:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self._close_all()
        self._sock.close()
        for t in self._threads:
            t.join(5)

    def cut(self) -> None:
        """The link goes down: every relayed connection is closed, new ones are refused."""
        self._open.clear()
        self._close_all()

    def restore(self) -> None:
        self._open.set()

    def _close_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            self.accepted += 1
            with self._lock:
                self._conns += [client, upstream]
            late: queue.Queue[tuple[float, bytes]] = queue.Queue()
            for target, args in ((self._pipe, (client, upstream, None)), (self._pipe, (upstream, client, late)),
                                 (self._deliver, (late, client))):
                t = threading.Thread(target=target, args=args, name="link-relay-pipe", daemon=True)
                self._threads.append(t)
                t.start()

    def _pipe(self, src: socket.socket, dst: socket.socket, late: queue.Queue[tuple[float, bytes]] | None) -> None:
        src.settimeout(None)
        try:
            while data := src.recv(65536):
                if late is None:
                    dst.sendall(data)
                else:
                    late.put((time.monotonic() + self.latency, data))
        except OSError:
            pass
        finally:
            if late is not None:
                late.put((0.0, b""))
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @staticmethod
    def _deliver(late: queue.Queue[tuple[float, bytes]], dst: socket.socket) -> None:
        """Send each chunk from the broker when its time comes, in order."""
        while True:
            due, data = late.get()
            if not data:
                return
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                dst.sendall(data)
            except OSError:
                return
