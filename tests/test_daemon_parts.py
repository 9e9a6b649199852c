"""The daemon's shape (README "Layout", vgw.daemon.agent): small parts that each name their thread and lock, and one
place that installs signal handlers for `vgw run`."""

from __future__ import annotations

import ast
import os
import signal
import threading
from pathlib import Path

from vgw.daemon.signals import DaemonSignals

from tests.agentkit import wait_until

ROOT = Path(__file__).resolve().parent.parent
# What `vgw run` executes: the command line's entry and run modules, the runtime and its parts.
PACKAGE = ROOT / "agent" / "vgw"
RUN_PATH = [PACKAGE / "cli" / "__init__.py", PACKAGE / "cli" / "run.py", *sorted((PACKAGE / "daemon").glob("*.py"))]


def _installs_handlers(path: Path) -> list[int]:
    """Lines of ``signal.signal(...)`` calls in ``path``."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "signal"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "signal"]


def test_signal_handlers_are_installed_in_one_place() -> None:
    found = {str(p.relative_to(ROOT)): lines for p in RUN_PATH if (lines := _installs_handlers(p))}
    assert list(found) == ["agent/vgw/daemon/signals.py"], found


def test_each_daemon_part_names_its_thread_and_lock() -> None:
    parts = [p for p in sorted((PACKAGE / "daemon").glob("*.py")) if p.name != "__init__.py"]
    assert {p.stem for p in parts} >= {"collector", "health", "status", "supervisor", "signals"}
    for path in parts:
        doc = (ast.get_docstring(ast.parse(path.read_text())) or "").lower()
        assert "thread" in doc and "lock" in doc, f"{path.name}: say which thread owns it and which lock it takes"


def test_a_stop_while_starting_is_kept_until_the_agent_exists_and_sighup_waits_for_it() -> None:
    """Real signals to this process (the main thread): remembered before attach, routed after."""
    assert threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    signals = DaemonSignals()
    try:
        assert signals.install()
        os.kill(os.getpid(), signal.SIGHUP)  # before an agent: ignored (not the default action, which kills)
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_until(lambda: signals.early == [signal.SIGTERM], 2)
        stop, reload = threading.Event(), threading.Event()
        signals.attach(stop, reload)
        assert stop.is_set() and not reload.is_set()
        os.kill(os.getpid(), signal.SIGHUP)
        assert wait_until(reload.is_set, 2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
