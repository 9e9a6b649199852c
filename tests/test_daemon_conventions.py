"""Daemon conventions: --config defaults to /etc/vgw/vgw.toml; --debug and --log-level after the subcommand;
SIGHUP re-reads the config (log level applied, the rest named); every logger is under `vgw.`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from vgw.base.errors import ConfigError
from vgw.cli import main
from vgw_sim.broker import free_port
from vgw_sim.paths import default_dbc, default_signal_map

from tests.agentkit import ROOT, Authority, agent_process, wait_until, write_config

DEFAULT_CONFIG = "/etc/vgw/vgw.toml"


def test_config_defaults_to_etc_vgw(capsys: pytest.CaptureFixture[str]) -> None:
    """`vgw status` without --config was a usage error; daemons default to their config under /etc."""
    if Path(DEFAULT_CONFIG).exists():
        pytest.skip(f"{DEFAULT_CONFIG} exists on this machine")
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert DEFAULT_CONFIG in err and len(err.strip().splitlines()) == 1
    assert main(["doctor"]) == 1
    assert DEFAULT_CONFIG in capsys.readouterr().out


def test_debug_and_log_level_after_the_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[device]\n")
    with pytest.raises(ConfigError):  # --debug after the subcommand: the traceback, as before it
        main(["status", "--config", str(bad), "--debug"])
    assert main(["status", "--config", str(bad), "--log-level", "DEBUG"]) == 1
    assert main(["--log-level", "warning", "consent", "show", "--config", str(bad)]) == 1
    assert "bad.toml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["status", "--log-level", "chatty"])
    assert exc.value.code == 2


def _collect(stream: object, into: list[str]) -> threading.Thread:
    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def test_sighup_reloads_the_log_level_and_names_what_needs_a_restart(tmp_path: Path, pki: object) -> None:
    auth = Authority(tmp_path)
    dbc = tmp_path / "car.dbc"
    shutil.copy(default_dbc(), dbc)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust,  # type: ignore[arg-type]
                       can={"channel": f"hup-{tmp_path.name[-8:]}", "dbc": [str(dbc)],
                            "signal_map": str(default_signal_map())})
    base = cfg.read_text()
    cfg.write_text(base + '\n[log]\nlevel = "warning"\n')
    lines: list[str] = []
    with agent_process(cfg) as proc:
        pump = _collect(proc.stderr, lines)
        assert wait_until(lambda: (tmp_path / "state" / "status.json").exists(), 20), "".join(lines)
        assert not any("running" in line for line in lines)  # the INFO line is below "warning"

        # More detail now, and a change that needs a restart (the batch timing, the DBC file's bytes).
        cfg.write_text(base.replace("max_interval_s = 0.2", "max_interval_s = 0.5") + '\n[log]\nlevel = "debug"\n')
        dbc.write_bytes(dbc.read_bytes() + b"\n")
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: any("reload: log level debug" in line for line in lines), 10), "".join(lines)
        assert wait_until(lambda: any("[batch]" in line and "the DBC/signal map files" in line
                                      and "restart the agent" in line for line in lines), 10), "".join(lines)

        cfg.write_text("[device]\nbroken")  # a config that no longer loads: logged, the agent goes on
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: any("the running configuration stays" in line for line in lines), 10)
        assert proc.poll() is None
        proc.terminate()
        assert proc.wait(15) == 0
        pump.join(5)


@pytest.mark.parametrize("kind", ["fifo", "link-to-dev-zero"])
def test_sighup_with_a_dbc_that_is_no_longer_a_regular_file_does_not_hang_the_agent(tmp_path: Path, pki: object,
                                                                                    kind: str) -> None:
    """A reload compares the DBC's bytes: a DBC replaced by a FIFO blocked the main loop in open (SIGTERM then
    went unheard), a link to /dev/zero read until memory ran out. Now the file counts as changed, unread."""
    auth = Authority(tmp_path)
    dbc = tmp_path / "car.dbc"
    shutil.copy(default_dbc(), dbc)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust,  # type: ignore[arg-type]
                       can={"channel": f"hup-{tmp_path.name[-8:]}", "dbc": [str(dbc)],
                            "signal_map": str(default_signal_map())})
    lines: list[str] = []
    with agent_process(cfg) as proc:
        pump = _collect(proc.stderr, lines)
        assert wait_until(lambda: (tmp_path / "state" / "status.json").exists(), 20), "".join(lines)
        dbc.unlink()
        if kind == "fifo":
            os.mkfifo(dbc)
        else:
            dbc.symlink_to("/dev/zero")
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: any("the DBC/signal map files" in line for line in lines), 15), "".join(lines)
        proc.terminate()
        assert proc.wait(15) == 0
        pump.join(5)


def test_every_logger_is_under_vgw() -> None:
    """journalctl and `--log-level` filters address `vgw.*`; a module logging as `vgw.sources.obd...` escaped them."""
    source = re.compile(r"getLogger\(([^)]*)\)")
    offenders = []
    for folder in ("agent", "simulators"):
        for path in (ROOT / folder).rglob("*.py"):
            for arg in source.findall(path.read_text()):
                if arg and not arg.startswith('"vgw') and arg not in ("n", "noisy", "name", "__name__"):
                    offenders.append(f"{path.relative_to(ROOT)}: getLogger({arg})")
    assert offenders == []
    # Import every module in a fresh interpreter: loggers made by other tests in this process do not count.
    code = ("import importlib, logging, pkgutil, vgw\n"
            "for m in pkgutil.walk_packages(vgw.__path__, 'vgw.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "names = logging.Logger.manager.loggerDict\n"
            "print(' '.join(n for n in names if n.split('.')[0] in ('agent', 'simulators')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []
