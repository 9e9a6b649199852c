"""What the pipeline asks of J1939 for a frame that no exact identifier matched (README "SAE J1939").

:class:`J1939Front` turns the bus's frames into whole J1939 messages -- single frames as they are, transport
fragments through the :class:`~vgw.pipeline.j1939.transport.Reassembler` -- and parses the built-in PGNs (VIN,
component identification, DM1) for the scopes a grant holds. The pipeline then looks the message up by
route key (:mod:`vgw.pipeline.j1939.ids`) and decodes it with the DBC like any other frame.

Owned by the pipeline; runs in the collector thread under the pipeline's lock.
"""

from __future__ import annotations

from collections.abc import Iterable

from vgw.pipeline.j1939.ids import PGN_TP_CM, PGN_TP_DT, any_destination_key, any_source_key, make_id, parse
from vgw.pipeline.j1939.messages import (
    BUILTINS,
    PGN_COMPONENT_ID,
    PGN_DM1,
    PGN_VIN,
    Builtin,
    parse_component_id,
    parse_dm1,
    parse_vin,
)
from vgw.pipeline.j1939.transport import Reassembler


def transport_needed(scopes: Iterable[str], long_messages: bool) -> bool:
    """Whether any grant can use a multi-packet message: a built-in PGN its scope covers, or a consented DBC
    message longer than 8 bytes. Otherwise transport frames are not even reassembled (minimisation)."""
    granted = set(scopes)
    return long_messages or any(b.scope in granted for b in BUILTINS.values())


def filter_keys(scopes: Iterable[str], long_messages: bool) -> frozenset[int]:
    """Route keys the kernel must let through besides the DBC's: the built-in PGNs that ``scopes`` cover,
    and the transport PGNs when :func:`transport_needed`."""
    granted = set(scopes)
    keys = {any_source_key(make_id(b.pgn, 0)) for b in BUILTINS.values() if b.scope in granted}
    if transport_needed(granted, long_messages):
        keys |= {any_destination_key(PGN_TP_CM), any_destination_key(PGN_TP_DT)}
    return frozenset(keys)


class J1939Front:
    """Reassembly and built-in PGNs for one consent state's scopes."""

    def __init__(self) -> None:
        self.reassembler = Reassembler()
        self._builtins: dict[int, Builtin] = {}
        self._transport = False

    def reset(self, scopes: Iterable[str], long_messages: bool) -> None:
        """Consent changed: read the built-in PGNs of ``scopes`` only, reassemble only if some grant can use
        it (``long_messages``: a consented DBC message is longer than 8 bytes), and drop every half-read
        transfer."""
        wanted = set(scopes)
        self._builtins = {pgn: b for pgn, b in BUILTINS.items() if b.scope in wanted}
        self._transport = transport_needed(wanted, long_messages)
        self.reassembler.clear()

    def message(self, can_id: int, data: bytes, t: float) -> tuple[int, bytes] | None:
        """The whole message this frame is or completes, as (identifier, data); None for a transport
        fragment that completes nothing."""
        pgn = parse(can_id).pgn
        if pgn != PGN_TP_CM and pgn != PGN_TP_DT:
            return can_id, data
        if not self._transport:
            return None
        transfer = self.reassembler.feed(can_id, data, t)
        if transfer is None:
            return None
        return make_id(transfer.pgn, transfer.source, destination=transfer.destination), transfer.data

    def builtin(self, can_id: int, data: bytes) -> tuple[Builtin, object] | None:
        """(what, value) when this message is a built-in PGN a grant's scope covers and parses."""
        jid = parse(can_id)
        spec = self._builtins.get(jid.pgn)
        if spec is None:
            return None
        value: object
        if jid.pgn == PGN_VIN:
            value = parse_vin(data)
        elif jid.pgn == PGN_COMPONENT_ID:
            value = parse_component_id(data, jid.source)
        elif jid.pgn == PGN_DM1:
            value = parse_dm1(data, jid.source)
        else:
            return None
        return None if value is None else (spec, value)
