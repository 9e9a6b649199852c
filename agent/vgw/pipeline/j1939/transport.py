"""Multi-packet transport (J1939-21 5.10): TP.BAM and TP.CMDT reassembled from what the bus carries.

:class:`Reassembler` is pure: frames and their times in, complete messages out; no I/O, no clock of its own
(times are the frames' own timestamps, so a replayed trace reassembles exactly like the live bus).

Sessions are keyed by (source, destination): J1939-21 allows one transfer per sender and destination at a
time (one BAM per sender, destination global), and TP.DT packets name nothing else. A new RTS or BAM on a key
replaces the session there (J1939-21 5.10.3: a new announcement aborts the old one).

Connection mode (RTS/CTS) is reassembled *passively*: the agent watches the RTS, the data packets and the
end-of-message acknowledgement between two other nodes. It never sends a CTS -- that would be a frame on the
vehicle network from a node that has claimed no address (J1939-81), and the agent sends nothing but consented
requests (README "SAE J1939"). Nobody opens a connection to the agent, since it has no address.

Bounds (a hostile or broken bus must not grow memory, nor shut out the engine's own transfers): at most
``MAX_SESSIONS`` open sessions, at most ``MAX_SESSIONS_PER_SOURCE`` of them from one sender, each at most 1785
bytes (255 packets of 7, J1939-21 5.10.1). A new announcement beyond a bound evicts the oldest session (of that
sender when it holds its share, else of all) and is counted: a full table never refuses a transfer, so 32
transfers that never end cannot lock the VIN out. Each session is dropped when a deadline passes:

* T1 = 0.75 s: the longest gap between two data packets, and from a BAM to its first packet;
* T2 = 1.25 s: from an RTS or CTS to the data it announces (J1939-21 uses T2 for the receiver after CTS;
  a passive observer also waits that long for the receiver's first CTS);
* T4 = 1.05 s: a CTS with 0 packets ("hold") keeps the connection open that long;
* an absolute deadline from the announcement, whatever comes after it: a BAM's packets are sent 50..200 ms
  apart (J1939-21, TP.BAM), so it ends T1 after its packet count times 200 ms (:func:`bam_deadline_s`); a
  connection may wait T1 + T2 per packet (:func:`cmdt_deadline_s`). Refreshing a session frame by frame
  cannot keep it open.

BAM packets come in order (J1939-21: the sender numbers them 1..n and has no way to resend one): a
packet that is not the next one ends the transfer (``out_of_order``), so re-sending packet 1 keeps nothing alive.
"""

from __future__ import annotations

from dataclasses import dataclass

from vgw.pipeline.j1939.ids import GLOBAL, PGN_TP_CM, PGN_TP_DT, parse

T1_S = 0.75
T2_S = 1.25
T4_S = 1.05
BAM_GAP_MAX_S = 0.2  # J1939-21 TP.BAM: data packets 50..200 ms apart
MAX_SESSIONS = 32
MAX_SESSIONS_PER_SOURCE = 4  # one BAM and a few connections; a single sender cannot take every slot
MAX_SIZE = 1785
MIN_SIZE = 9  # fewer bytes travel in one frame

CM_RTS, CM_CTS, CM_EOMA, CM_BAM, CM_ABORT = 16, 17, 19, 32, 255


def bam_deadline_s(packets: int) -> float:
    """How long after its announcement a BAM of ``packets`` data packets may take: every gap at 200 ms, + T1."""
    return T1_S + packets * BAM_GAP_MAX_S


def cmdt_deadline_s(packets: int) -> float:
    """How long after its RTS a connection of ``packets`` data packets may take: a CTS (T2) and a data gap (T1)
    per packet, the slowest a CTS of one packet at a time allows."""
    return packets * (T1_S + T2_S)


@dataclass(frozen=True, slots=True)
class Transfer:
    """One reassembled message: the PGN, who sent it, to whom (GLOBAL for BAM), its data, when it completed."""

    pgn: int
    source: int
    destination: int
    data: bytes
    t: float


@dataclass(slots=True)
class _Session:
    pgn: int
    size: int
    packets: list[bytes | None]
    deadline: float  # the next step's (T1, T2, T4)
    expires: float  # absolute, from the announcement: no frame moves it
    broadcast: bool
    started: float
    received: int = 0


class Reassembler:
    """Reassembles TP.BAM and (passively) TP.CMDT transfers. Owned by the collector thread; not thread-safe."""

    def __init__(self, *, max_sessions: int = MAX_SESSIONS) -> None:
        self._sessions: dict[tuple[int, int], _Session] = {}
        self._max = max_sessions
        self.counters = {"completed": 0, "aborted": 0, "timed_out": 0, "evicted": 0, "out_of_order": 0,
                         "bad_packets": 0}

    def __len__(self) -> int:
        return len(self._sessions)

    def clear(self) -> None:
        """Forget every open transfer (consent changed: nothing half-read survives it)."""
        self._sessions.clear()

    def feed(self, can_id: int, data: bytes, t: float) -> Transfer | None:
        """Take one TP.CM or TP.DT frame (other frames are ignored). Returns a transfer it completes."""
        self.expire(t)
        jid = parse(can_id)
        if jid.pgn == PGN_TP_CM:
            self._control(jid.source, jid.destination, data, t)
            return None
        if jid.pgn == PGN_TP_DT:
            return self._packet(jid.source, jid.destination, data, t)
        return None

    def expire(self, t: float) -> None:
        """Drop every session whose deadline passed at ``t``."""
        late = [k for k, s in self._sessions.items() if t > s.deadline or t > s.expires]
        for k in late:
            del self._sessions[k]
            self.counters["timed_out"] += 1

    def _control(self, source: int, destination: int, data: bytes, t: float) -> None:
        if len(data) < 8:
            self.counters["bad_packets"] += 1
            return
        kind = data[0]
        pgn = int.from_bytes(data[5:8], "little")
        if kind in (CM_RTS, CM_BAM):
            broadcast = kind == CM_BAM
            if broadcast != (destination == GLOBAL):
                self.counters["bad_packets"] += 1  # BAM goes to all, RTS to one node (J1939-21 5.10.3)
                return
            size = int.from_bytes(data[1:3], "little")
            total = data[3]
            if not MIN_SIZE <= size <= MAX_SIZE or total != -(-size // 7):
                self.counters["bad_packets"] += 1
                return
            key = (source, destination)
            self._sessions.pop(key, None)  # a new announcement aborts the old one (J1939-21 5.10.3)
            self._make_room(source)
            expires = t + (bam_deadline_s(total) if broadcast else cmdt_deadline_s(total))
            self._sessions[key] = _Session(pgn, size, [None] * total, t + (T1_S if broadcast else T2_S), expires,
                                           broadcast, t)
            return
        # CTS and EOMA travel from the receiver back to the sender: the session key is reversed.
        if kind == CM_CTS:
            session = self._sessions.get((destination, source))
            if session is not None and not session.broadcast and session.pgn == pgn:
                session.deadline = t + (T2_S if data[1] else T4_S)
            return
        if kind == CM_ABORT:
            for key in ((source, destination), (destination, source)):
                session = self._sessions.get(key)
                if session is not None and not session.broadcast and session.pgn == pgn:
                    del self._sessions[key]
                    self.counters["aborted"] += 1
            return
        # CM_EOMA (the receiver confirms) needs nothing: the data completed the transfer already.

    def _make_room(self, source: int) -> None:
        """Evict the oldest session of ``source`` if it holds its share, else the oldest of all if the table is
        full. An attacker's transfers, however many, then never keep a new genuine one out: the newest wins."""
        own = [k for k in self._sessions if k[0] == source]
        if len(own) >= MAX_SESSIONS_PER_SOURCE:
            pool = own
        elif len(self._sessions) >= self._max:
            pool = list(self._sessions)
        else:
            return
        del self._sessions[min(pool, key=lambda k: self._sessions[k].started)]
        self.counters["evicted"] += 1

    def _packet(self, source: int, destination: int, data: bytes, t: float) -> Transfer | None:
        key = (source, destination)
        session = self._sessions.get(key)
        if session is None:
            return None
        if len(data) < 8 or not 1 <= data[0] <= len(session.packets):
            self.counters["bad_packets"] += 1
            return None
        index = data[0] - 1
        if session.broadcast and index != session.received:
            del self._sessions[key]  # a BAM packet repeated, skipped or early: the transfer is broken
            self.counters["out_of_order"] += 1
            return None
        if session.packets[index] is None:
            session.received += 1
        session.packets[index] = bytes(data[1:8])  # CMDT may retransmit a packet (a later CTS asks again)
        session.deadline = t + T1_S
        if session.received < len(session.packets):
            return None
        del self._sessions[key]
        self.counters["completed"] += 1
        payload = b"".join(p for p in session.packets if p is not None)[: session.size]
        return Transfer(session.pgn, source, destination, payload, t)
