"""docs/performance.md "A second core": whole-process `vgw run` over one candump trace, alternating variants.

    DBC=hyundai_2015_ccan.dbc python run.py FRAMES ROUNDS 0,1 > every-signal.jsonl   # every signal consented
    CONSENT=typical DBC=... python run.py FRAMES ROUNDS 0,1 > typical.jsonl          # the bench's typical grants

Each variant is ``[agent] seal_workers``. Per run, one JSON line: wall (exec to exit, which replay_exit holds
until every batch is acknowledged), CPU of the agent with its reaped children (wait4), the worker's CPU
(psutil, sampled), peak summed PSS of the agent and its children (psutil memory_full_info, every 0.1 s),
rows left unsent. A private mosquitto from vgw_sim; the trace and signal map as `vgw bench` writes them.
CHILD=1 runs the agent through `vgw bench`'s child instead, which adds CPU per thread during ingest.
"""
import json, os, shutil, sqlite3, subprocess, sys, tempfile, time
from pathlib import Path
import psutil
from vgw.tools.bench.run import _broker, _retain
from vgw.tools.bench.child import _config_text
from vgw.tools.bench.trace import frame_source, write_trace
from vgw.tools.bench.options import DEVICE
from vgw_sim.paths import default_dbc, default_signal_map
from vgw.cloud.consent_authority import RecipientKey, SigningKey, consent_claims, grant, sign_consent
from vgw.contract.scopes import SCOPES
from vgw.state.consent.store import ConsentStore

frames = int(sys.argv[1]); rounds = int(sys.argv[2]); variants = sys.argv[3].split(",")  # e.g. 0,1
extra = {v: (f"\n[agent]\nseal_workers = {v}\n" if v != "none" else "") for v in variants}
consent = os.environ.get("CONSENT", "all")
root = Path(tempfile.mkdtemp(prefix="i26c-")); os.chmod(root, 0o755)
pki, broker = _broker(root)
try:
    signer = SigningKey.generate(); trust = signer.write_public_pem(root / "s.pub.pem")
    if consent == "all":
        scopes = {"g-fleet": sorted(SCOPES), "g-insurer": sorted(SCOPES)[:1]}
    else:
        from vgw.tools.bench.options import TYPICAL_SCOPES as scopes
    grants = [grant(g, s, RecipientKey.generate()) for g, s in scopes.items()]
    doc = sign_consent(consent_claims(DEVICE, 1, grants, iat=int(time.time())), signer)
    trace = root / "trace.log"
    DBC = Path(os.environ["DBC"]) if os.environ.get("DBC") else default_dbc()
    demo = not os.environ.get("DBC")
    if demo:
        smap = default_signal_map()
    else:
        from vgw.pipeline.catalogue import load_dbc
        from vgw.tools.bench.trace import synthetic_signal_map
        smap = root / "signals.toml"; smap.write_text(synthetic_signal_map(load_dbc([DBC], strict=False)))
        if consent == "all":
            from vgw.tools.bench.options import _PRIVACY_SCOPES
            picked = sorted(s for s in SCOPES if s not in _PRIVACY_SCOPES)
            grants = [grant("g-fleet", picked, RecipientKey.generate()), grant("g-insurer", picked[:1], RecipientKey.generate())]
            doc = sign_consent(consent_claims(DEVICE, 1, grants, iat=int(time.time())), signer)
    write_trace(trace, frame_source(DBC, demo=demo, seed=7, start=1.7e9), frames)
    _retain(broker, pki, doc)
    out = []
    vgw = str(Path(sys.executable).with_name("vgw"))
    for r in range(rounds):
        for v in variants:
            name = f"r{r}-{v}"
            state = root / f"state-{name}"; state.mkdir(mode=0o700)
            ConsentStore(state).write_token(doc)
            cfg = root / f"{name}.toml"
            cfg.write_text(_config_text(state, DBC, smap, trace, 0, broker.port, pki, trust,
                                        strict=demo, max_interval_s=None) + extra[v])
            t0 = time.monotonic()
            cmd = [vgw, "run", "--config", str(cfg)]
            if os.environ.get("CHILD"):
                cmd = [sys.executable, "-c", "import sys; from vgw.tools.bench import child_main; sys.exit(child_main(sys.argv[1]))", str(cfg)]
            p = subprocess.Popen(cmd, stdout=open(root / f"{name}.out", "w"),
                                 stderr=open(root / f"{name}.err", "w"))
            pp = psutil.Process(p.pid); peak = 0.0; kidcpu = {}
            while True:
                try:
                    pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid:
                    break
                try:
                    kids = pp.children(recursive=True)
                    s = sum(q.memory_full_info().pss for q in [pp, *kids])
                    peak = max(peak, s)
                    for q in kids:
                        c = q.cpu_times(); kidcpu[q.pid] = c.user + c.system
                except psutil.Error:
                    pass
                time.sleep(0.1)
            wall = time.monotonic() - t0
            p.returncode = os.waitstatus_to_exitcode(status)
            db = sqlite3.connect(state / "outbox.sqlite")
            left = db.execute("SELECT COUNT(*) FROM batches WHERE acked IS NULL").fetchone()[0]
            seqs = dict(db.execute("SELECT grant_id, next_seq FROM seqs").fetchall())
            st = json.loads((state / "status.json").read_text())
            rec = {"variant": v, "round": r, "rc": p.returncode, "wall_s": round(wall, 3),
                   "cpu_s": round(ru.ru_utime + ru.ru_stime, 3), "peak_pss_mb": round(peak / 2**20, 1), "worker_cpu_s~": round(sum(kidcpu.values()), 2),
                   "left_unsent": left, "seqs": seqs, "batches": st["counters"].get("batches"),
                   "samples": st["counters"].get("samples"), "seal": st.get("seal")}
            if os.environ.get("CHILD"):
                ch = json.loads([l for l in (root / f"{name}.out").read_text().splitlines() if l.startswith("{")][-1])
                rec["threads"] = ch["thread_cpu_ingest_s"]; rec["ingest_s"] = round(ch["ingest_s"], 2); rec["cpu_ingest_s"] = round(ch["cpu_ingest_s"], 2)
                rec.pop("seqs"); rec.pop("seal")
            print(json.dumps(rec), flush=True); out.append(rec)
finally:
    broker.close(); shutil.rmtree(root, ignore_errors=True)
