"""The consent service's database, the same tests on SQLite (the default) and on PostgreSQL (a private server
of the test's own, tests/pgkit.py): versions only rise, codes are single use, withdrawal revokes tokens,
receipts are kept once, times keep their fractions; and `vgw cloud serve` runs its OAuth flow on PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vgw.cloud.service.store import App, Document, GrantRow, Store, digest
from vgw.cloud.service.store import Owner as OwnerRow
from vgw_sim.broker import Mosquitto
from vgw_sim.pki import TestPKI

from tests.agentkit import wait_until
from tests.pgkit import postgres_server
from tests.servicekit import Owner, authorize_url, make_service_dir, service_process

pytestmark = pytest.mark.xdist_group("consent-store")  # one worker: the module's PostgreSQL server starts once


@pytest.fixture(scope="module")
def pg_dsn() -> Iterator[str]:
    with postgres_server() as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = Store.open_sqlite(tmp_path / "db.sqlite")
    else:
        import psycopg

        dsn = request.getfixturevalue("pg_dsn")
        name = f"t{time.monotonic_ns()}"
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        s = Store.open_postgres(dsn.rsplit("/", 1)[0] + f"/{name}")
    try:
        yield s
    finally:
        s.close()


def _grant(gid: str, at: float) -> GrantRow:
    return GrantRow(gid, "com.example.app", "alice", "dev-0001", ("read_fuel",), at, None, None, None)


def test_store_keeps_what_the_service_relies_on(store: Store) -> None:
    store.put_owner(OwnerRow("alice", "dev-0001", "scrypt$x"))
    store.add_app(App("com.example.app", "App", "purpose", "https://app.example/cb", digest("s"),
                      {"kem": "X25519", "pk": "x"}))
    with pytest.raises(ValueError, match="already registered"):
        store.add_app(App("com.example.app", "App", "p", "https://x/cb", digest("s"), {}))
    at = 1_796_633_445.125
    store.add_grant(_grant("g-1", at))
    assert store.grant("g-1") == _grant("g-1", at)  # the fraction survives (FLOAT8, not REAL)
    # versions in ms are beyond 32 bits, and only ever rise
    store.add_document(Document("dev-0001", 1_796_633_445_123, "tok1", at, None, 0, None))
    with pytest.raises(ValueError, match="not above"):
        store.add_document(Document("dev-0001", 1_796_633_445_123, "tok0", at, None, 0, None))
    assert [d.ver for d in store.unacked_latest()] == [1_796_633_445_123]
    store.document_pushed("dev-0001", 1_796_633_445_123, acked=True)
    assert store.unacked_latest() == []
    # a code is used once
    store.add_code("c", client_id="com.example.app", redirect_uri="https://app.example/cb", scope="read_fuel",
                   challenge="x", method="S256", owner="alice", grant_id="g-1", ttl_s=60)
    row = store.code("c")
    assert row is not None and store.use_code(row["digest"]) and not store.use_code(row["digest"])
    # a withdrawal revokes the grant's tokens and is history
    store.add_token("t", client_id="com.example.app", grant_id="g-1", code_digest=row["digest"], scope="read_fuel",
                    ttl_s=60)
    assert store.token("t") is not None
    assert store.withdraw_grant("g-1", at + 1) is not None and store.withdraw_grant("g-1", at + 2) is None
    assert store.token("t") is None
    assert [h["event"] for h in store.history("dev-0001")] == ["withdrawn", "allowed"]
    # a receipt is kept once
    claims = {"typ": "erasure", "sub": "dev-0001", "grant": "g-1", "ver": 1_796_633_445_124, "iat": 1}
    assert store.add_receipt("dev-0001", claims, "jws") and not store.add_receipt("dev-0001", claims, "jws")
    assert store.erasure_receipt("dev-0001", "g-1")["ver"] == 1_796_633_445_124  # type: ignore[index]
    assert store.secret("k") == store.secret("k") and len(store.secret("k")) == 32


def test_the_service_runs_its_flow_on_postgresql(tmp_path: Path, pki: TestPKI, broker: Mosquitto,
                                                 pg_dsn: str) -> None:
    sd = make_service_dir(tmp_path, pki, broker.port, database=pg_dsn)
    with service_process(sd):
        owner = Owner(sd)
        assert owner.sign_in().status_code == 303
        client = sd.client(scope="read_fuel")
        url, state, verifier = authorize_url(sd, client)
        token = client.fetch_token(f"{sd.issuer}/token", code_verifier=verifier, state=state,
                                   authorization_response=owner.decide(url, "allow").headers["Location"])
        assert token["device"] == "dev-0001"
        assert wait_until(lambda: "delivered to the broker" in owner.home(), 20)
