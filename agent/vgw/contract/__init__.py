"""The device contract both ends of the wire agree on (README "The contract, in our words"), written once.

The agent, the cloud kit (:mod:`vgw.cloud`) and the simulators import these definitions; none of them keeps a
copy, so a simulated device speaks exactly what the agent speaks:

- :mod:`vgw.contract.topics`: the topic names and filters of README "Topics", enrollment and renewal included;
- :mod:`vgw.contract.sealing`: the telemetry envelope's version byte, plaintext versions, HPKE suites and
  ``info`` (README "Telemetry envelope");
- :mod:`vgw.contract.receipt_types`: the receipt types and erasure reasons (README "Receipts");
- :mod:`vgw.contract.replay`: the replay window after a failover and its second pass (README "Replay after
  failover");
- :mod:`vgw.contract.backoff`: when a refused or unanswered consent subscription is asked for again (README
  "Topics").

Pure: constants and functions of their arguments; no I/O, no threads, no sockets, no clock. The package
imports only the base layer (``tests/test_layers.py``).
"""
