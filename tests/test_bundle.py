"""The offline install bundle (packaging/bundle.py, packaging/install.sh), built for this machine's arch and
installed end to end into a temp root with no network: the tree it writes names only the device's paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from vgw_sim.cloud import SigningKey
from vgw_sim.pki import TestPKI

from tests.test_provision import sign_csr

# one worker: the session fixture builds the bundle once (every worker that ran a test here built its own, ~10 s)
pytestmark = pytest.mark.xdist_group("bundle")

ROOT = Path(__file__).resolve().parents[1]
# Any attempt to reach an index during the install goes to a closed local port and fails at once.
NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))}
    # install.sh runs `python3`: the interpreter of this test (the bundle is built for its version).
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env | extra


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host-arch bundle, built once per session (wheels fetched from PyPI at build time, kept in a cache)."""
    work = tmp_path_factory.mktemp("bundle")
    proc = subprocess.run([sys.executable, str(ROOT / "packaging/bundle.py"), "--arch", "host", "--out",
                           str(work / "dist"), "--cache", str(work / "cache")],
                          capture_output=True, text=True, timeout=300, check=False, env=_env())
    assert proc.returncode == 0, proc.stderr
    archive = Path(proc.stdout.strip())
    assert archive.name.startswith("vgw-bundle-") and archive.name.endswith(".tar.gz")
    return archive


@pytest.fixture
def unpacked(bundle: Path, tmp_path: Path) -> Iterator[Path]:
    with tarfile.open(bundle) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (top,) = (tmp_path / "unpacked").iterdir()
    yield top
    shutil.rmtree(tmp_path / "unpacked", ignore_errors=True)


def install(top: Path, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(top / "install.sh"), "--root", str(root)], capture_output=True, text=True,
                          timeout=300, check=False, env=_env(**NO_NETWORK))


def vgw(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed `vgw` (its shebang names /opt/vgw, the device's path, so run it with the venv's python)."""
    venv = root / "opt/vgw/venv/bin"
    return subprocess.run([str(venv / "python"), str(venv / "vgw"), *args], capture_output=True, text=True,
                          timeout=60, check=False, env=_env(), cwd=root)


def test_bundle_holds_every_wheel_and_the_installer(bundle: Path) -> None:
    with tarfile.open(bundle) as tar:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in tar.getnames() if "/" in n}
    wheels = {n.split("/")[1].split("-")[0].lower() for n in names if n.startswith("wheels/")}
    assert {"vgw", "pip", "cryptography", "cantools", "python_can", "paho_mqtt", "pyjwt", "pyserial"} <= wheels
    assert {"install.sh", "BUNDLE.txt", "systemd/vgw-agent.service", "systemd/60-vgw-obd.rules",
            "dbc/vehicle.dbc", "dbc/signals.toml", "systemd/vgw-sysusers.service", "systemd/vgw.sysusers",
            "systemd/80-vgw.preset"} <= names


def test_offline_install_into_a_root_runs_and_names_no_staging_path(
        unpacked: Path, tmp_path: Path, pki: TestPKI) -> None:
    root = tmp_path / "root"
    proc = install(unpacked, root)
    assert proc.returncode == 0, proc.stderr
    for rel in ("opt/vgw/venv/bin/vgw", "opt/vgw/share/dbc/vehicle.dbc", "etc/systemd/system/vgw-agent.service",
                "etc/udev/rules.d/60-vgw-obd.rules", "etc/systemd/network/80-can0.network"):
        assert (root / rel).is_file(), rel
    # `make install DESTDIR=...` baked the staging folder into the venv: this tree can be copied onto a car.
    staged = str(root).encode()
    baked = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and staged in p.read_bytes()]
    assert baked == []
    assert (root / "opt/vgw/venv/bin/vgw").read_text().startswith("#!/opt/vgw/venv/bin/python")

    assert vgw(root, "--help").returncode == 0
    where = subprocess.run([str(root / "opt/vgw/venv/bin/python"), "-c",
                            "import vgw.cli, sys; print(vgw.cli.__file__); print(sys.prefix)"],
                           capture_output=True, text=True, check=True, env=_env(), cwd=tmp_path)
    assert all(line.startswith(str(root)) for line in where.stdout.split())

    # The installed agent provisions a device (finding the shipped DBC under /opt/vgw/share) and checks it.
    etc = tmp_path / "etc-vgw"
    share = root / "opt/vgw/share/dbc"
    key = SigningKey.generate().write_public_pem(tmp_path / "signer.pub.pem")
    prov = vgw(root, "provision", "--device-id", "car-0042", "--broker", "127.0.0.1:1", "--ca", str(pki.ca.cert),
               "--consent-key", str(key), "--out", str(etc), "--source", "can",
               "--dbc", str(share / "vehicle.dbc"), "--signal-map", str(share / "signals.toml"))
    assert prov.returncode == 0, prov.stderr
    (tmp_path / "signed.crt").write_bytes(sign_csr(etc / "device.csr", pki))
    assert vgw(root, "provision", "--install-cert", str(tmp_path / "signed.crt"), "--out", str(etc)).returncode == 0
    doctor = vgw(root, "doctor", "--config", str(etc / "vgw.toml"))
    lines = doctor.stdout.splitlines()
    assert any(line.startswith("PASS") and "config" in line for line in lines), doctor.stdout + doctor.stderr
    assert any(line.startswith("PASS") and "catalogue" in line for line in lines), doctor.stdout
    assert "Traceback" not in doctor.stderr


def test_install_refuses_another_arch_and_a_damaged_wheel(unpacked: Path, tmp_path: Path) -> None:
    meta = unpacked / "BUNDLE.txt"
    text = meta.read_text()
    arch = next(line.split()[1] for line in text.splitlines() if line.startswith("arch "))
    meta.write_text(text.replace(f"arch {arch}", "arch sparc64"))
    proc = install(unpacked, tmp_path / "r1")
    assert proc.returncode != 0
    assert "this bundle is for linux-sparc64" in proc.stderr
    assert not (tmp_path / "r1" / "opt").exists()

    meta.write_text(text)
    wheel = next((unpacked / "wheels").glob("paho_mqtt-*.whl"))
    wheel.write_bytes(wheel.read_bytes()[:-100])
    proc = install(unpacked, tmp_path / "r2")
    assert proc.returncode != 0
    assert "wheels do not match BUNDLE.txt" in proc.stderr
    assert not (tmp_path / "r2" / "opt").exists()


NOBODY = 65534  # an account with no rights, like the agent's: what it can run, the agent can run
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="running as another user needs root and setpriv")


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` run by a shell that is already ``NOBODY`` (setpriv opens its own command while still root)."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "/bin/sh", "-c",
                           'exec "$@"', "sh", *argv],
                          capture_output=True, text=True, timeout=60, check=False, cwd="/")


@needs_root
def test_the_venv_runs_as_an_unprivileged_user(unpacked: Path, tmp_path: Path) -> None:
    """install.sh took `python3` from root's PATH (pyenv under /root, mode 0700), so the service user got
    `failed to execute /opt/vgw/venv/bin/vgw: Permission denied`. Here `python3` on PATH is this test's own
    interpreter, wherever it lives."""
    # pytest's folders are 0700; the device's /opt is not: stage into a folder others can enter.
    top = Path(tempfile.mkdtemp(prefix="vgw-stage-"))
    try:
        os.chmod(top, 0o755)  # noqa: S103 - others must enter it, as they enter /opt
        root = top / "root"
        proc = install(unpacked, root)
        if proc.returncode != 0 and "unprivileged" in proc.stderr:
            pytest.skip(f"no interpreter of the bundle's version runs unprivileged here: {proc.stderr.strip()}")
        assert proc.returncode == 0, proc.stderr
        ran = as_nobody(str(root / "opt/vgw/venv/bin/python"), "-c", "import encodings, json, ssl")
        assert ran.returncode == 0, (os.path.realpath(root / "opt/vgw/venv/bin/python"), ran.stderr)
    finally:
        shutil.rmtree(top, ignore_errors=True)


@needs_root
def test_an_interpreter_the_agent_cannot_run_is_refused(unpacked: Path, tmp_path: Path) -> None:
    """An explicit --python in a folder only root can enter (pyenv under /root): one clear line, nothing written."""
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "python3").symlink_to(sys.executable)
    proc = subprocess.run([str(unpacked / "install.sh"), "--root", str(tmp_path / "r"), "--python",
                           str(hidden / "python3")], capture_output=True, text=True, timeout=300, check=False,
                          env=_env(**NO_NETWORK))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(hidden / "python3") in lines[0] and "unprivileged" in lines[0], proc.stderr
    assert "--python" in lines[0]
    assert not (tmp_path / "r" / "opt").exists()
