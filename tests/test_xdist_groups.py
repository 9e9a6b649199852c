"""The suite's xdist groups hold (README "Layout"): under ``--dist loadgroup`` every test of one group runs on
one worker. pytest 9.2 with pytest-xdist 3.8 silently dropped them (each test went to any worker: the timing
tests competed for the CPU and each worker started its own NATS cluster), so the installed pair is checked
here on a throwaway module, in a pytest of its own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


def test_loadgroup_keeps_a_group_on_one_worker(tmp_path: Path) -> None:
    pytest.importorskip("xdist")
    (tmp_path / "test_grouped.py").write_text("import pytest\n" + "".join(
        f"@pytest.mark.xdist_group({group!r})\ndef test_{group}_{i}():\n    pass\n"
        for group in ("one", "two") for i in range(8)))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # none of this project's options
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "3", "--dist", "loadgroup",
                          "-v", "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ran = re.findall(r"\[(gw\d+)\].*PASSED \S*::(test_\w+)", out.stdout)
    assert len(ran) == 16, out.stdout[-2000:]
    for group in ("one", "two"):
        assert len({worker for worker, name in ran if name.startswith(f"test_{group}_")}) == 1, ran
