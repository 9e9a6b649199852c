"""Automatic certificate renewal and device revocation (README "Enrollment"), end to end: the real agent,
`vgw cloud enroll serve`, mosquitto with the deploy ACL (and a CRL), the cloud peer counting every seq."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from vgw_sim.broker import Mosquitto, device_acl
from vgw_sim.pki import TestPKI

from tests.agentkit import AgentThread, Authority, vgw, wait_until, write_config
from tests.enrollkit import claim_identity, device_config, enroll_args, enroll_service, write_allow


@pytest.fixture(scope="module")
def pki() -> Iterator[TestPKI]:
    """A CA valid for years (the session's lives 30 days: a renewed certificate could not outlast the window)."""
    root = Path(tempfile.mkdtemp(prefix="vgw-pki-renew-"))
    os.chmod(root, 0o755)  # noqa: S103 - mosquitto (its own user) reads it
    try:
        yield TestPKI(root / "pki", devices=["dev-0001"], days=3650)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def auth(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def near_expiry_config(tmp: Path, pki, broker: Mosquitto, trust: Path, device: str, channel: str) -> Path:
    """A config for ``device`` whose certificate (issued by the CA, like a manually provisioned one) expires in
    two days, with renew_before_days = 30; its key and certificate are copies the renewal may replace."""
    now = dt.datetime.now(dt.UTC)
    pair = pki.client_cert(device, name=f"{device}-near", not_after=now + dt.timedelta(days=2))
    home = tmp / device
    home.mkdir()
    shutil.copy(pair.cert, home / "device.crt")
    shutil.copy(pair.key, home / "device.key")
    (home / "device.key").chmod(0o600)
    cfg = write_config(home, pki, broker.port, trust, device=device, can={"channel": channel},
                       mqtt_extra={"renew_before_days": 30})
    text = cfg.read_text().replace(f'cert_file = "{pki.device(device).cert}"', f'cert_file = "{home / "device.crt"}"')
    cfg.write_text(text.replace(f'key_file = "{pki.device(device).key}"', f'key_file = "{home / "device.key"}"'))
    return cfg


def not_after(path: Path) -> dt.datetime:
    return x509.load_pem_x509_certificates(path.read_bytes())[0].not_valid_after_utc


def status(cfg: Path) -> dict:
    r = vgw("status", "--config", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_certificate_near_expiry_is_renewed_under_load_with_a_new_key_and_no_seq_gap(
        tmp_path: Path, pki, broker: Mosquitto, cloud, auth: Authority, channel: str, vehicle) -> None:
    device = "dev-r01"
    allow = write_allow(tmp_path / "allow.toml", {device: "tok-r01-secret"})
    cfg = near_expiry_config(tmp_path, pki, broker, auth.trust, device, channel)
    home = tmp_path / device
    installed = ((home / "device.key").read_bytes(), (home / "device.crt").read_bytes())
    old_end = not_after(home / "device.crt")
    # The renewed pair lives in the state directory, the one folder the hardened unit lets the agent write.
    renewed = tmp_path / device / "state" / "identity"
    cloud.add_recipient("g-speed", auth.recipient("g-speed"))
    with enroll_service(tmp_path, pki, broker, allow) as service, AgentThread(cfg) as runner:
        assert runner.wait_link(30)
        cloud.publish_consent(device, auth.doc(device, {"g-speed": ["read_speedometer"]}))
        assert cloud.wait_for(lambda: len(cloud.batches(device, "g-speed")) >= 3, 30)
        # Renewed within seconds, while the vehicle keeps the pipeline busy.
        assert wait_until(lambda: (renewed / "device.crt").exists()
                          and not_after(renewed / "device.crt") > old_end + dt.timedelta(days=300), 60), \
            runner.agent.renewal.view()
        assert (renewed / "device.key").read_bytes() != installed[0], "renewal makes a new key"
        assert stat.S_IMODE((renewed / "device.key").stat().st_mode) == 0o600
        assert not (renewed / "device.key.new").exists() and not (renewed / "device.crt.new").exists()
        new_cert = x509.load_pem_x509_certificates((renewed / "device.crt").read_bytes())[0]
        new_key = load_pem_private_key((renewed / "device.key").read_bytes(), None)
        assert new_cert.public_key() == new_key.public_key()
        # The link came back with the new pair, and data keep flowing over it.
        up = runner.agent.uplink
        assert wait_until(lambda: up.view().state == "connected" and up.view().connects >= 2, 30)
        count = len(cloud.batches(device, "g-speed"))
        assert cloud.wait_for(lambda: len(cloud.batches(device, "g-speed")) >= count + 3, 30)
        # vgw status reads what the agent last wrote (every few seconds): wait for the write after the swap.
        assert wait_until(lambda: status(cfg)["certificate"]["state"] == "valid", 30), status(cfg)["certificate"]
        assert status(cfg)["certificate"]["not_after"] == new_cert.not_valid_after_utc.timestamp()
        records = [json.loads(line) for line in service.ledger.read_text().splitlines()]
        assert [(r["kind"], r["device"]) for r in records] == [("renew", device)]
        # Receipts after the swap are signed with the new key.
        cloud.add_device(device, renewed / "device.crt")
        cloud.publish_consent(device, auth.doc(device, {"g-speed": ["read_speedometer", "read_odometer"]}))
        assert cloud.wait_for(lambda: any(r.claims.get("ver") == auth.ver
                                          for r in cloud.receipts(device, "consent-applied")), 30)
    assert ((home / "device.key").read_bytes(), (home / "device.crt").read_bytes()) == installed  # untouched
    doctor = vgw("doctor", "--config", str(cfg)).stdout
    assert f"{renewed / 'device.crt'} valid until" in doctor, doctor
    # No sample lost, no seq gap across the swap.
    seqs = cloud.seqs(device, "g-speed")
    assert cloud.missing(device, "g-speed") == [] and sorted(set(seqs)) == list(range(1, max(seqs) + 1))
    audit = tmp_path / device / "state" / "audit.log"
    events = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
    assert events.count("certificate-renewed") == 1


def test_renewal_refused_keeps_the_old_certificate_and_status_says_so(
        tmp_path: Path, pki, broker: Mosquitto, cloud, auth: Authority, channel: str, vehicle) -> None:
    device = "dev-r02"
    allow = write_allow(tmp_path / "allow.toml", {"dev-other": "tok-other-secret"})  # dev-r02 is not known here
    cfg = near_expiry_config(tmp_path, pki, broker, auth.trust, device, channel)
    home = tmp_path / device
    before = ((home / "device.key").read_bytes(), (home / "device.crt").read_bytes())
    cloud.add_recipient("g-speed", auth.recipient("g-speed"))
    with enroll_service(tmp_path, pki, broker, allow), AgentThread(cfg) as runner:
        assert runner.wait_link(30)
        cloud.publish_consent(device, auth.doc(device, {"g-speed": ["read_speedometer"]}))
        assert wait_until(lambda: status(cfg)["certificate"]["state"] == "refused", 60)
        st = status(cfg)
        assert "not-enrolled" in st["certificate"]["last_error"] and st["certificate"]["attempts"] >= 1
        text = vgw("status", "--config", str(cfg)).stdout
        assert "RENEWAL FAILING" in text and "not-enrolled" in text
        doctor = vgw("doctor", "--config", str(cfg)).stdout
        assert "renewal failing" in doctor
        # Still running on the old certificate: connected, collecting, publishing.
        count = len(cloud.batches(device, "g-speed"))
        assert cloud.wait_for(lambda: len(cloud.batches(device, "g-speed")) >= count + 3, 30)
        assert runner.agent.uplink.view().state == "connected"
    assert ((home / "device.key").read_bytes(), (home / "device.crt").read_bytes()) == before
    renewed = home / "state" / "identity"
    assert not renewed.exists() or not any(renewed.iterdir())  # nothing staged is left behind


def test_revoked_device_is_refused_by_the_broker(tmp_path: Path, pki, auth: Authority) -> None:
    ca = ["--ca-cert", str(pki.ca.cert), "--ca-key", str(pki.ca.key)]
    # In the PKI's folder: a root-started mosquitto reads the CRL as its own user (pytest's tmp is 0700).
    ledger, crl = tmp_path / "ledger.jsonl", pki.dir / "crl.pem"
    r = vgw("cloud", "enroll", "revoke", *ca, "--ledger", str(ledger), "--crl", str(crl))  # the first, empty CRL
    assert r.returncode == 0, r.stderr
    broker = Mosquitto.from_pki(pki, acl=device_acl(), extra_config=f"crlfile {crl}")
    try:
        broker.start()
        allow = write_allow(tmp_path / "allow.toml", {"dev-v01": "tok-v01-secret", "dev-v02": "tok-v02-secret"})
        cfgs = {d: device_config(tmp_path, pki, broker, auth.trust, d) for d in ("dev-v01", "dev-v02")}
        with enroll_service(tmp_path, pki, broker, allow):
            for d, cfg in cfgs.items():
                assert vgw(*enroll_args(cfg, claim_identity(pki), f"tok-{d[4:]}-secret")).returncode == 0
        r = vgw("cloud", "enroll", "revoke", *ca, "--ledger", str(ledger), "--crl", str(crl), "dev-v01")
        assert r.returncode == 0, r.stderr
        assert "revoked dev-v01: 1 certificate(s)" in r.stdout
        revoked = x509.load_pem_x509_crl(crl.read_bytes())
        serial = int(json.loads(ledger.read_text().splitlines()[0])["serial"], 16)
        assert revoked.get_revoked_certificate_by_serial_number(serial) is not None
        broker.restart()  # the broker loads the new CRL
        with AgentThread(cfgs["dev-v01"]) as revoked_agent, AgentThread(cfgs["dev-v02"]) as other:
            assert other.wait_link(30), other.agent.uplink.view().last_error  # the CRL takes only the revoked one
            up = revoked_agent.agent.uplink
            assert wait_until(lambda: up.view().connect_attempts >= 2 and up.view().last_error is not None, 30)
            assert up.view().connects == 0
            assert "certificate_revoked" in up.view().last_error, up.view().last_error
    finally:
        broker.close()


def test_a_swap_cut_short_by_a_crash_is_finished_at_the_next_start(tmp_path: Path, pki, broker: Mosquitto,
                                                                    auth: Authority, channel: str) -> None:
    """The agent died between renaming the new key and the new certificate into place: the next start finishes
    the swap (the staged certificate belongs to the key now in place), audits it, and connects with the pair."""
    device = "dev-r03"
    cfg = near_expiry_config(tmp_path, pki, broker, auth.trust, device, channel)
    renewed = tmp_path / device / "state" / "identity"
    renewed.mkdir(parents=True, mode=0o700)
    (tmp_path / device / "state").chmod(0o700)
    fresh = pki.client_cert(device, name=f"{device}-fresh")  # the "renewed" pair the service had issued
    shutil.copy(fresh.key, renewed / "device.key")
    (renewed / "device.key").chmod(0o600)
    shutil.copy(fresh.cert, renewed / "device.crt.new")
    with AgentThread(cfg) as runner:
        assert runner.wait_link(30), runner.agent.uplink.view().last_error
        assert (renewed / "device.crt").read_bytes() == fresh.cert.read_bytes()
        assert not (renewed / "device.crt.new").exists()
    events = [json.loads(line) for line in (tmp_path / device / "state" / "audit.log").read_text().splitlines()]
    assert any(e["event"] == "certificate-swap-recovered" for e in events)


def test_a_certificate_installed_after_the_renewal_wins(tmp_path: Path, pki, broker: Mosquitto, auth: Authority,
                                                        channel: str) -> None:
    """Enrolled again (or --install-cert) after a renewal: the newer installed pair is used, not the renewed one."""
    device = "dev-r04"
    cfg = near_expiry_config(tmp_path, pki, broker, auth.trust, device, channel)
    home = tmp_path / device
    renewed = home / "state" / "identity"
    renewed.mkdir(parents=True)
    old = pki.client_cert(device, name=f"{device}-renewed-earlier",
                          not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    shutil.copy(old.cert, renewed / "device.crt")
    shutil.copy(old.key, renewed / "device.key")
    newer = pki.client_cert(device, name=f"{device}-installed-later")
    shutil.copy(newer.cert, home / "device.crt")
    shutil.copy(newer.key, home / "device.key")
    st = status(cfg)
    assert st["certificate"]["not_after"] == not_after(newer.cert).timestamp()
    assert f"{home / 'device.crt'} valid until" in vgw("doctor", "--config", str(cfg)).stdout


def test_a_renewed_certificate_from_another_ca_is_not_installed(tmp_path: Path, pki, broker: Mosquitto, cloud,
                                                                 auth: Authority, channel: str, vehicle) -> None:
    """The service signs with the wrong CA: the device's check (chain to [mqtt] ca_file) refuses the answer, keeps
    its pair, says why in `vgw status`, and keeps publishing."""
    device = "dev-r05"
    allow = write_allow(tmp_path / "allow.toml", {device: "tok-r05-secret"})
    cfg = near_expiry_config(tmp_path, pki, broker, auth.trust, device, channel)
    rogue = pki.other_ca("rogue-renewal")
    cloud.add_recipient("g-speed", auth.recipient("g-speed"))
    with enroll_service(tmp_path, pki, broker, allow, signing_ca=rogue), AgentThread(cfg) as runner:
        assert runner.wait_link(30)
        cloud.publish_consent(device, auth.doc(device, {"g-speed": ["read_speedometer"]}))
        assert wait_until(lambda: status(cfg)["certificate"]["state"] == "failed", 60)
        assert "does not chain to the CA" in status(cfg)["certificate"]["last_error"]
        count = len(cloud.batches(device, "g-speed"))
        assert cloud.wait_for(lambda: len(cloud.batches(device, "g-speed")) >= count + 3, 30)
    renewed = tmp_path / device / "state" / "identity"
    assert not renewed.exists() or not any(renewed.iterdir())


def test_a_device_revoked_while_the_service_runs_is_refused_renewal(tmp_path: Path, pki, broker: Mosquitto,
                                                                     auth: Authority) -> None:
    """Where the broker has no CRL (NATS), the service itself refuses a revoked device: `revoke` run next to a
    running service counts at its next request."""
    device = "dev-r06"
    allow = write_allow(tmp_path / "allow.toml", {device: "tok-r06-secret"})
    # renew_before_days longer than the certificate's life: the renewal is due at once.
    cfg = device_config(tmp_path, pki, broker, auth.trust, device, mqtt_extra={"renew_before_days": 400})
    with enroll_service(tmp_path, pki, broker, allow) as service:
        assert vgw(*enroll_args(cfg, claim_identity(pki), "tok-r06-secret")).returncode == 0
        r = vgw("cloud", "enroll", "revoke", "--ca-cert", str(pki.ca.cert), "--ca-key", str(pki.ca.key),
                "--ledger", str(service.ledger), "--crl", str(tmp_path / "crl.pem"), device)
        assert r.returncode == 0, r.stderr
        with AgentThread(cfg) as runner:
            assert runner.wait_link(30)
            assert wait_until(lambda: status(cfg)["certificate"]["state"] == "refused", 60), \
                runner.agent.renewal.view()
            assert "revoked" in status(cfg)["certificate"]["last_error"]


def test_a_certificate_renewed_in_the_second_it_was_installed_is_the_one_in_use(tmp_path: Path, pki) -> None:
    """X.509 times have one-second grain: a renewal right after provisioning (a fast machine) gets the same
    notBefore as the installed certificate. The longer-lived, renewed one must be used; choosing the installed
    one made the agent see its old expiry and ask again for ever (status stayed "due")."""
    from vgw.state.credentials import device_credentials, renewed_pair

    issued = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=5)
    near = pki.client_cert("dev-tie", name="dev-tie-near", not_before=issued, not_after=issued + dt.timedelta(days=2))
    later = pki.client_cert("dev-tie", name="dev-tie-new", not_before=issued, not_after=issued + dt.timedelta(days=365))
    state = tmp_path / "state"
    cert, key = renewed_pair(state)
    cert.parent.mkdir(parents=True)
    shutil.copy(later.cert, cert)
    shutil.copy(later.key, key)
    assert device_credentials(near.cert, near.key, state) == (cert, key)
    # The same certificate installed again (same times) is the installed one, as before.
    assert device_credentials(later.cert, later.key, state) == (later.cert, later.key)
