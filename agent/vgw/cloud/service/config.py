"""The consent service's configuration file (README "The owner's consent service"): ``[service]`` and
``[broker]`` tables; unknown keys are an error; relative paths are relative to the file.

Raises :class:`~vgw.base.errors.ConfigError` naming the file and key at fault.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vgw.base.errors import ConfigError

__all__ = ["BrokerSection", "ServiceConfig", "load_service_config"]

_SERVICE_KEYS = {"listen", "issuer", "database", "signing_key", "device_certs", "ttl_s", "tls_cert", "tls_key",
                 "code_ttl_s", "token_ttl_s", "login_attempts", "login_window_s"}
_BROKER_KEYS = {"host", "port", "ca_file", "cert_file", "key_file", "topic_prefix"}


@dataclass(frozen=True)
class BrokerSection:
    host: str
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    topic_prefix: str = "vgw"


@dataclass(frozen=True)
class ServiceConfig:
    """One consent service. ``code_ttl_s`` (default 60) bounds an authorization code's life (short-lived,
    RFC 6749 §4.1.2); ``login_attempts`` failed sign-ins per ``login_window_s`` per user and per client
    address lock sign-in for the rest of the window."""

    path: Path
    host: str
    port: int
    issuer: str
    database: str  # a SQLite file's path, or a postgresql:// URL
    signing_key: Path
    device_certs: Path
    broker: BrokerSection
    ttl_s: int = 86400
    tls_cert: Path | None = None
    tls_key: Path | None = None
    code_ttl_s: int = 60
    token_ttl_s: int = 3600
    login_attempts: int = 5
    login_window_s: int = 300

    @property
    def https(self) -> bool:
        return self.tls_cert is not None


def _str(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _int(table: dict[str, Any], key: str, where: str, default: int, low: int = 1) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{where}: {key} must be an integer >= {low}, got {value!r}")
    return value


def _address(text: str, where: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{where}: listen {text!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def _database(text: str, rel: Callable[[str], Path]) -> str:
    """A PostgreSQL URL as given; anything else is a SQLite file, relative to the config file."""
    return text if text.startswith(("postgresql://", "postgres://")) else str(rel(text))


def load_service_config(path: str | Path) -> ServiceConfig:
    """Read and check the file. Raises :class:`ConfigError`."""
    path = Path(path).resolve()
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    unknown = set(data) - {"service", "broker"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {sorted(unknown)}")
    service, broker = data.get("service"), data.get("broker")
    if not isinstance(service, dict) or not isinstance(broker, dict):
        raise ConfigError(f"{path}: needs the tables [service] and [broker]")
    base = path.parent

    def rel(text: str) -> Path:
        p = Path(text).expanduser()
        return p if p.is_absolute() else base / p

    where = f"{path}: [service]"
    extra = set(service) - _SERVICE_KEYS
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {sorted(extra)}")
    host, port = _address(_str(service, "listen", where), where)
    issuer = _str(service, "issuer", where).rstrip("/")
    parts = urlsplit(issuer)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"{where}: issuer {issuer!r} must be an http(s) URL without query or fragment (RFC 8414)")
    tls_cert = rel(_str(service, "tls_cert", where)) if "tls_cert" in service else None
    tls_key = rel(_str(service, "tls_key", where)) if "tls_key" in service else None
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError(f"{where}: tls_cert and tls_key go together")
    bwhere = f"{path}: [broker]"
    bextra = set(broker) - _BROKER_KEYS
    if bextra:
        raise ConfigError(f"{bwhere}: unknown key(s) {sorted(bextra)}")
    prefix = broker.get("topic_prefix", "vgw")
    if not isinstance(prefix, str) or not prefix or any(c in prefix for c in "+#"):
        raise ConfigError(f"{bwhere}: topic_prefix {prefix!r} must be a topic level without + or #")
    return ServiceConfig(
        path=path, host=host, port=port, issuer=issuer,
        database=_database(_str(service, "database", where), rel),
        signing_key=rel(_str(service, "signing_key", where)),
        device_certs=rel(_str(service, "device_certs", where)),
        ttl_s=_int(service, "ttl_s", where, 86400, 60),
        tls_cert=tls_cert, tls_key=tls_key,
        code_ttl_s=_int(service, "code_ttl_s", where, 60),
        token_ttl_s=_int(service, "token_ttl_s", where, 3600),
        login_attempts=_int(service, "login_attempts", where, 5),
        login_window_s=_int(service, "login_window_s", where, 300),
        broker=BrokerSection(
            host=_str(broker, "host", bwhere), port=_int(broker, "port", bwhere, 8883),
            ca_file=rel(_str(broker, "ca_file", bwhere)), cert_file=rel(_str(broker, "cert_file", bwhere)),
            key_file=rel(_str(broker, "key_file", bwhere)), topic_prefix=prefix),
    )
