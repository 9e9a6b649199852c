"""vgw: a consent-first edge vehicle gateway.

Data path (one package per stage)::

    sources/ (python-can bus, trace replay, ELM327)  ->  pipeline/ (id filter, decode, policy, batch)
        ->  crypto/ (HPKE envelope, per-grant data keys)  ->  outbox (encrypted SQLite)  ->  uplink (mTLS MQTT)

Consent (consent/) decides what may flow; nothing is decoded, stored or sent without a grant in force.
"""

__version__ = "0.1.0"
