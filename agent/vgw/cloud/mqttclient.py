"""The paho client of ``vgw cloud`` and of every simulated cloud or device party: MQTT 5 or 3.1.1 (the NATS
server speaks only 3.1.1; its session is kept with clean_session=False) over a TLS context from
:func:`vgw.transport.tlsctx.client_context`, the one every vgw client uses (TLS >= 1.2, the CA and a client
certificate)."""

from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion


def make_client(client_id: str, protocol: str, ctx: ssl.SSLContext, persistent: bool) -> mqtt.Client:
    """A paho client for ``protocol`` "5" or "3.1.1" over ``ctx``."""
    v5 = protocol == "5"
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
                    clean_session=None if v5 else not persistent)
    c.tls_set_context(ctx)
    return c
