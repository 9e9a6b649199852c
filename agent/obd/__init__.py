"""OBD-II source: an ELM327 adapter (serial, USB, Wi-Fi) or ISO-TP straight on a CAN bus.

::

    agent.obd.pids      PID catalogue: number, name, VSS path, scope, SAE J1979 formula, unit
    agent.obd.request   the safety choke point: build_request() is the only maker of request bytes
    agent.obd.elm327    ELM327 client over pyserial (init, protocol fallback, answer parsing)
    agent.obd.isotp     ISO 15765-2 framing over python-can (0x7DF -> 0x7E8-0x7EF, flow control)
    agent.obd.poller    ObdPoller: the thread the runtime starts; consent-minimised polling

Errors: :class:`~agent.errors.SourceOpenError` (adapter/bus cannot be opened or initialised),
:class:`~agent.errors.SourceReadError` (I/O failure or no answer prompt); the poller handles both by
reconnecting. :class:`~agent.obd.request.ForbiddenRequest` (a ``ValueError``) marks a request vgw must
never send.
"""
