"""systemd may stop the agent while it is still starting: that must still be a clean exit 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from vgw_sim.broker import free_port

from tests.agentkit import ROOT, Authority, stop_process, write_config


@pytest.mark.parametrize("delay", [0.25, 0.5, 0.9])
def test_sigterm_while_starting_exits_0(tmp_path, pki, delay: float) -> None:
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": "early"})
    proc = subprocess.Popen([sys.executable, "-m", "vgw", "run", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
        assert code == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        stop_process(proc)
