"""One erasure routine for every reason: `vgw uninstall --purge` receipts say what the erasure found.

`vgw uninstall --purge` signed ``key_destroyed: true`` without looking at what the erasure found (another
process holding the outbox open leaves erased pages in its files), and without the ``audit`` anchor README
"Receipts" promises on every receipt: install.py re-implemented the consent manager's erasure. Now both take
the state layer's one erasure routine and the manager's receipt.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import vgw.ops.install as inst
from vgw.base.errors import StorageError
from vgw.base.fsutil import acting_for_owner
from vgw.cli import main
from vgw.config.settings import load_config
from vgw.daemon.agent import open_state
from vgw_sim.cloud import RecipientKey, consent_claims, grant, sign_consent
from vgw_sim.pki import TestPKI

from tests.test_install import no_system_commands, provisioned  # noqa: F401  (the fixture, used by name)


def _claims(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


def _setup(tmp_path: Path, pki: TestPKI) -> Path:
    prefix = tmp_path / "root"
    config, signer = provisioned(prefix, pki, 8883)
    doc = tmp_path / "consent.jws"
    doc.write_text(sign_consent(consent_claims("dev-0001", 1, [
        grant("g-fleet", ["read_speedometer"], RecipientKey.generate()),
        grant("g-idle", ["read_fuel"], RecipientKey.generate())]), signer))
    assert main(["consent", "apply", "--config", str(config), str(doc)]) == 0
    cfg = load_config(config)
    with acting_for_owner(cfg.state_dir):  # the agent's rows, in the service user's state dir
        outbox, *_ = open_state(cfg)
        try:
            for _ in range(3):
                outbox.commit_batch("g-fleet", lambda seq: b"\x01sealed-envelope-%d" % seq, 1.0, 1)
        finally:
            outbox.close()
    return config


def _erasure_receipts(config: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    cfg = load_config(config)
    with acting_for_owner(cfg.state_dir):
        outbox, audit, *_ = open_state(cfg)
        try:
            receipts = [_claims(t) for _, t in outbox.pending_receipts(1000)]
            return [r for r in receipts if r["typ"] == "erasure"], list(audit.entries())
        finally:
            outbox.close()


def test_purge_receipts_carry_the_audit_anchor_and_what_was_found(tmp_path: Path, pki: TestPKI) -> None:
    config = _setup(tmp_path, pki)
    summary = inst.final_erasure(config, receipt_timeout_s=0)
    assert summary.grants == {"g-fleet": 3, "g-idle": 0}
    receipts, entries = _erasure_receipts(config)
    by_grant = {r["grant"]: r for r in receipts}
    assert set(by_grant) == {"g-fleet", "g-idle"}
    done = {e["grant"]: e for e in entries if e["event"] == "erasure-done" and e.get("reason") == "uninstall"}
    for gid, r in by_grant.items():
        # The anchor names the audit entry that records this erasure (README "Receipts").
        assert r.get("audit") == {"n": done[gid]["n"], "hash": done[gid]["hash"]}, r
        assert r["reason"] == "uninstall" and r["key_destroyed"] is True
    assert by_grant["g-fleet"]["batches_deleted"] == 3 and by_grant["g-idle"]["batches_deleted"] == 0


def test_purge_never_claims_an_erasure_it_could_not_verify(tmp_path: Path, pki: TestPKI) -> None:
    """Another process holds a read snapshot of the outbox: erased pages stay in its -wal, so no receipt may
    say the key is destroyed, and nothing is removed; once it lets go, a second run finishes and receipts."""
    config = _setup(tmp_path, pki)
    state_dir = load_config(config).state_dir
    reader = sqlite3.connect(state_dir / "outbox.sqlite")
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM batches").fetchone()
    try:
        with pytest.raises(StorageError, match="not verified"):
            inst.final_erasure(config, receipt_timeout_s=0)
    finally:
        reader.close()
    receipts, _ = _erasure_receipts(config)
    assert not [r for r in receipts if r["grant"] == "g-fleet"], receipts
    inst.final_erasure(config, receipt_timeout_s=0)
    receipts, _ = _erasure_receipts(config)
    [fleet] = [r for r in receipts if r["grant"] == "g-fleet"]
    assert fleet["key_destroyed"] is True and fleet["batches_deleted"] == 3 and "audit" in fleet
