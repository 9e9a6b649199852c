"""The mutual-TLS paho client of ``vgw cloud`` and of every simulated cloud or device party: TLS >= 1.2 with
the CA and a client certificate, MQTT 5 or 3.1.1 (the NATS server speaks only 3.1.1; its session is kept
with clean_session=False)."""

from __future__ import annotations

import os
import ssl

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion


def tls_context(ca: str | os.PathLike[str], cert: str | os.PathLike[str],
                key: str | os.PathLike[str]) -> ssl.SSLContext:
    """A client context: verify the broker against ``ca``, present ``cert``/``key``. Raises OSError, SSLError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=os.fspath(ca))
    ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    return ctx


def make_client(client_id: str, protocol: str, ctx: ssl.SSLContext, persistent: bool) -> mqtt.Client:
    """A paho client for ``protocol`` "5" or "3.1.1" over ``ctx``."""
    v5 = protocol == "5"
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
                    clean_session=None if v5 else not persistent)
    c.tls_set_context(ctx)
    return c
