"""The one frame the agent may send on a J1939 bus: a request (PGN 59904, J1939-21 5.4.2) for a PGN that a
consent in force covers -- and only with ``[can] j1939_requests = true`` (README "SAE J1939").

Why so narrow: the vehicle network is not the agent's. It never claims an address (PGN 60928) -- a claim can
take an address away from a real ECU -- so it sends from the address the installer gives it in
``[can] j1939_address`` (a free one, e.g. 0xF9, the off-board diagnostic tool's), and only requests for the
on-request PGNs it reads itself (VIN, component identification), each at most once per
``REQUEST_INTERVAL_S``, to the global address. Answers come back as broadcasts (TP.BAM), which the
reassembler reads like any other.

:class:`Requester` is pure: scopes and a clock in, frames out; the collector sends them.
"""

from __future__ import annotations

from collections.abc import Iterable

from vgw.pipeline.j1939.ids import GLOBAL, PGN_REQUEST, make_id
from vgw.pipeline.j1939.messages import BUILTINS, PGN_COMPONENT_ID, PGN_VIN

REQUEST_INTERVAL_S = 30.0
REQUESTABLE = (PGN_VIN, PGN_COMPONENT_ID)  # broadcast only on request (J1939-71)


def request_frame(pgn: int, source: int) -> tuple[int, bytes]:
    """(identifier, data) of a global request for ``pgn`` from ``source`` (priority 6, 3 data bytes)."""
    return make_id(PGN_REQUEST, source, destination=GLOBAL, priority=6), pgn.to_bytes(3, "little")


def is_request(can_id: int, data: bytes) -> bool:
    """True for exactly the frames :class:`Requester` makes: a request for a requestable PGN."""
    return ((can_id >> 8) & 0x3FF00) == PGN_REQUEST and len(data) == 3 and \
        int.from_bytes(data, "little") in REQUESTABLE


class Requester:
    """Decides which requests are due. Owned by the collector thread."""

    def __init__(self, source: int, *, interval_s: float = REQUEST_INTERVAL_S) -> None:
        if not 0 <= source <= 253:
            raise ValueError(f"J1939 source address must be 0..253, got {source}")
        self.source = source
        self.interval_s = interval_s
        self._last: dict[int, float] = {}

    def due(self, now: float, scopes: Iterable[str]) -> list[tuple[int, bytes]]:
        """Requests to send at monotonic time ``now`` for the PGNs ``scopes`` cover (none without consent)."""
        granted = set(scopes)
        out = []
        for pgn in REQUESTABLE:
            if BUILTINS[pgn].scope not in granted:
                continue
            last = self._last.get(pgn)
            if last is not None and now - last < self.interval_s:
                continue
            self._last[pgn] = now
            out.append(request_frame(pgn, self.source))
        return out
