"""systemd may stop the agent while it is still starting: that must still be a clean exit 0.

`vgw run` installs its SIGTERM handler first thing (vgw.daemon.signals); before that the interpreter itself is
starting (tens of milliseconds, more on a loaded machine) and SIGTERM still has its default action: the
process ends by the signal, which systemd also counts as a clean stop. So each case waits until the kernel
shows the handler caught (``SigCgt`` in /proc/<pid>/status), then lets the start go on for ``delay`` seconds
(imports, config, opening the state, connecting) and stops it there: whenever it comes, the exit is 0.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vgw_sim.broker import free_port

from tests.agentkit import ROOT, Authority, stop_process, wait_until, write_config


def _catches(pid: int, signum: int) -> bool:
    """True once process ``pid`` has a handler for ``signum`` (the SigCgt mask of /proc/<pid>/status)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.parametrize("delay", [0.0, 0.25, 0.9])
def test_sigterm_while_starting_exits_0(tmp_path, pki, delay: float) -> None:
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": "early"})
    proc = subprocess.Popen([sys.executable, "-m", "vgw", "run", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: _catches(proc.pid, signal.SIGTERM) or proc.poll() is not None, 30)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(delay)  # where in the start the stop lands, not a wait for a condition
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
        assert code == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        stop_process(proc)
