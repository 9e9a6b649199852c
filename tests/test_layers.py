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

# Layer -> the modules in it. A name covers the module and, for a package, everything below it, unless a
# longer name puts a sub-module elsewhere (vgw.state.consent.store is storage though vgw.state.consent is core).
LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("vgw.__init__", "vgw.base.errors", "vgw.base.fsutil", "vgw.base.timefmt", "vgw.base.logs", "vgw.dbc"),
    # What both ends of the wire share (topics, envelope parameters, receipt types, replay and backoff policy).
    "contract": ("vgw.contract",),
    "core": (
        "vgw.contract.scopes", "vgw.base.config", "vgw.pipeline.catalogue", "vgw.contract.rules", "vgw.state.consent", "vgw.crypto", "vgw.pipeline",
        "vgw.pipeline.j1939", "vgw.sources.obd", "vgw.pipeline.obd.pids", "vgw.pipeline.obd.request", "vgw.sources.obd.protocols",
    ),
    "storage": (
        "vgw.state.outbox", "vgw.state.audit", "vgw.state.consent.store", "vgw.state.consent.manager", "vgw.state.consent.intake",
        "vgw.state.keys", "vgw.state.credentials",
    ),
    "sources": ("vgw.sources", "vgw.sources.obd.elm327", "vgw.sources.obd.isotp", "vgw.sources.obd.poller"),
    "uplink": ("vgw.uplink.link", "vgw.uplink.packetguard", "vgw.uplink.tlsfailure", "vgw.uplink.renewal"),
    "daemon": ("vgw.daemon.agent", "vgw.daemon", "vgw.daemon.writer", "vgw.daemon.counters", "vgw.daemon.sdnotify"),
    "operations": ("vgw.ops.stateview", "vgw.ops.doctor", "vgw.ops.install", "vgw.ops.report", "vgw.ops.report_owner", "vgw.ops.report_periods",
                   "vgw.ops.provisioning", "vgw.ops.monitor", "vgw.ops.enroll"),
    "cloud": ("vgw.cloud", "vgw.api"),
    "service": ("vgw.cloud.service",),
    "simulators": ("vgw_sim",),
    "tools": ("vgw.tools",),
    "cli": ("vgw.cli", "vgw.__main__"),
}

# Layer -> the layers it may import (itself included).
MAY_IMPORT: dict[str, frozenset[str]] = {
    "base": frozenset({"base"}),
    "contract": frozenset({"base", "contract"}),
    "core": frozenset({"base", "contract", "core"}),
    "storage": frozenset({"base", "contract", "core", "storage"}),
    "sources": frozenset({"base", "contract", "core", "sources"}),
    "uplink": frozenset({"base", "contract", "core", "storage", "uplink"}),
    "daemon": frozenset({"base", "contract", "core", "storage", "sources", "uplink", "daemon"}),
    "operations": frozenset({"base", "contract", "core", "storage", "sources", "uplink", "daemon", "operations"}),
    "cloud": frozenset({"base", "contract", "core", "cloud"}),
    "service": frozenset({"base", "contract", "core", "cloud", "service"}),
    # The simulators play traces with the agent's own trace reader (both skip the same damaged lines).
    "simulators": frozenset({"base", "contract", "core", "sources", "cloud", "simulators"}),
    "tools": frozenset(set(LAYERS) - {"cli"}),
    "cli": frozenset(LAYERS),
}

# The pure layers do no network, threads, processes or databases: they may not import these at all.
NO_IO = ("socket", "ssl", "sqlite3", "threading", "subprocess", "multiprocessing", "asyncio", "selectors",
         "paho", "can", "serial", "http", "urllib")


def package_dirs() -> dict[str, Path]:
    """Import name -> folder, from pyproject's package-dir (the folders agent/, simulators/, dbc/)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: ROOT / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package's own file is `pkg.__init__`)."""
    dirs = package_dirs()
    found: dict[str, Path] = {}
    for name, folder in dirs.items():
        nested = [other for other in dirs.values() if other != folder and other.is_relative_to(folder)]
        for path in sorted(folder.rglob("*.py")):
            if any(path.is_relative_to(n) for n in nested):
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            found[".".join((name, *parts))] = path
    return found


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name: the longest listed name that is it or a package above it."""
    best: tuple[int, str] | None = None
    for layer, names in LAYERS.items():
        for name in names:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > best[0]:
                    best = (len(name), layer)
    if best is None and module.endswith(".__init__"):
        return layer_of(module.removesuffix(".__init__"))
    return best[1] if best else None


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
        return [f"{module}: in no layer; add it to LAYERS here and to README 'Layout'"]
    found = []
    for line, name in imported(module, source):
        if name == "vgw" or name.startswith("vgw."):
            other = target_layer(name, known)
            if other is not None and other not in MAY_IMPORT[layer]:
                allowed = ", ".join(sorted(MAY_IMPORT[layer]))
                found.append(f"{module}:{line} ({layer}) imports {name} ({other}); {layer} may import {allowed}")
        elif layer in ("base", "contract", "core") and name.split(".")[0] in NO_IO:
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
        ("vgw_sim.pki", "def f():\n    from vgw.ops.provisioning import cert_device_id\n", "(operations)"),
        ("vgw.state.outbox", "from vgw.daemon.agent import Agent\n", "(daemon)"),
        ("vgw.daemon.agent", "import vgw_sim.broker\n", "(simulators)"),
        ("vgw.cloud.cloudkit", "from ..outbox import Outbox\n", "(storage)"),
        ("vgw.contract.consent.verifier", "import sqlite3\n", "does no I/O"),
        ("vgw.contract.topics", "import threading\n", "does no I/O"),
        ("vgw.contract.sealing", "from vgw.contract.consent.model import KEM_X25519\n", "(core)"),
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
    for folder in package_dirs().values():
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
