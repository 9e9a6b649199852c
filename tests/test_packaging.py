"""The installed shapes: the developer's install (agent/vgw and simulators/vgw_sim, found by setuptools) and the
car's install (agent/pyproject.toml: `vgw` alone), built as real wheels the way pip builds them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _toml(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def _wheel(src: Path, out: Path) -> list[str]:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(out)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("vgw-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def _copy_tree(dest: Path) -> Path:
    """A copy of what a clone holds (the link agent/vgw/dbc -> ../../dbc stays a link), without build leftovers."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for folder in ("agent", "simulators", "dbc"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=skip, symlinks=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    return dest


def test_packages_are_found_not_listed() -> None:
    # a hand-kept list of packages drifts from the folders (a new folder works editable and is missing from the
    # wheel): setuptools finds them under the two source roots
    setuptools = _toml(ROOT / "pyproject.toml")["tool"]["setuptools"]
    assert "package-dir" not in setuptools
    assert setuptools["packages"]["find"]["where"] == ["agent", "simulators"]


def test_the_car_and_the_developer_install_the_same_agent() -> None:
    dev, car = _toml(ROOT / "pyproject.toml")["project"], _toml(ROOT / "agent" / "pyproject.toml")["project"]
    for key in ("name", "version", "requires-python", "license", "dependencies", "scripts", "description"):
        assert dev[key] == car[key], key
    dev_data = _toml(ROOT / "pyproject.toml")["tool"]["setuptools"]["package-data"]
    assert _toml(ROOT / "agent" / "pyproject.toml")["tool"]["setuptools"]["package-data"] == dev_data


def test_the_shipped_dbc_is_package_data() -> None:
    from vgw.dbc import DBC_NAME, SIGNAL_MAP_NAME, shipped_dir

    assert (shipped_dir() / DBC_NAME).is_file() and (shipped_dir() / SIGNAL_MAP_NAME).is_file()
    assert (ROOT / "agent" / "vgw" / "dbc").resolve() == (ROOT / "dbc").resolve()


def test_a_checkout_is_importable_from_its_source_roots() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "agent"), str(ROOT / "simulators")])}
    code = ("import vgw, vgw_sim, vgw.dbc, vgw.daemon.agent, vgw_sim.vehicle; "
            "print(vgw.__file__); print(vgw_sim.__file__)")
    # from a neutral folder, so only the source roots can match
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(ROOT / "agent" / "vgw" / "__init__.py"),
                                       str(ROOT / "simulators" / "vgw_sim" / "__init__.py")]


def test_the_developer_wheel_holds_vgw_and_the_simulators(tmp_path: Path) -> None:
    names = _wheel(_copy_tree(tmp_path / "src"), tmp_path / "wheel")
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"vgw", "vgw_sim"}
    for inside in ("vgw/__main__.py", "vgw/cloud/cloudkit.py", "vgw/tools/demo.py", "vgw_sim/cloud.py",
                   "vgw/dbc/vehicle.dbc", "vgw/dbc/signals.toml", "vgw/py.typed"):
        assert inside in names, inside


def test_the_car_wheel_has_no_simulators_and_says_so(tmp_path: Path) -> None:
    src = _copy_tree(tmp_path / "src")
    names = _wheel(src / "agent", tmp_path / "wheel")
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"vgw"}
    assert "vgw/dbc/vehicle.dbc" in names and "vgw/daemon/agent.py" in names


def test_a_command_that_needs_the_simulators_says_so_without_them() -> None:
    # what the car's install does on `vgw demo`: vgw_sim cannot be imported
    code = "import sys; sys.modules['vgw_sim'] = None; import vgw.cli; sys.exit(vgw.cli.main(['demo']))"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "needs the simulators (vgw_sim)" in out.stderr and "Traceback" not in out.stderr
