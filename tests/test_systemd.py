"""The systemd/ companions: the agent unit is valid and hardened (exposure <= 2.0 by systemd's own measure),
can0 comes from networkd, USB OBD adapters go to the vgw group."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "vgw-agent.service"
MAX_EXPOSURE = 2.0

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed")


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order; repeated keys stay separate, as systemd reads them."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(path: Path, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in directives(path) if s == section and k == key]


@needs_analyze
def test_exposure_score_at_most_2() -> None:
    proc = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(UNIT)], capture_output=True,
                          text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout + proc.stderr)
    assert m, f"no exposure line in systemd-analyze output:\n{proc.stdout}\n{proc.stderr}"
    assert float(m.group(1)) <= MAX_EXPOSURE, proc.stdout


@needs_analyze
@pytest.mark.parametrize("name", ["vgw-agent.service", "vgw-vcan.service", "vgw-sysusers.service",
                                  "vgw-enroll.service"])
def test_units_verify(tmp_path: Path, name: str) -> None:
    """`systemd-analyze verify`, with ExecStart pointing at this checkout's vgw (the unit names /opt/vgw)."""
    text = (SYSTEMD / name).read_text()
    vgw = ROOT / ".venv" / "bin" / "vgw"
    if not vgw.exists():
        vgw = Path(shutil.which("vgw") or "/bin/true")
    (tmp_path / name).write_text(text.replace("/opt/vgw/venv/bin/vgw", str(vgw)))
    proc = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / name)], capture_output=True, text=True,
                          timeout=60, check=False)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and name not in out:
        pytest.skip(f"systemd-analyze verify cannot run here: {out.strip()[:200]}")
    for binary in re.findall(r"Command (\S+) is not executable", out):
        if binary in ("/sbin/modprobe",):  # kmod is not in every container; "-" makes it optional anyway
            continue
        pytest.fail(out)
    assert not [ln for ln in out.splitlines() if name in ln and "is not executable" not in ln], out


def test_agent_unit_hardening_directives() -> None:
    def one(key: str) -> str:
        found = values(UNIT, key)
        assert len(found) == 1, f"{key}: {found}"
        return found[0]

    assert one("Type") == "notify"
    assert one("WatchdogSec")
    assert one("ExecStart") == "/opt/vgw/venv/bin/vgw run --config /etc/vgw/vgw.toml"
    assert one("Restart") == "on-failure"
    assert one("User") == "vgw"
    assert one("StateDirectory") == "vgw"
    assert one("StateDirectoryMode") == "0700"
    assert one("UMask") == "0077"
    assert one("CapabilityBoundingSet") == ""
    assert one("AmbientCapabilities") == ""
    assert one("RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6", "AF_CAN"]
    assert one("DevicePolicy") == "closed"
    assert sorted(values(UNIT, "DeviceAllow")) == ["char-ttyACM rw", "char-ttyUSB rw"]
    assert "@system-service" in values(UNIT, "SystemCallFilter")
    assert one("LimitCORE") == "0"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname", "RestrictNamespaces",
                "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute"):
        assert one(key) == "yes", key
    assert one("ProtectSystem") == "strict"
    assert one("ProtectProc") == "invisible"
    assert one("ProcSubset") == "pid"
    assert one("SystemCallArchitectures") == "native"
    # Things that would break the agent: device access through the vgw group, a remote broker.
    assert not values(UNIT, "PrivateUsers") and not values(UNIT, "PrivateDevices")
    assert not values(UNIT, "IPAddressDeny") and not values(UNIT, "PrivateNetwork")
    assert values(UNIT, "WantedBy", "Install") == ["multi-user.target"]


def test_can0_network() -> None:
    net = SYSTEMD / "80-can0.network"
    assert values(net, "Name", "Match") == ["can0"]
    assert values(net, "BitRate", "CAN") == ["500K"]
    assert values(net, "RequiredForOnline", "Link") == ["no"]
    assert "#ListenOnly=yes" in net.read_text()  # the listen-only option, off by default


_UDEV_KEY = re.compile(r'\s*([A-Z_]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|=)\s*"([^"]*)"\s*,?')


def udev_apply(rules_file: Path, dev: dict[str, str]) -> dict[str, object]:
    """What udev does with one tty event, for the subset of the rules syntax our file uses (udev(7)): match
    keys (== and != with shell globs), GROUP/MODE/SYMLINK assignments with ``%n``/``%k``/``$env{}``
    substitution, GOTO and LABEL. IMPORT{builtin} is given as ``dev``'s ID_* properties."""
    from fnmatch import fnmatchcase

    lines = [ln.strip() for ln in rules_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    result: dict[str, object] = {"SYMLINK": []}

    def value(key: str, attr: str | None) -> str:
        if key == "ENV":
            return dev.get(attr or "", "")
        return dev.get(f"{key}{{{attr}}}" if attr else key, "")

    def subst(text: str) -> str:
        text = text.replace("%n", dev["NUMBER"]).replace("%k", dev["KERNEL"])
        return re.sub(r"\$env\{([^}]*)\}", lambda m: dev.get(m.group(1), ""), text)

    i = 0
    while i < len(lines):
        keys = [(m.group(1), m.group(2), m.group(3), m.group(4)) for m in _UDEV_KEY.finditer(lines[i])]
        assert keys, f"unparsed udev line: {lines[i]}"
        i += 1
        if keys[0][0] == "LABEL":
            continue
        matched = all((fnmatchcase(value(k, a), v) if op == "==" else not fnmatchcase(value(k, a), v))
                      for k, a, op, v in keys if op in ("==", "!="))
        if not matched:
            continue
        for k, _attr, op, v in keys:
            if k == "SYMLINK" and op == "+=":
                result["SYMLINK"].append(subst(v))  # type: ignore[attr-defined]
            elif k in ("GROUP", "MODE") and op == "=":
                result[k] = v
            elif k == "GOTO":
                i = next(j for j, ln in enumerate(lines) if ln == f'LABEL="{v}"')
    return result


def adapter(kernel: str, vendor: str = "1a86", serial: str = "", port: str = "1.3") -> dict[str, str]:
    dev = {"SUBSYSTEM": "tty", "SUBSYSTEMS": "usb", "KERNEL": kernel, "NUMBER": re.sub(r"\D", "", kernel),
           "ATTRS{idVendor}": vendor, "ID_PATH_TAG": f"platform-fd500000_pcie-usb-0_{port.replace('.', '_')}_1_0"}
    if serial:
        dev["ID_SERIAL_SHORT"] = serial
    return dev


def test_udev_rule_gives_usb_serial_adapters_to_vgw() -> None:
    rules = SYSTEMD / "60-vgw-obd.rules"
    for vendor in ("0403", "1a86", "10c4", "067b"):  # FTDI (also OBDLink), CH340, CP210x, PL2303
        got = udev_apply(rules, adapter("ttyUSB0", vendor))
        assert got["GROUP"] == "vgw" and got["MODE"] == "0660", vendor
        assert "vgw-obd" in got["SYMLINK"], vendor  # type: ignore[operator]
    other = udev_apply(rules, adapter("ttyUSB0", "2341"))  # an Arduino: not ours
    assert other == {"SYMLINK": []}
    not_usb = udev_apply(rules, adapter("ttyS0", "0403") | {"SUBSYSTEMS": "platform"})
    assert not_usb == {"SYMLINK": []}
    lines = [ln for ln in rules.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith('SUBSYSTEM!="tty"')  # only serial ttys, never the USB device node
    udevadm = shutil.which("udevadm")
    if udevadm and subprocess.run([udevadm, "verify", "--help"], capture_output=True, check=False).returncode == 0:
        proc = subprocess.run([udevadm, "verify", str(rules)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("serial", "stable"), [("A50285BI", "vgw-obd-A50285BI"), ("", "vgw-obd-platform-")])
def test_udev_names_survive_replugging_and_reordering(serial: str, stable: str) -> None:
    """The rule's SYMLINK+="vgw-obd%n" named the adapter after the kernel's number: ttyUSB1 -> /dev/vgw-obd1
    once another USB serial device came first, so the configured /dev/vgw-obd0 was gone."""
    rules = SYSTEMD / "60-vgw-obd.rules"
    first = udev_apply(rules, adapter("ttyUSB0", "0403", serial))
    replugged = udev_apply(rules, adapter("ttyUSB1", "0403", serial))  # a GPS dongle took ttyUSB0 this boot
    assert first["SYMLINK"] == replugged["SYMLINK"]
    assert first["SYMLINK"][0] == "vgw-obd"  # type: ignore[index]
    assert any(link.startswith(stable) for link in first["SYMLINK"])  # type: ignore[attr-defined]
    # The default the config is written with (vgw provision --source obd) is the fixed name.
    from vgw.ops.provisioning import DEFAULT_OBD_PORT
    assert DEFAULT_OBD_PORT == "/dev/vgw-obd"


@pytest.mark.parametrize(("vendor", "product"), [("16d0", "117e"), ("04d8", "000a")])  # CANable slcan, USBtin
def test_udev_rule_gives_ttyacm_slcan_adapters_a_group_the_agent_is_in(vendor: str, product: str) -> None:
    """A CANable (slcan firmware) or USBtin is a ttyACM device; the rule gave it no group the agent is in, so
    the agent (User=vgw) logged `Permission denied` on it."""
    rules = SYSTEMD / "60-vgw-obd.rules"
    got = udev_apply(rules, adapter("ttyACM0", vendor, "205A32A5") | {"ATTRS{idProduct}": product})
    agent_groups = set(values(UNIT, "Group")) | {g for v in values(UNIT, "SupplementaryGroups") for g in v.split()}
    assert got.get("GROUP") in agent_groups and got.get("MODE") == "0660", got
    assert {"vgw-slcan", "vgw-slcan-205A32A5"} <= set(got["SYMLINK"]), got  # type: ignore[call-overload]
    assert "vgw-obd" not in got["SYMLINK"]  # type: ignore[operator]
    assert not [x for x in udev_apply(rules, adapter("ttyUSB0", "0403"))["SYMLINK"]  # type: ignore[attr-defined]
                if x.startswith("vgw-slcan")]  # an OBD adapter is no SLCAN adapter
    # A modem or an Arduino on ttyACM is not ours.
    assert udev_apply(rules, adapter("ttyACM0", "2341") | {"ATTRS{idProduct}": "0043"}) == {"SYMLINK": []}
