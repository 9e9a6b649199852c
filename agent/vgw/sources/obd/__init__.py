"""OBD-II source: an ELM327 adapter (serial, USB, Wi-Fi) or ISO-TP straight on a CAN bus.

::

    vgw.pipeline.obd.pids      PID catalogue: number, name, VSS path, scope, SAE J1979 formula, unit
    vgw.pipeline.obd.request   the safety choke point: build_request() is the only maker of request bytes
    vgw.sources.obd.elm327    ELM327 client over pyserial (init, protocol fallback, answer parsing)
    vgw.sources.obd.isotp     ISO 15765-2 framing over python-can (0x7DF -> 0x7E8-0x7EF, flow control)
    vgw.sources.obd.poller    ObdPoller: the thread the runtime starts; consent-minimised polling

Errors: :class:`~vgw.base.errors.SourceOpenError` (adapter/bus cannot be opened or initialised),
:class:`~vgw.base.errors.SourceReadError` (I/O failure or no answer prompt); the poller handles both by
reconnecting. :class:`~vgw.pipeline.obd.request.ForbiddenRequest` (a ``ValueError``) marks a request vgw must
never send.
"""
