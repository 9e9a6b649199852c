"""The installed shape: one import package `vgw` mapped from the folders agent/, simulators/ and dbc/."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"vgw": "agent", "vgw_sim": "simulators", "vgw.dbc": "dbc"}


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


def test_the_wheel_holds_only_vgw(tmp_path: Path) -> None:
    """Builds a real wheel the way `pip install .` does (isolated build, a few seconds): its top level is
    `vgw` and its dist-info only, with the cloud tools, the tools and the demo DBC inside."""
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for folder in [*FOLDERS.values()]:
        shutil.copytree(ROOT / folder, src / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(out)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("vgw-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"vgw", wheel.name.rsplit("-", 3)[0] + ".dist-info"}
    for inside in ("vgw/__main__.py", "vgw/cloud/cloudkit.py", "vgw/tools/demo.py", "vgw/simulators/cloud.py",
                   "vgw/dbc/vehicle.dbc", "vgw/dbc/signals.toml", "vgw/py.typed"):
        assert inside in names, inside
