"""SAE J1939 (trucks, buses, farm and construction machines) on top of the CAN pipeline (README "SAE J1939").

* :mod:`vgw.pipeline.j1939.ids`: the 29-bit identifier (priority, PGN, destination, source) and the route keys that
  match a J1939 DBC message (``VFrameFormat`` ``J1939PG``) by PGN -- and destination for PDU1 -- whatever the
  priority and the source address, or by PGN and one source address when the signal map names one.
* :mod:`vgw.pipeline.j1939.transport`: a pure reassembler of the multi-packet transport (TP.BAM and, passively,
  TP.CMDT; J1939-21 5.10) with bounded memory and the J1939-21 timeouts.
* :mod:`vgw.pipeline.j1939.messages`: the variable-length PGNs a DBC cannot describe: VIN (65260), component
  identification (65259), DM1 active diagnostic trouble codes (65226, J1939-73 5.7.1).
* :mod:`vgw.pipeline.j1939.unmatched`: what the pipeline calls for a frame no exact id matched.
* :mod:`vgw.pipeline.j1939.request`: the only frame the agent may ever send on a J1939 bus, a request (PGN 59904)
  for a PGN a consent covers, rate-limited, and only when ``[can] j1939_requests = true``. The agent never
  sends an address claim, and never answers a TP.CM RTS with a CTS (see the transport module).

Pure: nothing here does I/O; the collector owns the state (one thread, under the pipeline's lock).
"""
