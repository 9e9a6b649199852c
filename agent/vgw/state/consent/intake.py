"""The consent intake: where documents from MQTT wait for the main thread, bounded, without losing the newest.

A burst (31 versions published back to back, or a persistent session's backlog after time offline) must
end with the newest genuine document in force, and a flood of forged documents must not push it out. So a
document is judged when it arrives, not when a slot frees up:

- ``offer`` (the uplink's thread, which owns paho's client) runs the pure verifier (no I/O, well under a
  millisecond) against the consent in force. Only a document that verifies can take a slot, so its ``ver`` is the
  authority's word, not the sender's; a forged or invalid document costs one tally entry per reason and is
  forgotten.
- The slots keep the ``SLOTS`` highest verified versions (by version, then by digest). A full intake drops
  its lowest version, which a newer verified document has superseded anyway: nothing is ever dropped
  because the queue was full.
- ``take`` (main thread) empties the intake; the main thread applies the highest candidate first and falls
  back to the next one only if the manager now rejects it, and takes again until the intake is empty.
- A superseded version is never applied, but its grant ids are remembered (``Taken.skipped``): a grant that
  it withdrew and the newest version grants again was still revoked in between, so the manager erases what
  was stored for it before it starts afresh (a revocation is never lost to a burst).

- ``settled`` (the uplink's thread) is true once every document offered so far has been judged and applied or
  refused: after a (re)connect the uplink publishes no stored batch before the retained document is settled
  (README "Topics"). The main thread says when it is done with what it took (``done``).

Memory: ``SLOTS`` documents of at most ``MAX_DOCUMENT_BYTES`` each, one error per rejection reason and
``SKIPPED_MEMORY`` grant-id sets.
``offer`` never blocks on the main thread; one lock guards the slots, the tally and the in-force reference.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vgw.base.errors import ConsentError, MalformedError, TooLargeError
from vgw.contract.consent.model import Consent
from vgw.contract.consent.verifier import MAX_DOCUMENT_BYTES, verify_consent

SLOTS = 4  # verified candidates kept; more than one so a newest that the manager refuses has a fallback
SKIPPED_MEMORY = 32  # grant sets of superseded versions remembered (older ones are merged, conservatively)


@dataclass
class Rejections:
    """Documents refused on arrival, for one reason: how many, and the last error (for the receipt)."""

    count: int
    last: ConsentError


@dataclass
class Taken:
    """What ``take`` hands the main thread: candidates, highest version first, and the arrival rejections."""

    candidates: list[Consent] = field(default_factory=list)
    rejected: dict[str, Rejections] = field(default_factory=dict)
    superseded: int = 0  # verified documents a newer one replaced before the main thread got to them
    skipped: list[tuple[int, frozenset[str]]] = field(default_factory=list)  # their (ver, grant ids)

    def __bool__(self) -> bool:
        return bool(self.candidates or self.rejected)


class ConsentIntake:
    """Bounded intake of consent documents.

    ``offer`` runs in the uplink's thread (any thread will do); ``take`` and ``set_in_force`` in the main
    thread. ``_lock`` guards the slots, the rejection tally, the skipped grant sets and the in-force reference;
    verification runs outside it, so the main thread never waits for a signature check.
    """

    def __init__(self, *, trust_keys: Sequence[Ed25519PublicKey], device: str, clock: Callable[[], float],
                 floor_ver: Callable[[], int] = lambda: 0, slots: int = SLOTS) -> None:
        self._trust_keys = list(trust_keys)
        self._device = device
        self._clock = clock
        self._floor_ver = floor_ver  # the highest version ever accepted (README "Consent document")
        self._slots = slots
        self._lock = threading.Lock()
        self._in_force: Consent | None = None
        self._candidates: dict[str, Consent] = {}  # digest -> verified document
        self._rejected: dict[str, Rejections] = {}
        self._superseded = 0
        self._skipped: list[tuple[int, frozenset[str]]] = []
        self.ready = threading.Event()  # set while something waits for take()
        self.offered = 0
        self._offering = 0  # offers being verified right now (the uplink's thread)
        self._applying = False  # the main thread took documents and has not said it is done with them

    def set_in_force(self, consent: Consent | None) -> None:
        """The main thread tells the intake what is in force now (judged against on arrival)."""
        with self._lock:
            self._in_force = consent

    def offer(self, payload: bytes) -> None:
        """Judge one document from the consent topic and keep it if it may become the newest in force."""
        with self._lock:
            in_force = self._in_force
            self.offered += 1
            self._offering += 1
        try:
            self._judge(payload, in_force)
        finally:
            with self._lock:
                self._offering -= 1

    def settled(self) -> bool:
        """Every document offered so far has been judged and, if it verified, applied (or refused) by the main
        thread. The uplink waits for this after a (re)connect before it publishes stored batches (README
        "Topics"), so a revocation retained at the broker always goes first."""
        with self._lock:
            return not (self._offering or self._applying or self._candidates or self._rejected)

    def _judge(self, payload: bytes, in_force: Consent | None) -> None:
        # Size before anything else (the verifier checks it too): an oversized payload is not even decoded.
        if len(payload) > MAX_DOCUMENT_BYTES:
            self._tally(TooLargeError(f"consent rejected: {len(payload)} bytes > {MAX_DOCUMENT_BYTES} limit"))
            return
        try:
            consent = verify_consent(payload, trust_keys=self._trust_keys, device=self._device, now=self._clock(),
                                     in_force=in_force, floor_ver=self._floor_ver())
        except ConsentError as exc:
            self._tally(exc)
            return
        except Exception as exc:  # a parser failure is a malformed document, never a dead network thread
            self._tally(MalformedError(f"consent rejected: unreadable document ({type(exc).__name__})"))
            return
        if consent is in_force:
            return  # the retained copy of what is in force, delivered again on (re)subscribe
        with self._lock:
            self._candidates[consent.digest] = consent
            if len(self._candidates) > self._slots:
                lowest = min(self._candidates.values(), key=lambda c: (c.ver, c.digest))
                del self._candidates[lowest.digest]
                self._superseded += 1
                self._remember_skipped(lowest.ver, lowest.grant_ids)
            self.ready.set()

    def _remember_skipped(self, ver: int, grant_ids: frozenset[str]) -> None:
        self._skipped.append((ver, grant_ids))
        if len(self._skipped) > SKIPPED_MEMORY:
            # Merge the two lowest versions: the higher version and the grants both kept. A merged entry can
            # only make the manager erase more (a still-granted grant restarts with a fresh key), never less.
            self._skipped.sort(key=lambda e: e[0])
            (v1, g1), (v2, g2) = self._skipped[:2]
            self._skipped[:2] = [(max(v1, v2), g1 & g2)]

    def _tally(self, exc: ConsentError) -> None:
        with self._lock:
            seen = self._rejected.get(exc.reason)
            if seen is None:
                self._rejected[exc.reason] = Rejections(1, exc)
            else:
                seen.count += 1
                seen.last = exc
            self.ready.set()

    def take(self) -> Taken:
        """Everything waiting, emptied out: candidates highest version first, and the rejections by reason."""
        with self._lock:
            taken = Taken(sorted(self._candidates.values(), key=lambda c: (c.ver, c.digest), reverse=True),
                          self._rejected, self._superseded, self._skipped)
            self._candidates = {}
            self._rejected = {}
            self._superseded = 0
            self._skipped = []
            self._applying = bool(taken)
            self.ready.clear()
        return taken

    def done(self) -> None:
        """The main thread has applied (or refused) everything it took: see :meth:`settled`."""
        with self._lock:
            self._applying = False
