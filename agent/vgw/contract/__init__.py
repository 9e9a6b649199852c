"""The device contract both ends of the wire agree on (README "The contract, in our words"), written once.

The agent, the cloud kit (:mod:`vgw.cloud`) and the simulators import these definitions; none of them keeps a
copy, so a simulated device speaks exactly what the agent speaks:

- :mod:`vgw.contract.scopes`: the consent scopes (README "Scopes");
- :mod:`vgw.contract.consent`: the consent document's model, its verifier and what narrowing withdraws (README
  "Consent document");
- :mod:`vgw.contract.rules`: collection rules, their limits and budgets (README "Collection rules");
- :mod:`vgw.contract.topics`: the topic names and filters of README "Topics", enrollment and renewal included;
- :mod:`vgw.contract.sealing` and :mod:`vgw.contract.envelope`: the telemetry envelope's version byte,
  plaintext versions, HPKE suites and ``info``, and the sealing itself (README "Telemetry envelope");
- :mod:`vgw.contract.receipts` and :mod:`vgw.contract.receipt_types`: the receipt signer, the receipt types and
  erasure reasons (README "Receipts");
- :mod:`vgw.contract.enrollment` and :mod:`vgw.contract.certs`: enrollment messages and reading a device's
  identity from its certificate (README "Enrollment");
- :mod:`vgw.contract.replay`: the replay window after a failover and its second pass;
- :mod:`vgw.contract.backoff`: when a refused or unanswered consent subscription is asked for again.

Pure: no network, threads, processes or databases (``tests/test_layers.py``); it imports only the base layer.
"""
