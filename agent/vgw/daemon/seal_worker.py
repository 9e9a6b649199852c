"""The seal worker: the envelope's CPU (columnar JSON, zlib, HPKE) on a second core (``[agent] seal_workers = 1``).

The collector, the writer and paho share one core through the GIL; building and sealing the version 2 plaintext
(README "Telemetry envelope") is the largest part of the writer's CPU with every signal consented
(docs/performance.md "A second core"). This module moves it to a child process, ``python -m
vgw.daemon.seal_worker``, fed by the writer thread over a pipe. Storing stays in the agent: the outbox's
transaction assigns each seq, wraps the envelope with the grant's data key and commits, exactly as without a
worker, so the order, the seqs and the crash guarantees are the outbox's (docs/guarantees.md).

What the worker is given and keeps: per batch, the grant's recipient *public* key, the device and grant ids,
the seq the writer expects the outbox to assign, the outbox epoch and the columns. It holds no secret (no data
key, no storage key, no device key) and keeps nothing between requests: a revocation has no key to take from it.

Wire, both directions length-prefixed (4 bytes, big-endian): a request is a group, a :mod:`marshal` dump of a
list of :data:`Request` (plain data only: marshal makes no objects but built-in values, and it is about twice as
cheap as pickle for the columns); the reply is, per request in order, one status byte (0: sealed, 1: failed)
and the envelope, length-prefixed. Groups are answered in the order sent; two may be in flight.

:class:`SealWorker` is the agent's end, owned by the writer thread (vgw-writer), so it takes no lock;
:meth:`SealWorker.close` runs on the thread stopping the agent after the writer thread ended. The worker exits
when its stdin closes (the agent stopped, or was killed: the pipe's end closes with it).
"""

from __future__ import annotations

import logging
import marshal
import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

from vgw.base.errors import VgwError
from vgw.contract.envelope import Series, columnar_plaintext, load_recipient_key, seal

log = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
MAX_MESSAGE = 1 << 30  # a reply or request larger than this is a broken pipe, not a batch
#: (kem, recipient public key, device, grant id, seq, epoch, series)
Request = tuple[str, bytes, str, str, int, str, dict[str, Series]]


class SealWorkerGone(VgwError):
    """The worker died, hung past the timeout or answered out of protocol; it has been stopped."""


class SealWorker:
    """One worker process. Not thread-safe: the writer thread owns it (see the module docstring)."""

    def __init__(self, *, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s  # one group's reply at most; longer means hung: stopped, sealed in-process
        self._proc: subprocess.Popen[bytes] | None = None
        self._sent: list[int] = []  # requests per group sent and not yet answered, oldest first
        self._inbox = bytearray()  # reply bytes read ahead while writing (see _write_all)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the process (it imports in the background; the first request waits for it). Raises OSError."""
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "vgw.daemon.seal_worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            close_fds=True, env=_child_env())

    def seal(self, requests: list[Request]) -> list[bytes | None]:
        """Seal each request; None for one the worker could not seal. Raises SealWorkerGone (worker stopped)."""
        self.send(requests)
        return self.receive()

    def send(self, requests: list[Request]) -> None:
        """Hand a group to the worker, which answers groups in the order sent (:meth:`receive`). Raises
        SealWorkerGone (worker stopped), or ValueError for a value the pipe does not carry (nothing sent then)."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None or proc.poll() is not None:
            raise SealWorkerGone("seal worker not running")
        body = marshal.dumps(requests)  # lists, tuples, str, bytes, int, float, bool: no code, no classes
        try:
            self._write_all(proc.stdin.fileno(), proc.stdout.fileno(), _LEN.pack(len(body)) + body,
                            time.monotonic() + self.timeout_s)
        except (OSError, SealWorkerGone) as exc:
            self.close(grace_s=0.0)
            raise SealWorkerGone(f"seal worker stopped answering ({type(exc).__name__}: {exc})") from exc
        self._sent.append(len(requests))

    def receive(self) -> list[bytes | None]:
        """The reply to the oldest group sent and not yet received. Raises SealWorkerGone (worker stopped)."""
        proc = self._proc
        if proc is None or proc.stdout is None or not self._sent:
            raise SealWorkerGone("seal worker not running")
        count = self._sent.pop(0)
        try:
            reply = self._read_message(proc.stdout.fileno(), time.monotonic() + self.timeout_s)
        except (OSError, SealWorkerGone) as exc:
            self.close(grace_s=0.0)
            raise SealWorkerGone(f"seal worker stopped answering ({type(exc).__name__}: {exc})") from exc
        out: list[bytes | None] = []
        pos = 0
        try:
            for _ in range(count):
                ok = reply[pos] == 0
                (n,) = _LEN.unpack_from(reply, pos + 1)
                pos += 1 + _LEN.size
                out.append(bytes(reply[pos:pos + n]) if ok else None)
                pos += n
        except (IndexError, struct.error) as exc:
            self.close(grace_s=0.0)
            raise SealWorkerGone("seal worker answered out of protocol") from exc
        if pos != len(reply):
            self.close(grace_s=0.0)
            raise SealWorkerGone("seal worker answered out of protocol")
        return out

    def _write_all(self, fd: int, reply_fd: int, data: bytes, deadline: float) -> None:
        """Write ``data``; meanwhile take in what the worker answers to earlier groups, so a worker blocked on a
        full reply pipe never blocks this write (two groups in flight)."""
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            readable, writable, _ = select.select([reply_fd], [fd], [], max(left, 0.0))
            if readable:
                chunk = os.read(reply_fd, 1 << 20)
                if not chunk:
                    raise SealWorkerGone("seal worker exited")
                self._inbox += chunk
            if writable:
                view = view[os.write(fd, view[:1 << 16]):]
            elif not readable and left <= 0:
                raise SealWorkerGone("timed out writing to the seal worker")

    def _read_exact(self, fd: int, n: int, deadline: float) -> bytes:
        while len(self._inbox) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise SealWorkerGone("timed out waiting for the seal worker")
            chunk = os.read(fd, max(n - len(self._inbox), 1 << 16))
            if not chunk:
                raise SealWorkerGone("seal worker exited")
            self._inbox += chunk
        out = bytes(self._inbox[:n])
        del self._inbox[:n]
        return out

    def _read_message(self, fd: int, deadline: float) -> bytes:
        (n,) = _LEN.unpack(self._read_exact(fd, _LEN.size, deadline))
        if n > MAX_MESSAGE:
            raise SealWorkerGone(f"seal worker sent {n} bytes at once")
        return self._read_exact(fd, n, deadline)

    def close(self, grace_s: float = 2.0) -> None:
        """Close its stdin (it exits), wait ``grace_s``, then kill; the process is reaped either way."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _child_env() -> dict[str, str]:
    """The agent's environment, with the folder ``vgw`` was imported from first on PYTHONPATH (a checkout run
    from its roots finds it as an installed agent does)."""
    import vgw

    root = str(Path(vgw.__file__).resolve().parents[1])
    rest = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + rest if rest else "")}


# ---------------------------------------------------------------- the worker process


def _read_blocking(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    if data is None or len(data) < n:
        return None  # the agent closed the pipe (stopped or killed): exit
    return data


def serve(inp: BinaryIO, out: BinaryIO) -> int:
    """The worker's loop: one request message in, one reply out, until ``inp`` ends."""
    while True:
        head = _read_blocking(inp, _LEN.size)
        if head is None:
            return 0
        (n,) = _LEN.unpack(head)
        if n > MAX_MESSAGE:
            return 2
        body = _read_blocking(inp, n)
        if body is None:
            return 0
        requests: list[Any] = marshal.loads(body)  # noqa: S302 - from the agent that started this process
        del body
        parts: list[bytes] = []
        for kem, pk, device, grant, seq, epoch, series in requests:
            try:
                env = seal(kem, load_recipient_key(kem, pk), device, grant,
                           columnar_plaintext(device, grant, seq, series, epoch=epoch))
                parts.append(b"\x00" + _LEN.pack(len(env)) + env)
            except Exception:  # one bad batch: the agent seals it itself and counts it there
                parts.append(b"\x01" + _LEN.pack(0))
        del requests  # nothing of a batch outlives its request
        reply = b"".join(parts)
        try:
            out.write(_LEN.pack(len(reply)) + reply)
            out.flush()
        except BrokenPipeError:
            return 0


def main() -> int:
    # The reply pipe is fd 1: keep it private and point fd 1 at stderr, so a stray print cannot break the
    # protocol.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    return serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    sys.exit(main())
