#!/bin/sh
# The enrollment measurement of docs/fleet.md ("Measured: a fleet enrolls"): 1000 simulated devices enroll
# through a real `vgw cloud enroll serve` on a private mosquitto (loopback, mutual TLS, the deploy ACL), then
# run 30 s at 1 Hz with 1 consent change/s. Reports land next to this script.
set -eu
here=$(dirname "$0")
vgw sim fleet --enroll --devices 1000 --rate 1 --duration 30 --churn 1 --json > "$here/enroll-1000.json"
