"""How the code reads (docs/style.md): one error tree, loggers named by module under ``vgw``, no test hooks or
message-text decisions in production code, no dead fallbacks."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import vgw
from vgw.base import errors

from tests.agentkit import ROOT

AGENT = ROOT / "agent" / "vgw"
# Derived from RuntimeError on purpose: a missing or dead test broker is the machine's problem (vgw.base.errors).
ENVIRONMENT_ERRORS = {"BrokerError", "MosquittoNotFound", "BrokerStartError", "NatsNotFound"}


def _modules() -> list[str]:
    names = ["vgw"]
    for info in pkgutil.walk_packages(vgw.__path__, "vgw."):
        if info.name.startswith(("vgw.dbc", "vgw.__main__")):
            continue
        names.append(info.name)
    return names


def test_every_exception_class_of_the_package_is_in_the_vgw_error_tree() -> None:
    outside = []
    for name in _modules():
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name or not issubclass(cls, BaseException):
                continue
            if not issubclass(cls, errors.VgwError) and cls_name not in ENVIRONMENT_ERRORS:
                outside.append(f"{name}.{cls_name}")
    assert outside == []


def test_the_tree_in_the_docstring_names_every_error_class() -> None:
    doc = errors.__doc__ or ""
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, errors.VgwError):
            assert re.search(rf"\b{name}\b", doc), f"{name} missing from the tree in vgw.base.errors"


def test_each_consent_rule_has_its_own_class_and_unchanged_reason() -> None:
    leaves = {cls.reason: cls for cls in vars(errors).values()
              if isinstance(cls, type) and issubclass(cls, errors.ConsentError) and not cls.__subclasses__()
              and cls is not errors.BadRuleError}
    assert set(leaves) == set(errors.ConsentReason)
    assert issubclass(errors.RollbackError, errors.FreshnessError)
    assert errors.RollbackError("x").reason == "version-rollback"


def _sources() -> list[Path]:
    return sorted(AGENT.rglob("*.py"))


def test_loggers_are_named_by_module_under_vgw() -> None:
    named = [f"{p.relative_to(ROOT)}: {m}" for p in _sources()
             for m in re.findall(r"getLogger\(([^)]*)\)", p.read_text()) if m and m not in ("__name__", '"vgw"')
             and p.name != "logs.py"]  # "vgw": the package's root logger (the demo's kept log)
    assert named == []


def test_no_test_hooks_or_message_text_decisions_in_the_outbox() -> None:
    from vgw.state.outbox import Outbox

    for hook in ("page_limit", "read_only", "attempted"):
        assert not hasattr(Outbox, hook), hook
    for p in (AGENT / "outbox").glob("*.py"):
        text = p.read_text()
        assert not re.search(r"in str\(exc\)|str\(exc\)\.lower\(\)|\.args\[", text), p


def test_no_fallback_hides_a_missing_module_of_vgw() -> None:
    # Only the simulators may be missing (the car's install leaves them out, and says so); a missing module of the
    # agent itself is a broken install and must show as one.
    import subprocess
    import sys

    code = "import sys; sys.modules['vgw.tools.demo'] = None; import vgw.cli; sys.exit(vgw.cli.main(['demo']))"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr and "vgw.tools.demo" in out.stderr


def test_unused_receipt_verifier_is_gone_from_the_device_side() -> None:
    from vgw.contract import receipts

    assert not hasattr(receipts, "verify_receipt")  # the cloud side verifies receipts (vgw_sim.envelopes)


def test_the_leak_guard_sees_vgw_threads_and_open_buses() -> None:
    import threading

    import can

    from tests.conftest import _counts, _open_buses

    bus = can.Bus(interface="virtual", channel="vgw-leak-guard-self-test")
    try:
        assert bus in _open_buses()
    finally:
        bus.shutdown()
    assert bus not in _open_buses()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="vgw-leak-guard-self-test", daemon=True)
    thread.start()
    try:
        assert _counts(thread)
    finally:
        stop.set()
        thread.join(5)
    assert not _counts(thread)


def test_the_suite_has_one_wait_until() -> None:
    tests = ROOT / "tests"
    defs = [f"{p.name}: {m}" for p in sorted(tests.glob("*.py"))
            for m in re.findall(r"^\s*def (wait_until|wait_for|_wait)\(", p.read_text(), re.M)]
    assert defs == ["agentkit.py: wait_until"]


def test_doctor_hints_at_a_missing_certificate_by_type_not_by_message(tmp_path: Path, pki: object) -> None:
    from vgw.ops.doctor import run_checks

    from tests.agentkit import Authority, write_config

    cfg = write_config(tmp_path, pki, 1883, Authority(tmp_path).trust, can={"channel": "vgw-hygiene-doctor"})
    text = cfg.read_text()
    cert = re.search(r'cert_file = "([^"]+)"', text)
    assert cert is not None
    cfg.write_text(text.replace(cert.group(1), str(tmp_path / "device.crt")))
    [check] = run_checks(cfg)
    assert check.check == "config" and "file not found" in check.detail and "--install-cert" in check.detail
