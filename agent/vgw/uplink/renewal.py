"""Automatic certificate renewal over the device's own identity (README "Enrollment").

When the client certificate expires within ``[mqtt] renew_before_days``, the uplink's connection thread (the
only owner of a :class:`Renewal`) makes a new key on the device, subscribes to ``vgw/<device>/cert/response``,
publishes a CSR on ``vgw/<device>/cert/request``, checks the issued chain against the new key, the device id
and ``[mqtt] ca_file``, and stages the new pair beside the old one. The uplink then reconnects with the staged
pair; only once that connection is up are key and certificate swapped in (vgw.state.credentials) and the swap
audited. A refusal, no answer, or a staged pair the broker refuses keeps the current pair, is retried with
backoff, and shows in `vgw status` and `vgw doctor`. Collection never waits for any of this: the outbox keeps
every batch and the reconnect resumes where it stopped.

Threads: every method runs on the uplink's thread (the one owner of the MQTT client, vgw.uplink.link) except
:meth:`view`, which reads a snapshot the owner refreshes (one assignment of a new dict). The uplink sleeps
between events; :meth:`next_check` tells it when the renewal needs it next.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from vgw.base.errors import EnrollmentError, StorageError
from vgw.base.fsutil import ensure_private_dir
from vgw.config.settings import MqttConfig
from vgw.contract.enrollment import (
    Kind,
    build_csr,
    check_issued,
    decode_response,
    encode_request,
    new_key,
    request_topic,
    response_topic,
)
from vgw.state.credentials import (
    Staged,
    commit_staged,
    device_credentials,
    discard_staged,
    renewed_pair,
    settle,
    stage,
)

__all__ = ["Renewal", "RenewalState", "RenewalTiming"]

log = logging.getLogger(__name__)

CLOCK_RECHECK_S = 3600.0  # see Renewal.next_check


class RenewalState(StrEnum):
    VALID = "valid"  # not due yet
    DUE = "due"  # within renew_before_days: a request goes out on the next connection
    REQUESTED = "requested"  # CSR published, waiting for the answer
    STAGED = "staged"  # new pair checked and staged; reconnecting with it
    REFUSED = "refused"  # the service said no: retrying with backoff on the current certificate
    FAILED = "failed"  # no answer, a bad answer, or the new pair did not connect: retrying with backoff
    OFF = "off"  # renew_before_days = 0


@dataclass(frozen=True)
class RenewalTiming:
    """How long to wait for an answer, and the retry backoff (doubling from ``retry_min_s``)."""

    answer_timeout_s: float = 60.0
    retry_min_s: float = 60.0
    retry_max_s: float = 6 * 3600.0


class Renewal:
    """The renewal state machine of one device (see the module docstring)."""

    def __init__(self, cfg: MqttConfig, device: str, state_dir: Path, *, audit: Callable[..., None],
                 on_renewed: Callable[[ec.EllipticCurvePrivateKey], None] | None = None,
                 timing: RenewalTiming | None = None, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.device = device
        self.audit = audit
        self.on_renewed = on_renewed
        self.timing = timing or RenewalTiming()
        self.clock = clock
        self.request_topic = request_topic(cfg.topic_prefix, Kind.RENEW, device)
        self.response_topic = response_topic(cfg.topic_prefix, Kind.RENEW, device)
        self.state_dir = state_dir
        self.cert_file, self.key_file = renewed_pair(state_dir)  # where a renewed pair goes
        self.staged = Staged.beside(self.key_file, self.cert_file)
        self.state = RenewalState.OFF if cfg.renew_before_days <= 0 else RenewalState.VALID
        self.attempts = 0  # requests that did not end in a new certificate since the last success
        self.renewals = 0
        self.last_error: str | None = None
        self._not_after: float | None = None
        self._retry_at = 0.0  # monotonic
        self._delay = self.timing.retry_min_s
        self._asked_at: float | None = None  # monotonic, while REQUESTED
        self._key: ec.EllipticCurvePrivateKey | None = None  # the new key, while REQUESTED or STAGED
        self._view: dict[str, Any] = {}
        done = settle(self.key_file, self.cert_file)  # a swap a crash interrupted: finished or dropped
        if done:
            log.warning("renewal: %s", done)
            self.audit("certificate-swap-recovered", what=done)
        self._read_expiry()

    # -- the uplink's questions ---------------------------------------------------------------------

    def credentials(self) -> tuple[Path, Path]:
        """(cert, key) to connect with: the staged pair while it is being tried, else the one in use."""
        if self.state is RenewalState.STAGED:
            return self.staged.cert, self.staged.key
        return device_credentials(self.cfg.cert_file, self.cfg.key_file, self.state_dir)

    def wants_request(self) -> bool:
        """Due, and the backoff (if any) has passed: the uplink subscribes and publishes :meth:`request`."""
        if self.state in (RenewalState.OFF, RenewalState.REQUESTED, RenewalState.STAGED):
            return False
        if self._not_after is None:
            return False
        if self._not_after - self.clock() > self.cfg.renew_before_days * 86400:
            return False
        if self.state is RenewalState.VALID:
            self.state = RenewalState.DUE
            log.info("renewal: the certificate expires %s, within renew_before_days = %g; renewing",
                     _day(self._not_after), self.cfg.renew_before_days)
            self._refresh_view()
        return time.monotonic() >= self._retry_at

    def request(self) -> bytes:
        """A new key (kept in memory until staged) and its CSR as the request payload."""
        self._key = new_key()
        self.state = RenewalState.REQUESTED
        self._asked_at = time.monotonic()
        self._refresh_view()
        return encode_request(build_csr(self._key, self.device), None)

    def next_check(self) -> float | None:
        """When (monotonic) the uplink must next call :meth:`wants_request` and :meth:`tick`; None: not before one
        of its own events. A renewal days away is looked at again at least every ``CLOCK_RECHECK_S`` (the wall
        clock it is measured on may be stepped meanwhile)."""
        now = time.monotonic()
        if self.state is RenewalState.REQUESTED:
            return (self._asked_at or now) + self.timing.answer_timeout_s
        if self.state in (RenewalState.OFF, RenewalState.STAGED) or self._not_after is None:
            return None
        due_in = self._not_after - self.cfg.renew_before_days * 86400 - self.clock()
        if due_in > 0:
            return now + min(due_in, CLOCK_RECHECK_S)
        return max(now, self._retry_at)

    def tick(self) -> None:
        """No answer within the timeout: a failure (retried later)."""
        if self.state is RenewalState.REQUESTED and self._asked_at is not None \
                and time.monotonic() - self._asked_at > self.timing.answer_timeout_s:
            self._failed(RenewalState.FAILED, f"no answer within {self.timing.answer_timeout_s:g} s")

    def topic_refused(self, reason: str) -> None:
        """The broker refused the answer topic: nothing can be asked on this connection (retried later)."""
        self._failed(RenewalState.FAILED, reason)

    def connection_lost(self) -> None:
        """The link dropped while a request was out: ask again on the next connection (after the backoff)."""
        if self.state is RenewalState.REQUESTED:
            self._failed(RenewalState.FAILED, "the connection dropped before the answer")

    def answer(self, payload: bytes) -> bool:
        """The service's answer. True if a new pair is staged (the uplink reconnects with it)."""
        if self.state is not RenewalState.REQUESTED or self._key is None:
            return False  # a late or repeated answer
        try:
            response = decode_response(payload)
            if response.refused is not None:
                self._failed(RenewalState.REFUSED, f"the service refused: {response.refused}")
                return False
            check_issued(response.chain, self._key, self.device, _anchors(self.cfg.ca_file),
                         dt.datetime.fromtimestamp(self.clock(), dt.UTC))
            ensure_private_dir(self.key_file.parent)
            stage(self.staged, self._key, response.chain)
        except (EnrollmentError, StorageError, OSError, ValueError) as exc:
            self._failed(RenewalState.FAILED, str(exc))
            return False
        self.state = RenewalState.STAGED
        self._refresh_view()
        log.info("renewal: new certificate %x staged; reconnecting with it", response.chain[0].serial_number)
        return True

    def connected(self) -> None:
        """The uplink connected: with the staged pair, this is the moment to swap it in."""
        if self.state is not RenewalState.STAGED or self._key is None:
            return
        try:
            commit_staged(self.staged, self.key_file, self.cert_file)
        except StorageError as exc:
            self._failed(RenewalState.FAILED, str(exc))
            discard_staged(self.staged)
            return
        key, self._key = self._key, None
        old = self._not_after
        self._read_expiry()
        self.renewals += 1
        self.attempts = 0
        self.last_error = None
        self._delay = self.timing.retry_min_s
        self.state = RenewalState.VALID
        if self._not_after is not None and self._not_after - self.clock() <= self.cfg.renew_before_days * 86400:
            # The CA issues certificates shorter than the window (or its own ends sooner): renewing again at once
            # would loop. Wait the longest backoff before the next attempt.
            self._retry_at = time.monotonic() + self.timing.retry_max_s
            log.warning("renewal: the renewed certificate ends %s, within renew_before_days = %g as well (the CA's "
                        "validity is shorter); next renewal in %g s", _day(self._not_after),
                        self.cfg.renew_before_days, self.timing.retry_max_s)
        self._refresh_view()
        log.info("renewal: certificate renewed, valid until %s (was %s)", _day(self._not_after), _day(old))
        self.audit("certificate-renewed", not_after=int(self._not_after or 0), previous_not_after=int(old or 0))
        if self.on_renewed is not None:
            self.on_renewed(key)

    def connect_failed(self) -> None:
        """A connection attempt failed: if it was with the staged pair, drop it and go back to the old one."""
        if self.state is RenewalState.STAGED:
            discard_staged(self.staged)
            self._failed(RenewalState.FAILED, "the broker did not accept the renewed certificate")

    # -- state ------------------------------------------------------------------------------------

    def _failed(self, state: RenewalState, reason: str) -> None:
        self.state = state
        self.attempts += 1
        self.last_error = reason
        self._key = None
        self._asked_at = None
        self._retry_at = time.monotonic() + self._delay
        log.warning("renewal: %s; keeping the current certificate (valid until %s), retrying in %g s", reason,
                    _day(self._not_after), self._delay)
        self.audit("certificate-renewal-failed", reason=reason[:200], attempts=self.attempts)
        self._delay = min(self._delay * 2, self.timing.retry_max_s)
        self._refresh_view()

    def _read_expiry(self) -> None:
        cert_file, _key = device_credentials(self.cfg.cert_file, self.cfg.key_file, self.state_dir)
        try:
            leaf = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
            self._not_after = leaf.not_valid_after_utc.timestamp()
        except (OSError, ValueError, IndexError):
            self._not_after = None
        self._refresh_view()

    def _refresh_view(self) -> None:
        self._view = {"state": self.state.value, "not_after": self._not_after,
                      "renew_from": (self._not_after - self.cfg.renew_before_days * 86400
                                     if self._not_after is not None and self.state is not RenewalState.OFF else None),
                      "attempts": self.attempts, "renewals": self.renewals, "last_error": self.last_error}

    def view(self) -> dict[str, Any]:
        """For status.json (any thread): state, not_after, renew_from, attempts, renewals, last_error."""
        return dict(self._view)


def _anchors(ca_file: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(ca_file.read_bytes())


def _day(ts: float | None) -> str:
    return "unknown" if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
