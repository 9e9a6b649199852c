#!/bin/sh
# The headline of docs/performance.md ("The headline: the whole process"): `vgw run` from exec to its last
# PUBACK and exit against the naive process, demo vehicle and comma.ai's opendbc mazda_3_2019.dbc (fetched
# with pip into the test corpus cache, never committed: `make bench` does the same), both trace forms, a
# typical consent and every signal, 400k frames, 3 alternating rounds; then the stages with every signal of
# that DBC. One JSON report per run lands next to this script.
set -eu
here=$(dirname "$0")
dbc=$(.venv/bin/python -c 'from tests.decoderkit import fetch_sdist_files as f
d = f("opendbc==0.3.1", lambda n: n.endswith(".dbc") and "/opendbc/dbc/" in n); print(d / "mazda_3_2019.dbc")')
.venv/bin/vgw bench --dbc "$dbc" --consent all --frames 400000 --rounds 3 --json > "$here/${1:-run}.json"
