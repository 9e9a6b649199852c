"""The cloud side of vgw, as product code: the tools behind ``vgw cloud keygen|sign|push|revoke|listen``.

An operator runs these with the consent signing key and the recipients' HPKE keys, so they are typed as strictly
as the agent. Layer: cloud (README "Layout"): imports only the core, never the agent's storage, daemon or the
simulators.

- :mod:`vgw.cloud.consent_authority`: signing and recipient keys, consent claims and the compact JWS (README
  "Consent document").
- :mod:`vgw.cloud.envelopes`: open (and, for tests, seal) the telemetry envelope; verify a receipt.
- :mod:`vgw.cloud.records`: what a receiver records: batches, receipts, rejections, de-duplication.
- :mod:`vgw.cloud.cloudkit`: key files, grants files and the ``vgw cloud`` offline commands.
- :mod:`vgw.cloud.cloudlink`: the online part (MQTT v5 over mutual TLS): push, revoke, listen.
- :mod:`vgw.cloud.mqttclient`: the paho client and TLS context these share.
"""
