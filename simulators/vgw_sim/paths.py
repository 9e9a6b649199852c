"""Where the demo vehicle's DBC and signal map are shipped (package data of ``vgw.dbc``)."""

from __future__ import annotations

from pathlib import Path

from vgw.dbc import DBC_NAME, SIGNAL_MAP_NAME, shipped_dir


def dbc_dir() -> Path:
    """The folder of the shipped demo DBC and signal map."""
    return shipped_dir()


def default_dbc() -> Path:
    """Path of the demo vehicle's DBC."""
    return shipped_dir() / DBC_NAME


def default_signal_map() -> Path:
    """Path of the demo vehicle's signal map."""
    return shipped_dir() / SIGNAL_MAP_NAME
