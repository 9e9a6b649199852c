"""The tests do not depend on the host's users or files: the ones that failed on a developer's Pi after `make
install` (a `vgw` user, an /etc/vgw and a /var/lib/vgw exist) run here on such a host, made in a private mount
namespace (/etc and /var/lib overlaid: the real host is never touched)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agentkit import ROOT
from tests.test_provision import free_uid

# The tests that failed there: provision's re-run, another identity and the prompt, and both purges.
TESTS = [
    "tests/test_provision.py::test_rerun_is_safe_and_keeps_keys",
    "tests/test_provision.py::test_another_identity_needs_force",
    "tests/test_provision.py::test_asks_for_the_source_on_a_terminal",
    "tests/test_install.py::test_purge_erases_every_grant_then_removes_state",
    "tests/test_install.py::test_purge_offline_still_erases",
    "tests/test_root_device.py",
]

HOST_WITH_VGW = r"""
set -e
for d in /etc /var/lib; do
    n=$(echo "$d" | tr / _)
    mkdir -p "$OVERLAY/$n/upper" "$OVERLAY/$n/work"
    mount -t overlay overlay -o "lowerdir=$d,upperdir=$OVERLAY/$n/upper,workdir=$OVERLAY/$n/work" "$d"
done
echo "vgw:x:$VGW_UID:$VGW_UID:vgw agent:/nonexistent:/usr/sbin/nologin" >> /etc/passwd
echo "vgw:x:$VGW_UID:" >> /etc/group
mkdir -m 755 /etc/vgw
mkdir -m 700 /var/lib/vgw
chown "$VGW_UID:$VGW_UID" /var/lib/vgw
[ "$(id -u vgw)" = "$VGW_UID" ]
exec "$@"
"""


def _namespaces_work(tmp_path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    for sub in ("upper", "work", "lower", "mnt"):
        (probe / sub).mkdir(parents=True)
    proc = subprocess.run(["unshare", "--mount", "sh", "-c",
                           f"mount -t overlay overlay -o lowerdir={probe}/lower,upperdir={probe}/upper,"
                           f"workdir={probe}/work {probe}/mnt"], capture_output=True, check=False, timeout=30)
    return proc.returncode == 0


def test_the_suite_passes_on_a_host_with_a_vgw_user_and_etc_vgw(tmp_path: Path) -> None:
    if not _namespaces_work(tmp_path):
        pytest.skip("needs root, unshare and overlay mounts to make a host with a vgw user")
    host_had = Path("/etc/vgw").exists(), Path("/var/lib/vgw").exists()
    env = dict(os.environ, OVERLAY=str(tmp_path / "overlay"), VGW_UID=str(free_uid(54400)))
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", HOST_WITH_VGW, "sh", sys.executable, "-m", "pytest",
                           "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "inner"), *TESTS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-600:]
    assert (Path("/etc/vgw").exists(), Path("/var/lib/vgw").exists()) == host_had  # the host was not touched
