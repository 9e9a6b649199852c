"""The encrypted store-and-forward outbox: one SQLite file in the state directory.

Tables:
  meta           ``epoch``: a random string made when the outbox is created, carried in every batch
                 (README "Telemetry envelope") so a receiver tells a wiped or re-provisioned device (seq 1 again) from a
                 re-delivery; ``user_version`` (a PRAGMA) is the schema version, see :data:`SCHEMA_VERSION`.
  active_grants  grants allowed to store data now, each with the digest of its terms in force
                 (:func:`vgw.contract.consent.narrowing.terms_digest`); inserts and key creation check it in the
                 same transaction, so a grant revoked by another process (``vgw consent apply``) can never
                 store again even before this process notices.
  grant_keys     per-grant AES-256-GCM data key, wrapped by the device storage key.
  seqs           next ``seq`` per grant; assigned at commit, so sequences survive crashes with no gap/reuse.
  batches        sealed envelopes, each encrypted again with its grant's data key (aad binds device/grant/seq);
                 ``scopes`` = {scope: samples} it holds (no values), ``terms`` = the digest of the terms its
                 samples were collected under. The agent cannot re-filter a sealed row, so these two decide
                 whether a narrowed grant still permits it (README "Narrowing applies to stored data").
                 ``acked`` = when the broker acknowledged it, for rows kept for the replay window (README
                 "Replay after failover"); NULL while it waits to be sent.
  receipts       signed receipts waiting for the broker (no personal data, not encrypted).
  counters       named counters (drops, retention deletes, what was sent) for status and the privacy report.
                 Most add up; ``first_sent:<g>`` / ``last_sent:<g>`` (Unix seconds) are kept with a MIN / MAX
                 upsert instead (see :meth:`Outbox.mark_sent`), so one table serves the report.
  rate_marks     per grant and path, the frame time of the last sample stored and the max_hz interval it was
                 judged under: a limit that stays or tightens holds across new terms and restarts (README
                 "Limits hold across updates").
  sent_log       per grant (scope ''), scope and consent version in force: samples and batches the broker
                 acknowledged, first and last acknowledgement in ms: the privacy report's periods (README
                 "Privacy report").

Durability (the fault-injection suite in ``tests/test_faults_*.py`` checks each point): a batch counts as
collected only once its transaction commits; its ``seq`` is assigned in that transaction, so a crash loses at
most the batch not yet committed and never reuses or skips a seq. On start :func:`open_checked` runs
``PRAGMA integrity_check``; a corrupt file is quarantined: its ``seqs`` are salvaged if still readable, then the
file and its -wal/-shm are overwritten and deleted (a corrupt copy would keep revoked grants' wrapped keys and
rows beyond any erasure, docs/guarantees.md), and a fresh file takes its place.

Quota: :meth:`Outbox.commit_batch` with ``quota_bytes``, when the outbox would exceed it, deletes in the same
transaction, in this order until it fits: (0) rows kept after their PUBACK for the replay window, oldest ack first,
not counted (the broker has them); (1) the committing grant's oldest batches, its new batch excepted; (2) the
oldest batches of the grant holding the most bytes that has a batch not in flight (possibly the new batch itself).
A batch in flight (handed to the broker, PUBACK not come) is never a victim: it may have arrived, and dropping it
would make the ``dropped_quota`` count lie; the next-oldest batch goes instead. So a grant's dropped seqs are
exactly the counted ones (``dropped_quota:<grant>``, each once), oldest first among those not in flight, and
batches in flight may split them into several runs. If every batch left is in flight, the outbox stays over the
quota until their PUBACKs come: it then holds only the batches in flight (the uplink's window).

Narrowing (README "Narrowing applies to stored data"): no sample of a scope not in force at publish time leaves the
car. Three checks:
:meth:`Outbox.apply_terms` replaces the terms in force and deletes the withdrawn rows in one transaction
(under the lock the uplink holds from reading a row to handing it to the socket, so no withdrawn row can be
published in between); :meth:`Outbox.commit_batch` refuses a batch collected under other terms than those in
force; :meth:`Outbox.pending` only returns rows whose terms digest is the one in force.

``secure_delete`` overwrites deleted content; after an erasure the WAL is checkpointed and truncated so no
page of a revoked grant survives in the -wal file either, and the raw bytes of the files are searched for the
grant's wrapped key and rows: only when none is found is the key reported destroyed (:meth:`Outbox.erase_grant`).
The file is created 0600 before SQLite opens it (SQLite gives -wal/-shm the mode of the main file) and is never
opened through a symlink. ``synchronous=FULL`` makes a commit survive power loss.

One module per job; :class:`Outbox` joins them over one connection and one lock:

  connection.py  opening, schema, migration, the transaction helper every write runs in
  batches.py     :class:`Outbox`: grants, data keys, terms, sealed batches, quota, what to publish
  receipts.py    receipts waiting for the broker
  counters.py    named counters
  erasure.py     erasure of a grant and the proof that nothing of it is left
  quarantine.py  integrity check and quarantine of a corrupt file; startup.py: :func:`open_checked`
  view.py        :func:`read_figures`: a read-only look for `vgw status` and `vgw report`
"""

from __future__ import annotations

from vgw.base.errors import OutboxUnwritable
from vgw.state.outbox.batches import (
    Committed,
    GrantNotActive,
    GrantTerms,
    NewBatch,
    Outbox,
    Row,
    TermsChanged,
    Withdrawal,
)
from vgw.state.outbox.connection import BUSY_TIMEOUT_S, LEGACY_TERMS, SCHEMA_VERSION
from vgw.state.outbox.erasure import ERASE_WAIT_S, Erasure
from vgw.state.outbox.quarantine import (
    QUARANTINE_MARK,
    Quarantined,
    destroy_quarantined,
    integrity_problem,
    quarantine,
)
from vgw.state.outbox.startup import open_checked
from vgw.state.outbox.view import OutboxFigures, read_figures

OUTBOX_FILE = "outbox.sqlite"  # its name in the state directory

__all__ = [
    "BUSY_TIMEOUT_S",
    "ERASE_WAIT_S",
    "LEGACY_TERMS",
    "OUTBOX_FILE",
    "QUARANTINE_MARK",
    "SCHEMA_VERSION",
    "Committed",
    "Erasure",
    "GrantNotActive",
    "GrantTerms",
    "NewBatch",
    "Outbox",
    "OutboxFigures",
    "OutboxUnwritable",
    "Quarantined",
    "Row",
    "TermsChanged",
    "Withdrawal",
    "destroy_quarantined",
    "integrity_problem",
    "open_checked",
    "quarantine",
    "read_figures",
]
