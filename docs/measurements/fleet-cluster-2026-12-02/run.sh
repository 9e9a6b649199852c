#!/bin/bash
# The docs/fleet.md cluster runs, one after another on a quiet machine.
cd /work/main
common="--broker nats-cluster --devices 1000 --rate 1 --duration 60 --churn 1 --kill-at 20 --down 15 --drain 60 --connect-timeout 600 --json"
for spec in "c1-leader:--consumers 1 --kill-role leader" "c3-leader:--consumers 3 --kill-role leader" "c1-follower:--consumers 1 --kill-role follower" "c3-follower:--consumers 3 --kill-role follower"; do
  name=${spec%%:*}; args=${spec#*:}
  echo "$(date +%T) start $name" >> /tmp/fleet/log
  /usr/bin/time -v .venv/bin/vgw sim fleet $common $args > /tmp/fleet/$name.json 2> /tmp/fleet/$name.err
  echo "$(date +%T) end $name rc=$?" >> /tmp/fleet/log
  sleep 5
done
echo "$(date +%T) start r300" >> /tmp/fleet/log
.venv/bin/vgw sim fleet --broker nats-cluster --devices 300 --rate 1 --duration 40 --churn 1 --consumers 2 --kill-at 15 --down 10 --drain 30 --connect-timeout 300 --kill-role leader --json > /tmp/fleet/r300.json 2> /tmp/fleet/r300.err
echo "$(date +%T) end r300 rc=$?" >> /tmp/fleet/log
