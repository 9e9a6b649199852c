"""Small file-system helpers: private directories, safe reads of small files, crash-safe writes.

The rules (docs/guarantees.md, "Files the agent reads and writes"):

- The state directory belongs to the user running vgw and nobody else can write to it: a directory owned by
  someone else or writable by group/others is refused, never adopted (an attacker who made it could have
  planted symlinks or files in it). One exception, scoped by :func:`acting_for`: root running a command on
  the service user's state dir (`sudo vgw provision` again, `sudo vgw uninstall --purge`) accepts that user's
  files, and gives every file it created there to that user when the command ends, so the agent can still
  open them (SQLite's ``-wal``): ownership stays as it was, nobody is asked to chown.
- Files in the state directory are opened without following symlinks (``O_NOFOLLOW``) and created 0600 before
  their first byte is written.
- Every small file the agent reads (keys, certificates, trust keys, DBC, signal map, config) is read through
  :func:`read_small_file`: non-regular files (``/dev/zero``, a FIFO, a directory) are refused before a byte is
  read, and the size is capped before the read, so a bad path gives one clear line instead of a hang or a
  MemoryError.
- Every file of the state directory, by `vgw run` and by the commands that only read it (`vgw status`,
  `vgw report`, `vgw audit`), is opened through :func:`open_state_file` (or read through
  :func:`read_state_file`): never following a link, never blocking on a FIFO, a regular file owned by the state
  directory's owner, its size capped.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
import tempfile
import tomllib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgw.base.errors import StorageError, VgwError

# Caps for the files the agent reads (a real one is far smaller; more is a wrong path or an attack).
MAX_KEY_BYTES = 64 * 1024  # PEM keys, certificate chains, the storage key
MAX_CONFIG_BYTES = 1024 * 1024  # config TOML, signal map
MAX_STATE_BYTES = 1024 * 1024  # consent cache, inbox, clock file, status file, pending erasures
MAX_AUDIT_BYTES = 64 * 1024 * 1024  # the audit log, read whole by `vgw report` and `vgw audit`: ~200 000 entries

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@dataclass(frozen=True)
class Account:
    """A user root acts for: the service user that owns the state dir (``name`` only for messages)."""

    uid: int
    gid: int
    name: str | None = None

    def __str__(self) -> str:
        return self.name or f"uid {self.uid}"


# The accounts root acts for right now (:func:`acting_for`, entered and left by the main thread only).
_acting: list[Account] = []


def _accepted(uid: int) -> bool:
    """True if a file owned by ``uid`` counts as our own: the running user's, or, while root acts for the
    service user, that user's."""
    me = os.geteuid()
    return uid == me or (me == 0 and any(a.uid == uid for a in _acting))


def owner_of(folder: Path) -> Account | None:
    """The non-root owner of an existing directory (not a link), or None."""
    try:
        st = os.lstat(folder)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid == 0:
        return None
    return Account(st.st_uid, st.st_gid)


@contextmanager
def acting_for(account: Account | None, folder: Path) -> Iterator[None]:
    """Root runs a command on ``account``'s ``folder`` (its state dir): its files are accepted as our own
    meanwhile, and on exit every file and folder root created below ``folder`` (and ``folder`` itself, if
    root made it) is given to ``account``. A no-op unless running as root for a non-root account.

    Given away are only root-owned regular files with one link and folders that were not there on entry,
    walked without following a link (``os.fwalk``, ``dir_fd``): a hard or symbolic link the service user
    planted never makes root hand over a file outside. Raises StorageError if a file cannot be given.
    """
    if account is None or account.uid == 0 or os.geteuid() != 0:
        yield
        return
    before = _root_owned(folder)
    _acting.append(account)
    try:
        yield
    finally:
        _acting.pop()
        _give_created(folder, account, before)


def acting_for_owner(state_dir: Path) -> AbstractContextManager[None]:
    """:func:`acting_for` the owner of ``state_dir`` (root running `vgw consent apply` or `uninstall --purge` on
    the service user's state dir; the read-only commands need no more than root's reading rights)."""
    return acting_for(owner_of(state_dir), state_dir)


def _walk(folder: Path) -> Iterator[tuple[str, int | None, os.stat_result]]:
    """``folder`` and every entry below it: (name, dir_fd, lstat), never following a link."""
    try:
        top = os.lstat(folder)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        return
    yield str(folder), None, top
    for _top, dirs, files, top_fd in os.fwalk(folder, follow_symlinks=False):
        for name in (*dirs, *files):
            try:
                yield name, top_fd, os.stat(name, dir_fd=top_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue


def _root_owned(folder: Path) -> set[tuple[int, int]]:
    return {(st.st_dev, st.st_ino) for _name, _fd, st in _walk(folder) if st.st_uid == 0}


def _give_created(folder: Path, account: Account, before: set[tuple[int, int]]) -> None:
    for name, dir_fd, st in _walk(folder):
        if st.st_uid != 0 or (st.st_dev, st.st_ino) in before:
            continue
        if not (stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink == 1)):
            continue
        try:
            os.chown(name, account.uid, account.gid, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StorageError(f"{folder}/{name}: cannot give it to {account}: {exc.strerror}") from exc


def read_small_file(path: Path, *, what: str, max_bytes: int, error: type[VgwError] = StorageError) -> bytes:
    """Read a whole small regular file. Raises ``error`` (one line naming ``path`` and ``what``).

    FileNotFoundError is passed through unchanged, so callers keep their own "missing" message. The file is
    opened non-blocking (a FIFO would otherwise block in ``open``) and checked with ``fstat`` on the opened
    descriptor, so what is checked is what is read.
    """
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise
    except NotRegularFile as exc:
        raise error(f"{path}: {what} is not a regular file; refused") from exc
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from exc
    try:
        return _read_capped(fd, os.fstat(fd), path, what=what, max_bytes=max_bytes, error=error)
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from exc
    finally:
        os.close(fd)


class NotRegularFile(StorageError, OSError):
    """A FIFO, device, socket or directory where a regular file must be (also an OSError, so a reader that
    cannot open a file says why in the same words: ``strerror`` is "not a regular file")."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.EINVAL, "not a regular file", str(path))


def open_regular(path: Path) -> int:
    """Open ``path`` (links followed) read-only if it is a regular file; returns a blocking descriptor. The
    open does not block (``O_NONBLOCK``: a FIFO would wait for a writer) and the check is ``fstat`` on the
    opened descriptor, so what is checked is what is read. Raises :class:`NotRegularFile` (an OSError) for
    anything else, OSError as ``open`` does."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def load_toml(path: Path, *, what: str, max_bytes: int = MAX_CONFIG_BYTES,
              error: type[VgwError] = StorageError) -> dict[str, Any]:
    """Read and parse a TOML file (the config file, the signal map): :func:`read_small_file`, then ``tomllib``.

    Raises ``error`` naming ``path`` for anything wrong: not UTF-8, invalid TOML, arrays or tables nested too
    deeply (tomllib parses them recursively: thousands of ``[`` would otherwise end in RecursionError). A
    missing file raises FileNotFoundError, so callers keep their own "not found" message.
    """
    raw = read_small_file(path, what=what, max_bytes=max_bytes, error=error)
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: invalid TOML: {exc}") from exc
    except RecursionError as exc:
        raise error(f"{path}: invalid TOML: arrays or tables nested too deeply") from exc


def _read_capped(fd: int, st: os.stat_result, path: Path, *, what: str, max_bytes: int,
                 error: type[VgwError]) -> bytes:
    """Read a regular file's descriptor whole, refusing one over ``max_bytes`` before and while reading."""
    if st.st_size > max_bytes:
        raise error(f"{path}: {what} is {st.st_size} bytes, more than the {max_bytes} allowed; refused")
    os.set_blocking(fd, True)
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, min(65536, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:  # grew while we read
            raise error(f"{path}: {what} is more than the {max_bytes} bytes allowed; refused")
    return b"".join(chunks)


def open_state_file(path: Path, flags: int = os.O_RDONLY, *, what: str, mode: int = 0o600,
                    error: type[VgwError] = StorageError) -> int:
    """Open a file of the state directory the one way every reader and writer does; returns a blocking fd.

    Never through a link (``O_NOFOLLOW``: a planted link to ``/dev/zero`` or a victim file), never blocking
    (``O_NONBLOCK`` until the descriptor is checked: a FIFO would hang ``open`` or the first read), and only a
    regular file owned by the owner of its folder (the state directory: the agent's user, also when root runs
    a read-only command) or by a user :func:`acting_for` accepts (root's own files while it acts for the
    service user). ``flags`` may add ``O_CREAT`` (then created with ``mode``) and the access mode.
    FileNotFoundError is passed through; anything else refused raises ``error`` (one line naming ``path``).
    """
    try:
        fd = os.open(path, flags | _NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), mode)
    except FileNotFoundError:
        raise
    except OSError as exc:
        # ELOOP (a link) or ENXIO (a FIFO opened for writing with no reader): say which rule, not the errno.
        try:
            kind = os.lstat(path).st_mode
        except OSError:
            kind = stat.S_IFREG
        if stat.S_ISLNK(kind):
            raise error(f"{path}: {what} is a symbolic link; refused (state files are never followed)") from exc
        if not stat.S_ISREG(kind):
            raise error(f"{path}: {what} is not a regular file; refused") from exc
        raise error(f"{path}: cannot open {what}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: {what} is not a regular file; refused")
        owner = os.stat(path.parent).st_uid
        if st.st_uid != owner and not _accepted(st.st_uid):
            raise error(f"{path}: {what} is owned by uid {st.st_uid}, not by the state directory's owner "
                        f"(uid {owner}); refused")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_state_file(path: Path, *, what: str, max_bytes: int = MAX_STATE_BYTES,
                    error: type[VgwError] = StorageError) -> bytes:
    """Read a whole file of the state directory, opened by :func:`open_state_file`, capped at ``max_bytes``.
    FileNotFoundError is passed through; anything refused raises ``error``."""
    fd = open_state_file(path, what=what, error=error)
    try:
        return _read_capped(fd, os.fstat(fd), path, what=what, max_bytes=max_bytes, error=error)
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def check_owner(path: Path, *, what: str, allow_root: bool, error: type[VgwError] = StorageError) -> os.stat_result:
    """Refuse ``path`` unless it is owned by the running user (or root, with ``allow_root``) and nobody else
    can write to it. Symlinks are followed (a key may live elsewhere); returns the stat result."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise error(f"{path}: cannot check {what}: {exc.strerror}") from exc
    me = os.geteuid()
    if not _accepted(st.st_uid) and not (allow_root and st.st_uid == 0):
        raise error(f"{path}: {what} is owned by uid {st.st_uid}, not by the running user (uid {me}); refused")
    if st.st_mode & 0o022:
        raise error(f"{path}: {what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); refused")
    return st


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 if missing; tighten read bits of our own to 0700.

    Raises StorageError for a path that is a symlink or not a directory, is owned by another user, is
    writable by group/others (such a directory was not made by us and may hold planted links), or holds a
    symbolic link, a FIFO, a socket or a device.
    """
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(path)
    except OSError as exc:
        raise StorageError(f"{path}: cannot create state directory: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"{path}: state directory is a symbolic link or not a directory; refused")
    if not _accepted(st.st_uid):
        hint = ("run the agent as its owner, as vgw-agent.service does" if os.geteuid() == 0
                else "chown it or choose another state_dir")
        raise StorageError(f"{path}: state directory is owned by uid {st.st_uid}, not by the running user "
                           f"(uid {os.geteuid()}); refused ({hint})")
    if st.st_mode & 0o022:
        raise StorageError(f"{path}: state directory is writable by group or others (mode "
                           f"{stat.S_IMODE(st.st_mode):o}); refused (chmod 700 it after checking its content)")
    if st.st_mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            raise StorageError(f"{path}: cannot make state directory private: {exc.strerror}") from exc
    # vgw never makes links, FIFOs, sockets or devices here: one found was planted (before the directory was
    # ours, or by hand), and would hang or feed without end whatever opens it.
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
        links = [e.name for e in entries if e.is_symlink()]
        odd = [e.name for e in entries if not e.is_symlink() and not e.is_file() and not e.is_dir()]
    except OSError as exc:
        raise StorageError(f"{path}: cannot list state directory: {exc.strerror}") from exc
    if links:
        raise StorageError(f"{path}: state directory holds a symbolic link ({links[0]}); refused (state files "
                           "are never followed: remove it)")
    if odd:
        raise StorageError(f"{path}: state directory holds {odd[0]}, which is not a regular file; refused "
                           "(a FIFO or device there was not made by vgw: remove it)")
    return path


def create_private(path: Path, *, what: str = "state file") -> None:
    """Create ``path`` empty with mode 0600 if missing, never following a symlink; refuse a non-regular file or
    one owned by someone else (:func:`open_state_file`). SQLite then opens it (and makes -wal/-shm with the same
    mode)."""
    fd = open_state_file(path, os.O_RDWR | os.O_CREAT, what=what)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def refuse_symlink(path: Path) -> None:
    """Raise StorageError if ``path`` exists as a symlink or a non-regular file (SQLite's side files)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(f"{path}: cannot check: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise StorageError(f"{path}: is a symbolic link; refused (state files are never followed)")
    if not stat.S_ISREG(st.st_mode):
        raise StorageError(f"{path}: is not a regular file; refused")


def destroy_file(path: Path) -> bool:
    """Overwrite a regular file with zeros, fsync, then unlink it (never following a symlink). True if it
    existed. On flash or copy-on-write file systems the old blocks may survive the overwrite; the file's
    name and content are gone from the file system either way."""
    try:
        fd = os.open(path, os.O_WRONLY | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    except OSError:
        fd = -1  # a symlink or unwritable: still unlink the name below
    if fd >= 0:
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                zeros = b"\0" * 65536
                left = st.st_size
                while left > 0:
                    left -= os.write(fd, zeros[:min(left, len(zeros))])
                os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old or the new file, never half of one.

    Temp file in the same folder (created 0600 with O_EXCL: never through a planted link), fsync,
    ``os.replace`` (which replaces a link itself, never its target), then fsync the folder.
    """
    folder = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StorageError(f"{path}: cannot write: {exc.strerror}") from exc


class ReservedRecord:
    """A small record rewritten in place inside a file whose space was reserved beforehand.

    Made for what must reach the disk when the file system is full (a revocation applied in memory whose disk
    part waits for space must survive a restart): :meth:`reserve` writes the file in full while there is room,
    and :meth:`write` then only overwrites bytes already allocated, which needs no free block. Two slots of
    ``slot_bytes``: a write goes to the slot that does not hold the newest record, with a higher sequence number
    and a SHA-256 of its payload, then fsync; a crash in the middle of a write leaves the previous record whole.
    The file is created 0600 and never opened through a symbolic link. Raises StorageError.
    """

    _HEADER = struct.Struct(">4sQI32s")  # magic, sequence, payload length, SHA-256 of the payload
    _MAGIC = b"VGWR"

    def __init__(self, path: Path, *, slot_bytes: int) -> None:
        self.path = path
        self.slot_bytes = slot_bytes
        self.max_payload = slot_bytes - self._HEADER.size

    def reserve(self) -> None:
        """Create the file at its full size (zeros written, so its blocks are allocated), if it is not yet."""
        create_private(self.path)
        size = 2 * self.slot_bytes
        try:
            fd = open_state_file(self.path, os.O_RDWR, what="reserved record")
            try:
                if os.fstat(fd).st_size == size:
                    return
                os.ftruncate(fd, 0)
                zeros = b"\0" * self.slot_bytes
                for _ in range(2):
                    view = memoryview(zeros)
                    while view:
                        view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            try:
                self.path.unlink()  # a half-reserved file would promise room it does not have
            except OSError:
                pass
            raise StorageError(f"{self.path}: cannot reserve {size} bytes: {exc.strerror}") from exc

    def _slots(self, data: bytes) -> list[tuple[int, bytes]]:
        """(sequence, payload) of each valid slot."""
        out = []
        for i in range(2):
            raw = data[i * self.slot_bytes:(i + 1) * self.slot_bytes]
            if len(raw) < self._HEADER.size:
                continue
            magic, seq, length, digest = self._HEADER.unpack_from(raw)
            payload = raw[self._HEADER.size:self._HEADER.size + length]
            if magic == self._MAGIC and len(payload) == length and hashlib.sha256(payload).digest() == digest:
                out.append((seq, payload))
        return out

    def read(self) -> bytes | None:
        """The newest record (None: none, or an empty one). Reads only."""
        try:
            data = read_state_file(self.path, what="reserved record", max_bytes=2 * self.slot_bytes)
        except FileNotFoundError:
            return None
        slots = self._slots(data)
        if not slots:
            return None
        return max(slots)[1] or None

    def write(self, payload: bytes) -> None:
        """Replace the record with ``payload`` (``b""``: no record), in place."""
        if len(payload) > self.max_payload:
            raise StorageError(f"{self.path}: record of {len(payload)} bytes > {self.max_payload}")
        try:
            fd = open_state_file(self.path, os.O_RDWR, what="reserved record")
        except FileNotFoundError:
            raise StorageError(f"{self.path}: no space was reserved") from None
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot open: {exc.strerror}") from exc
        try:
            if os.fstat(fd).st_size != 2 * self.slot_bytes:
                raise StorageError(f"{self.path}: not the reserved size")
            data = os.pread(fd, 2 * self.slot_bytes, 0)
            seq, slot = 0, 0
            for i in range(2):
                raw = data[i * self.slot_bytes:(i + 1) * self.slot_bytes]
                magic, s, length, digest = self._HEADER.unpack_from(raw)
                body = raw[self._HEADER.size:self._HEADER.size + length]
                if magic == self._MAGIC and hashlib.sha256(body).digest() == digest and s >= seq:
                    seq, slot = s, i
            target = 1 - slot if seq else 0
            record = self._HEADER.pack(self._MAGIC, seq + 1, len(payload), hashlib.sha256(payload).digest()) + payload
            os.pwrite(fd, record, target * self.slot_bytes)
            os.fsync(fd)
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot write: {exc.strerror}") from exc
        finally:
            os.close(fd)
