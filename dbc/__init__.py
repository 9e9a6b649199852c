"""The demo vehicle's DBC and signal map, shipped as package data of ``vgw.dbc``.

The files live in the repository's ``dbc/`` folder and are installed inside the package, so every
installation (a clone with ``pip install -e``, a wheel in a venv, the offline bundle) finds them here.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DBC_NAME = "vehicle.dbc"
SIGNAL_MAP_NAME = "signals.toml"


def shipped_dir() -> Path:
    """The folder holding the shipped ``vehicle.dbc`` and ``signals.toml`` (a real folder: installed unzipped)."""
    return Path(str(files(__name__)))
