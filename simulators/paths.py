"""Where the demo vehicle's DBC and signal map are shipped (the repository's ``dbc/`` folder)."""

from __future__ import annotations

from pathlib import Path


def dbc_dir() -> Path:
    """The ``dbc/`` folder next to the ``simulators`` package (it may not exist in a bare wheel)."""
    return Path(__file__).resolve().parent.parent / "dbc"


def default_dbc() -> Path:
    """Path of the demo vehicle's DBC, ``dbc/vehicle.dbc``."""
    return dbc_dir() / "vehicle.dbc"


def default_signal_map() -> Path:
    """Path of the demo vehicle's signal map, ``dbc/signals.toml``."""
    return dbc_dir() / "signals.toml"
