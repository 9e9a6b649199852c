"""The cloud can tell a restart from a duplicate: the outbox epoch (README "Telemetry envelope").

A wiped or re-provisioned state directory starts ``seq`` at 1 again; receivers de-duplicate on
(device, grant, epoch, seq), so the new data are kept, while a real re-delivery is still dropped.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from vgw.cloud.cloudlink import Listener
from vgw.state.keys import new_data_key
from vgw.state.outbox import Outbox
from vgw_sim.cloud import RecipientKey, seal_envelope
from vgw_sim.pki import device_public_key_from_cert

from tests.agentkit import AgentThread, Authority, vgw, write_config
from tests.faultkit import DEV

G = "g-speed"


def _apply(cfg: Path, token: str, tmp: Path) -> None:
    doc = tmp / f"doc-{time.monotonic_ns()}.jws"
    doc.write_text(token)
    r = vgw("consent", "apply", "--config", str(cfg), str(doc))
    assert r.returncode == 0, r.stderr


def test_wiped_state_starts_a_new_epoch_and_its_seq_1_is_kept(tmp_path, pki, broker, cloud, channel, vehicle):
    auth = Authority(tmp_path)
    cloud.add_recipient(G, auth.recipient(G))
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel})
    token = auth.doc(DEV, {G: ["read_speedometer"]})
    _apply(cfg, token, tmp_path)
    with AgentThread(cfg) as runner:
        first_epoch = runner.agent.outbox.epoch
        assert cloud.wait_for(lambda: {1, 2, 3} <= set(cloud.seqs(DEV, G)), 15)

    shutil.rmtree(tmp_path / "state")  # wiped (or re-provisioned): seq starts at 1 again
    _apply(cfg, token, tmp_path)
    with AgentThread(cfg) as runner:
        second_epoch = runner.agent.outbox.epoch
        assert second_epoch != first_epoch
        assert cloud.wait_for(lambda: cloud.seqs(DEV, G).count(1) == 2, 15), cloud.seqs(DEV, G)
    ones = [b for b in cloud.batches(DEV, G) if b.seq == 1]
    assert [b.epoch for b in ones] == [first_epoch, second_epoch]
    assert cloud.epochs(DEV, G) == [first_epoch, second_epoch]
    assert cloud.duplicates(DEV, G) == 0
    assert cloud.missing(DEV, G) == []  # judged within the newest epoch


def test_listener_deduplicates_on_epoch_and_seq(pki):
    rk = RecipientKey.generate()
    events: list[dict[str, Any]] = []
    keys = {DEV: device_public_key_from_cert(pki.device(DEV).cert)}
    listener = Listener("vgw", {"fleet": rk.private_key}, keys, events.append)

    def batch(epoch: str | None, seq: int) -> bytes:
        doc: dict[str, Any] = {"v": 1, "device": DEV, "grant": G, "seq": seq,
                               "samples": [{"t": 1.0, "path": "Vehicle.Speed", "value": seq}]}
        if epoch is not None:
            doc["epoch"] = epoch
        return seal_envelope(doc, rk, DEV, G)

    for epoch, seq in (("aa", 1), ("aa", 2), ("aa", 2), ("bb", 1), ("bb", 2), ("bb", 4), (None, 1), (None, 1)):
        listener.handle(f"vgw/{DEV}/data/{G}", batch(epoch, seq))
    kinds = [(e["type"], e.get("epoch"), e.get("seq")) for e in events if e["type"] != "gap"]
    assert kinds == [("batch", "aa", 1), ("batch", "aa", 2), ("duplicate", "aa", 2), ("batch", "bb", 1),
                     ("batch", "bb", 2), ("batch", "bb", 4), ("batch", "", 1), ("duplicate", "", 1)]
    gaps = [(e["epoch"], e["from"], e["to"]) for e in events if e["type"] == "gap"]
    assert gaps == [("bb", 3, 3)]  # seq 1 of a new epoch is no gap, and "bb" 3 is
    stream = listener.summary()["streams"][f"{DEV}/{G}"]
    assert (stream["batches"], stream["duplicates"], stream["epochs"]) == (6, 2, 3)


def test_the_epoch_is_made_once_per_outbox_file(tmp_path):
    key = new_data_key()
    a = Outbox(tmp_path / "a.sqlite", key, DEV)
    epoch = a.epoch
    a.close()
    assert len(epoch) == 16
    reopened = Outbox(tmp_path / "a.sqlite", key, DEV)
    other = Outbox(tmp_path / "b.sqlite", key, DEV)
    assert reopened.epoch == epoch and other.epoch != epoch
    reopened.close()
    other.close()
