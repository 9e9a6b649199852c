"""`vgw consent apply|show`: apply a consent document offline, or show the consent in force."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vgw.base.errors import ConfigError, StorageError
from vgw.base.timefmt import utc_text
from vgw.cli import DEFAULT_CONFIG
from vgw.contract.consent.model import version_text
from vgw.state.consent.store import ConsentStore

if TYPE_CHECKING:
    from vgw.config.settings import Config


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("consent", help="apply or show consent documents", description=__doc__)
    csub = p.add_subparsers(dest="consent_command", metavar="ACTION", required=True)

    a = csub.add_parser("apply", help="verify a consent document (compact JWS) and put it in force",
                        description="Verify DOC exactly as if it came from the cloud and, if it passes, cache it "
                        "in the state directory. Exit 0 applied, 3 rejected. A running `vgw run` on the same "
                        "state directory enforces it within 1 s.")
    a.add_argument("--config", default=DEFAULT_CONFIG, help=f"agent config file (TOML; default {DEFAULT_CONFIG})")
    a.add_argument("doc", metavar="DOC", help="file holding the compact JWS")
    a.set_defaults(func=cmd_apply)

    s = csub.add_parser("show", help="the consent in force: version, grants, scopes, expiry")
    s.add_argument("--config", default=DEFAULT_CONFIG, help=f"agent config file (TOML; default {DEFAULT_CONFIG})")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_show)


def _read_doc(path: str) -> bytes:
    from vgw.contract.consent.verifier import MAX_DOCUMENT_BYTES

    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = fh.read(MAX_DOCUMENT_BYTES + 2)  # enough to know it is too big, never more
    except FileNotFoundError:
        raise ConfigError(f"{p}: consent document not found") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read consent document: {exc.strerror}") from exc
    return data.strip()


def cmd_apply(args: argparse.Namespace) -> int:
    from vgw.base.fsutil import acting_for_owner
    from vgw.config.settings import load_config

    cfg = load_config(args.config)
    token = _read_doc(args.doc)
    # Root (`sudo vgw consent apply`) acts on the service user's state dir and leaves its files that user's.
    with acting_for_owner(cfg.state_dir):
        return _apply(cfg, token)


def _apply(cfg: Config, token: bytes) -> int:
    from vgw.base.errors import ConsentError
    from vgw.state.consent.manager import ConsentManager, load_trust_keys
    from vgw.state.statedir import AgentLock, open_state

    outbox, audit, store, signer = open_state(cfg)
    try:
        manager = ConsentManager(device=cfg.device.id, store=store, outbox=outbox, audit=audit, signer=signer,
                                 trust_keys=load_trust_keys(cfg.consent.trust_keys))
        agent_running = AgentLock.held_by_other(cfg.state_dir)
        lock = None
        if not agent_running:
            lock = AgentLock(cfg.state_dir)
            if not lock.acquire():
                agent_running, lock = True, None
        try:
            if agent_running:
                # The running agent owns the effects (memory, rows, keys, receipts): verify here against the
                # same cache, then hand the document over through the cache file.
                in_force_token = store.read_token()
                if in_force_token:
                    manager.load_cached_readonly()
                try:
                    consent = manager.verify(token)
                except ConsentError as exc:
                    manager.reject(exc, source="cli", token=token)
                    print(f"vgw consent apply: {exc}", file=sys.stderr)
                    return 3
                if manager.in_force is not None and consent is manager.in_force:
                    print(f"{version_text(consent.ver)} is already in force")
                    return 0
                store.write_inbox(consent.token)
                outcome = _wait_for_agent(store, cfg.state_dir, consent.ver, timeout=5.0)
                if outcome == "applied":
                    print(f"{version_text(consent.ver)} applied by the running agent ({len(consent.grants)} grant(s))")
                    return 0
                if outcome == "rejected":
                    print(f"vgw consent apply: {version_text(consent.ver)} rejected by the running agent (a newer "
                          "document arrived meanwhile; see `vgw audit show`)", file=sys.stderr)
                    return 3
                print(f"{version_text(consent.ver)} handed to the running agent; it has not confirmed it yet",
                      file=sys.stderr)
                return 0
            try:  # room for the record of a document whose disk part must wait (vgw.state.consent.pending)
                store.pending_apply.reserve()
            except StorageError:
                pass
            manager.load_cached()
            result = manager.apply(token, source="cli")
        finally:
            if lock is not None:
                lock.release()
    finally:
        outbox.close()
    if result.status == "rejected":
        print(f"vgw consent apply: {result.error}", file=sys.stderr)
        return 3
    if result.status == "pending":
        pending = manager.pending
        print(f"vgw consent apply: {version_text(result.consent.ver) if result.consent else 'consent'} not applied: "
              f"{pending.error if pending else 'storage failed'}; it is kept pending in the state directory and "
              "`vgw run` finishes it once the disk can be written", file=sys.stderr)
        return 1
    assert result.consent is not None
    if result.status == "duplicate":
        print(f"{version_text(result.consent.ver)} is already in force")
        return 0
    print(f"{version_text(result.consent.ver)} applied ({len(result.consent.grants)} grant(s))")
    for e in result.revoked:
        print(f"  grant {e.grant_id} revoked: {e.batches_deleted} batch(es) deleted, " + (
            "data key destroyed" if e.key_destroyed else "erasure pending (another process holds the outbox open; "
            "the receipt follows once no copy is left)"))
    for w in result.narrowed:
        print(f"  grant {w.grant_id} narrowed ({', '.join(sorted(w.kinds))}): {w.batches_deleted} stored batch(es) "
              "deleted, " + ("data key replaced" if w.key_destroyed else "erasure pending (the receipt follows once "
                             "no copy is left)" if w.pending else "old data key could not be replaced"))
    return 0


def _wait_for_agent(store: ConsentStore, state_dir: Path, ver: int, timeout: float) -> str:
    """"applied", "rejected" (the agent took the hand-over and did not apply it) or "pending"."""
    from vgw.state.statedir import read_status_file

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = read_status_file(state_dir)
        in_force = status.get("consent_version")
        if in_force == ver:
            return "applied"
        if store.read_inbox() is None:
            # Taken by the agent; give its status file a moment to show the outcome.
            time.sleep(0.6)
            status = read_status_file(state_dir)
            return "applied" if status.get("consent_version") == ver else "rejected"
        time.sleep(0.1)
    return "pending"


def cmd_show(args: argparse.Namespace) -> int:
    from vgw.cli.status import pending_consent
    from vgw.config.settings import load_config
    from vgw.contract.rules.describe import describe_grant
    from vgw.ops.stateview import read_state

    cfg = load_config(args.config)
    state = read_state(cfg)
    consent = state.consent
    # A newer document the running agent applied in memory only (its disk part waits): what the cache says is
    # no longer what is collected (docs/guarantees.md "Revocation wins every race").
    pending = pending_consent(ConsentStore(cfg.state_dir))
    if args.json:
        doc = consent.summary() if consent else {"version": None, "grants": []}
        doc["expired"] = state.expired
        doc["pending"] = pending
        print(json.dumps(doc, indent=2))
        return 0
    if pending is not None:
        print(f"{_pending_version(pending['ver'])} PENDING: applied in memory, not yet on disk; stopped: "
              f"{', '.join(pending['grants_stopped']) or 'none'} (what follows is the stored document)")
    if consent is None:
        print("no consent in force: nothing is collected or sent"
              + ("" if state.exists else f" (no state yet: {state.audit.path.parent} does not exist)"))
        return 0
    print(f"{version_text(consent.ver)} {'EXPIRED' if state.expired else 'in force'}, issued {_ts(consent.iat)}, "
          f"expires {_ts(consent.exp)}")
    for g in consent.grants:
        print(f"  grant {g.id}  controller={g.controller}  purpose={g.purpose}")
        print(f"    scopes: {', '.join(g.scopes)}")
        print("    what it receives:")
        for line in describe_grant(g.scopes, g.collect, g.limits_in_force()):
            print(f"      {line}")
        for scope in g.scopes:
            lim = g.limits_for(scope)
            if lim.max_hz or lim.precision_m:
                parts = [f"max {lim.max_hz:g} Hz" if lim.max_hz else "", f"{lim.precision_m:g} m grid"
                         if lim.precision_m else ""]
                print(f"    limit {scope}: {', '.join(p for p in parts if p)}")
        if g.retention_s:
            print(f"    retention: {g.retention_s} s")
    return 0


def _pending_version(ver: int | None) -> str:
    return version_text(ver) if ver is not None else "a consent document"  # None: the record names no version


def _ts(t: int) -> str:
    return utc_text(t)  # any cached value prints, even one an older agent accepted
