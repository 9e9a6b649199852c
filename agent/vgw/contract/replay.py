"""Replay after failover (README "Replay after failover"): how long a device keeps what a broker acknowledged,
and when it sends it again.

A cluster node can PUBACK a message and then lose it. A device with several endpoints keeps each acknowledged
batch and receipt for the replay window and, at every reconnect after the first, publishes again what was
acknowledged within the window; a second pass :data:`SECOND_PASS_AFTER` of the window later sends again
everything acknowledged since the first pass's start (the cluster may still be electing a leader and lose the
first replay the same way). Receivers drop the copies by (epoch, seq).
"""

from __future__ import annotations

__all__ = ["DEFAULT_REPLAY_WINDOW_S", "MAX_REPLAY_WINDOW_S", "SECOND_PASS_AFTER", "second_pass_delay"]

#: ``[mqtt] replay_window_s`` with several endpoints when the config does not say (one endpoint: 0, off). A node
#: that PUBACKs and loses (nats-server 2.9 during a stream leader election, docs/fleet.md "PUBACK is not storage")
#: does so for the seconds an election takes, so 30 s covers it with room to spare.
DEFAULT_REPLAY_WINDOW_S = 30.0
MAX_REPLAY_WINDOW_S = 3600.0
#: The second replay pass comes this fraction of the window after the first.
SECOND_PASS_AFTER = 1 / 3


def second_pass_delay(window_s: float) -> float:
    """How long after a reconnect's first replay pass the second one is due, for a window of ``window_s``."""
    return window_s * SECOND_PASS_AFTER
