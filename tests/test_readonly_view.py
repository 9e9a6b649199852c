"""`vgw status`, `vgw consent show` and `vgw report` read the state directory and change nothing on disk.

docs/style.md "a read never writes": no state directory, storage key, SQLite schema or -wal/-shm side file is
created, and no existing file is modified (names, sizes, modes and mtimes compared before and after).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.agentkit import Authority, vgw, write_config

READS = [
    ("status", "--json"),
    ("status",),
    ("consent", "show", "--json"),
    ("consent", "show"),
    ("report", "--json"),
    ("report",),
]


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under ``root``: (size, mode, mtime_ns)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if not p.is_dir() else 0, st.st_mode, st.st_mtime_ns)
    return out


def run_reads(cfg: Path) -> list[Any]:
    outs = []
    for args in READS:
        r = vgw(*args, "--config", str(cfg))
        assert r.returncode == 0, (args, r.stderr)
        assert "Traceback" not in r.stderr
        outs.append(r.stdout)
    return outs


@pytest.fixture
def setup(tmp_path: Path, pki: Any) -> dict[str, Any]:
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, 1883, auth.trust, can={"channel": "vgw-readonly-view"})
    return {"cfg": cfg, "state": tmp_path / "state", "tmp": tmp_path, "auth": auth}


def test_reads_of_a_missing_state_dir_create_nothing_and_say_no_state_yet(setup: dict[str, Any]) -> None:
    before = snapshot(setup["tmp"])
    outs = run_reads(setup["cfg"])
    assert not setup["state"].exists()
    assert snapshot(setup["tmp"]) == before
    st = json.loads(outs[0])
    assert st["state"] == "none" and st["consent_version"] is None and st["outbox"] == {}
    assert "no state yet" in outs[1]
    assert json.loads(outs[2])["version"] is None
    assert "no state yet" in outs[3]


@pytest.mark.parametrize("storage_key", ["present", "missing"])
def test_reads_of_an_existing_state_dir_modify_nothing(setup: dict[str, Any], storage_key: str) -> None:
    doc = setup["tmp"] / "v1.jws"
    doc.write_text(setup["auth"].doc("dev-0001", {"g-speed": ["read_speedometer"]}))
    r = vgw("consent", "apply", "--config", str(setup["cfg"]), str(doc))
    assert r.returncode == 0, r.stderr
    assert (setup["state"] / "outbox.sqlite").exists()
    if storage_key == "missing":
        (setup["state"] / "storage.key").unlink()  # the figures shown need no key: none may be made
    before = snapshot(setup["tmp"])
    outs = run_reads(setup["cfg"])
    assert snapshot(setup["tmp"]) == before
    st = json.loads(outs[0])
    assert st["state"] == "present" and st["consent_version"] == 1
    assert [g["id"] for g in st["grants"]] == ["g-speed"]
    assert json.loads(outs[2])["version"] == 1
