"""Zero-touch enrollment (README "Enrollment"): `vgw enroll` on the device against `vgw cloud enroll serve`
over a real mosquitto with the deploy ACL: the claim identity can ask to enroll and nothing else."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from vgw.base.errors import UplinkError
from vgw.cloud.cloudlink import BrokerOptions, CloudLink
from vgw.contract.certs import cert_device_id
from vgw.contract.enrollment import build_csr, new_key
from vgw_sim.broker import Mosquitto

from tests.agentkit import ROOT, AgentThread, Authority, stop_process, vgw, wait_until
from tests.enrollkit import Service, claim_identity, device_config, enroll_args, enroll_service, write_allow


@pytest.fixture
def auth(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def _claim_link(pki, broker: Mosquitto, name: str = "claim-test") -> CloudLink:
    claim = claim_identity(pki)
    return CloudLink(BrokerOptions("127.0.0.1", broker.port, pki.ca.cert, claim.cert, claim.key, protocol="5",
                                   client_id=name)).connect()


def _ask(link: CloudLink, device: str, payload: bytes) -> dict[str, str]:
    """Publish ``payload`` as ``device``'s enrollment request over ``link`` and return the answer."""
    answers: list[bytes] = []
    link._on_message_cb = lambda _topic, body: answers.append(body)
    link.subscribe([(f"vgw/enroll/{device}/response", 1)])
    link.publish(f"vgw/enroll/{device}/request", payload, retain=False)
    assert wait_until(lambda: answers, 30), "no answer from the enrollment service"
    return json.loads(answers[0])


def test_enroll_happy_path_installs_a_working_identity_and_a_rerun_changes_nothing(
        tmp_path: Path, pki, broker: Mosquitto, auth: Authority) -> None:
    allow = write_allow(tmp_path / "allow.toml", {"dev-e01": "tok-e01-secret"})
    cfg = device_config(tmp_path, pki, broker, auth.trust, "dev-e01")
    key_path, cert_path = tmp_path / "dev-e01" / "device.key", tmp_path / "dev-e01" / "device.crt"
    with enroll_service(tmp_path, pki, broker, allow) as service:
        r = vgw(*enroll_args(cfg, claim_identity(pki), "tok-e01-secret"))
        assert r.returncode == 0, r.stderr
        assert "dev-e01: enrolled" in r.stdout
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert chain[0].public_key() == key.public_key()
        assert cert_device_id(chain[0]) == "dev-e01"
        chain[0].verify_directly_issued_by(x509.load_pem_x509_certificate(pki.ca.cert.read_bytes()))
        records = [json.loads(line) for line in service.ledger.read_text().splitlines()]
        assert [(r["event"], r["device"], r["kind"]) for r in records] == [("issued", "dev-e01", "enroll")]
        assert "tok-e01-secret" not in service.ledger.read_text()  # the ledger keeps a digest, not the token
        before = (key_path.read_bytes(), cert_path.read_bytes(), cert_path.stat().st_mtime_ns)

        again = vgw(*enroll_args(cfg, claim_identity(pki), "tok-e01-secret"))
        assert again.returncode == 0, again.stderr
        assert "already enrolled" in again.stdout
        assert (key_path.read_bytes(), cert_path.read_bytes(), cert_path.stat().st_mtime_ns) == before
        assert len(service.ledger.read_text().splitlines()) == 1
    # The installed identity is the device's: the agent connects with it under the per-device ACL.
    with AgentThread(cfg) as runner:
        assert runner.wait_link(30), runner.agent.uplink.view().last_error


def test_token_reused_by_another_key_is_refused(tmp_path: Path, pki, broker: Mosquitto, auth: Authority) -> None:
    allow = write_allow(tmp_path / "allow.toml", {"dev-e02": "tok-e02-secret"})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = device_config(tmp_path / "a", pki, broker, auth.trust, "dev-e02")
    second = device_config(tmp_path / "b", pki, broker, auth.trust, "dev-e02")
    with enroll_service(tmp_path, pki, broker, allow):
        assert vgw(*enroll_args(first, claim_identity(pki), "tok-e02-secret")).returncode == 0
        r = vgw(*enroll_args(second, claim_identity(pki), "tok-e02-secret"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "token-used" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b" / "dev-e02" / "device.crt").exists()


def test_device_not_in_the_allow_list_is_refused(tmp_path: Path, pki, broker: Mosquitto, auth: Authority) -> None:
    allow = write_allow(tmp_path / "allow.toml", {"dev-e03": "tok-e03-secret"})
    cfg = device_config(tmp_path, pki, broker, auth.trust, "dev-stranger")
    with enroll_service(tmp_path, pki, broker, allow) as service:
        r = vgw(*enroll_args(cfg, claim_identity(pki), "tok-e03-secret"))
        assert r.returncode == 1
        assert "unknown-device" in r.stderr
        assert service.ledger.read_text() == ""
    assert not (tmp_path / "dev-stranger" / "device.crt").exists()


def test_refusals_csr_for_another_id_wrong_token_garbage_oversized(tmp_path: Path, pki, broker: Mosquitto) -> None:
    allow = write_allow(tmp_path / "allow.toml", {"dev-e04": "tok-e04-secret", "dev-e05": "tok-e05-secret"})
    csr_other = build_csr(new_key(), "dev-e05").public_bytes(serialization.Encoding.PEM).decode()
    csr_own = build_csr(new_key(), "dev-e04").public_bytes(serialization.Encoding.PEM).decode()
    cases = [
        # dev-e04's token, but a CSR for dev-e05: a claim holder borrowing another device's identity
        (json.dumps({"csr": csr_other, "token": "tok-e04-secret"}).encode(), "subject"),
        (json.dumps({"csr": csr_own, "token": "tok-e05-secret"}).encode(), "token"),
        (b"\x00\xffnot json at all", "malformed"),
        (json.dumps({"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "token": "x" * 9}).encode(), "bad-csr"),
        (json.dumps({"csr": csr_own, "token": "tok-e04-secret", "pad": "x" * 17_000}).encode(), "too-large"),
    ]
    with enroll_service(tmp_path, pki, broker, allow) as service:
        link = _claim_link(pki, broker)
        try:
            for i, (payload, reason) in enumerate(cases):
                answer = _ask(link, "dev-e04", payload)
                assert answer["status"] == "refused", (reason, answer)
                assert answer["reason"].startswith(reason + ":"), (reason, answer)
                link.close()
                link = _claim_link(pki, broker, name=f"claim-test-{i}")
        finally:
            link.close()
        assert service.ledger.read_text() == ""  # nothing was issued
        # After all that, the real device with its own CSR still enrolls.
        link = _claim_link(pki, broker, name="claim-test-ok")
        try:
            answer = _ask(link, "dev-e04", json.dumps({"csr": csr_own, "token": "tok-e04-secret"}).encode())
        finally:
            link.close()
        assert answer["status"] == "issued"


def test_service_restarted_mid_way_still_answers_and_remembers_the_token(
        tmp_path: Path, pki, broker: Mosquitto, auth: Authority) -> None:
    allow = write_allow(tmp_path / "allow.toml", {"dev-e06": "tok-e06-secret"})
    cfg = device_config(tmp_path, pki, broker, auth.trust, "dev-e06")
    service = Service(tmp_path, pki, broker, allow)
    # The device asks while the service is down; the service comes up later and the device's repeat reaches it.
    device = subprocess.Popen([sys.executable, "-m", "vgw", *enroll_args(cfg, claim_identity(pki), "tok-e06-secret",
                                                                         timeout=90)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert wait_until(lambda: (tmp_path / "dev-e06" / "device.key").exists(), 30)
        time.sleep(1.0)  # the first request went out to nobody
        service.start()
        _out, err = device.communicate(timeout=90)
        assert device.returncode == 0, err
        # Restarted: the ledger is read back, and a second key with the same token is refused.
        service.stop()
        service.start()
        (tmp_path / "again").mkdir()
        other = device_config(tmp_path / "again", pki, broker, auth.trust, "dev-e06")
        r = vgw(*enroll_args(other, claim_identity(pki), "tok-e06-secret"))
        assert r.returncode == 1 and "token-used" in r.stderr, r.stderr
    finally:
        stop_process(device)
        service.stop()


def test_no_answer_exits_2(tmp_path: Path, pki, broker: Mosquitto, auth: Authority) -> None:
    cfg = device_config(tmp_path, pki, broker, auth.trust, "dev-e07")
    r = vgw(*enroll_args(cfg, claim_identity(pki), "tok-e07-secret", timeout=2))
    assert r.returncode == 2, r.stderr
    assert "no answer" in r.stderr


@pytest.mark.parametrize("topic", ["vgw/dev-0001/data/g-1", "vgw/dev-0001/receipt", "vgw/dev-0001/status",
                                   "vgw/vgw-claim/data/g-1", "vgw/dev-0001/cert/request"])
def test_claim_identity_publishing_anything_but_enrollment_is_refused_by_the_broker(
        pki, broker: Mosquitto, topic: str) -> None:
    link = _claim_link(pki, broker)
    try:
        with pytest.raises(UplinkError, match="Not authorized"):
            link.publish(topic, b"{}", retain=False)
        link.publish("vgw/enroll/dev-0001/request", b"{}", retain=False)  # its one right
    finally:
        link.close()


def test_enrolled_key_is_made_on_the_device_and_never_sent(tmp_path: Path, pki, broker: Mosquitto,
                                                           auth: Authority) -> None:
    """What the wire carries is the CSR (public key) and the token: the private key's bytes never appear."""
    allow = write_allow(tmp_path / "allow.toml", {"dev-e08": "tok-e08-secret"})
    cfg = device_config(tmp_path, pki, broker, auth.trust, "dev-e08")
    seen: list[bytes] = []
    spy = CloudLink(BrokerOptions("127.0.0.1", broker.port, pki.ca.cert, pki.cloud.cert, pki.cloud.key,
                                  client_id="spy"), on_message=lambda _t, body: seen.append(body)).connect()
    try:
        spy.subscribe([("vgw/enroll/#", 1)])
        with enroll_service(tmp_path, pki, broker, allow):
            assert vgw(*enroll_args(cfg, claim_identity(pki), "tok-e08-secret")).returncode == 0
        assert wait_until(lambda: len(seen) >= 2, 10)
    finally:
        spy.close()
    key = serialization.load_pem_private_key((tmp_path / "dev-e08" / "device.key").read_bytes(), password=None)
    secret = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    for body in seen:
        assert secret not in body and der not in body and b"PRIVATE KEY" not in body
    assert os.stat(tmp_path / "dev-e08" / "device.key").st_mode & 0o077 == 0


def test_provision_with_a_claim_enrolls_without_a_csr_round_trip(tmp_path: Path, pki, broker: Mosquitto,
                                                                 auth: Authority) -> None:
    allow = write_allow(tmp_path / "allow.toml", {"dev-p01": "tok-p01-secret"})
    out, claim = tmp_path / "etc", claim_identity(pki)
    argv = ["provision", "--device-id", "dev-p01", "--broker", f"localhost:{broker.port}", "--ca", str(pki.ca.cert),
            "--consent-key", str(auth.trust), "--source", "can", "--demo-dbc", "--out", str(out),
            "--state-dir", str(tmp_path / "state"), "--enroll-claim-cert", str(claim.cert),
            "--enroll-claim-key", str(claim.key), "--enroll-token", "tok-p01-secret", "--enroll-timeout", "60"]
    with enroll_service(tmp_path, pki, broker, allow):
        r = vgw(*argv)
    assert r.returncode == 0, r.stderr
    assert "Enrolled." in r.stdout and "--install-cert" not in r.stdout
    assert not (out / "claim").exists()  # spent: nothing of the claim stays on an enrolled device
    leaf = x509.load_pem_x509_certificates((out / "device.crt").read_bytes())[0]
    key = serialization.load_pem_private_key((out / "device.key").read_bytes(), password=None)
    assert leaf.public_key() == key.public_key() and cert_device_id(leaf) == "dev-p01"
    doctor = vgw("doctor", "--config", str(out / "vgw.toml"))
    assert "certificate" in doctor.stdout and "names device" not in doctor.stdout


def test_provision_with_a_claim_and_no_service_exits_2_and_keeps_step_1(tmp_path: Path, pki, broker: Mosquitto,
                                                                         auth: Authority) -> None:
    out, claim = tmp_path / "etc", claim_identity(pki)
    r = vgw("provision", "--device-id", "dev-p02", "--broker", f"localhost:{broker.port}", "--ca", str(pki.ca.cert),
            "--consent-key", str(auth.trust), "--source", "can", "--demo-dbc", "--out", str(out),
            "--state-dir", str(tmp_path / "state"), "--enroll-claim-cert", str(claim.cert),
            "--enroll-claim-key", str(claim.key), "--enroll-token", "tok-p02-secret", "--enroll-timeout", "2")
    assert r.returncode == 2, r.stderr
    assert "vgw enroll --config" in r.stderr
    assert (out / "device.key").exists() and (out / "vgw.toml").exists() and not (out / "device.crt").exists()
    # The claim stays for the boot unit (root only); the unit's command finishes the job once the service answers.
    claim_dir = out / "claim"
    assert stat.S_IMODE(claim_dir.stat().st_mode) == 0o700
    assert (claim_dir / "token").read_text().strip() == "tok-p02-secret"
    assert all(stat.S_IMODE((claim_dir / n).stat().st_mode) == 0o600 for n in ("claim.crt", "claim.key", "token"))
    allow = write_allow(tmp_path / "allow.toml", {"dev-p02": "tok-p02-secret"})
    with enroll_service(tmp_path, pki, broker, allow):
        r = vgw("enroll", "--config", str(out / "vgw.toml"), "--claim-cert", str(claim_dir / "claim.crt"),
                "--claim-key", str(claim_dir / "claim.key"), "--token-file", str(claim_dir / "token"))
    assert r.returncode == 0, r.stderr
    assert (out / "device.crt").exists()


def test_claim_identity_on_nats_can_ask_to_enroll_and_nothing_else(pki) -> None:
    """deploy/nats/vgw-users.conf's claim user (simulators.nats.authorization_block): the enrollment subjects only."""
    from vgw_sim.nats import NatsMqtt, NatsNotFound

    try:
        server = NatsMqtt.from_pki(pki)
    except NatsNotFound:
        pytest.skip("nats-server is not installed")
    claim = claim_identity(pki)
    seen: list[str] = []
    try:
        server.start()
        cloud = CloudLink(BrokerOptions("127.0.0.1", server.port, pki.ca.cert, pki.cloud.cert, pki.cloud.key,
                                        protocol="3.1.1", client_id="cloud-watch"),
                          on_message=lambda topic, _body: seen.append(topic)).connect()
        link = CloudLink(BrokerOptions("127.0.0.1", server.port, pki.ca.cert, claim.cert, claim.key, protocol="3.1.1",
                                       client_id="claim-nats")).connect()
        try:
            cloud.subscribe([("vgw/+/+/request", 1), ("vgw/+/data/+", 1), ("vgw/+/receipt", 1), ("vgw/+/status", 1)])
            for topic in ("vgw/dev-0001/data/g-1", "vgw/dev-0001/receipt", "vgw/vgw-claim/status"):
                try:
                    link.publish(topic, b"{}", retain=False, timeout=2)
                except UplinkError:
                    pass  # refused without a PUBACK: as good as an error
            link.publish("vgw/enroll/dev-0001/request", b"{}", retain=False)
            assert wait_until(lambda: "vgw/enroll/dev-0001/request" in seen, 10)
            assert seen == ["vgw/enroll/dev-0001/request"], seen
        finally:
            link.close()
            cloud.close()
        assert "Publish Violation" in server.log_text()
    finally:
        server.close()


@pytest.mark.parametrize(("body", "why"), [
    ('[[device]]\nid = "dev-a"\ntoken = "tok-aaaaaaaa"\n[[device]]\nid = "dev-a"\ntoken = "tok-bbbbbbbb"\n',
     "listed twice"),
    ('[[device]]\nid = "dev-a"\ntoken = "short"\n', "at least 8 characters"),
    ('[[device]]\nid = "enroll"\ntoken = "tok-aaaaaaaa"\n', "not a device id"),
    ('[[device]]\nid = "dev-a"\n', "exactly 'id' and 'token'"),
    ("not toml [", "not TOML"),
])
def test_serve_refuses_a_bad_allow_file_in_one_line(tmp_path: Path, pki, body: str, why: str) -> None:
    allow = tmp_path / "allow.toml"
    allow.write_text(body)
    r = vgw("cloud", "enroll", "serve", "--broker", "127.0.0.1:1", "--ca", str(pki.ca.cert), "--cert",
            str(pki.cloud.cert), "--tls-key", str(pki.cloud.key), "--ca-cert", str(pki.ca.cert), "--ca-key",
            str(pki.ca.key), "--allow", str(allow), "--ledger", str(tmp_path / "ledger.jsonl"))
    assert r.returncode == 1, r.stderr
    assert why in r.stderr and str(allow) in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_ledger_with_a_torn_last_line_still_serves_and_revokes(tmp_path: Path, pki, broker: Mosquitto,
                                                               auth: Authority) -> None:
    """A crash mid-append leaves half a line: the service starts, the records before it count, new ones append
    cleanly after it, and `revoke` finds every certificate."""
    allow = write_allow(tmp_path / "allow.toml", {"dev-t01": "tok-t01-secret", "dev-t02": "tok-t02-secret"})
    cfgs = {d: device_config(tmp_path, pki, broker, auth.trust, d) for d in ("dev-t01", "dev-t02")}
    with enroll_service(tmp_path, pki, broker, allow) as service:
        assert vgw(*enroll_args(cfgs["dev-t01"], claim_identity(pki), "tok-t01-secret")).returncode == 0
    with service.ledger.open("ab") as fh:
        fh.write(b'{"event": "issued", "device": "dev-t0')  # torn
    with enroll_service(tmp_path, pki, broker, allow) as service:
        assert vgw(*enroll_args(cfgs["dev-t02"], claim_identity(pki), "tok-t02-secret")).returncode == 0
        (tmp_path / "again").mkdir()
        again = device_config(tmp_path / "again", pki, broker, auth.trust, "dev-t01")
        r = vgw(*enroll_args(again, claim_identity(pki), "tok-t01-secret"))
        assert r.returncode == 1 and "token-used" in r.stderr  # the record before the torn line still counts
    lines = service.ledger.read_bytes().split(b"\n")
    assert json.loads(lines[-2])["device"] == "dev-t02"  # appended on a line of its own
    crl = pki.dir / "crl-torn.pem"
    for device in ("dev-t01", "dev-t02"):
        r = vgw("cloud", "enroll", "revoke", "--ca-cert", str(pki.ca.cert), "--ca-key", str(pki.ca.key),
                "--ledger", str(service.ledger), "--crl", str(crl), device)
        assert r.returncode == 0 and "1 certificate(s)" in r.stdout, r.stderr
    assert len(x509.load_pem_x509_crl(crl.read_bytes())) == 2
    r = vgw("cloud", "enroll", "revoke", "--ca-cert", str(pki.ca.cert), "--ca-key", str(pki.ca.key),
            "--ledger", str(service.ledger), "--crl", str(crl), "dev-never")
    assert r.returncode == 1 and "no certificate was issued to 'dev-never'" in r.stderr


def test_the_same_key_asking_again_gets_the_same_certificate(tmp_path: Path, pki, broker: Mosquitto) -> None:
    """An answer lost on the way (the service crashed after recording it, the device's link dropped): the device
    asks again with the same CSR and gets the certificate already issued, not a refusal and not a second one."""
    allow = write_allow(tmp_path / "allow.toml", {"dev-e09": "tok-e09-secret"})
    request = json.dumps({"csr": build_csr(new_key(), "dev-e09").public_bytes(serialization.Encoding.PEM).decode(),
                          "token": "tok-e09-secret"}).encode()
    with enroll_service(tmp_path, pki, broker, allow) as service:
        link = _claim_link(pki, broker, name="claim-repeat-1")
        try:
            first = _ask(link, "dev-e09", request)
        finally:
            link.close()
    with enroll_service(tmp_path, pki, broker, allow) as service:  # restarted in between
        link = _claim_link(pki, broker, name="claim-repeat-2")
        try:
            second = _ask(link, "dev-e09", request)
        finally:
            link.close()
    assert first["status"] == second["status"] == "issued"
    assert first["certificate"] == second["certificate"]
    assert len(service.ledger.read_text().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="root enrolling for the agent's user needs root")
def test_root_enrolling_leaves_the_key_and_audit_log_to_the_agents_user(tmp_path: Path, pki, broker: Mosquitto,
                                                                        auth: Authority) -> None:
    """`sudo vgw enroll` on a device whose state dir belongs to the agent's user (uid 65534 here): the key it
    makes and the audit entry it writes must stay readable by that user, or the agent could not start."""
    allow = write_allow(tmp_path / "allow.toml", {"dev-e10": "tok-e10-secret"})
    cfg = device_config(tmp_path, pki, broker, auth.trust, "dev-e10")
    state = tmp_path / "dev-e10" / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    with enroll_service(tmp_path, pki, broker, allow):
        r = vgw(*enroll_args(cfg, claim_identity(pki), "tok-e10-secret"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dev-e10" / "device.key").stat().st_uid == 65534
    assert (state / "audit.log").stat().st_uid == 65534


def test_the_service_outlives_a_broker_restart(tmp_path: Path, pki, broker: Mosquitto, auth: Authority) -> None:
    allow = write_allow(tmp_path / "allow.toml", {"dev-e11": "tok-e11-secret"})
    cfg = device_config(tmp_path, pki, broker, auth.trust, "dev-e11")
    with enroll_service(tmp_path, pki, broker, allow) as service:
        broker.restart()
        r = vgw(*enroll_args(cfg, claim_identity(pki), "tok-e11-secret", timeout=60))
        assert r.returncode == 0, r.stderr + "".join(service.stderr)
