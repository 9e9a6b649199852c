"""When a device asks again: for its consent subscription (README "Topics"), and for a certificate (README
"Enrollment": the same request every :data:`ENROLL_RESEND_S` until answered; the service answers a repeat the
same, so a service that was down or restarts still answers).

Without the subscription no consent change reaches the car on that connection, a revocation included, so a
SUBACK that refuses it (a NATS node under load that cannot create the subscription's JetStream consumer in
time) is answered by subscribing again after :data:`SUBSCRIBE_RETRY_FIRST_S`, doubling up to
:data:`SUBSCRIBE_RETRY_MAX_S`; a SUBSCRIBE with no answer at all is sent again after :data:`SUBACK_TIMEOUT_S`
(one that could not even be queued, after the current delay). A new connection, and a granted subscription,
start the doubling afresh. :class:`Resubscribe` is that rule as a small state machine; the caller passes its
own clock.
"""

from __future__ import annotations

__all__ = [
    "ENROLL_RESEND_S",
    "SUBACK_TIMEOUT_S",
    "SUBSCRIBE_RETRY_FIRST_S",
    "SUBSCRIBE_RETRY_MAX_S",
    "Resubscribe",
    "next_subscribe_delay",
]

SUBSCRIBE_RETRY_FIRST_S = 1.0
SUBSCRIBE_RETRY_MAX_S = 30.0
SUBACK_TIMEOUT_S = 30.0
ENROLL_RESEND_S = 5.0


def next_subscribe_delay(delay: float) -> float:
    """The wait after the refusal following one that waited ``delay`` seconds: double, at most the cap."""
    return min(delay * 2, SUBSCRIBE_RETRY_MAX_S)


class Resubscribe:
    """One connection's consent subscription: when to send the SUBSCRIBE again (``due``, None: not at all).

    Owned by the thread that owns the connection; no lock.
    """

    def __init__(self) -> None:
        self.delay = SUBSCRIBE_RETRY_FIRST_S  # the wait after the next refusal
        self.due: float | None = None
        self.refusals = 0  # on this connection

    def sent(self, now: float, *, queued: bool) -> None:
        """A SUBSCRIBE went out (``queued``) or could not even be queued: when to try again without an answer."""
        self.due = now + (SUBACK_TIMEOUT_S if queued else self.delay)

    def refused(self, now: float) -> float:
        """The SUBACK refused it: returns the wait before the next SUBSCRIBE, and doubles the one after."""
        wait = self.delay
        self.refusals += 1
        self.due = now + wait
        self.delay = next_subscribe_delay(wait)
        return wait

    def granted(self) -> None:
        """The SUBACK granted it: nothing more to send; a later refusal starts from the first delay again."""
        self.due = None
        self.delay = SUBSCRIBE_RETRY_FIRST_S

    def is_due(self, now: float) -> bool:
        return self.due is not None and now >= self.due
