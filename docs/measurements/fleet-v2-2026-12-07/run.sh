#!/bin/sh
# The fleet figures of docs/fleet.md and README "A fleet", measured again with the simulator speaking the
# contract through the agent's code (verifier, version 2 envelopes, receipt signer, vgw.contract policies).
# One run each, one after the other; the load average before each run goes to load.txt beside the reports.
# Usage: run.sh [single|enroll|cluster|all] (default all).
set -eu
here=$(dirname "$0")
what=${1:-all}
run() {
    name=$1; shift
    echo "$name: $(date -u +%FT%TZ) $(cat /proc/loadavg)" >> "$here/load.txt"
    vgw sim fleet "$@" --json > "$here/$name.json" || true
    echo "$name: done $(date -u +%FT%TZ) $(cat /proc/loadavg)" >> "$here/load.txt"
}
if [ "$what" = single ] || [ "$what" = all ]; then
    for broker in mosquitto nats; do
        for n in 100 1000; do
            run "$broker-$n" --devices "$n" --rate 1 --duration 30 --churn 5 --broker "$broker"
        done
    done
fi
if [ "$what" = enroll ] || [ "$what" = all ]; then
    run enroll-1000 --enroll --devices 1000 --rate 1 --duration 30 --churn 1
fi
if [ "$what" = cluster ] || [ "$what" = all ]; then
    for role in leader follower; do
        run "c1-$role" --broker nats-cluster --devices 1000 --rate 1 --duration 60 --churn 1 --kill-at 20 --down 15 \
            --drain 60 --connect-timeout 600 --consumers 1 --kill-role "$role"
    done
fi
