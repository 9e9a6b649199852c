"""A private mosquitto broker with mutual TLS on a free loopback port.

:class:`Mosquitto` writes a ``mosquitto.conf`` into its own work directory (0755, so the ``mosquitto`` user
that a root-started mosquitto drops to can read it), starts ``mosquitto -c``, waits until the TLS listener
accepts connections, and stops it (terminate, then kill; idempotent). :meth:`Mosquitto.restart` comes back on
the same port, for outage tests. :func:`device_acl` is the per-device policy of README "Topics": a device can
touch only ``<prefix>/<its CN>/...``; the cloud user may read and write everything under the prefix.

Errors (all ``RuntimeError``: a missing or failing test broker is an environment problem, not a vgw error)::

    BrokerError
     +-- MosquittoNotFound   the mosquitto binary is not installed
     +-- BrokerStartError    mosquitto exited or did not listen in time (the message holds its log tail)
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vgw_sim.server import START_TIMEOUT as _START_TIMEOUT
from vgw_sim.server import ServerProcess

if TYPE_CHECKING:
    from vgw_sim.pki import TestPKI

__all__ = [
    "CLAIM_USER",
    "BrokerError",
    "BrokerStartError",
    "Mosquitto",
    "MosquittoNotFound",
    "device_acl",
    "find_mosquitto",
    "free_port",
]

HOST = "127.0.0.1"
CLAIM_USER = "vgw-claim"  # CN of the test claim certificate (README "Enrollment")
_START_ATTEMPTS = 5
_RUNNING = " running"


class BrokerError(RuntimeError):
    """The test broker could not be found, started or stopped."""


class MosquittoNotFound(BrokerError):
    """No mosquitto binary on this machine."""


class BrokerStartError(BrokerError):
    """mosquitto exited during start-up or did not accept connections in time."""


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that was free a moment ago (bind port 0, read it, close).

    Another process can take it before you bind it: callers retry (as :meth:`Mosquitto.start` does).
    Raises ``OSError`` if no port can be bound.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def find_mosquitto() -> str:
    """Path of the mosquitto binary (``$PATH``, then ``/usr/sbin``, ``/usr/local/sbin``).

    Raises :class:`MosquittoNotFound` with the install command if there is none.
    """
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise MosquittoNotFound(
        "mosquitto broker not found: install it with `apt-get install -y mosquitto` (Debian/Ubuntu)"
    )


def device_acl(prefix: str = "vgw", cloud_user: str = "cloud", claim_user: str = CLAIM_USER) -> str:
    """A mosquitto ACL file body for vgw (README "Topics", "Enrollment").

    ``%u`` is the user name, which ``use_identity_as_username`` takes from the client certificate's CN, so a
    device can publish only data, receipts, status and its renewal request under its own id and read only its
    own consent and renewal answer. ``claim_user`` (the CN of the batch's claim certificate) may only ask to
    enroll and read the answers: its ``deny`` overrides the device patterns for its own name. ``cloud_user``
    may read and write everything under ``prefix``.
    """
    if not prefix or "#" in prefix or "+" in prefix:
        raise ValueError(f"invalid topic prefix {prefix!r}")
    return (
        "# vgw per-device policy: a device touches only its own topics (identity = certificate CN)\n"
        f"pattern write {prefix}/%u/data/#\n"
        f"pattern write {prefix}/%u/receipt\n"
        f"pattern write {prefix}/%u/status\n"
        f"pattern read {prefix}/%u/consent\n"
        f"pattern write {prefix}/%u/cert/request\n"
        f"pattern read {prefix}/%u/cert/response\n"
        "\n"
        "# the claim identity: the enrollment topics, nothing else\n"
        f"user {claim_user}\n"
        f"topic write {prefix}/enroll/+/request\n"
        f"topic read {prefix}/enroll/+/response\n"
        f"topic deny {prefix}/{claim_user}/#\n"
        "\n"
        f"user {cloud_user}\n"
        f"topic readwrite {prefix}/#\n"
    )


class Mosquitto(ServerProcess):
    """A private mosquitto with mutual TLS (``require_certificate``, ``use_identity_as_username``).

    ``acl`` is the ACL file body (``None``: no ACL, any authenticated client may use any topic).
    ``persistence`` keeps retained messages and sessions in ``<workdir>/db`` across :meth:`restart`.
    ``workdir`` defaults to a fresh temporary directory removed by :meth:`close`; a given one is kept.
    ``port`` fixes the port (else a free one is picked at the first start and kept for restarts).

    Use as a context manager or call :meth:`start` / :meth:`close`. Raises :class:`MosquittoNotFound` at
    construction if mosquitto is missing.
    """

    kind = "mosquitto"

    def __init__(
        self,
        *,
        ca_file: str | os.PathLike[str],
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        acl: str | None = None,
        persistence: bool = False,
        port: int | None = None,
        tls_version: str = "tlsv1.2",
        workdir: str | os.PathLike[str] | None = None,
        extra_config: str = "",
        binary: str | None = None,
    ) -> None:
        self._binary = binary or find_mosquitto()
        self.host = HOST
        self._ca_file, self._cert_file, self._key_file = self._tls_files(ca_file, cert_file, key_file)
        self._acl = acl
        self._persistence = persistence
        self._tls_version = tls_version
        self._extra = extra_config
        self._fixed_port = port
        self._port: int | None = port
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vgw-mosq-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)  # noqa: S103 - the mosquitto user must traverse it
        self.log_path = self.workdir / "mosquitto.log"
        self.conf_path = self.workdir / "mosquitto.conf"
        self._init_process(own_workdir=self._own_workdir)

    @classmethod
    def from_pki(
        cls,
        pki: TestPKI,
        *,
        acl: bool | str = True,
        prefix: str = "vgw",
        server: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        **kwargs: object,
    ) -> Mosquitto:
        """A broker trusting ``pki``'s CA with its server certificate (or ``server=(cert, key)``).

        ``acl=True`` installs :func:`device_acl` for ``prefix``; a string is used as the ACL body; ``False``
        means no ACL. Other keyword arguments go to the constructor.
        """
        cert, key = server if server is not None else (pki.server.cert, pki.server.key)
        acl_body: str | None
        if acl is True:
            acl_body = device_acl(prefix, cloud_user="cloud")
        elif acl is False:
            acl_body = None
        else:
            acl_body = acl
        return cls(
            ca_file=pki.ca.cert,
            cert_file=cert,
            key_file=key,
            acl=acl_body,
            **kwargs,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------ properties

    # ------------------------------------------------------------- lifecycle

    def _write_config(self, port: int) -> None:
        lines = [
            "# written by vgw_sim.broker for a private test broker",
            "per_listener_settings false",
            "allow_anonymous false",
            f"listener {port} {self.host}",
            f"cafile {self._ca_file}",
            f"certfile {self._cert_file}",
            f"keyfile {self._key_file}",
            "require_certificate true",
            "use_identity_as_username true",
            # Minimum TLS version for this listener (mosquitto >= 2.0 semantics).
            f"tls_version {self._tls_version}",
            # Logs go to stderr, which we redirect to a file we opened: mosquitto may have dropped to the
            # mosquitto user by the time it logs and could not open a file in a root-owned directory.
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp true",
            "connection_messages true",
        ]
        if self._acl is not None:
            acl_path = self.workdir / "acl"
            acl_path.write_text(self._acl)
            os.chmod(acl_path, 0o644)
            lines.append(f"acl_file {acl_path}")
        if self._persistence:
            db = self.workdir / "db"
            db.mkdir(exist_ok=True)
            os.chmod(db, 0o755)  # noqa: S103 - the mosquitto user must traverse it
            if os.geteuid() == 0:
                # Root-started mosquitto writes its database as the unprivileged mosquitto user.
                try:
                    pw = pwd.getpwnam("mosquitto")
                    os.chown(db, pw.pw_uid, pw.pw_gid)
                except KeyError:
                    pass
            lines += [
                "persistence true",
                f"persistence_location {db}/",
                "autosave_interval 1",
            ]
        else:
            lines.append("persistence false")
        if self._extra:
            lines.append(self._extra)
        self.conf_path.write_text("\n".join(lines) + "\n")
        os.chmod(self.conf_path, 0o644)

    def start(self, timeout: float = _START_TIMEOUT) -> Mosquitto:
        """Start mosquitto and wait until its listener accepts TCP connections; returns ``self``.

        A picked port that another process took first is replaced by a new one (up to 5 attempts).
        Raises :class:`BrokerStartError` with the log tail if it does not come up, ``RuntimeError`` if
        already running or closed.
        """
        if self._closed:
            raise RuntimeError("broker is closed")
        if self.running:
            raise RuntimeError("broker is already running")
        last_error = ""
        for _attempt in range(_START_ATTEMPTS):
            port = self._port if self._port is not None else free_port(self.host)
            ok, last_error = self._try_start(port, timeout)
            if ok:
                self._port = port
                return self
            if "Address already in use" in last_error and self._port is None:
                continue  # the port we picked was taken meanwhile: pick another
            if "Address already in use" in last_error:
                time.sleep(0.5)  # restart on the same port: wait for the old socket to go
                continue
            break
        raise BrokerStartError(f"mosquitto did not start: {last_error.strip()[-2000:]}")

    def _try_start(self, port: int, timeout: float) -> tuple[bool, str]:
        self._write_config(port)
        # mosquitto logs "... running" once its listeners are open; reading the log instead of probing the
        # port keeps failed-handshake noise out of the log.
        return self._launch([self._binary, "-c", str(self.conf_path)],
                            lambda text: _RUNNING in text and self._accepts(port), timeout)

    def _accepts(self, port: int) -> bool:
        # The process is alive and said it is running: check that something listens on the port without
        # connecting (a TCP probe would log a failed TLS handshake). A bind that fails means it is taken.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((self.host, port))
            except OSError:
                return True
            return False
