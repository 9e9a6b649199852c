"""`vgw dev up --service`: the dev stack runs the owner's consent service (README "Your own dev stack",
docs/consent-service.md), and one signer owns the car's consent document at a time: grants.toml, or, from
`--service` on, the service alone until `--no-service`. Real mosquitto over TLS, the real agent, the simulator,
the cloud listener and `vgw cloud serve` as background processes; the app through Authlib's OAuth 2.0 client,
the owner through HTTP forms."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from vgw.contract.consent.verifier import verify_consent

from tests.agentkit import ROOT, vgw, wait_until
from tests.servicekit import Owner, ServiceDir, authorize_url


@pytest.fixture
def stack_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "devstack"
    yield d
    if (d / "stack.json").exists():
        vgw("dev", "down", str(d), timeout=60)  # never leave a stack running after a failed test


def _status(d: Path) -> dict[str, Any]:
    st = vgw("status", "--config", str(d / "vgw.toml"), "--json")
    return json.loads(st.stdout) if st.returncode == 0 else {}


def _in_force(d: Path) -> tuple[int | None, set[str]]:
    st = _status(d)
    return st.get("consent_version"), {g["id"] for g in st.get("grants", [])}


def _events(d: Path, kind: str) -> list[dict[str, Any]]:
    try:
        lines = (d / "cloud" / "received.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [e for e in map(json.loads, lines) if e.get("type") == kind]


def _erased(d: Path) -> set[str]:
    return {e["claims"]["grant"] for e in _events(d, "receipt") if e["claims"].get("typ") == "erasure"}


def _parts(d: Path) -> dict[str, bool]:
    st = vgw("dev", "status", str(d), "--json")
    return {p: v["running"] for p, v in json.loads(st.stdout)["parts"].items()}


def _retained(d: Path) -> str | None:
    """The consent document the stack's broker holds retained for the car, read as the cloud identity."""
    from vgw.cloud.cloudlink import BrokerOptions, CloudLink

    port = json.loads((d / "stack.json").read_text())["port"]
    pki = d / "pki"
    got: list[bytes] = []
    link = CloudLink(BrokerOptions(host="127.0.0.1", port=port, ca_file=pki / "ca.crt", cert_file=pki / "cloud.crt",
                                   key_file=pki / "cloud.key", client_id=f"test-retained-{time.monotonic_ns()}"),
                     on_message=lambda _t, payload: got.append(payload)).connect()
    try:
        link.subscribe([("vgw/dev-car-01/consent", 1)])
        wait_until(lambda: got, 15)
    finally:
        link.close()
    return got[0].decode().strip() if got else None


def _verified(d: Path, token: str) -> Any:
    """The car's own verifier, with the key the stack's agent trusts."""
    key = serialization.load_pem_public_key((d / "consent" / "consent-signer.pub.pem").read_bytes())
    return verify_consent(token, trust_keys=[key], device="dev-car-01", now=time.time())  # type: ignore[list-item]


def _service(d: Path, client_id: str) -> ServiceDir:
    """The stack's service as the test kit's owner and app see it (apps.json: the client's secret)."""
    import tomllib

    issuer = tomllib.loads((d / "service" / "service.toml").read_text())["service"]["issuer"]
    app = json.loads((d / "service" / "apps.json").read_text())[client_id]
    return ServiceDir(d / "service", d / "service" / "service.toml", int(issuer.rsplit(":", 1)[1]), issuer,
                      app["redirect_uri"], client_id, app["client_secret"], d / "consent" / "recipients",
                      d / "consent" / "consent-signer.pub.pem")


def test_up_service_makes_the_service_the_cars_only_signer_until_no_service(stack_dir: Path) -> None:
    d = stack_dir
    assert vgw("dev", "init", str(d), timeout=60).returncode == 0
    r = vgw("dev", "up", str(d), timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert wait_until(lambda: _in_force(d)[1] == {"g-fleet", "g-insurer"}, 30)
    v_grants = _in_force(d)[0]
    assert v_grants is not None

    # --service: the service signs the car's next document from what owners allowed on it (nothing yet)
    r = vgw("dev", "up", str(d), "--service", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "handed to the owner's consent service" in r.stdout
    assert json.loads((d / "stack.json").read_text())["consent"] == "service"
    assert _parts(d) == {"broker": True, "sim": True, "cloud": True, "service": True, "agent": True}
    doc = _retained(d)
    assert doc is not None and _verified(d, doc).grants == () and _verified(d, doc).ver > v_grants
    assert wait_until(lambda: _in_force(d) == (_verified(d, doc).ver, set()), 30)
    assert wait_until(lambda: {"g-fleet", "g-insurer"} <= _erased(d), 30)  # the car's receipts for the handover
    issuer = _service(d, "com.example.insurer").issuer
    assert f"consent service: {issuer}/" in r.stdout
    assert f"com.example.insurer asks (open it, sign in, Allow): {issuer}/authorize?" in r.stdout
    for name in ("service.toml", "owner-password", "apps.json", "service.sqlite"):
        assert (d / "service" / name).stat().st_mode & 0o077 == 0, name

    # The owner allows the insurer (Authlib's client, the owner's HTTP forms); the car sends that grant's data
    sd = _service(d, "com.example.insurer")
    owner = Owner(sd)
    assert owner.sign_in("owner", (d / "service" / "owner-password").read_text().strip()).status_code == 303
    client = sd.client(scope="read_speedometer read_battery")
    url, state, verifier = authorize_url(sd, client)
    answer = owner.decide(url, "allow")
    token = client.fetch_token(f"{sd.issuer}/token", authorization_response=answer.headers["Location"],
                               code_verifier=verifier, state=state)
    gid = token["grant_id"]
    assert wait_until(lambda: _in_force(d)[1] == {gid}, 30)
    v_service = _in_force(d)[0]
    assert wait_until(lambda: any(e["grant"] == gid for e in _events(d, "batch")), 30)  # the stack's app keys open it

    # grants.toml edited: `up` does not sign it while the service signs, and says so; the car keeps the service's
    os.utime(d / "grants.toml", (time.time() + 5, time.time() + 5))
    r = vgw("dev", "up", str(d), timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "grants.toml changed but not signed" in r.stdout and "signed (v" not in r.stdout
    assert _parts(d)["service"] is True
    held = _retained(d)
    assert held is not None and {g.id for g in _verified(d, held).grants} == {gid}
    assert _in_force(d) == (v_service, {gid})

    # --no-service: the service stops, grants.toml signs again, above every version the service made
    r = vgw("dev", "up", str(d), "--no-service", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "given back to grants.toml" in r.stdout
    assert json.loads((d / "stack.json").read_text())["consent"] == "grants"
    assert "service" not in _parts(d)
    assert wait_until(lambda: _in_force(d)[1] == {"g-fleet", "g-insurer"}, 30)
    assert (_in_force(d)[0] or 0) > (v_service or 0)
    assert wait_until(lambda: gid in _erased(d), 30)
    back = _retained(d)
    assert back is not None and {g.id for g in _verified(d, back).grants} == {"g-fleet", "g-insurer"}


def test_the_service_signs_above_a_version_floor_the_car_holds(stack_dir: Path) -> None:
    """A document the car took may carry a version far above the service's clock-based ones (grants.toml's
    `ver`, or one signed by hand): the car keeps the highest it ever accepted as its floor, so the service's
    documents must continue above it, or the car would refuse every one of them as a rollback."""
    d = stack_dir
    assert vgw("dev", "init", str(d), timeout=60).returncode == 0
    high = 9_000_000_000_000_000
    grants = d / "grants.toml"
    grants.write_text(f"ver = {high}\n" + grants.read_text())
    os.utime(grants, (time.time() + 5, time.time() + 5))  # newer than consent/current.jws: `up` signs it
    r = vgw("dev", "up", str(d), timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert wait_until(lambda: _in_force(d) == (high, {"g-fleet", "g-insurer"}), 30)

    r = vgw("dev", "up", str(d), "--service", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"the service signed v{high + 1} " in r.stdout
    assert wait_until(lambda: _in_force(d) == (high + 1, set()), 30)
    doc = _retained(d)
    assert doc is not None and jwt.decode(doc, options={"verify_signature": False})["ver"] == high + 1


def test_up_service_without_its_extra_is_one_line_and_starts_nothing(stack_dir: Path, tmp_path: Path) -> None:
    """After a plain `pip install .` Flask is missing: `vgw dev up --service` says what to install, before any
    part starts, and the stack stays grants.toml's."""
    assert vgw("dev", "init", str(stack_dir), timeout=60).returncode == 0
    shadow = tmp_path / "no-flask"
    shadow.mkdir()
    (shadow / "flask.py").write_text("raise ModuleNotFoundError(\"No module named 'flask'\", name='flask')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "vgw", "dev", "up", str(stack_dir), "--service"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'vgw[service]'" in lines[0] and "flask missing" in lines[0], r.stderr
    assert not list((stack_dir / "run").glob("*.pid"))
    assert "consent" not in json.loads((stack_dir / "stack.json").read_text())


from tests.test_devstack import needs_root  # noqa: E402 - beside the tests that need it; foreign_stack: conftest


@needs_root
def test_up_service_as_root_runs_the_service_as_the_folders_owner(foreign_stack: Path) -> None:
    """Root hands a stack another user owns to the service: the database root created for the hand-over is given
    to that user before the service, run as that user, opens it; nothing in the folder stays root's."""
    from tests.test_provision import SERVICE

    r = vgw("dev", "up", str(foreign_stack), "--service", timeout=120)
    if r.returncode == 1 and "cannot be run by the stack's owner" in r.stderr:
        pytest.skip("this host's interpreter is out of the stack owner's reach (see test_devstack)")
    assert r.returncode == 0, r.stdout + r.stderr
    pids = {p: v["pid"] for p, v in json.loads(vgw("dev", "status", str(foreign_stack), "--json").stdout)["parts"]
            .items()}
    assert pids["service"] and psutil.Process(pids["service"]).uids().effective == SERVICE
    assert all(os.lstat(p).st_uid == SERVICE for p in [foreign_stack, *foreign_stack.rglob("*")])
    sd = _service(foreign_stack, "com.example.fleet")
    owner = Owner(sd)
    assert owner.sign_in("owner", (foreign_stack / "service" / "owner-password").read_text().strip()).status_code \
        == 303
    url, _state, _verifier = authorize_url(sd, sd.client(scope="read_odometer"))
    assert owner.decide(url, "allow").status_code == 302  # the service, as the owner, writes its database
    assert wait_until(lambda: len(_in_force(foreign_stack)[1]) == 1, 30)
