"""vgw's error tree.

Every error a user can cause or meet in operation derives from :class:`VgwError`; the CLI prints its
message as one line and exits non-zero. Programming mistakes raise ``ValueError``/``RuntimeError``. Like
python-can's, the tree is split by *when* a failure happens (opening a part, operating it, one bad input
skipped) and, for consent, like python-tuf's: one class per rule, so a caller catches a rollback by type
(``except RollbackError``) instead of comparing strings. A consent error's ``reason`` (a
:class:`ConsentReason`, a ``str``) is what rejection receipts and the audit log carry (README "Receipts"); its
values never change.

::

    VgwError
     +-- ConfigError                bad config file, DBC, signal map (names the file and field)
     |    +-- MissingFileError      a file the config names does not exist (``path``)
     |    +-- CloudKitError         `vgw cloud`: unusable key file, grants description or option
     +-- ConsentError               a consent document broke a rule of README "Consent document" (``reason`` says which)
     |    +-- SignatureError        not verifiable as a document signed by a trusted key
     |    |    +-- MalformedError       not a compact JWS, unreadable header          reason "malformed"
     |    |    +-- AlgorithmError       alg is not EdDSA (alg confusion)              reason "alg"
     |    |    +-- TypeHeaderError      typ is not vgw-consent+jwt (token confusion)  reason "typ"
     |    |    +-- CriticalHeaderError  a 'crit' header this agent cannot honour      reason "crit"
     |    |    +-- UntrustedError       no trust key configured                       reason "untrusted"
     |    |    +-- BadSignatureError    signature does not verify under any key       reason "signature"
     |    +-- ClaimsError           the signed claims are not an acceptable document
     |    |    +-- TooLargeError        document or grant list over its limit         reason "too-large"
     |    |    +-- PayloadError         payload is not a JSON object                  reason "payload"
     |    |    +-- WrongDeviceError     sub is another device (replay to a fleet)     reason "subject"
     |    |    +-- ValidityError        iat/exp missing, out of range, exp <= iat     reason "validity"
     |    |    +-- BadClaimError        a field of the wrong type or shape            reason "claims"
     |    |    +-- DuplicateGrantError  one grant id twice                            reason "duplicate-grant"
     |    |    +-- UnknownKeyError      a key this agent cannot enforce (fail closed) reason "unknown-key"
     |    |    +-- ControlScopeError    a control (write) scope                       reason "control-scope"
     |    |    +-- UnknownScopeError    a scope not in the catalogue                  reason "unknown-scope"
     |    |    +-- RecipientError       no or unusable HPKE recipient key             reason "recipient"
     |    |    +-- BadRuleError         a rule of README "Collection rules"    reason "collect-*" (RuleReason)
     |    +-- FreshnessError        the document is not the newest valid one now
     |         +-- RollbackError        ver below the one in force (rollback)         reason "version-rollback"
     |         +-- VersionConflictError same ver, other content (equivocation)        reason "version-conflict"
     |         +-- ExpiredError         exp has passed                                reason "expired"
     |         +-- NotYetValidError     iat in the future beyond the skew             reason "not-yet-valid"
     +-- RuleError                  a collection rule broke README "Collection rules" (vgw.contract.rules.rules)
     +-- ConditionError             a rule's condition does not parse (vgw.contract.rules.expr)
     +-- PolicyError                vgw refused to do something it must never do
     |    +-- ForbiddenRequest      an OBD request outside the read-only services (also a ValueError)
     +-- SourceError                a frame/PID source failed
     |    +-- SourceOpenError       could not open the bus/adapter/trace (initialisation)
     |    |    +-- SourceEndedError  a trace that cannot be opened, with replay_exit: the run ends non-zero
     |    +-- SourceReadError       failed while reading (operation); AnswerTimeout, AnswerTooLong (vgw.sources.obd)
     |    +-- SourceFrameError      one frame was malformed and skipped; the source is still usable
     |         +-- LineError        one candump line is not a frame (vgw.sources.candump; also a ValueError)
     +-- StorageError               state dir / outbox / key store
     |    +-- StorageOpenError      could not open or create a state file (initialisation)
     |    +-- NotRegularFile        a FIFO, device or folder where a regular file must be (fsutil; also OSError)
     |    +-- OutboxUnwritable      a write failed: ``fault`` is a StorageFault (full, read-only, io)
     |    +-- GrantNotActive        a batch or key refused: its grant was revoked meanwhile (vgw.state.outbox)
     |         +-- TermsChanged     a batch collected under terms no longer in force (vgw.state.outbox)
     +-- UplinkError                MQTT/TLS
     |    +-- PacketTooLarge        a packet over the limit ended the connection (also an OSError, for paho)
     +-- EnvelopeError              (cloud side) a telemetry envelope failed a rule of README "Telemetry envelope"
     +-- ReceiptError               (cloud side) a receipt is not a valid ES256 JWS of its device (README "Receipts")
     +-- EnrollmentError            enrollment or renewal failed (README "Enrollment"); ``reason`` an EnrollReason
          +-- EnrollmentRefused     the enrollment service said no (its reason is printed; `vgw enroll` exit 1)
          +-- EnrollmentTimeout     no answer in time (`vgw enroll` exit 2)

Outside the tree on purpose: ``vgw_sim.broker.BrokerError`` (``MosquittoNotFound``,
``BrokerStartError``, ``NatsNotFound``) derives from ``RuntimeError``: a missing or dead test broker is a
problem of the machine the tests or the demo run on, not something vgw's user caused.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path


class VgwError(Exception):
    """Base of every vgw error a user can meet."""


# -- configuration ----------------------------------------------------------------------------------


class ConfigError(VgwError):
    """The configuration (TOML, DBC, signal map) is invalid. The message names the file and field."""


class MissingFileError(ConfigError):
    """A file the configuration names does not exist; ``path`` is that file."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class CloudKitError(ConfigError):
    """A key file, grants description, consent document or option of `vgw cloud` is unusable (message names it)."""


# -- consent ----------------------------------------------------------------------------------------


class ConsentReason(StrEnum):
    """Why a consent document was rejected: the ``reason`` of its rejection receipt (README "Receipts").

    The collection-rule reasons (``collect-*``) are :class:`vgw.contract.rules.rules.RuleReason`.
    """

    MALFORMED = "malformed"
    ALG = "alg"
    TYP = "typ"
    CRIT = "crit"
    UNTRUSTED = "untrusted"
    SIGNATURE = "signature"
    TOO_LARGE = "too-large"
    PAYLOAD = "payload"
    SUBJECT = "subject"
    VALIDITY = "validity"
    CLAIMS = "claims"
    DUPLICATE_GRANT = "duplicate-grant"
    UNKNOWN_KEY = "unknown-key"
    CONTROL_SCOPE = "control-scope"
    UNKNOWN_SCOPE = "unknown-scope"
    RECIPIENT = "recipient"
    VERSION_ROLLBACK = "version-rollback"
    VERSION_CONFLICT = "version-conflict"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"


class ConsentError(VgwError):
    """A consent document was rejected. ``reason`` names the broken rule (a ``str`` enum, see the tree);
    ``version`` is the document's claimed ``ver`` when it could be read."""

    reason: StrEnum = ConsentReason.MALFORMED

    def __init__(self, message: str, version: int | None = None) -> None:
        super().__init__(message)
        self.version = version


class SignatureError(ConsentError):
    """The document cannot be verified as signed by a trusted key."""

    reason = ConsentReason.SIGNATURE


class MalformedError(SignatureError):
    reason = ConsentReason.MALFORMED


class AlgorithmError(SignatureError):
    reason = ConsentReason.ALG


class TypeHeaderError(SignatureError):
    reason = ConsentReason.TYP


class CriticalHeaderError(SignatureError):
    reason = ConsentReason.CRIT


class UntrustedError(SignatureError):
    reason = ConsentReason.UNTRUSTED


class BadSignatureError(SignatureError):
    reason = ConsentReason.SIGNATURE


class ClaimsError(ConsentError):
    """The signed claims do not form an acceptable document."""

    reason: StrEnum = ConsentReason.CLAIMS


class TooLargeError(ClaimsError):
    reason = ConsentReason.TOO_LARGE


class PayloadError(ClaimsError):
    reason = ConsentReason.PAYLOAD


class WrongDeviceError(ClaimsError):
    reason = ConsentReason.SUBJECT


class ValidityError(ClaimsError):
    reason = ConsentReason.VALIDITY


class BadClaimError(ClaimsError):
    reason = ConsentReason.CLAIMS


class DuplicateGrantError(ClaimsError):
    reason = ConsentReason.DUPLICATE_GRANT


class UnknownKeyError(ClaimsError):
    reason = ConsentReason.UNKNOWN_KEY


class ControlScopeError(ClaimsError):
    reason = ConsentReason.CONTROL_SCOPE


class UnknownScopeError(ClaimsError):
    reason = ConsentReason.UNKNOWN_SCOPE


class RecipientError(ClaimsError):
    reason = ConsentReason.RECIPIENT


class BadRuleError(ClaimsError):
    """A collection rule broke README "Collection rules"; ``reason`` is the rule's
    :class:`~vgw.contract.rules.rules.RuleReason`."""

    def __init__(self, message: str, reason: StrEnum, *, version: int | None = None) -> None:
        super().__init__(message, version=version)
        self.reason = reason


class FreshnessError(ConsentError):
    """The document is not the newest valid one at the device's now."""

    reason = ConsentReason.VERSION_ROLLBACK


class RollbackError(FreshnessError):
    reason = ConsentReason.VERSION_ROLLBACK


class VersionConflictError(FreshnessError):
    reason = ConsentReason.VERSION_CONFLICT


class ExpiredError(FreshnessError):
    reason = ConsentReason.EXPIRED


class NotYetValidError(FreshnessError):
    reason = ConsentReason.NOT_YET_VALID


# -- policy -----------------------------------------------------------------------------------------


class PolicyError(VgwError):
    """vgw refused to do something it must never do (README "What vgw never does")."""


class ForbiddenRequest(PolicyError, ValueError):
    """A request that vgw must never send (wrong service, too many PIDs, DTCs without consent)."""


# -- sources ----------------------------------------------------------------------------------------


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


# -- storage ----------------------------------------------------------------------------------------


class StorageError(VgwError):
    """The state directory, outbox or key store failed."""


class StorageOpenError(StorageError):
    """A state file could not be opened or created."""


class StorageFault(StrEnum):
    """Why a write to the outbox failed, from SQLite's result code (never from its message text)."""

    FULL = "full"  # SQLITE_FULL: the disk, or the file's page limit
    READ_ONLY = "read-only"  # SQLITE_READONLY and its extended codes
    IO = "io"  # anything else: SQLITE_IOERR, SQLITE_CANTOPEN, a corrupt page ...


class OutboxUnwritable(StorageError):
    """The outbox cannot store now; ``fault`` says why (``kind`` is its string, for logs and the audit)."""

    def __init__(self, message: str, fault: StorageFault) -> None:
        super().__init__(message)
        self.fault = fault

    @property
    def kind(self) -> str:
        return self.fault.value


# -- uplink and cloud -------------------------------------------------------------------------------


class UplinkError(VgwError):
    """The MQTT/TLS uplink failed."""


class EnvelopeError(VgwError):
    """A telemetry envelope broke README "Telemetry envelope"; ``reason`` is a short tag (version, hpke, zlib,
    json, ...)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ReceiptError(VgwError):
    """A receipt is not a valid compact JWS signed ES256 by the device it names (README "Receipts")."""


# -- enrollment -------------------------------------------------------------------------------------


class EnrollReason(StrEnum):
    """Why an enrollment or renewal request was refused, or why an issued certificate was not installed
    (README "Enrollment"). The value travels in a refusal (``{"status": "refused", "reason": ...}``) as its first
    word; it never changes."""

    TOO_LARGE = "too-large"  # the request is over 16 KiB
    MALFORMED = "malformed"  # not a JSON object with the fields of the topic
    BAD_CSR = "bad-csr"  # not a PEM CSR, a bad self-signature, or a key that is not EC P-256
    SUBJECT = "subject"  # the CSR names another device than the topic
    UNKNOWN_DEVICE = "unknown-device"  # the allow file does not list the device
    TOKEN = "token"  # noqa: S105 - a reason word, not a secret: the token is not the allow file's one for the device
    TOKEN_USED = "token-used"  # noqa: S105 - the token was used before for another key
    NOT_ENROLLED = "not-enrolled"  # renewal for a device this service never issued to or lets renew
    REVOKED = "revoked"  # the device was revoked
    SERVICE = "service"  # the service could not record the issuance (it issues nothing then)
    BAD_CERTIFICATE = "bad-certificate"  # device side: the issued chain does not match the key, id or CA
    TIMEOUT = "timeout"  # device side: no answer


class EnrollmentError(VgwError):
    """Enrollment or renewal failed; ``reason`` (an :class:`EnrollReason`) says why."""

    def __init__(self, message: str, reason: EnrollReason) -> None:
        super().__init__(message)
        self.reason = reason


class EnrollmentRefused(EnrollmentError):
    """The enrollment service refused the request; the message is its reason."""


class EnrollmentTimeout(EnrollmentError):
    """No answer from the enrollment service in time."""
