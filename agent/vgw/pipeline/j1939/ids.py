"""The J1939 29-bit identifier (J1939-21 5.2) and the route keys the pipeline looks frames up by.

Identifier bits: 28-26 priority, 25 EDP, 24 DP, 23-16 PDU format (PF), 15-8 PDU specific (PS), 7-0 source
address (SA). PF < 240 is PDU1: PS is the destination address and not part of the PGN. PF >= 240 is PDU2:
PS is the group extension, the destination is global.

Route keys are ints above every 29-bit id (bit 29 set), so they share the router's table with exact ids:

* ``route_key(can_id)``: bits 25-8 of the id (EDP, DP, PF, PS -- the PGN, plus the destination for PDU1)
  and the source address: one ECU's PGN, whatever the priority;
* ``any_source_key(can_id)``: the same with the source field set to 0xFF, which is the global address and
  never a valid source (J1939-81 4.2.2): the PGN from any source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from cantools.database.can.message import Message

T = TypeVar("T")

J1939_FLAG = 1 << 29
ANY_DESTINATION = 1 << 30
GLOBAL = 0xFF  # destination "all"; never a source address
NULL = 0xFE  # the address of a node that has none (J1939-81)
_KEY_BITS = 0x03FFFF00  # EDP, DP, PF, PS
PGN_REQUEST = 0xEA00  # 59904
PGN_TP_CM = 0xEC00  # 60416, transport protocol connection management
PGN_TP_DT = 0xEB00  # 60160, transport protocol data transfer
PGN_ADDRESS_CLAIM = 0xEE00  # 60928: the agent never sends it


@dataclass(frozen=True, slots=True)
class J1939Id:
    priority: int
    pgn: int  # PDU1: PS bits zero
    destination: int  # GLOBAL for PDU2
    source: int

    @property
    def pdu1(self) -> bool:
        return (self.pgn >> 8) & 0xFF < 240


def parse(can_id: int) -> J1939Id:
    """Split a 29-bit identifier into its J1939 fields."""
    pf = (can_id >> 16) & 0xFF
    ps = (can_id >> 8) & 0xFF
    pgn = (can_id >> 8) & 0x3FFFF
    if pf < 240:
        return J1939Id((can_id >> 26) & 7, pgn & 0x3FF00, ps, can_id & 0xFF)
    return J1939Id((can_id >> 26) & 7, pgn, GLOBAL, can_id & 0xFF)


def make_id(pgn: int, source: int, *, destination: int = GLOBAL, priority: int = 6) -> int:
    """The 29-bit identifier of ``pgn`` from ``source`` (to ``destination`` for a PDU1 PGN)."""
    if (pgn >> 8) & 0xFF < 240:
        pgn = (pgn & 0x3FF00) | (destination & 0xFF)
    return ((priority & 7) << 26) | ((pgn & 0x3FFFF) << 8) | (source & 0xFF)


def route_key(can_id: int) -> int:
    """The key of this frame's PGN (and PDU1 destination) from this source, priority ignored."""
    return J1939_FLAG | (can_id & (_KEY_BITS | 0xFF))


def any_source_key(can_id: int) -> int:
    """The key of this frame's PGN (and PDU1 destination) from any source."""
    return J1939_FLAG | (can_id & _KEY_BITS) | GLOBAL


def any_destination_key(pgn: int) -> int:
    """A kernel-filter-only key: a PDU1 ``pgn`` to any destination from any source (the transport PGNs,
    which a passive observer reads between any two nodes)."""
    return ANY_DESTINATION | J1939_FLAG | ((pgn & 0x3FF00) << 8) | GLOBAL


def is_route_key(key: int) -> bool:
    return bool(key & J1939_FLAG)


def kernel_filter(key: int) -> tuple[int, int]:
    """(can_id, can_mask) of a route key for a SocketCAN filter: priority never matters, the source only
    for a source-specific key, the destination not for an any-destination key."""
    can_id = key & (_KEY_BITS | 0xFF)
    if key & ANY_DESTINATION:
        return can_id & 0x03FF0000, 0x03FF0000
    if can_id & 0xFF == GLOBAL:
        return can_id & _KEY_BITS, _KEY_BITS
    return can_id, _KEY_BITS | 0xFF


def is_j1939(message: Message) -> bool:
    """True for a DBC message with ``VFrameFormat`` ``J1939PG`` (cantools: ``protocol == 'j1939'``)."""
    return message.protocol == "j1939" and message.is_extended_frame


def message_key(message: Message, source: int | None) -> int:
    """The route key of a J1939 DBC message, from ``source`` or (None) from any source."""
    if source is None:
        return any_source_key(message.frame_id)
    return (route_key(message.frame_id) & ~0xFF) | source


def widen(routes: dict[tuple[int, bool], list[T]]) -> None:
    """Let each source-specific route also decode what its PGN's any-source route decodes: a frame finds
    one route only (source-specific first), and must still yield the signals mapped for every source.
    ``routes`` is keyed like the router's table: (frame id or route key, is_extended)."""
    for (key, extended), entries in routes.items():
        if extended and key & J1939_FLAG and key & 0xFF != GLOBAL:
            entries.extend(routes.get((key | GLOBAL, True), ()))
