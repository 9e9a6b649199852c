"""One reader per serial port: an SLCAN adapter or pty delivers each byte to exactly one reader, so a second
reader splits the stream and both see malformed frames (README "Against an SLCAN adapter").

:func:`holders` finds the other processes that hold a port open (as far as /proc shows them: all of them for
root, one's own otherwise). :class:`PortClaim` is what `vgw run` holds while it reads a port: a ``flock`` on
the device (every vgw process, of any user, that can open the port sees it) and, once the bus is open,
``TIOCEXCL`` (a later ``open`` by anyone but root fails with EBUSY, whatever program it is). No thread of
its own: the collector thread takes and releases the claim with its source.
"""

from __future__ import annotations

import errno
import fcntl
import os
import termios

from vgw.base.errors import SourceOpenError

SERIAL_INTERFACES = frozenset({"slcan", "serial", "seeedstudio", "robotell"})  # python-can on a serial port


class PortBusyError(SourceOpenError):
    """The serial port is already read by another process (or another source of this one)."""


def device_path(interface: str, channel: str | None) -> str | None:
    """The device file a serial ``interface`` reads (``/dev/ttyACM0@115200`` -> ``/dev/ttyACM0``), or None for
    anything else (a SocketCAN interface, a pyserial URL)."""
    if interface not in SERIAL_INTERFACES or not channel:
        return None
    path = channel.split("@", 1)[0]
    return path if path.startswith("/") else None


def holders(device: str) -> list[int]:
    """Pids of other processes that hold ``device`` (a tty or serial port) open, as far as /proc shows them."""
    try:
        target = os.stat(os.path.realpath(device))
    except OSError:
        return []
    if not target.st_rdev:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if st.st_rdev == target.st_rdev and st.st_ino == target.st_ino:
                found.append(int(entry))
                break
    return found


def _busy(what: str, path: str, pids: list[int]) -> PortBusyError:
    who = f"process {pids[0]}" if pids else "another process"
    return PortBusyError(f"CAN {what}: {path} is already open in {who} (another `vgw run`, `vgw monitor`?): a "
                         "serial adapter or pty has one reader; refused, not opened beside it. Stop the other "
                         "reader, give each its own adapter (`vgw sim can --link A --link B`), or share a USB "
                         "adapter as SocketCAN with slcand")


class PortClaim:
    """The claim of one reader on a serial port. Raises :class:`PortBusyError` when another process holds the
    port (seen in /proc, or holding the claim itself), SourceOpenError when the port cannot be opened."""

    def __init__(self, what: str, path: str) -> None:
        self.path = path
        pids = holders(path)
        if pids:
            raise _busy(what, path, pids)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EBUSY:  # TIOCEXCL: another program holds it exclusively
                raise _busy(what, path, holders(path)) from exc
            raise SourceOpenError(f"CAN {what}: cannot open {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(what, path, holders(path)) from None
        except OSError:
            pass  # a device that takes no lock: /proc and TIOCEXCL still guard it
        self._fd: int | None = fd
        self._exclusive = False

    def exclusive(self) -> None:
        """Once our own bus has the port open: no later ``open`` by another program (root excepted)."""
        if self._fd is None:
            return
        try:
            fcntl.ioctl(self._fd, termios.TIOCEXCL)
            self._exclusive = True
        except OSError as exc:
            if exc.errno != errno.ENOTTY:
                raise SourceOpenError(f"{self.path}: cannot make the port exclusive: {exc.strerror}") from exc

    def release(self) -> None:
        """Give the port up (idempotent): exclusive mode off, so our own reopen can open it again."""
        if self._fd is None:
            return
        if self._exclusive:
            try:
                fcntl.ioctl(self._fd, termios.TIOCNXCL)
            except OSError:
                pass
        os.close(self._fd)
        self._fd = None
