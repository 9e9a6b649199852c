"""The layer contract of the `vgw` package (README "Layout"): imports point one way, down.

Every module belongs to exactly one layer, and a layer imports only the layers it lists. The check parses the
sources with `ast` (no import runs, no extra tool), so it runs in `make test` and again in `make lint`.
Imports inside functions and under `if TYPE_CHECKING:` count too: a lazy import that dodges a cycle is still
the cycle.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# One layer per folder of agent/vgw (README "Layout" is `ls agent/vgw`), plus the simulators' own root, bottom up.
# Layer -> the layers it may import (itself included). No module is placed apart from its folder.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "base": frozenset({"base"}),
    "contract": frozenset({"base", "contract"}),
    "config": frozenset({"base", "contract", "config"}),
    "pipeline": frozenset({"base", "contract", "config", "pipeline"}),
    "sources": frozenset({"base", "contract", "config", "pipeline", "sources"}),
    "state": frozenset({"base", "contract", "config", "pipeline", "state"}),
    # What every MQTT client of the tree shares, the agent's and the cloud's alike (ssl, so not a pure layer).
    "transport": frozenset({"base", "transport"}),
    "uplink": frozenset({"base", "contract", "config", "pipeline", "state", "transport", "uplink"}),
    "daemon": frozenset({"base", "contract", "config", "pipeline", "sources", "state", "transport", "uplink",
                         "daemon"}),
    "ops": frozenset({"base", "contract", "config", "pipeline", "sources", "state", "transport", "uplink", "daemon",
                      "ops", "dbc"}),
    "cloud": frozenset({"base", "contract", "config", "transport", "cloud"}),
    "api": frozenset({"base", "contract", "config", "transport", "cloud", "api"}),
    # The simulators play traces with the agent's own trace reader (both skip the same damaged lines).
    "vgw_sim": frozenset({"base", "contract", "config", "pipeline", "sources", "transport", "cloud", "vgw_sim", "dbc"}),
    "tools": frozenset({"base", "contract", "config", "pipeline", "sources", "state", "transport", "uplink", "daemon",
                        "ops", "cloud", "api", "vgw_sim", "dbc", "tools"}),
    "cli": frozenset({"base", "contract", "config", "pipeline", "sources", "state", "transport", "uplink", "daemon",
                      "ops", "cloud", "api", "vgw_sim", "dbc", "tools", "cli"}),
    "dbc": frozenset({"dbc"}),
}
# The package's own two files belong to the layers they are: `vgw` (its version) to base, `python -m vgw` to cli.
TOP_FILES = {"vgw.__init__": "base", "vgw.__main__": "cli"}

# The pure layers do no network, threads, processes or databases: they may not import these at all.
PURE = ("base", "contract", "pipeline")
NO_IO = ("socket", "ssl", "sqlite3", "threading", "subprocess", "multiprocessing", "asyncio", "selectors",
         "paho", "can", "serial", "http", "urllib")


ROOTS = {"vgw": ROOT / "agent" / "vgw", "vgw_sim": ROOT / "simulators" / "vgw_sim"}


def package_dirs() -> dict[str, Path]:
    """Import name -> folder of each top-level package: the two source roots (pyproject's packages.find)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    where = config["tool"]["setuptools"]["packages"]["find"]["where"]
    found = {p.name: p for w in where for p in (ROOT / w).iterdir() if (p / "__init__.py").is_file()}
    assert found == ROOTS, found
    return found


def modules() -> dict[str, Path]:
    """Every module of both packages by dotted name (a package's own file is `pkg.__init__`); agent/vgw/dbc is the
    link to the top-level dbc/ folder, so it is walked like any other folder."""
    found: dict[str, Path] = {}
    for name, folder in package_dirs().items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            found[".".join((name, *parts))] = path
    for path in sorted((ROOTS["vgw"] / "dbc").glob("*.py")):
        found[f"vgw.dbc.{path.stem}"] = path
    return found


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name: its folder under agent/vgw (or the simulators' root)."""
    if module in TOP_FILES:
        return TOP_FILES[module]
    parts = module.split(".")
    if parts[0] == "vgw_sim":
        return "vgw_sim"
    if parts[0] == "vgw" and len(parts) > 1 and parts[1] in MAY_IMPORT:
        return parts[1]
    return None


def imported(module: str, source: str) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import in `source`; `from a import b` yields `a.b` (b may be a module)."""
    package = module.removesuffix(".__init__") if module.endswith(".__init__") else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"


def target_layer(name: str, known: dict[str, Path]) -> str | None:
    """The layer of an imported vgw name, trimming a trailing attribute (`vgw.base.errors.VgwError`)."""
    while name and name not in known and f"{name}.__init__" not in known:
        name = name.rpartition(".")[0]
    return layer_of(name) if name else None


def violations(module: str, source: str, known: dict[str, Path]) -> list[str]:
    """Every import of `module` that breaks the contract, as one line each."""
    layer = layer_of(module)
    if layer is None:
        return [f"{module}: in no layer; put it in a layer's folder (README 'Layout')"]
    found = []
    for line, name in imported(module, source):
        if name in ("vgw", "vgw_sim") or name.startswith(("vgw.", "vgw_sim.")):
            other = target_layer(name, known)
            if other is not None and other not in MAY_IMPORT[layer]:
                allowed = ", ".join(sorted(MAY_IMPORT[layer]))
                found.append(f"{module}:{line} ({layer}) imports {name} ({other}); {layer} may import {allowed}")
        elif layer in PURE and name.split(".")[0] in NO_IO:
            found.append(f"{module}:{line} ({layer}) imports {name}: the {layer} layer does no I/O")
    return found


def test_every_module_is_in_a_layer_and_imports_only_below() -> None:
    known = modules()
    assert "vgw.daemon.agent" in known and "vgw_sim.vehicle" in known and "vgw.dbc.__init__" in known
    broken = [v for module, path in known.items() for v in violations(module, path.read_text(), known)]
    assert not broken, "layer contract (README 'Layout') broken:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        # the cycle this contract removed: the throwaway PKI reaching up into provisioning inside a function
        ("vgw_sim.pki", "def f():\n    from vgw.ops.provisioning import cert_device_id\n", "(ops)"),
        ("vgw.state.outbox", "from vgw.daemon.agent import Agent\n", "(daemon)"),
        ("vgw.daemon.agent", "import vgw_sim.broker\n", "(vgw_sim)"),
        ("vgw.cloud.cloudkit", "from ..state.outbox import Outbox\n", "(state)"),
        ("vgw.contract.consent.verifier", "import sqlite3\n", "does no I/O"),
        ("vgw.contract.topics", "import threading\n", "does no I/O"),
        ("vgw.contract.sealing", "from vgw.config.settings import Config\n", "(config)"),
        ("vgw.newthing", "", "in no layer"),
    ],
)
def test_the_check_catches(module: str, source: str, expected: str) -> None:
    found = violations(module, source, modules())
    assert len(found) == 1 and expected in found[0], found


def test_allowed_imports_pass() -> None:
    known = modules()
    assert violations("vgw.cli.demo", "from vgw.tools.demo import run_demo\n", known) == []
    assert violations("vgw_sim.cloud", "from vgw.cloud.envelopes import seal_envelope\n", known) == []
    assert violations("vgw.state.consent.store", "from . import model\nfrom .model import Grant\n", known) == []


# Help texts and comments cite what a user of the package can read: README sections, docs/, RFCs. The
# contract's section numbers map to README "The contract, in our words": §1 "Running the agent", §2
# "Configuration (TOML)", §3 "Scopes", §4 "Topics", §5 "Consent document", §5.1 "Collection rules", §6
# "Telemetry envelope" (and "Narrowing applies to stored data"), §7 "Receipts".
# A section sign must follow a spec and its version or number: "RFC 7515 §2", "MQTT 5.0 §2.1".
UNREADABLE = re.compile(r"CONTRACT|\b[Ii]ssue #?\d+|(?<!\d )§")


def test_citations_are_ones_a_user_can_read() -> None:
    found = []
    for folder in [*package_dirs().values(), ROOT / "dbc"]:
        for path in sorted([*folder.rglob("*.py"), *folder.rglob("*.toml")]):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if UNREADABLE.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "cite a README section or an RFC instead (see the map above this test):\n" + "\n".join(found)


def test_code_names_modules_by_import_name_not_folder() -> None:
    # The folders agent/, simulators/ and dbc/ are importable by those names only from a clone's root (pytest's
    # pythonpath); an installed `vgw` has no such modules. Code run as text (`python -c "..."`, a child
    # process) is not checked by an import, so look at every line.
    folder_import = re.compile(r"\b(from|import) (agent|simulators|dbc)\b(?! *[:,)\]])")
    found = []
    for folder in package_dirs().values():
        for path in sorted(folder.rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if folder_import.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "import `vgw...`, not a folder name:\n" + "\n".join(found)
