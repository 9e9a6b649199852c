"""vgw: a consent-first edge vehicle gateway.

Data path (one folder per layer, README "Layout")::

    sources/ (python-can bus, trace replay, ELM327)  ->  pipeline/ (id filter, decode, policy, batch)
        ->  state/ (HPKE-sealed batches in the encrypted outbox)  ->  uplink/ (mTLS MQTT)

The consent document (contract/) decides what may flow, and state/consent applies it: nothing is decoded,
stored or sent without a grant in force.
"""

__version__ = "0.1.0"
