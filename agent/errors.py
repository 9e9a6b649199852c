"""vgw's error tree.

Every error a user can cause or meet in operation derives from :class:`VgwError`; the CLI prints its
message as one line and exits non-zero. Programming mistakes raise ``ValueError``/``RuntimeError``.

::

    VgwError
     +-- ConfigError            bad config file, DBC, signal map (names the file and field)
     +-- ConsentError           a consent document broke a rule of README "Consent document" (``reason`` says which)
     |    +-- SignatureError    not signed by a trusted key, wrong alg/typ, malformed JWS
     |    +-- ClaimsError       wrong subject, scope, grant shape, size
     |    +-- FreshnessError    version rollback/replay, expired, issued in the future
     +-- SourceError            a frame/PID source failed
     |    +-- SourceOpenError   could not open the bus/adapter/trace (initialisation)
     |    +-- SourceReadError   failed while reading (operation)
     |    +-- SourceFrameError  one frame was malformed and skipped; the source is still usable
     +-- StorageError           state dir / outbox / key store
     +-- UplinkError            MQTT/TLS
"""

from __future__ import annotations


class VgwError(Exception):
    """Base of every vgw error a user can meet."""


class ConfigError(VgwError):
    """The configuration (TOML, DBC, signal map) is invalid. The message names the file and field."""


class ConsentError(VgwError):
    """A consent document was rejected; ``reason`` is a short machine-readable tag."""

    reason = "invalid"

    def __init__(self, message: str, *, version: int | None = None) -> None:
        super().__init__(message)
        self.version = version


class SignatureError(ConsentError):
    reason = "signature"


class ClaimsError(ConsentError):
    reason = "claims"


class FreshnessError(ConsentError):
    reason = "freshness"


class SourceError(VgwError):
    """A source of frames or OBD answers failed."""


class SourceOpenError(SourceError):
    """The bus, adapter or trace could not be opened."""


class SourceEndedError(SourceOpenError):
    """The source cannot be opened and must not be retried (a replayed trace with ``replay_exit``): the run ends
    with a non-zero exit."""


class SourceReadError(SourceError):
    """Reading from an open source failed."""


class SourceFrameError(SourceError):
    """One frame could not be read (garbled or truncated input); it was skipped and the source is still usable."""


class StorageError(VgwError):
    """The state directory, outbox or key store failed."""


class UplinkError(VgwError):
    """The MQTT/TLS uplink failed."""
