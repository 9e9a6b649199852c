"""`vgw cloud`: every command, and the whole consent round trip against the real agent through mosquitto.

keygen -> sign -> push -> the agent applies it -> listen decrypts its samples; revoke -> the agent erases ->
listen verifies the erasure receipt -> verify-receipt accepts it (and rejects a forgery). Shared
subscriptions split one stream between two listen workers with each batch handled once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from vgw.cloud.cloudlink import Listener
from vgw.pipeline.catalogue import load_catalogue
from vgw.transport.tlsctx import client_context
from vgw_sim.broker import Mosquitto
from vgw_sim.cloud import RecipientKey, seal_envelope
from vgw_sim.paths import default_dbc, default_signal_map
from vgw_sim.pki import TestPKI, device_public_key_from_cert

from tests.agentkit import ROOT, AgentThread, Vehicle, stop_process, vgw, wait_until, write_config

DEV = "dev-0001"


@pytest.fixture
def vehicle_seed() -> int:
    return 4  # the seed these tests were written against


def broker_args(broker: Any, pki: TestPKI, protocol: str = "auto") -> list[str]:
    return ["--broker", f"localhost:{broker.port}", "--ca", str(pki.ca.cert), "--cert", str(pki.cloud.cert),
            "--tls-key", str(pki.cloud.key), "--protocol", protocol]


class ListenProc:
    """`vgw cloud listen` as a child process writing JSON lines to a file."""

    def __init__(self, args: list[str], out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen([sys.executable, "-m", "vgw", "cloud", "listen", *args, "--out", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert "subscribed" in line, line + self.proc.stderr.read()

    def events(self, typ: str | None = None) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        rows = [json.loads(x) for x in self.out.read_text().splitlines() if x.strip()]
        return [r for r in rows if typ is None or r["type"] == typ]

    def wait(self, predicate: Any, timeout: float = 15.0) -> bool:
        return wait_until(predicate, timeout, step=0.1)

    def stop(self) -> dict[str, Any]:
        self.proc.terminate()
        _out, err = self.proc.communicate(timeout=15)
        assert self.proc.returncode == 0, err
        summary = json.loads(err.strip().splitlines()[-1])["summary"]
        assert isinstance(summary, dict)
        return summary


def keys_and_grants(tmp_path: Path, scopes: list[str]) -> tuple[Path, Path]:
    keys = tmp_path / "keys"
    r = vgw("cloud", "keygen", "--dir", str(keys), "--recipient", "fleet")
    assert r.returncode == 0, r.stderr
    grants = tmp_path / "grants.toml"
    grants.write_text(
        "ttl_s = 3600\n[[grant]]\nid = \"g-fleet\"\ncontroller = \"com.example.fleet\"\n"
        f"scopes = {json.dumps(scopes)}\nrecipient = \"keys/recipients/fleet.pub.json\"\nretention_s = 600\n"
    )
    return keys, grants


def test_keygen_writes_private_keys_0600_and_keeps_the_signer(tmp_path: Path) -> None:
    keys = tmp_path / "k"
    r = vgw("cloud", "keygen", "--dir", str(keys), "--recipient", "fleet", "--recipient", "insurer")
    assert r.returncode == 0, r.stderr
    for name in ("consent-signer.key", "recipients/fleet.key", "recipients/insurer.key"):
        assert (keys / name).stat().st_mode & 0o777 == 0o600, name
    pub = json.loads((keys / "recipients/fleet.pub.json").read_text())
    assert pub["kem"] == "X25519" and RecipientKey  # a grant's recipient object
    signer = (keys / "consent-signer.key").read_bytes()
    assert vgw("cloud", "keygen", "--dir", str(keys)).returncode == 0
    assert (keys / "consent-signer.key").read_bytes() == signer, "an existing signing key must be kept"
    again = vgw("cloud", "keygen", "--dir", str(keys), "--recipient", "fleet")
    assert again.returncode == 1 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_sign_output_is_accepted_by_the_agent_and_bad_scope_is_refused(tmp_path: Path, pki: TestPKI) -> None:
    keys, grants = keys_and_grants(tmp_path, ["read_odometer", "read_location"])
    doc = tmp_path / "doc.jws"
    r = vgw("cloud", "sign", "--key", str(keys / "consent-signer.key"), "--grants", str(grants),
            "--device", DEV, "--ver", "5", "-o", str(doc))
    assert r.returncode == 0, r.stderr
    cfg = write_config(tmp_path, pki, 1, keys / "consent-signer.pub.pem", can={"channel": "unused"})
    applied = vgw("consent", "apply", "--config", str(cfg), str(doc))
    assert applied.returncode == 0, applied.stderr
    show = json.loads(vgw("consent", "show", "--config", str(cfg), "--json").stdout)
    assert show["version"] == 5 and show["grants"][0]["id"] == "g-fleet"
    # several devices at once: one document per device in a directory
    out = tmp_path / "docs"
    r = vgw("cloud", "sign", "--key", str(keys / "consent-signer.key"), "--grants", str(grants),
            "--device", "dev-0001", "--device", "dev-0002", "-o", str(out))
    assert r.returncode == 0 and sorted(p.name for p in out.iterdir()) == ["dev-0001.jws", "dev-0002.jws"]

    bad = tmp_path / "bad.toml"
    bad.write_text(grants.read_text().replace("read_odometer", "control_doors"))
    r = vgw("cloud", "sign", "--key", str(keys / "consent-signer.key"), "--grants", str(bad), "--device", DEV)
    assert r.returncode == 1 and "control_doors" in r.stderr and "grant[0]" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["deep.toml", "deep.json", "fifo.toml"])
def test_sign_answers_a_hostile_grants_file_with_one_line(tmp_path: Path, name: str) -> None:
    """A grants file nested too deeply (TOML or JSON) was a RecursionError traceback, and a FIFO hung `vgw cloud
    sign`: it is read like the config file and the signal map (one loader, a regular file, capped)."""
    keys, _ = keys_and_grants(tmp_path, ["read_odometer"])
    bad = tmp_path / name
    if name == "fifo.toml":
        os.mkfifo(bad)
    else:
        bad.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n" if name.endswith(".toml") else "[" * 5000 + "]" * 5000)
    r = vgw("cloud", "sign", "--key", str(keys / "consent-signer.key"), "--grants", str(bad), "--device", DEV,
            timeout=30)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and name in r.stderr, r.stderr[-2000:]
    assert ("not a regular file" if name == "fifo.toml" else "nested too deeply") in r.stderr, r.stderr


def test_push_listen_revoke_verify_receipt_round_trip_with_the_agent(
    tmp_path: Path, pki: TestPKI, broker: Mosquitto, vehicle: Vehicle
) -> None:
    keys, grants = keys_and_grants(tmp_path, ["read_speedometer", "read_odometer"])
    signer = str(keys / "consent-signer.key")
    doc = tmp_path / "v1.jws"
    assert vgw("cloud", "sign", "--key", signer, "--grants", str(grants), "--device", DEV, "-o", str(doc)
               ).returncode == 0
    listen = ListenProc([*broker_args(broker, pki), "--recipient", str(keys), "--device-cert", str(pki.dir)],
                        tmp_path / "events.jsonl")
    try:
        cfg = write_config(tmp_path, pki, broker.port, keys / "consent-signer.pub.pem",
                           can={"channel": vehicle.channel})
        with AgentThread(cfg) as runner:
            assert runner.wait_link()
            pushed = vgw("cloud", "push", *broker_args(broker, pki), str(doc))
            assert pushed.returncode == 0, pushed.stderr
            assert "pushed consent" in pushed.stdout
            assert listen.wait(lambda: len(listen.events("batch")) >= 3)
            assert listen.wait(lambda: any(e["receipt"] == "consent-applied" for e in listen.events("receipt")))

            revoked = vgw("cloud", "revoke", "--key", signer, "--current", str(doc), "--all",
                          "-o", str(tmp_path / "v2.jws"), *broker_args(broker, pki))
            assert revoked.returncode == 0, revoked.stderr
            # Reported on stdout like push, with the new version (it used to print only to stderr).
            ver = jwt.decode((tmp_path / "v2.jws").read_text().strip(), options={"verify_signature": False})["ver"]
            # The version (Unix ms) is shown with its date (vgw.contract.consent.model.version_text).
            dated = f"consent v{ver} (dated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(ver // 1000))})"
            assert f"pushed revocation of g-fleet: {dated} for {DEV} (0 grant(s) left)" in revoked.stdout
            assert f"wrote revocation of g-fleet: {dated}" in revoked.stdout
            assert listen.wait(lambda: any(e["receipt"] == "erasure" for e in listen.events("receipt")))
            assert runner.agent.manager.in_force is not None and not runner.agent.manager.in_force.grants
        summary = listen.stop()
    finally:
        stop_process(listen.proc)
    batches = listen.events("batch")
    scope_of = load_catalogue([default_dbc()], default_signal_map()).scope_of_path()
    paths = {s["path"] for b in batches for s in b["samples"]}
    assert "Vehicle.Speed" in paths
    assert {scope_of[p] for p in paths} <= {"read_speedometer", "read_odometer"}
    assert [b["seq"] for b in batches] == list(range(1, len(batches) + 1))
    assert listen.events("rejected") == [] and listen.events("bad-receipt") == []
    assert summary["streams"][f"{DEV}/g-fleet"]["missing"] == []
    erasure = next(e for e in listen.events("receipt") if e["receipt"] == "erasure")
    assert erasure["claims"]["grant"] == "g-fleet" and erasure["claims"]["key_destroyed"] is True

    receipt = tmp_path / "erasure.jws"
    receipt.write_text(erasure["token"])
    ok = vgw("cloud", "verify-receipt", "--device-cert", str(pki.device(DEV).cert), "--json", str(receipt))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["claims"]["typ"] == "erasure"
    # the same receipt checked against another device's certificate, and a tampered one, are refused
    other = vgw("cloud", "verify-receipt", "--device-cert", str(pki.device("dev-0002").cert), str(receipt))
    assert other.returncode == 3 and "dev-0001" in other.stderr
    head, payload, sig = erasure["token"].split(".")
    receipt.write_text(f"{head}.{payload}.{sig[:-6]}AAAAAA")
    bad = vgw("cloud", "verify-receipt", "--device-cert", str(pki.dir), str(receipt))
    assert bad.returncode == 3 and "Traceback" not in bad.stderr


def test_listener_reports_duplicates_and_gaps_per_device_and_grant(pki: TestPKI) -> None:
    rk = RecipientKey.generate()
    events: list[dict[str, Any]] = []
    keys = {DEV: device_public_key_from_cert(pki.device(DEV).cert)}
    listener = Listener("vgw", {"fleet": rk.private_key}, keys, events.append)

    def batch(device: str, grant: str, seq: int) -> bytes:
        return seal_envelope({"v": 1, "device": device, "grant": grant, "seq": seq,
                              "samples": [{"t": 1.0, "path": "Vehicle.Speed", "value": seq}]}, rk, device, grant)

    for seq in (1, 2, 2, 5, 3):
        listener.handle(f"vgw/{DEV}/data/g-a", batch(DEV, "g-a", seq))
    listener.handle("vgw/dev-0002/data/g-a", batch("dev-0002", "g-a", 1))
    listener.handle(f"vgw/{DEV}/data/g-b", batch(DEV, "g-b", 1))
    listener.handle(f"vgw/{DEV}/data/g-b", batch("dev-0002", "g-b", 2))  # relabelled: HPKE info mismatch
    kinds = [(e["type"], e.get("device"), e.get("grant"), e.get("seq")) for e in events]
    assert kinds.count(("duplicate", DEV, "g-a", 2)) == 1
    gap = next(e for e in events if e["type"] == "gap")
    assert (gap["device"], gap["grant"], gap["from"], gap["to"]) == (DEV, "g-a", 3, 4)
    assert [e["reason"] for e in events if e["type"] == "rejected"] == ["hpke"]
    summary = listener.summary()["streams"]
    assert summary[f"{DEV}/g-a"]["missing"] == [[4, 4]]  # 3 arrived late, 4 never
    assert summary["dev-0002/g-a"]["missing"] == [] and summary[f"{DEV}/g-b"]["batches"] == 1


def _sealed(rk: RecipientKey, items: list[tuple[str, int]], grant: str = "g-a") -> list[bytes]:
    """One sealed batch of DEV/``grant`` per (epoch, seq) of ``items``."""
    return [seal_envelope({"v": 1, "device": DEV, "grant": grant, "seq": seq, "epoch": epoch,
                           "samples": [{"t": 1.0, "path": "Vehicle.Speed", "value": seq}]}, rk, DEV, grant)
            for epoch, seq in items]


def test_listener_de_duplication_memory_is_bounded_per_stream() -> None:
    """Before: the de-duplication set kept every (epoch, seq) ever accepted (about 240 B a batch: 20 GB a day for
    1000 devices at 1 batch/s). Now a stream keeps, per epoch, the highest seq below which all arrived plus a
    window above it, and a few epochs: 6000 more batches, 2000 more epochs and 200 more grants of one device
    leave its memory where it was."""
    import tracemalloc

    rk = RecipientKey.generate()
    counts: dict[str, int] = {}

    def count(e: dict[str, Any]) -> None:
        counts[e["type"]] = counts.get(e["type"], 0) + 1

    listener = Listener("vgw", {"g-a": rk.private_key}, {}, count)
    warm = _sealed(rk, [("e1", n) for n in range(1, 501)])
    more = _sealed(rk, [("e1", n) for n in range(501, 6501)])
    epochs = _sealed(rk, [(f"epoch-{k}", 1) for k in range(2000)])
    grants = [b for k in range(200) for b in _sealed(rk, [("e1", 1)], grant=f"g-{k}")]
    for b in warm:
        listener.handle(f"vgw/{DEV}/data/g-a", b)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for b in more + epochs:
            listener.handle(f"vgw/{DEV}/data/g-a", b)
        for k, b in enumerate(grants):
            listener.handle(f"vgw/{DEV}/data/g-{k}", b)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert counts == {"batch": 8700}
    assert grown < 150_000, f"{grown} bytes kept for 8200 batches of one device"


def test_listener_window_drops_copies_in_and_below_it(pki: TestPKI) -> None:
    from vgw.cloud.cloudlink import SEQ_WINDOW

    rk = RecipientKey.generate()
    events: list[dict[str, Any]] = []
    listener = Listener("vgw", {"g-a": rk.private_key}, {}, events.append)
    order = [("e1", n) for n in (3, 1, 2, 2, 7, 5, 3)] + [("e2", 1), ("e1", 4), ("e1", 1)]
    order += [("e1", SEQ_WINDOW + 10), ("e1", 6), ("e1", 8)]  # 6 arrives again; 8 never came, now too late
    for b in _sealed(rk, order):
        listener.handle(f"vgw/{DEV}/data/g-a", b)
    kinds = [(e["type"], e.get("epoch"), e.get("seq")) for e in events if e["type"] != "gap"]
    assert [k for k in kinds if k[0] == "duplicate"] == [("duplicate", "e1", 2), ("duplicate", "e1", 3),
                                                         ("duplicate", "e1", 1), ("duplicate", "e1", 6),
                                                         ("duplicate", "e1", 8)]
    assert sorted((e, s) for t, e, s in kinds if t == "batch") == sorted(
        [("e1", n) for n in (1, 2, 3, 4, 5, 7, SEQ_WINDOW + 10)] + [("e2", 1)])
    stream = listener.summary()["streams"][f"{DEV}/g-a"]
    assert (stream["batches"], stream["duplicates"], stream["epochs"]) == (8, 5, 2)


def test_shared_subscription_workers_each_handle_a_batch_once(
    tmp_path: Path, pki: TestPKI, broker: Mosquitto
) -> None:
    import paho.mqtt.client as mqtt

    rk_dir = tmp_path / "keys"
    assert vgw("cloud", "keygen", "--dir", str(rk_dir), "--recipient", "fleet").returncode == 0
    pub = json.loads((rk_dir / "recipients/fleet.pub.json").read_text())
    from vgw_sim.cloud import recipient_public_key

    pk = recipient_public_key(pub)
    common = [*broker_args(broker, pki, "5"), "--recipient", str(rk_dir), "--share", "workers", "--no-status"]
    workers = [ListenProc([*common, "--client-id", f"w{i}"], tmp_path / f"w{i}.jsonl") for i in range(2)]
    try:
        dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=DEV, protocol=mqtt.MQTTv5)
        dev.tls_set_context(client_context(pki.ca.cert, pki.device(DEV).cert, pki.device(DEV).key))
        dev.connect("localhost", broker.port)
        dev.loop_start()
        try:
            n = 40
            for seq in range(1, n + 1):
                env = seal_envelope({"v": 1, "device": DEV, "grant": "g-s", "seq": seq, "samples": []}, pk, DEV,
                                    "g-s")
                dev.publish(f"vgw/{DEV}/data/g-s", env, qos=1).wait_for_publish(5)
        finally:
            dev.disconnect()
            dev.loop_stop()
        assert workers[0].wait(lambda: sum(len(w.events("batch")) for w in workers) >= n)
        time.sleep(0.3)
        for w in workers:
            w.stop()
    finally:
        for w in workers:
            stop_process(w.proc)
    seqs = [[e["seq"] for e in w.events("batch")] for w in workers]
    assert sorted(seqs[0] + seqs[1]) == list(range(1, n + 1)), "each batch exactly once across the group"
    assert seqs[0] and seqs[1], "both workers got a share of the load"
    assert all(w.events("gap") == [] for w in workers), "per-worker gap detection is off under --share"


def test_deploy_mosquitto_acl_is_the_tested_policy() -> None:
    from vgw_sim.broker import device_acl

    root = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
    assert (root / "vgw.acl").read_text() == device_acl("vgw", cloud_user="cloud")
    conf = (root / "mosquitto.conf").read_text()
    for line in ("require_certificate true", "use_identity_as_username true", "allow_anonymous false",
                 "acl_file /etc/mosquitto/vgw.acl", "persistence true"):
        assert line in conf


def test_listener_reports_a_repeated_receipt_once_then_as_a_duplicate(pki: TestPKI) -> None:
    """An agent publishes a receipt again after a failover (README "Replay after failover"): the listener
    reports it once and the copy as a duplicate-receipt."""
    events: list[dict[str, Any]] = []
    keys = {DEV: device_public_key_from_cert(pki.device(DEV).cert)}
    listener = Listener("vgw", {}, keys, events.append)
    key_pem = Path(pki.device(DEV).key).read_bytes()
    first = jwt.encode({"typ": "erasure", "sub": DEV, "iat": 1, "grant": "g-a", "ver": 2, "batches_deleted": 0,
                        "key_destroyed": True}, key_pem, algorithm="ES256")
    other = jwt.encode({"typ": "consent-applied", "sub": DEV, "iat": 1, "ver": 2}, key_pem, algorithm="ES256")
    for token in (first, other, first):
        listener.handle(f"vgw/{DEV}/receipt", token.encode())
    assert [(e["type"], e["receipt"]) for e in events] == [
        ("receipt", "erasure"), ("receipt", "consent-applied"), ("duplicate-receipt", "erasure")]


def test_mosquitto_spellings_of_the_broker_options(tmp_path: Path, pki: TestPKI, broker: Mosquitto) -> None:
    """mosquitto_pub/sub users type `-h HOST -p PORT --cafile --cert --key`; `vgw cloud` took only `--broker
    HOST:PORT --ca --cert --tls-key`. Both spellings work, and the same flags read back what was pushed."""
    keys, grants = keys_and_grants(tmp_path, ["read_odometer"])
    doc = tmp_path / "v1.jws"
    r = vgw("cloud", "sign", "--key", str(keys / "consent-signer.key"), "--grants", str(grants),
            "--device-id", DEV, "-o", str(doc))  # --device-id as `vgw provision` spells it
    assert r.returncode == 0, r.stderr
    tls = ["--cafile", str(pki.ca.cert), "--cert", str(pki.cloud.cert), "--key", str(pki.cloud.key)]
    pushed = vgw("cloud", "push", "-h", "localhost", "-p", str(broker.port), *tls, str(doc))
    assert pushed.returncode == 0, pushed.stderr
    assert "pushed consent" in pushed.stdout
    got = subprocess.run(["mosquitto_sub", "-h", "localhost", "-p", str(broker.port), *tls,
                          "-t", f"vgw/{DEV}/consent", "-C", "1", "-W", "20"],
                         capture_output=True, text=True, timeout=30)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == doc.read_text().strip()  # retained, as with --broker

    # One broker, one spelling: both at once is a clear one-line error, not a silent pick.
    both = vgw("cloud", "push", "-h", "localhost", "--broker", f"localhost:{broker.port}", *tls, str(doc))
    assert both.returncode != 0 and "Traceback" not in both.stderr
    assert "--broker" in both.stderr and "-h" in both.stderr
    # --help still prints the help; the help names both spellings.
    helped = vgw("cloud", "push", "--help")
    assert helped.returncode == 0
    for flag in ("-h HOST", "-p PORT", "--broker HOST:PORT", "--cafile", "--ca ", "--tls-key", "--key"):
        assert flag in helped.stdout, (flag, helped.stdout)


@pytest.mark.parametrize("command", [("provision",), ("dev", "init"), ("cloud", "sign"), ("cloud", "owner", "add")])
def test_every_device_id_option_takes_both_spellings(command: tuple[str, ...]) -> None:
    """`--device` (cloud sign, dev init, cloud owner add) vs `--device-id` (provision): each command takes both,
    --device-id named first in its help."""
    helped = vgw(*command, "--help")
    assert helped.returncode == 0, helped.stderr
    assert re.search(r"--device-id ID, --device ID\b", helped.stdout), helped.stdout


def test_verify_receipt_says_valid_in_a_line_and_as_json(tmp_path: Path, pki: TestPKI) -> None:
    """`vgw cloud verify-receipt` answers like `vgw audit verify`: a line that says valid (or why not), and with
    --json one object a script can read, for a good receipt and a forged one alike."""
    key_pem = Path(pki.device(DEV).key).read_bytes()
    token = jwt.encode({"typ": "erasure", "sub": DEV, "iat": int(time.time()), "grant": "g-a", "ver": 7,
                        "batches_deleted": 3, "key_destroyed": True}, key_pem, algorithm="ES256")
    receipt = tmp_path / "erasure.jws"
    receipt.write_text(token)
    cert = ["--device-cert", str(pki.device(DEV).cert)]

    text = vgw("cloud", "verify-receipt", *cert, str(receipt))
    assert text.returncode == 0, text.stderr
    first = text.stdout.splitlines()[0]
    assert first.startswith(f"{receipt}: valid erasure receipt of {DEV}"), text.stdout
    assert "grant: g-a" in text.stdout and "batches_deleted: 3" in text.stdout

    as_json = vgw("cloud", "verify-receipt", *cert, "--json", str(receipt))
    assert as_json.returncode == 0, as_json.stderr
    out = json.loads(as_json.stdout)
    assert out["valid"] is True and out["file"] == str(receipt) and out["device"] == DEV
    assert out["typ"] == "erasure" and out["claims"]["key_destroyed"] is True and out["token"] == token

    head, payload, sig = token.split(".")
    receipt.write_text(f"{head}.{payload}.{sig[:-6]}AAAAAA")
    bad = vgw("cloud", "verify-receipt", *cert, "--json", str(receipt))
    assert bad.returncode == 3 and "Traceback" not in bad.stderr
    out = json.loads(bad.stdout)
    assert out["valid"] is False and out["file"] == str(receipt) and "ignature" in out["reason"]
    plain = vgw("cloud", "verify-receipt", *cert, str(receipt))
    assert plain.returncode == 3 and plain.stdout == "" and "not valid" in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1


def test_listen_writes_decoded_values_without_binary_float_noise(
    tmp_path: Path, pki: TestPKI, broker: Mosquitto
) -> None:
    """A DBC value is raw * scale + offset in binary floating point: 3266 * 0.01 is 32.660000000000004, and that
    is what the agent sends (value-exact against cantools). What `vgw cloud listen` writes for people and apps
    reads 32.66: printed to 15 significant digits (DBL_DIG: every decimal of that many digits survives a double),
    the noise goes and such values are written as they are."""
    import paho.mqtt.client as mqtt

    keys = tmp_path / "keys"
    assert vgw("cloud", "keygen", "--dir", str(keys), "--recipient", "fleet").returncode == 0
    from vgw_sim.cloud import recipient_public_key

    pk = recipient_public_key(json.loads((keys / "recipients/fleet.pub.json").read_text()))
    noisy = {"Vehicle.Speed": 3266 * 0.01, "Vehicle.Body.Lights.IsHighBeamOn": True, "Vehicle.VIN": "WVW1",
             "Vehicle.TraveledDistance": 123456789, "Vehicle.Exterior.AirTemperature": -40 + 0.1 * 3,
             "Vehicle.CurrentLocation.Latitude": 48.137154,
             "Vehicle.Powertrain.FuelSystem.Level": {"n": 3, "mean": 0.1 + 0.2, "min": 0.1, "max": 0.5, "last": 0.5}}
    assert str(noisy["Vehicle.Speed"]) == "32.660000000000004"  # the noise this test is about
    env = seal_envelope({"v": 1, "device": DEV, "grant": "g-n", "seq": 1, "epoch": "e1", "samples": [
        {"t": 1795920000.125, "path": p, "value": v} for p, v in noisy.items()]}, pk, DEV, "g-n")
    out = tmp_path / "received.jsonl"
    listen = ListenProc([*broker_args(broker, pki), "--recipient", str(keys), "--no-status"], out)
    try:
        dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=DEV, protocol=mqtt.MQTTv5)
        dev.tls_set_context(client_context(pki.ca.cert, pki.device(DEV).cert, pki.device(DEV).key))
        dev.connect("localhost", broker.port)
        dev.loop_start()
        try:
            dev.publish(f"vgw/{DEV}/data/g-n", env, qos=1).wait_for_publish(5)
        finally:
            dev.disconnect()
            dev.loop_stop()
        assert listen.wait(lambda: listen.events("batch"))
        listen.stop()
    finally:
        stop_process(listen.proc)
    line = next(x for x in out.read_text().splitlines() if '"batch"' in x)
    samples_text = line[line.index('"samples"'):line.index('"arrived"')]
    assert "000000000" not in samples_text and "999999999" not in samples_text, line
    values = {s["path"]: s["value"] for s in json.loads(line)["samples"]}
    assert values == {**noisy, "Vehicle.Speed": 32.66, "Vehicle.Exterior.AirTemperature": -39.7,
                      "Vehicle.Powertrain.FuelSystem.Level": {**noisy["Vehicle.Powertrain.FuelSystem.Level"],
                                                              "mean": 0.3}}
    assert values["Vehicle.Body.Lights.IsHighBeamOn"] is True and isinstance(values["Vehicle.TraveledDistance"], int)


def test_enroll_revoke_takes_the_device_as_an_option_too(tmp_path: Path, pki: TestPKI) -> None:
    """`vgw cloud enroll revoke` took the device id only as a positional DEVICE: `--device-id` (and `--device`)
    name it as every other command does."""
    ledger, crl = tmp_path / "ledger.jsonl", tmp_path / "crl.pem"
    ledger.write_text("")
    ca = ["--ca-cert", str(pki.ca.cert), "--ca-key", str(pki.ca.key), "--ledger", str(ledger), "--crl", str(crl)]
    for flag in ("--device-id", "--device"):
        r = vgw("cloud", "enroll", "revoke", *ca, flag, "dev-never")
        assert r.returncode == 1 and "no certificate was issued to 'dev-never'" in r.stderr, r.stderr
    r = vgw("cloud", "enroll", "revoke", *ca, "--device-id", "dev-a", "dev-b")
    assert r.returncode == 1 and "dev-a" in r.stderr and "dev-b" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
@pytest.mark.parametrize("command", ["push", "verify-receipt"])
def test_a_document_or_receipt_that_is_not_a_small_regular_file_is_one_line(tmp_path: Path, pki: TestPKI,
                                                                             kind: str, command: str) -> None:
    """`vgw cloud push` and `verify-receipt` read their file the bounded way the agent reads its own: a FIFO
    would hang them and a link to /dev/zero would fill memory; both are refused at once with one line."""
    path = tmp_path / "doc.jws"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    args = {"push": ["--broker", "127.0.0.1:1", "--ca", str(pki.ca.cert), "--cert", str(pki.ca.cert),
                     "--tls-key", str(pki.ca.key), str(path)],
            "verify-receipt": ["--device-cert", str(pki.device(DEV).cert), str(path)]}[command]
    r = subprocess.run([sys.executable, "-m", "vgw", "cloud", command, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(path) in r.stderr and "Traceback" not in r.stderr
