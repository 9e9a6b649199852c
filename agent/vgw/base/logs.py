"""Logging set-up: journald-friendly under systemd, plain on a terminal.

Never log personal data: no VIN, no location, no signal values. Log counts, names of grants and scopes,
and errors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

# sd-daemon(3) priority prefixes, read by journald from a service's stderr.
_SD_PRIORITY = {
    logging.DEBUG: "<7>",
    logging.INFO: "<6>",
    logging.WARNING: "<4>",
    logging.ERROR: "<3>",
    logging.CRITICAL: "<2>",
}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = _SD_PRIORITY.get(record.levelno, "<6>")
        return f"{prefix}{record.name}: {record.getMessage()}"


def under_systemd() -> bool:
    """True when stderr goes to the journal (systemd sets JOURNAL_STREAM for services)."""
    return bool(os.environ.get("JOURNAL_STREAM")) or bool(os.environ.get("INVOCATION_ID"))


# Set when the command line named a level (--log-level, --debug): a config's [log] level then does not apply.
_PINNED: list[bool] = [False]


def parse_level(name: str) -> int:
    """"debug", "info", "warning" or "error" -> the logging level. Raises ValueError."""
    level = logging.getLevelName(name.upper())
    if name.lower() not in ("debug", "info", "warning", "error") or not isinstance(level, int):
        raise ValueError(f"log level {name!r}: expected debug, info, warning or error")
    return level


def apply_config_level(name: str | None) -> bool:
    """Set the threshold from the config's ``[log] level`` unless the command line pinned one. True if set."""
    if name is None or _PINNED[0]:
        return False
    logging.getLogger().setLevel(parse_level(name))
    return True


def setup_logging(*, debug: bool = False, verbose: bool = False, level: str | None = None) -> None:
    """Route logs to stderr. Short-lived commands log errors only (their result is their output).

    ``level`` (``--log-level``) wins over ``debug``, which wins over the default of the command kind.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    if under_systemd():
        handler.setFormatter(_JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root.addHandler(handler)
    _PINNED[0] = level is not None or debug
    root.setLevel(parse_level(level) if level else logging.DEBUG if debug else logging.INFO if verbose
                  else logging.ERROR)
    for noisy in ("can", "cantools", "paho"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def silence_library(name: str) -> None:
    """Only errors from a library's logger: nats-py's TLS closes make asyncio warn about something harmless
    that no operator can act on ("returning true from eof_received()")."""
    logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def quieted(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise these loggers' level for a while (the demo's screen, the benchmark), then restore it."""
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, before, strict=True):
            lg.setLevel(lvl)
