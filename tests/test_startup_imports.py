"""What `vgw run` imports before its first frame (docs/performance.md, "A lighter start"): the modules of the
other subcommands, the cloud kit, the simulators and the tools are not part of it. Pinned by the import set of
a fresh interpreter, not by timing (the time a start takes is `vgw bench`'s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vgw.cli import _COMMANDS, command_of
from vgw_sim.pki import TestPKI


def _imported(code: str) -> set[str]:
    """The modules a fresh interpreter holds after ``code``."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


NOT_FOR_A_RUN = ("vgw.ops.provisioning", "vgw_sim", "vgw.tools", "vgw.cloud", "vgw.ops.monitor", "vgw.ops.doctor",
                 "vgw.ops.install", "vgw.ops.report")


def test_vgw_run_imports_only_its_own_subcommand() -> None:
    mods = _imported("from vgw.cli import build_parser, command_of\n"
                     "build_parser(command_of(['--log-level', 'info', 'run', '--config', 'x']))\n"
                     "import vgw.config.settings, vgw.daemon.agent")
    assert "vgw.cli.run" in mods and "vgw.daemon.agent" in mods
    assert not mods & {f"vgw.cli.{name}" for name in _COMMANDS if name != "run"}
    assert not [m for m in mods if m.startswith(NOT_FOR_A_RUN)]


def test_the_runtime_imports_no_cli_cloud_or_simulator() -> None:
    mods = _imported("import vgw.daemon.agent")
    assert not [m for m in mods if m.startswith(("vgw.cli", *NOT_FOR_A_RUN))]


def test_command_of_skips_the_global_options() -> None:
    assert command_of(["run", "--config", "x"]) == "run"
    assert command_of(["--debug", "--log-level", "info", "status"]) == "status"
    assert command_of(["--log-level=debug", "run"]) == "run"
    assert command_of(["--help"]) is None and command_of([]) is None
    assert command_of(["runn"]) is None  # a typo: every subcommand is registered, argparse lists them


# What the owner's and the installer's quick commands must not load: the agent's daemon, its pipeline and uplink
# (`vgw status` and `vgw consent apply` imported all of vgw.daemon.agent for its lock: 0.2 s more per call).
NOT_FOR_A_QUICK_COMMAND = ("vgw.daemon.agent", "vgw.daemon.collector", "vgw.uplink", "vgw.pipeline.router")


@pytest.mark.parametrize("argv", [["status"], ["consent", "show"], ["consent", "apply", "DOC"]],
                         ids=["status", "consent-show", "consent-apply"])
def test_quick_commands_do_not_load_the_daemon(tmp_path: Path, pki: TestPKI, argv: list[str]) -> None:
    from tests.agentkit import Authority, write_config

    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, 1, auth.trust, can={"channel": "unused"}, state_dir=tmp_path / "state")
    doc = tmp_path / "doc.jws"
    doc.write_text(auth.doc("dev-0001", {"g-1": ["read_odometer"]}))
    args = [str(doc) if a == "DOC" else a for a in argv] + ["--config", str(cfg)]
    mods = _imported(f"import vgw.cli\nassert vgw.cli.main({args!r}) == 0")
    assert f"vgw.cli.{argv[0]}" in mods
    assert "can" not in mods and not [m for m in mods if m.startswith(NOT_FOR_A_QUICK_COMMAND)]
