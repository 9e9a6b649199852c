#!/bin/sh
# The control for run.sh on a loaded machine: 1000 devices on each private broker, alternately with this
# simulator (v2 through the agent's code) and with the one before it (bare jwt.decode, version 1 envelopes),
# back to back, so both see the same load. OLD is a folder laid out as the package `vgw` of the commit before
# the change (the folders agent/, simulators/, dbc/ of that commit linked as vgw/, vgw/simulators, vgw/dbc).
# Usage: control.sh OLD [single|cluster] (default single; cluster: the nats-cluster run with a follower killed).
set -eu
here=$(dirname "$0")
old=$1
what=${2:-single}
if [ "$what" = cluster ]; then
    for who in v2 v1; do
        name="control-c1-follower-$who"
        echo "$name: $(date -u +%FT%TZ) $(cat /proc/loadavg)" >> "$here/load.txt"
        set -- --broker nats-cluster --devices 1000 --rate 1 --duration 60 --churn 1 --kill-at 20 --down 15 \
            --drain 60 --connect-timeout 300 --consumers 1 --kill-role follower --json
        if [ "$who" = v1 ]; then
            PYTHONPATH=$old python -m vgw sim fleet "$@" > "$here/$name.json" || true
        else
            vgw sim fleet "$@" > "$here/$name.json" || true
        fi
        echo "$name: done $(date -u +%FT%TZ) $(cat /proc/loadavg)" >> "$here/load.txt"
    done
    exit 0
fi
for broker in mosquitto nats; do
    for who in v2 v1; do
        name="control-$broker-1000-$who"
        echo "$name: $(date -u +%FT%TZ) $(cat /proc/loadavg)" >> "$here/load.txt"
        if [ "$who" = v1 ]; then
            PYTHONPATH=$old python -m vgw sim fleet --devices 1000 --rate 1 --duration 30 --churn 5 \
                --broker "$broker" --drain 30 --json > "$here/$name.json" || true
        else
            vgw sim fleet --devices 1000 --rate 1 --duration 30 --churn 5 --broker "$broker" --drain 30 \
                --json > "$here/$name.json" || true
        fi
        echo "$name: done $(date -u +%FT%TZ) $(cat /proc/loadavg)" >> "$here/load.txt"
    done
done
