"""The installed shape: one import package `vgw` mapped from the folders agent/, simulators/ and dbc/."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"vgw": "agent", "vgw.simulators": "simulators", "vgw.dbc": "dbc"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_sub_package_folder_is_listed_in_pyproject() -> None:
    # setuptools installs only the packages named in `packages`: a new folder left out of the list works in
    # an editable install and is missing from the wheel (what `pip install .` and the offline bundle get).
    setuptools = _pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == FOLDERS
    found = set()
    for name, folder in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert sorted(setuptools["packages"]) == sorted(found)


def test_the_shipped_dbc_is_package_data() -> None:
    from vgw.dbc import DBC_NAME, SIGNAL_MAP_NAME, shipped_dir

    assert (shipped_dir() / DBC_NAME).is_file() and (shipped_dir() / SIGNAL_MAP_NAME).is_file()
    data = _pyproject()["tool"]["setuptools"]["package-data"]["vgw.dbc"]
    assert "*.dbc" in data and "*.toml" in data
