"""The public cloud-side Python API, `vgw.api`, used the way a backend uses it: through `vgw.api` only.

Inputs are real: the agent runs as a `vgw run` process against mosquitto over mutual TLS and replays a recorded
drive; what it publishes is caught with paho; keys come from `vgw cloud keygen`; a signed document is applied
with `vgw consent apply`, the agent's own verifier. Version 1 plaintexts, which today's agent no longer sends,
are sealed here with cryptography's HPKE exactly as README "Telemetry envelope" writes them. Of `vgw`, this
module imports `vgw.api` and nothing else (the last test checks that); the test kits only start the broker,
write the agent's config and record the trace.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import ssl
import threading
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import vgw.api as api
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from tests.agentkit import agent_process, stop_process, vgw, wait_until, write_config
from tests.faultkit import record_trace

DEV = "dev-0001"
GRANTS = """\
ttl_s = 3600
iss = "consent-service"
[[grant]]
id = "g-fleet"
controller = "com.example.fleet"
purpose = "fleet-maintenance"
scopes = ["read_speedometer", "read_odometer"]
recipient = "keys/recipients/fleet.pub.json"
retention_s = 600
limits = { read_speedometer = { max_hz = 50.0 } }
"""


def keys_and_grants(tmp_path: Path) -> Path:
    r = vgw("cloud", "keygen", "--dir", str(tmp_path / "keys"), "--recipient", "fleet", "--recipient", "other")
    assert r.returncode == 0, r.stderr
    grants = tmp_path / "grants.toml"
    grants.write_text(GRANTS)
    return grants


class Catcher:
    """A paho client under the cloud's certificate that keeps every message under ``vgw/<DEV>/``."""

    def __init__(self, port: int, pki: Any) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="api-test-cloud",
                                  protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
        ctx.load_cert_chain(str(pki.cloud.cert), str(pki.cloud.key))
        self.client.tls_set_context(ctx)
        self.client.on_connect = lambda c, *_: c.subscribe(f"vgw/{DEV}/#", qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("localhost", port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def receipts(catcher: Catcher, cert: api.DeviceCertificate, typ: str) -> list[api.Receipt]:
    out = [api.verify_receipt(p, cert) for p in catcher.on(f"vgw/{DEV}/receipt")]
    return [r for r in out if r.typ == typ]


def test_a_backend_signs_consent_opens_the_agents_envelopes_and_verifies_its_erasure_receipt(
    tmp_path: Path, pki: Any, broker: Any
) -> None:
    grants_file = keys_and_grants(tmp_path)
    grants = api.check_grants(grants_file)
    assert [g.id for g in grants.grants] == ["g-fleet"] and grants.ttl_s == 3600
    fleet = grants.grants[0]
    assert fleet.scopes == ("read_speedometer", "read_odometer") and fleet.retention_s == 600
    assert fleet.recipient == api.Recipient(**{k: v for k, v in json.loads(
        (tmp_path / "keys/recipients/fleet.pub.json").read_text()).items() if k in ("kem", "pk")})
    assert dict(fleet.limits["read_speedometer"]) == {"max_hz": 50.0}

    key = api.load_signing_key(tmp_path / "keys/consent-signer.key")
    signed = api.sign_consent(grants, key, DEV)
    assert signed.device == DEV and signed.grant_ids == ("g-fleet",) and signed.exp == signed.iat + 3600
    doc = tmp_path / "v1.jws"
    doc.write_text(signed.token)

    trace = record_trace(tmp_path, 20.0)
    cfg = write_config(tmp_path, pki, broker.port, tmp_path / "keys/consent-signer.pub.pem",
                       can={"replay": str(trace), "replay_rate": 2.0, "replay_loop": True})
    applied = vgw("consent", "apply", "--config", str(cfg), str(doc))  # the agent's own verifier
    assert applied.returncode == 0, applied.stderr

    cert = api.load_device_certificate(pki.device(DEV).cert)
    assert cert.device == DEV
    catcher = Catcher(broker.port, pki)
    try:
        assert catcher.subscribed.wait(15)
        with agent_process(cfg) as proc:
            data = f"vgw/{DEV}/data/g-fleet"
            assert wait_until(lambda: len(catcher.on(data)) >= 3, 60, step=0.1), proc.stderr
            # The owner withdraws everything: the document a backend signs for that is an empty grants file.
            revoke = api.sign_consent(dataclasses.replace(grants, grants=()), key, DEV, ver=signed.ver + 1)
            assert revoke.grant_ids == ()
            (tmp_path / "v2.jws").write_text(revoke.token)
            assert vgw("consent", "apply", "--config", str(cfg), str(tmp_path / "v2.jws")).returncode == 0
            assert wait_until(lambda: receipts(catcher, cert, "erasure"), 60, step=0.1)
            stop_process(proc, 15)
    finally:
        catcher.close()

    recipient = api.load_recipient_key(tmp_path / "keys/recipients/fleet.key")
    batches = [api.open_envelope(p, recipient, device=DEV, grant="g-fleet") for p in catcher.on(data)]
    assert [b.seq for b in batches] == list(range(1, len(batches) + 1))
    assert {b.epoch for b in batches} == {batches[0].epoch} and batches[0].epoch
    assert {b.plaintext_version for b in batches} == {2}  # what the agent sends (README "Telemetry envelope")
    samples = [s for b in batches for s in b.samples]
    assert "Vehicle.Speed" in {s.path for s in samples}
    assert all(isinstance(s.value, float | int) for s in samples if s.path == "Vehicle.Speed")
    # Frame times are the trace's own: the replay starts at the recorded time and loops after 20 s.
    assert all(1_790_000_000.0 <= s.t < 1_790_000_000.0 + 3600 for s in samples)

    # The grant's key opens nothing of another device or grant, nor does another app's key.
    with pytest.raises(api.EnvelopeError) as bad:
        api.open_envelope(catcher.on(data)[0], recipient, device="dev-0002", grant="g-fleet")
    assert bad.value.reason == "hpke"
    with pytest.raises(api.EnvelopeError):
        api.open_envelope(catcher.on(data)[0], api.load_recipient_key(tmp_path / "keys/recipients/other.key"),
                          device=DEV, grant="g-fleet")

    erasure = receipts(catcher, cert, "erasure")[0]
    assert erasure.device == DEV and erasure.grant == "g-fleet" and erasure.ver == revoke.ver
    assert erasure.claims["key_destroyed"] is True and erasure.token.count(".") == 2
    # Against another device's certificate, or tampered, the same receipt is refused.
    with pytest.raises(api.ReceiptError, match="certificate of dev-0002"):
        api.verify_receipt(erasure.token, api.load_device_certificate(pki.device("dev-0002").cert))
    head, payload, sig = erasure.token.split(".")
    with pytest.raises(api.ReceiptError):
        api.verify_receipt(f"{head}.{payload}.{sig[:-6]}AAAAAA", cert)


def _seal(plaintext: dict[str, Any], public_key: Any, device: str, grant: str) -> bytes:
    """README "Telemetry envelope", written out with cryptography: 0x01 || HPKE base-mode seal of zlib(JSON)."""
    suite = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
    info = b"vgw/1 " + device.encode() + b"/" + grant.encode()
    return b"\x01" + suite.encrypt(zlib.compress(json.dumps(plaintext).encode()), public_key, info=info)


def test_both_plaintext_versions_open_into_the_same_samples(tmp_path: Path) -> None:
    keys_and_grants(tmp_path)
    key = api.load_recipient_key(tmp_path / "keys/recipients/fleet.key")
    common = {"device": DEV, "grant": "g-a", "seq": 7, "epoch": "5f0c2a9e41d7b3c8"}
    v1 = {"v": 1, **common, "samples": [
        {"t": 1795920000.125, "path": "Vehicle.Speed", "value": 52.4},
        {"t": 1795920000.145, "path": "Vehicle.Speed", "value": 52.6},
        {"t": 1795920000.13, "path": "Vehicle.VehicleIdentification.VIN", "value": "WVWZZZ1JZXW000001"},
        {"t": 1795920060.0, "path": "Vehicle.Powertrain.FuelSystem.Level",
         "value": {"n": 3, "min": 40.0, "max": 41.5, "mean": 40.5, "last": 41.5}},
    ]}
    v2 = {"v": 2, **common, "t0_us": 1795920000125000, "series": [
        {"path": "Vehicle.Speed", "dt_us": [0, 20000], "value": [52.4, 52.6]},
        {"path": "Vehicle.VehicleIdentification.VIN", "dt_us": [5000], "value": ["WVWZZZ1JZXW000001"]},
        {"path": "Vehicle.Powertrain.FuelSystem.Level", "dt_us": [59875000],
         "value": [{"n": 3, "min": 40.0, "max": 41.5, "mean": 40.5, "last": 41.5}]},
    ]}
    one = api.open_envelope(_seal(v1, key.public_key(), DEV, "g-a"), key, device=DEV, grant="g-a")
    two = api.open_envelope(_seal(v2, key.public_key(), DEV, "g-a"), key, device=DEV, grant="g-a")
    assert (one.plaintext_version, two.plaintext_version) == (1, 2)
    assert (one.seq, one.epoch) == (two.seq, two.epoch) == (7, "5f0c2a9e41d7b3c8")
    assert [(s.path, round(s.t, 6), s.value) for s in one.samples] == [
        (s.path, round(s.t, 6), s.value) for s in two.samples]
    assert two.samples[0] == api.Sample(1795920000.125, "Vehicle.Speed", 52.4)
    aggregate = two.samples[-1].value
    assert isinstance(aggregate, Mapping) and aggregate["mean"] == 40.5
    # The batch and its samples are read-only values.
    with pytest.raises(dataclasses.FrozenInstanceError):
        two.samples[0].value = 0.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        aggregate["mean"] = 0.0  # type: ignore[index]  # read-only on purpose

    # An envelope whose plaintext names another grant than its topic is refused (a relabelling relay).
    with pytest.raises(api.EnvelopeError) as relabelled:
        api.open_envelope(_seal({**v2, "grant": "g-b"}, key.public_key(), DEV, "g-a"), key, device=DEV, grant="g-a")
    assert relabelled.value.reason == "mismatch"
    with pytest.raises(api.EnvelopeError) as version:
        api.open_envelope(b"\x02" + _seal(v1, key.public_key(), DEV, "g-a")[1:], key, device=DEV, grant="g-a")
    assert version.value.reason == "version"


def test_grants_and_documents_the_device_would_reject_are_refused_with_a_vgw_error(tmp_path: Path) -> None:
    grants_file = keys_and_grants(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text(GRANTS.replace('"read_odometer"', '"control_doors"'))
    with pytest.raises(api.CloudKitError, match=r"grant\[0\].*control_doors"):
        api.check_grants(bad)
    assert issubclass(api.CloudKitError, api.ConfigError) and issubclass(api.ConfigError, api.VgwError)

    grants = api.check_grants(grants_file)
    key = api.load_signing_key(tmp_path / "keys/consent-signer.key")
    # A grant built by hand skips check_grants; signing still refuses what the device would reject.
    forged = dataclasses.replace(grants.grants[0], scopes=("read_speedometer", "control_doors"))
    with pytest.raises(api.ConsentError) as refused:
        api.sign_consent(dataclasses.replace(grants, grants=(forged,)), key, DEV)
    assert refused.value.reason == "control-scope"
    twice = dataclasses.replace(grants, grants=(grants.grants[0], grants.grants[0]))
    with pytest.raises(api.ConsentError) as dup:
        api.sign_consent(twice, key, DEV)
    assert dup.value.reason == "duplicate-grant"

    with pytest.raises(api.CloudKitError, match=r"consent-signer\.pub\.pem"):
        api.load_signing_key(tmp_path / "keys/consent-signer.pub.pem")
    with pytest.raises(api.CloudKitError, match="not an X25519"):
        api.load_recipient_key(tmp_path / "keys/consent-signer.key")
    with pytest.raises(api.CloudKitError, match=r"missing\.crt"):
        api.load_device_certificate(tmp_path / "missing.crt")
    with pytest.raises(api.CloudKitError, match="not a PEM"):
        api.DeviceCertificate.from_pem(b"junk", name="junk.crt")


def test_the_public_surface_is_documented_typed_and_frozen() -> None:
    assert api.PROTOCOL_VERSION == "1.2" and api.API_VERSION.split(".")[0] == "1"
    for name in api.__all__:
        obj = getattr(api, name)
        if isinstance(obj, type) or callable(obj):
            assert (obj.__doc__ or "").strip(), f"vgw.api.{name} has no docstring"
    for cls in (api.Sample, api.Batch, api.Receipt, api.DeviceCertificate, api.Recipient, api.Grant,
                api.GrantsFile, api.SignedConsent):
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls  # type: ignore[attr-defined]
    # This module reaches vgw through vgw.api only, as a backend would.
    tree = ast.parse(Path(__file__).read_text())
    used = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    used |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m for m in used if m == "vgw" or m.startswith("vgw.")} == {"vgw.api"}


def test_the_examples_in_the_docs_run_as_written(tmp_path: Path, pki: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python examples of docs/api.md and the cloud team's getting-started page, run in a folder laid out as
    they assume (keys from `vgw cloud keygen`, a grants file, the device's certificate) with a real envelope
    and receipt of that device as `payload` / `token`."""
    import jwt

    root = Path(__file__).resolve().parents[1]
    keys_and_grants(tmp_path)
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / f"{DEV}.crt").write_bytes(Path(pki.device(DEV).cert).read_bytes())
    fleet = api.load_recipient_key(tmp_path / "keys/recipients/fleet.key")
    payload = _seal({"v": 1, "device": DEV, "grant": "g-fleet", "seq": 1, "epoch": "e",
                     "samples": [{"t": 1795920000.0, "path": "Vehicle.Speed", "value": 52.4}]},
                    fleet.public_key(), DEV, "g-fleet")
    receipt = jwt.encode({"typ": "erasure", "sub": DEV, "iat": 1795920000, "grant": "g-fleet", "ver": 2,
                          "batches_deleted": 1, "key_destroyed": True},
                         Path(pki.device(DEV).key).read_bytes(), algorithm="ES256")
    monkeypatch.chdir(tmp_path)
    for page in ("docs/api.md", "docs/getting-started/cloud.md"):
        text = (root / page).read_text()
        blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
        assert blocks, page
        for code in blocks:
            scope: dict[str, Any] = {"payload": payload, "token": receipt}
            exec(compile(code.replace("car-0042", DEV), page, "exec"), scope)  # noqa: S102
            assert scope["batch"].samples[0] == api.Sample(1795920000.0, "Vehicle.Speed", 52.4), page
            assert scope["signed"].device == DEV, page


# vgw.api as released under API_VERSION 1.0: every name, each function's signature, each type's fields. A change
# here is a change of the API: add to it and raise the minor number, or change it and raise the major number.
SURFACE_1_0 = {
    "API_VERSION": "str", "PROTOCOL_VERSION": "str", "RecipientPrivateKey": "alias", "SampleValue": "alias",
    "VgwError": "error", "ConfigError": "error", "CloudKitError": "error", "ConsentError": "error",
    "EnvelopeError": "error", "ReceiptError": "error",
    "Sample": ["t", "path", "value"],
    "Batch": ["device", "grant", "seq", "epoch", "plaintext_version", "samples"],
    "DeviceCertificate": ["device", "public_key", "certificate"],
    "Receipt": ["typ", "device", "iat", "ver", "grant", "claims", "token"],
    "Recipient": ["kem", "pk"],
    "Grant": ["id", "scopes", "recipient", "controller", "purpose", "limits", "retention_s", "collect"],
    "GrantsFile": ["grants", "ttl_s", "iss", "ver", "devices"],
    "SignedConsent": ["token", "device", "ver", "iat", "exp", "grant_ids"],
    "SigningKey": ["private_key"],
    "open_envelope": "(payload: 'bytes', key: 'RecipientPrivateKey', *, device: 'str', grant: 'str') -> 'Batch'",
    "verify_receipt": "(token: 'str | bytes', certificate: 'DeviceCertificate') -> 'Receipt'",
    "check_grants": "(path: 'str | os.PathLike[str]') -> 'GrantsFile'",
    "sign_consent": "(grants: 'GrantsFile', key: 'SigningKey', device: 'str', *, ver: 'int | None' = None, "
                    "now: 'int | None' = None) -> 'SignedConsent'",
    "load_signing_key": "(path: 'str | os.PathLike[str]') -> 'SigningKey'",
    "load_recipient_key": "(path: 'str | os.PathLike[str]') -> 'RecipientPrivateKey'",
    "load_device_certificate": "(path: 'str | os.PathLike[str]') -> 'DeviceCertificate'",
}


def test_the_api_is_the_one_its_version_names() -> None:
    def shape(name: str) -> Any:
        obj = getattr(api, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            return "error"
        if dataclasses.is_dataclass(obj):
            return [f.name for f in dataclasses.fields(obj)]
        if inspect.isfunction(obj):
            return str(inspect.signature(obj))
        return "str" if name.endswith("_VERSION") else "alias"

    assert api.API_VERSION == "1.0", "a new API version: record its surface here"
    assert {name: shape(name) for name in api.__all__} == SURFACE_1_0
    assert all(issubclass(getattr(api, n), api.VgwError) for n, s in SURFACE_1_0.items() if s == "error")
