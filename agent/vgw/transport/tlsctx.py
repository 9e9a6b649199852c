"""The one TLS client context of every vgw MQTT or NATS connection: the agent's uplink, `vgw enroll`, `vgw doctor`,
`vgw cloud` and the simulators.

Mutual TLS, version 1.2 at least (README "Configuration (TOML)"): the broker's certificate is checked against
the CA file and the host name, and the client presents its certificate and key. Each file is checked to be a
regular file of sane size before ``ssl`` opens it (a FIFO would hang ``ssl`` in ``open``). Pure of threads and
sockets: it only reads the three files.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from vgw.base.errors import ConfigError
from vgw.base.fsutil import MAX_KEY_BYTES, read_small_file

__all__ = ["client_context"]


def client_context(ca_file: str | os.PathLike[str], cert_file: str | os.PathLike[str],
                   key_file: str | os.PathLike[str], *, error: type[ConfigError] = ConfigError) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca_file`` and presents ``cert_file``/``key_file``.

    Raises ``error`` (a :class:`~vgw.base.errors.ConfigError`, one line naming the file) for a file that is missing,
    not a regular file, too large, unreadable or not a usable CA, certificate or key."""
    files = (("CA file", ca_file), ("client certificate", cert_file), ("client key", key_file))
    for what, path in files:
        try:
            read_small_file(Path(path), what=what, max_bytes=MAX_KEY_BYTES, error=error)
        except FileNotFoundError as exc:
            raise error(f"{os.fspath(path)}: {what} not found") from exc
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.fspath(ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    except (OSError, ssl.SSLError) as exc:
        detail = getattr(exc, "reason", None) or exc.strerror or exc
        raise error(f"{os.fspath(ca_file)}, {os.fspath(cert_file)}, {os.fspath(key_file)}: not a usable CA, "
                    f"certificate and key ({detail})") from exc
    return ctx
