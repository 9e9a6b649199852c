"""`vgw provision`: identity key, CSR, storage key, state dir and config in a temp dir; then --install-cert."""

from __future__ import annotations

import datetime as dt
import os
import pwd
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from vgw.base.errors import ConfigError
from vgw.cli import main
from vgw.config.settings import load_config
from vgw.ops.provisioning import parse_broker
from vgw.pipeline.catalogue import load_catalogue
from vgw_sim.cloud import SigningKey
from vgw_sim.pki import TestPKI

ROOT = Path(__file__).resolve().parents[1]


def free_uid(start: int = 54321) -> int:
    """A uid (and gid of the same number) that no passwd entry names."""
    uid = start
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


# The account the agent runs as, in every test: a uid without a passwd entry, so a host that has a `vgw`
# user (a developer's Pi after `make install`) runs the same tests as one that has none.
SERVICE = free_uid()
SERVICE_USER = ["--service-user", f"{SERVICE}:{SERVICE}"]


def sign_csr(csr_path: Path, pki: TestPKI, *, days: int = 90, cn: str | None = None,
             ca_key: Path | None = None, ca_cert: Path | None = None) -> bytes:
    """What the cloud CA does with the CSR: a client certificate for the CSR's key."""
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    key = serialization.load_pem_private_key((ca_key or pki.ca.key).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    issuer = x509.load_pem_x509_certificate((ca_cert or pki.ca.cert).read_bytes())
    now = dt.datetime.now(dt.UTC)
    subject = csr.subject if cn is None else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.subject)
               .public_key(csr.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if cn is None:
        builder = builder.add_extension(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value,
                                        critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def install_signed_cert(out: Path, pki: TestPKI, work: Path) -> Path:
    """Sign ``out``'s CSR as the cloud CA would and `vgw provision --install-cert` it; returns the certificate file."""
    signed = work / "signed.crt"
    signed.write_bytes(sign_csr(out / "device.csr", pki))
    assert main(["provision", "--install-cert", str(signed), "--out", str(out)]) == 0
    return signed


@pytest.fixture
def inputs(tmp_path: Path, pki: TestPKI) -> dict[str, Path]:
    consent_key = SigningKey.generate().write_public_pem(tmp_path / "signer.pub.pem")
    return {"ca": pki.ca.cert, "consent_key": consent_key, "out": tmp_path / "etc-vgw", "state": tmp_path / "state"}


def provision(inputs: dict[str, Path], *extra: str, device: str = "dev-0001", broker: str = "mqtt.example.com:8883"
              ) -> int:
    """`vgw provision` with the installer's own DBC and signal map (here: copies of the repo's) unless ``extra``
    names the source."""
    source = [] if any(a.startswith("--source") for a in extra) else [
        "--source", "can", "--dbc", str(ROOT / "dbc/vehicle.dbc"), "--signal-map", str(ROOT / "dbc/signals.toml")]
    return main(["provision", "--device-id", device, "--broker", broker, "--ca", str(inputs["ca"]),
                 "--consent-key", str(inputs["consent_key"]), "--out", str(inputs["out"]),
                 "--state-dir", str(inputs["state"]), *SERVICE_USER, *source, *extra])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_provision_creates_identity_keys_state_and_config(inputs: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(inputs) == 0
    out, state = inputs["out"], inputs["state"]
    printed = capsys.readouterr().out

    key_pem = (out / "device.key").read_bytes()
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert mode(out / "device.key") == 0o600
    csr = x509.load_pem_x509_csr((out / "device.csr").read_bytes())
    assert csr.is_signature_valid and csr.public_key() == key.public_key()
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-0001"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["dev-0001"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["vgw:device:dev-0001"]

    assert mode(state) == 0o700
    assert len((state / "storage.key").read_bytes()) == 32 and mode(state / "storage.key") == 0o600
    assert (out / "ca.pem").read_bytes() == inputs["ca"].read_bytes()
    assert (out / "consent-signer.pub.pem").read_bytes() == inputs["consent_key"].read_bytes()

    # Next steps are printed; no key material ever is.
    assert "Next steps" in printed and "--install-cert" in printed and "vgw doctor" in printed
    assert "PRIVATE KEY" not in printed and key_pem.decode().splitlines()[1] not in printed
    assert (state / "storage.key").read_bytes().hex() not in printed


def test_config_loads_once_the_certificate_is_installed(inputs: dict[str, Path], pki: TestPKI,
                                                        tmp_path: Path) -> None:
    assert provision(inputs, broker="broker.example.net:8884") == 0
    out = inputs["out"]
    with pytest.raises(ConfigError, match=r"device\.crt"):
        load_config(out / "vgw.toml")  # the only thing missing before install-cert
    signed = install_signed_cert(out, pki, tmp_path)
    assert (out / "device.crt").read_bytes() == signed.read_bytes()

    cfg = load_config(out / "vgw.toml")
    assert cfg.device.id == "dev-0001" and cfg.state_dir == inputs["state"]
    assert cfg.device.storage_key == inputs["state"] / "storage.key"
    assert cfg.can is not None and cfg.can.interface == "socketcan" and cfg.can.channel == "can0"
    assert cfg.can.dbc == (out / "vehicle.dbc",) and cfg.can.signal_map == out / "signals.toml"
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("broker.example.net", 8884)
    assert (cfg.mqtt.ca_file, cfg.mqtt.cert_file, cfg.mqtt.key_file) == (out / "ca.pem", out / "device.crt",
                                                                          out / "device.key")
    assert cfg.consent.trust_keys == (out / "consent-signer.pub.pem",)
    assert load_catalogue(cfg.can.dbc, cfg.can.signal_map).specs  # the shipped DBC and map load


def test_rerun_is_safe_and_keeps_keys(inputs: dict[str, Path], pki: TestPKI, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(inputs) == 0
    install_signed_cert(inputs["out"], pki, tmp_path)
    before = snapshot(inputs["out"]) | {"state/" + k: v for k, v in snapshot(inputs["state"]).items()}
    capsys.readouterr()

    assert provision(inputs) == 0  # identical re-run: nothing changes
    after = snapshot(inputs["out"]) | {"state/" + k: v for k, v in snapshot(inputs["state"]).items()}
    assert after == before
    assert "kept" in capsys.readouterr().out

    assert provision(inputs, broker="other.example.com") == 0  # a fix: config updated, keys and cert kept
    assert (inputs["out"] / "device.key").read_bytes() == before["device.key"]
    assert (inputs["out"] / "device.crt").read_bytes() == before["device.crt"]
    assert (inputs["state"] / "storage.key").read_bytes() == before["state/storage.key"]
    assert load_config(inputs["out"] / "vgw.toml").mqtt.host == "other.example.com"
    assert (inputs["out"] / "vgw.toml.bak").read_bytes() == before["vgw.toml"]


def test_another_identity_needs_force(inputs: dict[str, Path], pki: TestPKI, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(inputs) == 0
    install_signed_cert(inputs["out"], pki, tmp_path)
    before = snapshot(inputs["out"])
    capsys.readouterr()

    assert provision(inputs, device="dev-0002") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vgw.toml" in err and "--force" in err and "Traceback" not in err
    assert snapshot(inputs["out"]) == before  # a rejected run changes nothing

    assert provision(inputs, "--force", device="dev-0002") == 0
    assert (inputs["out"] / "device.key").read_bytes() != before["device.key"]
    assert mode(inputs["out"] / "device.key") == 0o600
    assert not (inputs["out"] / "device.crt").exists()  # the old certificate no longer matches: moved aside
    assert (inputs["out"] / "device.crt.old").read_bytes() == before["device.crt"]
    csr = x509.load_pem_x509_csr((inputs["out"] / "device.csr").read_bytes())
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-0002"


@pytest.mark.parametrize(("case", "needle"), [
    ("foreign", "does not match the device key"),
    ("other-ca", "does not chain to the CA"),
    ("other-id", "names device 'dev-9999'"),
    ("not-pem", "not a PEM certificate"),
])
def test_install_cert_checks(inputs: dict[str, Path], pki: TestPKI, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str], case: str, needle: str) -> None:
    assert provision(inputs) == 0
    out = inputs["out"]
    bad = tmp_path / "bad.crt"
    if case == "foreign":  # a valid certificate from the right CA, but for another key
        bad.write_bytes(pki.device("dev-0001").cert.read_bytes())
    elif case == "other-ca":
        rogue = pki.other_ca("rogue-provision")
        bad.write_bytes(sign_csr(out / "device.csr", pki, ca_key=rogue.ca.key, ca_cert=rogue.ca.cert))
    elif case == "other-id":
        bad.write_bytes(sign_csr(out / "device.csr", pki, cn="dev-9999"))
    else:
        bad.write_text("hello\n")
    capsys.readouterr()
    assert main(["provision", "--install-cert", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert needle in err and str(bad) in err and len(err.strip().splitlines()) == 1
    assert not (out / "device.crt").exists()


@pytest.mark.parametrize(("args", "needle"), [
    ({"broker": "host:99999"}, "--broker"),
    ({"broker": "bad host"}, "--broker"),
    ({"device": "dev/0001"}, "--device-id"),
    ({"ca": "consent_key"}, "--ca"),
    ({"consent_key": "ca"}, "consent trust key"),
])
def test_bad_input_is_one_line_and_writes_nothing(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                  args: dict[str, str], needle: str) -> None:
    if "ca" in args:
        inputs = inputs | {"ca": inputs[args["ca"]]}
    if "consent_key" in args:
        inputs = inputs | {"consent_key": inputs[args["consent_key"]]}
    rc = provision(inputs, device=args.get("device", "dev-0001"), broker=args.get("broker", "h.example:8883"))
    err = capsys.readouterr().err
    assert rc == 1 and needle in err and len(err.strip().splitlines()) == 1
    assert not inputs["out"].exists() and not inputs["state"].exists()


def test_usage_errors(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["provision", "--device-id", "dev-0001"])
    assert exc.value.code == 2 and "--broker" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["provision", "--install-cert", "x.crt", "--device-id", "dev-0001"])
    assert exc.value.code == 2


def test_refuses_a_broken_existing_key(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(inputs) == 0
    (inputs["out"] / "device.key").write_text("garbage\n")
    assert provision(inputs) == 1
    assert "device.key" in capsys.readouterr().err
    assert (inputs["out"] / "device.key").read_text() == "garbage\n"  # not silently replaced


def test_parse_broker() -> None:
    assert parse_broker("mqtt.example.com:8883") == ("mqtt.example.com", 8883)
    assert parse_broker("mqtt.example.com") == ("mqtt.example.com", 8883)
    assert parse_broker("10.0.0.2:1883") == ("10.0.0.2", 1883)
    assert parse_broker("[::1]:8883") == ("::1", 8883)
    for bad in ("", ":8883", "h:0", "h:x", "::1:8883", "[nope]:1", "a b:1"):
        with pytest.raises(ConfigError):
            parse_broker(bad)


def test_default_state_dir() -> None:
    from vgw.ops.provisioning import default_state_dir

    assert default_state_dir(Path("/etc/vgw")) == Path("/var/lib/vgw")
    assert default_state_dir(Path("/tmp/x")) == Path("/tmp/x/state")
    assert os.sep in str(default_state_dir(Path("rel")))


# -- the data source: CAN with the installer's DBC, OBD-II only, or both ------------------------------------


def test_obd_only_installer_gets_no_can_section(inputs: dict[str, Path], pki: TestPKI, tmp_path: Path) -> None:
    """An OBD-only installer got `[can] channel = "can0"` and the demo DBC, so `vgw doctor` said can0 not found."""
    assert provision(inputs, "--source", "obd") == 0
    out = inputs["out"]
    install_signed_cert(out, pki, tmp_path)
    cfg = load_config(out / "vgw.toml")
    assert cfg.can is None
    assert cfg.obd is not None and cfg.obd.port == "/dev/vgw-obd"
    assert not (out / "vehicle.dbc").exists() and not (out / "signals.toml").exists()
    from vgw.ops.doctor import Probes, run_checks
    lines = [f"{c.status} {c.check} {c.detail}" for c in run_checks(out / "vgw.toml", Probes())]
    assert not any("can0" in line for line in lines), lines


def test_both_sources_with_the_installers_own_files(inputs: dict[str, Path], pki: TestPKI, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "my-car.dbc").write_bytes((ROOT / "dbc/vehicle.dbc").read_bytes())
    (mine / "my-map.toml").write_bytes((ROOT / "dbc/signals.toml").read_bytes())
    assert provision(inputs, "--source", "both", "--dbc", str(mine / "my-car.dbc"), "--signal-map",
                     str(mine / "my-map.toml"), "--can-channel", "can1", "--obd-port", "/dev/ttyACM0") == 0
    assert "WARNING" not in capsys.readouterr().err
    out = inputs["out"]
    install_signed_cert(out, pki, tmp_path)
    cfg = load_config(out / "vgw.toml")
    assert cfg.can is not None and cfg.can.channel == "can1"
    assert cfg.can.dbc == (out / "my-car.dbc",) and cfg.can.signal_map == out / "my-map.toml"
    assert cfg.obd is not None and cfg.obd.port == "/dev/ttyACM0"


def test_no_source_off_a_terminal_is_a_usage_error(inputs: dict[str, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The old provision silently copied the demo car's DBC and wrote a CAN section."""
    with pytest.raises(SystemExit) as exc:
        main(["provision", "--device-id", "dev-0001", "--broker", "h.example", "--ca", str(inputs["ca"]),
              "--consent-key", str(inputs["consent_key"]), "--out", str(inputs["out"])])
    assert exc.value.code == 2
    assert "--source" in capsys.readouterr().err
    assert not inputs["out"].exists()
    with pytest.raises(SystemExit) as exc:
        provision(inputs, "--source", "can")  # CAN without the installer's DBC
    assert exc.value.code == 2 and "--dbc FILE" in capsys.readouterr().err
    assert not inputs["out"].exists()


def test_demo_dbc_only_on_request_and_loudly(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(inputs, "--source", "can", "--demo-dbc") == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "demo car's DBC" in err
    text = (inputs["out"] / "vgw.toml").read_text()
    assert "# DEMO DBC" in text
    assert (inputs["out"] / "vehicle.dbc").read_bytes() == (ROOT / "dbc/vehicle.dbc").read_bytes()


@pytest.mark.parametrize(("flags", "needle"), [
    (["--dbc", "missing.dbc", "--signal-map", "signals.toml"], "--dbc missing.dbc: file not found"),
    (["--dbc", "vehicle.dbc", "--signal-map", "bad-map.toml"], "bad-map.toml"),
])
def test_bad_dbc_or_map_is_one_line_and_writes_nothing(
        inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        flags: list[str], needle: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vehicle.dbc").write_bytes((ROOT / "dbc/vehicle.dbc").read_bytes())
    (tmp_path / "signals.toml").write_bytes((ROOT / "dbc/signals.toml").read_bytes())
    (tmp_path / "bad-map.toml").write_text('[[signal]]\nmessage = "NoSuchMessage"\nsignal = "X"\n'
                                           'path = "Vehicle.Speed"\nscope = "telemetry.speed"\n')
    assert provision(inputs, "--source", "can", *flags) == 1
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not inputs["out"].exists()


def _converse(argv: list[str], answers: list[tuple[str, str]], cwd: Path) -> tuple[int, str]:
    """Run `vgw provision` on a real pseudo-terminal; answer each prompt (waited for by its text)."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "vgw", *argv], stdin=slave, stdout=slave, stderr=slave,
                            cwd=cwd, close_fds=True)
    os.close(slave)
    seen = b""
    pending = list(answers)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            if pending and pending[0][0].encode() in seen:
                os.write(master, pending.pop(0)[1].encode() + b"\n")
            if proc.poll() is not None and not ready:
                break
        rc = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return rc, seen.decode(errors="replace")


def test_asks_for_the_source_on_a_terminal(inputs: dict[str, Path], tmp_path: Path) -> None:
    argv = ["provision", "--device-id", "dev-0001", "--broker", "h.example", "--ca", str(inputs["ca"]),
            "--consent-key", str(inputs["consent_key"]), "--out", str(inputs["out"]), "--state-dir",
            str(inputs["state"]), *SERVICE_USER]
    rc, screen = _converse(argv, [("Choose 1, 2 or 3", "7"), ("Please answer 1, 2 or 3", "1"),
                                  ("DBC file", str(ROOT / "dbc/vehicle.dbc")),
                                  ("signal map", str(ROOT / "dbc/signals.toml"))], ROOT)
    assert rc == 0, screen
    assert "Where does this device read the vehicle's data?" in screen and "(source: can)" in screen
    text = (inputs["out"] / "vgw.toml").read_text()
    assert "\n[can]\n" in text and "\n[obd]\n" not in text and "DEMO" not in text

    other = inputs["out"].parent / "etc-obd"
    argv[argv.index(str(inputs["out"]))] = str(other)
    rc, screen = _converse(argv, [("Choose 1, 2 or 3", "2")], ROOT)
    assert rc == 0, screen
    text = (other / "vgw.toml").read_text()
    assert "\n[obd]\n" in text and "\n[can]\n" not in text


def test_an_existing_config_that_is_a_fifo_is_one_line_not_a_hang(inputs: dict[str, Path],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Provision reads an existing config to see which device it was made for: the bounded way every config is
    read, so a FIFO there (or a link to /dev/zero) is one clear line instead of a hang."""
    import os
    import threading

    inputs["out"].mkdir(parents=True)
    os.mkfifo(inputs["out"] / "vgw.toml")
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(provision(inputs)), daemon=True)
    worker.start()
    worker.join(20)
    if not result:  # still blocked in open(): let it go by opening the FIFO's other end, then fail
        with open(inputs["out"] / "vgw.toml", "w"):
            pass
        worker.join(10)
        pytest.fail("vgw provision blocked on a FIFO config")
    assert result == [1]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vgw.toml" in err[0] and "not a regular file" in err[0], err
