#!/usr/bin/env python3
"""Build the offline install bundle: ``dist/vgw-bundle-<version>-<arch>.tar.gz``.

The bundle is what an installer carries to a car that has no internet (docs/install-raspberry-pi.md,
"Offline install"). It holds every wheel the agent needs on the target, our own wheel, pip's wheel, the
systemd units, the udev rule, the shipped DBC and an ``install.sh`` that lays the agent out under
``/opt/vgw`` with ``pip install --no-index`` (no network) and then runs ``vgw install --no-venv`` from the
freshly installed venv (user, units, networkd, udev: one implementation for both install paths).

Layout inside the archive (one top folder, ``vgw-bundle-<version>-<arch>/``)::

    install.sh            the offline installer (run as root on the car; --root DIR stages an image)
    BUNDLE.txt            version, target arch, Python version, and the sha256 of every wheel
    wheels/*.whl          vgw + its dependencies for the target, + pip itself
    systemd/ dbc/ docs/   units, network file, udev rule, demo DBC and signal map, the Pi guide

Targets (``--arch``): ``aarch64`` (Raspberry Pi OS 64-bit, glibc 2.36), ``armv7l`` (32-bit), or ``host``
(this machine's own platform, used by the tests). Wheels are fetched with pip's ``--platform``/
``--python-version``/``--only-binary=:all:``: a dependency without a wheel for the target (no compiler on
the car, and none here for another arch) fails the build with one line naming it; ``--wheels DIR`` adds a
folder of wheels built on the target (``pip wheel`` on such a device) to fill that gap.

Standard library only: it runs before any venv exists. Exit 0 and the bundle path on stdout, or exit 1 with
one line on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Raspberry Pi OS Bookworm ships glibc 2.36 and Python 3.11: every manylinux tag up to 2.36 runs there.
GLIBC_MAX_MINOR = 36
TARGETS = {"aarch64": "aarch64", "arm64": "aarch64", "armv7l": "armv7l", "armv7": "armv7l", "armhf": "armv7l"}
SHARE = {  # bundle path -> source path
    "systemd/vgw-agent.service": "systemd/vgw-agent.service",
    "systemd/vgw-vcan.service": "systemd/vgw-vcan.service",
    "systemd/vgw-enroll.service": "systemd/vgw-enroll.service",
    "systemd/80-can0.network": "systemd/80-can0.network",
    "systemd/60-vgw-obd.rules": "systemd/60-vgw-obd.rules",
    "systemd/vgw-sysusers.service": "systemd/vgw-sysusers.service",
    "systemd/vgw.sysusers": "systemd/vgw.sysusers",
    "systemd/80-vgw.preset": "systemd/80-vgw.preset",
    "dbc/vehicle.dbc": "dbc/vehicle.dbc",
    "dbc/signals.toml": "dbc/signals.toml",
    "docs/install-raspberry-pi.md": "docs/install-raspberry-pi.md",
}


class BuildError(Exception):
    """The bundle cannot be built; the message is the one line shown to the user."""


def project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def platform_args(arch: str) -> list[str]:
    """pip's --platform list for a glibc Linux ``arch``: every manylinux tag the target can run.

    pip does not widen one manylinux tag to the older ones, so each is named (PEP 600 ``manylinux_2_x``
    plus the PEP 599 alias ``manylinux2014``, which is 2.17).
    """
    first = 31 if arch == "armv7l" else 17  # PEP 600 armv7l wheels start at glibc 2.31
    args = [f"--platform=manylinux_2_{minor}_{arch}" for minor in range(first, GLIBC_MAX_MINOR + 1)]
    if arch != "armv7l":
        args.append(f"--platform=manylinux2014_{arch}")
    return args


def _pip(args: list[str], *, env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.startswith("ERROR")]
        missing = sorted(set(re.findall(r"no matching distributions? available for your environment:\s*(\S+)",
                                        proc.stderr + proc.stdout)))
        text = "; ".join(lines[:2]) or (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        if missing:
            raise BuildError(f"PyPI has no wheel of {', '.join(missing)} for this target; build it on such a device "
                             f"(pip wheel {' '.join(missing)}) and pass the folder with --wheels DIR")
        raise BuildError(f"pip {args[0]} failed: {text}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build(arch: str, out: Path, *, cache: Path | None = None, extra_wheels: Path | None = None) -> Path:
    """Build the bundle for ``arch`` ("host" or a key of TARGETS) into ``out``; return the archive path.

    ``cache`` keeps downloaded wheels between builds (tests build once per session). Raises BuildError.
    """
    host = arch == "host"
    target = platform.machine() if host else TARGETS.get(arch)
    if target is None:
        raise BuildError(f"--arch {arch!r}: choose one of host, {', '.join(sorted(set(TARGETS.values())))}")
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}" if host else "3.11"
    version = project_version()
    name = f"vgw-bundle-{version}-{target}"
    # The caller's pip config (an extra index, a local wheel folder) must not change what the car gets.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if os.environ.get("PIP_CERT"):
        env["PIP_CERT"] = os.environ["PIP_CERT"]

    with tempfile.TemporaryDirectory(prefix="vgw-bundle-") as tmp:
        stage = Path(tmp) / name
        wheels = stage / "wheels"
        wheels.mkdir(parents=True)
        # the car's distribution: the agent without the simulators (agent/pyproject.toml), built from a copy so
        # that no build folder is left in the checkout and two builds at once do not share one
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "agent", src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build",
                                                                           "*.egg-info"))
        _pip(["wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(src)],
             env=env)
        own = next(wheels.glob("vgw-*.whl"))
        fetch = ["download", "--only-binary=:all:", "--dest", str(wheels)]
        if not host:
            fetch += [*platform_args(target), f"--python-version={pyver}", "--implementation=cp"]
        if extra_wheels is not None:
            fetch += ["--find-links", str(extra_wheels)]
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            fetch += ["--find-links", str(cache)]
        _pip([*fetch, str(own), "pip"], env=env)
        if cache is not None:
            for whl in wheels.glob("*.whl"):
                if whl != own and not (cache / whl.name).exists():
                    shutil.copy2(whl, cache / whl.name)

        for dest, src in SHARE.items():
            (stage / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / src, stage / dest)
        shutil.copy2(ROOT / "packaging" / "install.sh", stage / "install.sh")
        os.chmod(stage / "install.sh", 0o755)  # noqa: S103 - an executable script, not a secret
        lines = [f"vgw {version}", f"arch {target}", f"python {pyver}"]
        lines += [f"sha256 {_sha256(w)} {w.name}" for w in sorted(wheels.glob("*.whl"))]
        (stage / "BUNDLE.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

        out.mkdir(parents=True, exist_ok=True)
        archive = out / f"{name}.tar.gz"
        tmp_archive = archive.with_name(f".{archive.name}.tmp")
        with tarfile.open(tmp_archive, "w:gz") as tar:
            tar.add(stage, arcname=name)
        os.replace(tmp_archive, archive)
    return archive


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the offline install bundle (all wheels for the target).")
    p.add_argument("--arch", default="aarch64",
                   help="target: aarch64 (default, Pi OS 64-bit), armv7l (Pi OS 32-bit) or host")
    p.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default dist/)")
    p.add_argument("--cache", type=Path, help="folder that keeps downloaded wheels between builds")
    p.add_argument("--wheels", type=Path, help="extra wheels built on the target (for packages PyPI lacks)")
    args = p.parse_args(argv)
    try:
        print(build(args.arch, args.out, cache=args.cache, extra_wheels=args.wheels))
    except BuildError as exc:
        print(f"vgw bundle --arch {args.arch}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
