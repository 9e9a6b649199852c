"""What every private test server (mosquitto, nats-server) shares: a child process in its own work directory
(also its current directory, so nothing it writes by a relative path lands where the tests run), its log file,
and an idempotent stop / kill / restart / close lifecycle.

A subclass sets ``workdir``, ``log_path`` and ``_port`` in its constructor (after calling
:meth:`_init_process`) and implements :meth:`start`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

STOP_TIMEOUT = 5.0
START_TIMEOUT = 10.0

S = TypeVar("S", bound="ServerProcess")


class ServerProcess:
    kind = "server"  # for messages and repr
    stop_timeout = STOP_TIMEOUT
    host: str
    workdir: Path
    log_path: Path

    def _init_process(self, *, own_workdir: bool) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._closed = False
        self._own_workdir = own_workdir
        self._port: int | None = getattr(self, "_port", None)

    def _tls_files(self, *paths: str | os.PathLike[str]) -> tuple[Path, ...]:
        """Resolve the server's TLS files. Raises FileNotFoundError naming a missing one."""
        resolved = tuple(Path(p).resolve() for p in paths)
        for p in resolved:
            if not p.is_file():
                raise FileNotFoundError(f"broker TLS file missing: {p}")
        return resolved

    # -- to implement ---------------------------------------------------------------------------------

    def start(self: S, timeout: float = START_TIMEOUT) -> S:
        raise NotImplementedError

    # -- properties -----------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The listener port. Raises ``RuntimeError`` before the first :meth:`start`."""
        if self._port is None:
            raise RuntimeError(f"{self.kind} port is not known before start()")
        return self._port

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id while running, else ``None``."""
        return self._proc.pid if self.running and self._proc is not None else None

    def log_text(self) -> str:
        """The server log so far (empty if none)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- process helpers ------------------------------------------------------------------------------

    def _launch(self, argv: list[str], ready: Callable[[str], bool], timeout: float) -> tuple[bool, str]:
        """Start the process in its work directory (output appended to the log) and wait until
        ``ready(log since start)``.

        Returns (True, "") once ready, or (False, why) if it exited or was not ready within ``timeout``
        (then it is stopped).
        """
        self._log_fh = open(self.log_path, "ab")
        offset = self._log_fh.tell()
        proc = self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log_fh,
                                             stderr=subprocess.STDOUT, close_fds=True, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                text = self._log_since(offset)
                self._reap()
                return False, f"exit code {proc.returncode}: {text}"
            if ready(self._log_since(offset)):
                return True, ""
            time.sleep(0.02)
        text = self._log_since(offset)
        self._stop_process()
        return False, f"not ready on {self.host} after {timeout:.0f}s: {text}"

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _reap(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def _stop_process(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(self.stop_timeout)
        elif proc is not None:
            proc.wait()
        self._reap()

    # -- lifecycle ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s). Idempotent; port and data kept for restart."""
        self._stop_process()

    def kill(self) -> None:
        """SIGKILL the server (no clean shutdown, no final save). Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        self._stop_process()

    def restart(self: S, timeout: float = START_TIMEOUT) -> S:
        """Stop, then start again on the same port. Raises like :meth:`start`."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop and remove the work directory if this object created it. Idempotent."""
        self.stop()
        if not self._closed and self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._closed = True

    def __enter__(self: S) -> S:
        if not self.running:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self._port} {state} workdir={self.workdir}>"
