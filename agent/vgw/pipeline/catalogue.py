"""The signal catalogue: vehicle descriptions (DBC, ARXML, KCD, SYM) plus the signal map (README "Configuration
(TOML)"), as one in-memory model.

Each mapped DBC signal becomes a :class:`SignalSpec` (message, signal, VSS path, scope). A DBC signal that
no entry maps is unknown to the agent: never decoded, stored or sent. Loading validates everything a typo
could break and raises :class:`~vgw.base.errors.ConfigError` naming the file, the entry and the rule.

String signals (the VIN) are carried over several multiplexed frames; the map says which part each DBC
signal is with ``part``/``parts`` and the agent assembles the string (big-endian ASCII bytes of each raw
part, concatenated in part order, NUL padding removed) before policy sees it.
"""

from __future__ import annotations

import itertools
import re
import xml.parsers.expat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cantools
from cantools.database.can.database import Database
from cantools.database.can.message import Message

from vgw.base.errors import ConfigError
from vgw.base.fsutil import MAX_CONFIG_BYTES, load_toml, read_small_file
from vgw.contract.scopes import SCOPES
from vgw.pipeline.j1939.ids import is_j1939, message_key
from vgw.pipeline.j1939.ids import parse as parse_id

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


# -- the description budget: what a Raspberry Pi holds of the vehicle descriptions of one agent, all files together --
# cantools builds about 3.3 kB per signal and 300-400 bytes per word it reads (value tables, attributes and
# comments included), and takes 10-20 µs per word here. So the files are counted before cantools parses them
# (:func:`dbc_counts`: a scan that holds no more than the file's bytes), and a set beyond any cap is refused.
# At every cap together a load takes about 200 MB and 10 s on this machine (docs/performance.md, "A big DBC").
# The XML formats (ARXML, KCD) are counted the same way by a streaming parse that keeps nothing: each element,
# attribute and text is one word (what ElementTree turns into an object); SYM is a text format of words like
# DBC. Their messages and signals are counted after cantools parsed them, against the same caps.
MAX_DBC_BYTES = 16 * 1024 * 1024  # one file; a full-vehicle DBC is a few MB
MAX_DBC_MESSAGES = 4096  # BO_ definitions (messages, in every format)
MAX_DBC_SIGNALS = 16_384  # SG_ definitions (signals, in every format)
MAX_DBC_WORDS = 500_000  # names, numbers and strings: what cantools' tokenizer turns into objects

_BO = re.compile(rb"^[ \t]*BO_[ \t]", re.MULTILINE)
_SG = re.compile(rb"^[ \t]*SG_[ \t]", re.MULTILINE)
_WORD = re.compile(rb'"(?:[^"\\]|\\.)*"|[^\s"]+')

#: The formats cantools.database.load_file reads as a CAN database, by file extension (docs/vehicles.md
#: "Vehicle descriptions"); a file with another extension is recognised by its content.
FORMATS = {".dbc": "dbc", ".arxml": "arxml", ".kcd": "kcd", ".sym": "sym"}
_NAMES = {"dbc": "DBC", "arxml": "ARXML", "kcd": "KCD", "sym": "SYM"}
_XML_ROOTS = {"AUTOSAR": "arxml", "NetworkDefinition": "kcd"}
_SYM_HEADER = re.compile(rb"^[ \t]*FormatVersion[ \t]*=", re.MULTILINE)
_XML_START = re.compile(rb"^(?:\xef\xbb\xbf)?\s*<")


@dataclass(frozen=True)
class DbcCounts:
    """What a vehicle description asks cantools to build: message and signal definitions, and words."""

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


def xml_scan(text: str, *, max_words: int = MAX_DBC_WORDS) -> tuple[str, int]:
    """Scan an XML description without building it: (root element's local name, words), where elements,
    attributes and texts are words and the count stops just past ``max_words``. Raises :class:`ValueError`
    for XML that is not well formed or declares a DTD.

    A vehicle description needs no DTD, and a DTD is what entity tricks need (billion laughs, external
    entities that read local files: OWASP "XML External Entity Prevention"), so any DOCTYPE is refused before
    cantools' parser (xml.etree) sees the text; this scan uses the same parser (expat) on the same text."""
    parser = xml.parsers.expat.ParserCreate()
    root = ""
    words = 0
    over = False  # the scan stopped at the cap (raising from a handler is the way to stop expat)

    def count(n: int) -> None:
        nonlocal words, over
        words += n
        if words > max_words:
            over = True
            raise ValueError("past the word cap")

    def start(tag: str, attrs: dict[str, str]) -> None:
        nonlocal root
        root = root or tag.rpartition(":")[2]
        count(1 + len(attrs))

    def chars(data: str) -> None:
        if not data.isspace():
            count(1)

    def doctype(*_: object) -> None:
        raise ValueError("a DOCTYPE declaration (DTD) is not allowed in a vehicle description")

    parser.StartElementHandler = start
    parser.CharacterDataHandler = chars
    parser.StartDoctypeDeclHandler = doctype
    parser.EntityDeclHandler = doctype
    try:
        parser.Parse(text, True)
    except ValueError:
        if not over:
            raise
    except xml.parsers.expat.ExpatError as exc:
        raise ValueError(f"not well-formed XML: {exc}") from None
    return root, words


def description_format(path: Path, raw: bytes) -> str:
    """The cantools format of a vehicle description: by extension (:data:`FORMATS`), else by content (an
    AUTOSAR or KCD XML root element, a SYM ``FormatVersion=`` header, else DBC). Raises ConfigError for a
    diagnostics database (.cdd), which describes no CAN frames."""
    suffix = path.suffix.lower()
    if suffix in FORMATS:
        return FORMATS[suffix]
    if suffix == ".cdd":
        raise ConfigError(f"{path}: a .cdd file is a diagnostics database, not a CAN description "
                          "(docs/vehicles.md \"Vehicle descriptions\" lists the formats)")
    if _XML_START.match(raw):
        try:
            root, _ = xml_scan(raw.decode("utf-8-sig", errors="replace"), max_words=1)
        except ValueError as exc:
            raise ConfigError(f"{path}: vehicle description rejected: {exc}") from None
        if root in _XML_ROOTS:
            return _XML_ROOTS[root]
        raise ConfigError(f"{path}: XML root element {root!r} is neither AUTOSAR (ARXML) nor NetworkDefinition "
                          "(KCD); refused")
    if _SYM_HEADER.search(raw[:65536]):
        return "sym"
    return "dbc"


def _check_budget(path: Path, total: DbcCounts) -> None:
    for count, cap, what in ((total.messages, MAX_DBC_MESSAGES, "messages"),
                             (total.signals, MAX_DBC_SIGNALS, "signals"),
                             (total.words, MAX_DBC_WORDS, "words (names, numbers and strings)")):
        if count > cap:
            shown = f"at least {count}" if cap is MAX_DBC_WORDS else str(count)
            raise ConfigError(f"{path}: DBC budget exceeded: {shown} {what}, more than the {cap} allowed (all "
                              "vehicle description files together); refused: keep the messages the signal map "
                              "uses")


def load_dbc(paths: Iterable[Path], *, strict: bool = True) -> Database:
    """Load one or more vehicle descriptions (DBC, ARXML, KCD, SYM: :func:`description_format`) into one
    database, each as ``cantools.database.load_file`` reads it (``strict=False``: as ``cantools --no-strict``).
    Raises ConfigError naming the file and cantools' reason, or the cap of the description budget that the
    files, counted together (before each is parsed where the format allows), go beyond."""
    db = cantools.database.can.Database(strict=strict)
    total = DbcCounts(0, 0, 0)
    for path in map(Path, paths):
        what = _NAMES.get(FORMATS.get(path.suffix.lower(), ""), "vehicle description")
        try:
            raw = read_small_file(path, what=f"{what} file", max_bytes=MAX_DBC_BYTES, error=ConfigError)
        except FileNotFoundError:
            raise ConfigError(f"{path}: {what} file not found") from None
        fmt = description_format(path, raw)
        before = _built(db)
        try:
            if fmt == "dbc":
                total += dbc_counts(raw, max_words=MAX_DBC_WORDS - total.words)
                _check_budget(path, total)
                db.add_dbc_string(raw.decode("cp1252").replace("\r\n", "\n").replace("\r", "\n"))
            elif fmt == "sym":
                total += DbcCounts(0, 0, dbc_counts(raw, max_words=MAX_DBC_WORDS - total.words).words)
                _check_budget(path, total)
                db.add_sym_string(raw.decode("cp1252").replace("\r\n", "\n").replace("\r", "\n"))
            else:
                text = raw.decode("utf-8-sig", errors="replace")
                total += DbcCounts(0, 0, xml_scan(text, max_words=MAX_DBC_WORDS - total.words)[1])
                _check_budget(path, total)
                (db.add_arxml_string if fmt == "arxml" else db.add_kcd_string)(text)
        except ConfigError:
            raise
        except Exception as exc:  # cantools raises many types (ParseError, Error, ValueError...)
            hint = " (set dbc_strict = false in [can] to load it leniently)" if strict else ""
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            msg = msg.removeprefix(f"{_NAMES[fmt]}: ")  # cantools names the format too
            raise ConfigError(f"{path}: {_NAMES[fmt]} rejected: {msg}{hint}") from exc
        if fmt != "dbc":  # the DBC pre-scan counted them already
            after = _built(db)
            total += DbcCounts(after.messages - before.messages, after.signals - before.signals, 0)
            _check_budget(path, total)
    return db


def _built(db: Database) -> DbcCounts:
    """The messages and signals of a loaded database, the PDUs inside AUTOSAR containers included."""
    messages = [*db.messages, *(c for m in db.messages if m.is_container for c in m.contained_messages or ())]
    return DbcCounts(len(messages), sum(len(m.signals) for m in messages), 0)


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
            container = next((m.name for m in db.messages if m.is_container
                              and any(c.name == msg_name for c in m.contained_messages or ())), None)
            if container is not None:
                # A contained PDU has no CAN id of its own: it travels inside a container frame behind a
                # header (AUTOSAR multiplexed I-PDUs), which vgw does not unpack.
                raise ConfigError(f"{at}: message {msg_name!r} is carried only inside the container PDU "
                                  f"{container!r}; container PDUs are not supported") from None
            raise ConfigError(f"{at}: no message {msg_name!r} in the vehicle description files") from None
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
        other = messages.get(message.frame_id)
        if other is not None and other is not message and not is_j1939(message):
            # A description of several buses may reuse an id on each (KCD <Bus>, ARXML clusters); vgw reads one
            # bus, and one frame id decodes as one message.
            raise ConfigError(f"{at}: messages {other.name!r} and {message.name!r} have the same frame id "
                              f"0x{message.frame_id:X} (on two buses of the description?): map signals of one")
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
