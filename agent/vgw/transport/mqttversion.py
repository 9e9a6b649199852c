"""Which MQTT version a broker speaks: the one rule for ``[mqtt] protocol = "auto"`` (README "Configuration (TOML)"),
used by the agent's uplink, `vgw enroll` and `vgw cloud`.

``auto`` sends an MQTT 5 CONNECT first. A 3.1.1-only broker (the NATS server's MQTT support, for one) answers it
with CONNACK reason code 0x84 "Unsupported Protocol Version" (MQTT 5.0 §3.2.2.2; a 3.1.1 broker's return code 1,
which paho reports as the same reason code) or closes the connection before any CONNACK. Only those two answers
mean "speak 3.1.1"; the decision reads the reason code and whether a CONNACK came, never a message text. A TLS
alert is never taken for either: the broker refused the certificate, and another MQTT version would not help.
"""

from __future__ import annotations

import ssl
from typing import Protocol

__all__ = ["UNSUPPORTED_PROTOCOL_VERSION", "refuses_mqtt5"]

UNSUPPORTED_PROTOCOL_VERSION = 0x84  # CONNACK reason code, MQTT 5.0 §3.2.2.2


class _ReasonCode(Protocol):
    @property
    def value(self) -> int: ...


def refuses_mqtt5(connack: _ReasonCode | None, tls_error: ssl.SSLError | None = None) -> bool:
    """True if a failed MQTT 5 connection attempt says the broker speaks only 3.1.1.

    ``connack`` is the refusing CONNACK's reason code, or None if the connection closed before any CONNACK;
    ``tls_error`` a TLS error the attempt met (then never)."""
    if tls_error is not None:
        return False
    return connack is None or connack.value == UNSUPPORTED_PROTOCOL_VERSION
