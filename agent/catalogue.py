"""The signal catalogue: DBC files plus the signal map (README "Configuration (TOML)"), as one in-memory model.

Each mapped DBC signal becomes a :class:`SignalSpec` (message, signal, VSS path, scope). A DBC signal that
no entry maps is unknown to the agent: never decoded, stored or sent. Loading validates everything a typo
could break and raises :class:`~vgw.errors.ConfigError` naming the file, the entry and the rule.

String signals (the VIN) are carried over several multiplexed frames; the map says which part each DBC
signal is with ``part``/``parts`` and the agent assembles the string (big-endian ASCII bytes of each raw
part, concatenated in part order, NUL padding removed) before policy sees it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cantools
from cantools.database.can.database import Database
from cantools.database.can.message import Message
from vgw.errors import ConfigError
from vgw.fsutil import MAX_CONFIG_BYTES, load_toml, read_small_file
from vgw.j1939.ids import is_j1939, message_key
from vgw.j1939.ids import parse as parse_id
from vgw.scopes import SCOPES

_VSS_PATH = re.compile(r"^Vehicle(\.[A-Z][A-Za-z0-9]*)+$")
_ENTRY_KEYS = {"message", "signal", "path", "scope", "part", "parts", "source_address"}


@dataclass(frozen=True, slots=True)
class SignalSpec:
    message: str
    signal: str
    path: str
    scope: str
    frame_id: int
    part: int | None = None  # for string signals split over several frames
    parts: int | None = None
    byte_len: int = 0  # length of one part in bytes (string signals)
    source_address: int | None = None  # J1939: only frames from this source (None: any source)


@dataclass(frozen=True)
class Catalogue:
    """Every mapped signal, indexed by frame id and by scope."""

    messages: dict[int, Message]  # frame id -> cantools message (only messages with a mapped signal)
    specs: tuple[SignalSpec, ...]

    def scope_of_path(self) -> dict[str, str]:
        return {s.path: s.scope for s in self.specs}


# -- the DBC budget: what a Raspberry Pi can hold of the DBC files of one agent, all files together -----------------
# cantools builds about 3.3 kB per signal and 300-400 bytes per word it reads (value tables, attributes and
# comments included), and takes 10-20 µs per word here. So the files are counted before cantools parses them
# (:func:`dbc_counts`: a scan that holds no more than the file's bytes), and a set beyond any cap is refused.
# At every cap together a load takes about 200 MB and 10 s on this machine (docs/performance.md, "A big DBC").
MAX_DBC_BYTES = 16 * 1024 * 1024  # one file; a full-vehicle DBC is a few MB
MAX_DBC_MESSAGES = 4096  # BO_ definitions
MAX_DBC_SIGNALS = 16_384  # SG_ definitions
MAX_DBC_WORDS = 500_000  # names, numbers and strings: what cantools' tokenizer turns into objects

_BO = re.compile(rb"^[ \t]*BO_[ \t]", re.MULTILINE)
_SG = re.compile(rb"^[ \t]*SG_[ \t]", re.MULTILINE)
_WORD = re.compile(rb'"(?:[^"\\]|\\.)*"|[^\s"]+')


@dataclass(frozen=True)
class DbcCounts:
    """What a DBC file asks cantools to build: message and signal definitions, and words."""

    messages: int
    signals: int
    words: int

    def __add__(self, other: DbcCounts) -> DbcCounts:
        return DbcCounts(self.messages + other.messages, self.signals + other.signals, self.words + other.words)


def dbc_counts(raw: bytes, *, max_words: int = MAX_DBC_WORDS) -> DbcCounts:
    """Count a DBC's BO_ and SG_ lines and its words (a quoted string is one word; the count stops past
    ``max_words``): cheap next to parsing, holding nothing but the file's bytes."""
    words = sum(1 for _ in itertools.islice(_WORD.finditer(raw), max(0, max_words) + 1))
    return DbcCounts(sum(1 for _ in _BO.finditer(raw)), sum(1 for _ in _SG.finditer(raw)), words)


def _check_budget(path: Path, total: DbcCounts) -> None:
    for count, cap, what in ((total.messages, MAX_DBC_MESSAGES, "messages"),
                             (total.signals, MAX_DBC_SIGNALS, "signals"),
                             (total.words, MAX_DBC_WORDS, "words (names, numbers and strings)")):
        if count > cap:
            shown = f"at least {count}" if cap is MAX_DBC_WORDS else str(count)
            raise ConfigError(f"{path}: DBC budget exceeded: {shown} {what}, more than the {cap} allowed (all DBC "
                              "files together); refused: keep the messages the signal map uses")


def load_dbc(paths: Iterable[Path], *, strict: bool = True) -> Database:
    """Load one or more DBC files into one database. Raises ConfigError naming the file and cantools' reason, or
    the cap of the DBC budget that the files, counted together before each is parsed, go beyond."""
    db = cantools.database.can.Database(strict=strict)
    total = DbcCounts(0, 0, 0)
    for path in paths:
        try:
            raw = read_small_file(Path(path), what="DBC file", max_bytes=MAX_DBC_BYTES, error=ConfigError)
        except FileNotFoundError:
            raise ConfigError(f"{path}: DBC file not found") from None
        total += dbc_counts(raw, max_words=MAX_DBC_WORDS - total.words)
        _check_budget(Path(path), total)
        try:
            db.add_dbc_string(raw.decode("cp1252").replace("\r\n", "\n").replace("\r", "\n"))
        except Exception as exc:  # cantools raises many types (ParseError, Error, ValueError...)
            hint = " (set dbc_strict = false in [can] to load it leniently)" if strict else ""
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{path}: DBC rejected: {msg}{hint}") from exc
    return db


def load_catalogue(dbc_paths: Iterable[Path], signal_map: Path, *, strict: bool = True) -> Catalogue:
    """Load DBC files and the signal map; validate every entry against the DBC and the scope list."""
    db = load_dbc(dbc_paths, strict=strict)
    try:
        doc = load_toml(signal_map, what="signal map", max_bytes=MAX_CONFIG_BYTES, error=ConfigError)
    except FileNotFoundError:
        raise ConfigError(f"{signal_map}: signal map not found") from None
    return catalogue_from_map(db, doc, signal_map)


def catalogue_from_map(db: Database, doc: dict[str, Any], where: Path) -> Catalogue:
    extra = set(doc) - {"signal"}
    if extra:
        raise ConfigError(f"{where}: unknown top-level key {sorted(extra)[0]!r} (expected [[signal]] entries)")
    entries = doc.get("signal", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: 'signal' must be an array of tables ([[signal]])")
    specs: list[SignalSpec] = []
    seen: set[tuple[str, str, int | None]] = set()
    messages: dict[int, Message] = {}
    for i, entry in enumerate(entries, start=1):
        at = f"{where}: signal #{i}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: must be a table")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise ConfigError(f"{at}: unknown key {sorted(unknown)[0]!r}")
        for key in ("message", "signal", "path", "scope"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ConfigError(f"{at}: {key!r} is required and must be a string")
        msg_name, sig_name = entry["message"], entry["signal"]
        at = f"{where}: signal #{i} ({msg_name}.{sig_name})"
        try:
            message = db.get_message_by_name(msg_name)
        except KeyError:
            raise ConfigError(f"{at}: no message {msg_name!r} in the DBC files") from None
        try:
            signal = message.get_signal_by_name(sig_name)
        except KeyError:
            raise ConfigError(f"{at}: message {msg_name!r} has no signal {sig_name!r}") from None
        if entry["scope"] not in SCOPES:
            raise ConfigError(f"{at}: unknown scope {entry['scope']!r} (README 'Scopes' lists the scopes)")
        if not _VSS_PATH.match(entry["path"]):
            raise ConfigError(f"{at}: path {entry['path']!r} is not a VSS path (Vehicle.Branch.Leaf)")
        source = _source_address(entry, message, at)
        if (msg_name, sig_name, source) in seen:
            raise ConfigError(f"{at}: mapped twice")
        seen.add((msg_name, sig_name, source))
        part, parts = entry.get("part"), entry.get("parts")
        byte_len = 0
        if (part is None) != (parts is None):
            raise ConfigError(f"{at}: 'part' and 'parts' go together")
        if part is not None:
            if not (isinstance(part, int) and isinstance(parts, int) and 0 <= part < parts <= 64):
                raise ConfigError(f"{at}: need 0 <= part < parts, got part={part!r} parts={parts!r}")
            if signal.length % 8 or signal.is_float or signal.is_signed:
                raise ConfigError(f"{at}: a string part must be an unsigned whole number of bytes")
            byte_len = signal.length // 8
        specs.append(SignalSpec(message=msg_name, signal=sig_name, path=entry["path"], scope=entry["scope"],
                                frame_id=message.frame_id, part=part, parts=parts, byte_len=byte_len,
                                source_address=source))
        messages[message.frame_id] = message
    _check_parts(specs, where)
    _check_paths(specs, where)
    _check_j1939_routes(specs, messages, where)
    return Catalogue(messages=messages, specs=tuple(specs))


def _source_address(entry: dict[str, Any], message: Message, at: str) -> int | None:
    """The optional ``source_address`` of a J1939 entry (README "SAE J1939"): which ECU's copy of the PGN."""
    if "source_address" not in entry:
        return None
    sa = entry["source_address"]
    if not is_j1939(message):
        raise ConfigError(f"{at}: source_address applies to J1939 messages only (VFrameFormat J1939PG)")
    # 254 is the null address and 255 the global one; neither ever sends data (J1939-81 4.2.2).
    if isinstance(sa, bool) or not isinstance(sa, int) or not 0 <= sa <= 253:
        raise ConfigError(f"{at}: source_address must be an integer 0..253 (e.g. 0x00), got {sa!r}")
    return int(sa)


def _check_j1939_routes(specs: list[SignalSpec], messages: dict[int, Message], where: Path) -> None:
    """Two J1939 messages of one PGN (and destination) would both claim the same frames: each entry must then
    name the source address it reads (README "SAE J1939")."""
    owner: dict[int, str] = {}
    for s in specs:
        message = messages[s.frame_id]
        if not is_j1939(message):
            continue
        key = message_key(message, s.source_address)
        if owner.setdefault(key, message.name) != message.name:
            raise ConfigError(f"{where}: messages {owner[key]!r} and {message.name!r} are the same J1939 PGN "
                              f"{parse_id(message.frame_id).pgn}: give each entry a different source_address")


def _check_parts(specs: list[SignalSpec], where: Path) -> None:
    by_path: dict[str, list[SignalSpec]] = {}
    for s in specs:
        if s.parts is not None:
            by_path.setdefault(s.path, []).append(s)
    for path, group in by_path.items():
        parts = {s.parts for s in group}
        if len(parts) != 1 or sorted(s.part for s in group if s.part is not None) != list(range(group[0].parts or 0)):
            raise ConfigError(f"{where}: string path {path!r} needs exactly one entry for each part 0..parts-1")


def _check_paths(specs: list[SignalSpec], where: Path) -> None:
    scope_of: dict[str, str] = {}
    for s in specs:
        if scope_of.setdefault(s.path, s.scope) != s.scope:
            raise ConfigError(f"{where}: path {s.path!r} mapped to two scopes ({scope_of[s.path]}, {s.scope})")
