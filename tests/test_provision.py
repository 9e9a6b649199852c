"""`vgw provision`: identity key, CSR, storage key, state dir and config in a temp dir; then --install-cert."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from vgw.catalogue import load_catalogue
from vgw.cli import main
from vgw.config import load_config
from vgw.errors import ConfigError
from vgw.provisioning import parse_broker
from vgw.simulators.cloud import SigningKey
from vgw.simulators.pki import TestPKI


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
    return main(["provision", "--device-id", device, "--broker", broker, "--ca", str(inputs["ca"]),
                 "--consent-key", str(inputs["consent_key"]), "--out", str(inputs["out"]),
                 "--state-dir", str(inputs["state"]), *extra])


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
    from vgw.provisioning import default_state_dir

    assert default_state_dir(Path("/etc/vgw")) == Path("/var/lib/vgw")
    assert default_state_dir(Path("/tmp/x")) == Path("/tmp/x/state")
    assert os.sep in str(default_state_dir(Path("rel")))
