"""A TLS failure named: which alert (RFC 8446 §6.2) or which check failed, and what the installer does about it.

The broker refuses a client certificate with an alert: ``certificate_expired`` (45), ``unknown_ca`` (48),
``certificate_revoked`` (44), ``bad_certificate`` (42), ``certificate_required`` (116). OpenSSL reports a
received alert as an ``ssl.SSLError`` whose ``reason`` is its mnemonic (``SSLV3_ALERT_CERTIFICATE_EXPIRED``);
our own check of the broker's certificate fails with an ``ssl.SSLCertVerificationError`` whose ``verify_code``
is X.509's (``X509_V_ERR_*``). Both are codes, never message text; :func:`classify` maps them to a
:class:`TlsFailure`. A TLS failure is never a sign that the broker speaks another MQTT version.
"""

from __future__ import annotations

import ssl
from enum import Enum

__all__ = ["TlsFailure", "classify", "describe"]


class TlsFailure(Enum):
    """(name a person reads, what to do)."""

    CLIENT_EXPIRED = ("the broker refused this device's certificate: certificate_expired",
                      "renew it (the agent renews [mqtt] renew_before_days ahead; `vgw doctor` shows its state) or "
                      "enroll the device again")
    CLIENT_UNKNOWN_CA = ("the broker refused this device's certificate: unknown_ca",
                         "the certificate was not issued by a CA the broker trusts: enroll again or install one "
                         "signed by the broker's client CA")
    CLIENT_REVOKED = ("the broker refused this device's certificate: certificate_revoked",
                      "the device was revoked; only its operator can enroll it again")
    CLIENT_BAD = ("the broker refused this device's certificate: bad_certificate",
                  "check [mqtt] cert_file and key_file belong together (`vgw doctor`)")
    CLIENT_REQUIRED = ("the broker asked for a client certificate and got none: certificate_required",
                       "set [mqtt] cert_file and key_file")
    CLIENT_UNSUPPORTED = ("the broker refused this device's certificate: unsupported_certificate",
                          "the certificate's key or usage is not accepted; enroll again")
    BROKER_EXPIRED = ("the broker's certificate has expired", "the broker's operator must renew it")
    BROKER_UNTRUSTED = ("the broker's certificate is not signed by [mqtt] ca_file",
                        "check ca_file is the CA of this broker")
    BROKER_REVOKED = ("the broker's certificate is revoked", "the broker's operator must replace it")
    BROKER_NAME = ("the broker's certificate is not for this host name",
                   "use the host name the certificate names in [mqtt] host/hosts")
    OTHER = ("TLS handshake failed", "check the broker address, ca_file, cert_file and key_file (`vgw doctor`)")

    @property
    def what(self) -> str:
        return self.value[0]

    @property
    def advice(self) -> str:
        return self.value[1]

    @property
    def is_client_certificate(self) -> bool:
        """The broker refused our certificate (not a fault of the link or of the broker's certificate)."""
        return self.name.startswith("CLIENT_")


# Alerts the peer sent, by OpenSSL's reason mnemonic (ssl/ssl_err.c, SSL_R_*ALERT_*).
_ALERTS = {
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": TlsFailure.CLIENT_EXPIRED,
    "TLSV1_ALERT_UNKNOWN_CA": TlsFailure.CLIENT_UNKNOWN_CA,
    "SSLV3_ALERT_CERTIFICATE_REVOKED": TlsFailure.CLIENT_REVOKED,
    "SSLV3_ALERT_BAD_CERTIFICATE": TlsFailure.CLIENT_BAD,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": TlsFailure.CLIENT_BAD,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": TlsFailure.CLIENT_REQUIRED,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": TlsFailure.CLIENT_UNSUPPORTED,
}

# Our verification of the broker's certificate, by X.509 verify code (OpenSSL x509_vfy.h).
_X509_V_ERR_CERT_HAS_EXPIRED = 10
_X509_V_ERR_CERT_REVOKED = 23
_X509_V_ERR_HOSTNAME_MISMATCH = 62
_X509_V_ERR_IP_ADDRESS_MISMATCH = 64
_VERIFY = {
    _X509_V_ERR_CERT_HAS_EXPIRED: TlsFailure.BROKER_EXPIRED,
    _X509_V_ERR_CERT_REVOKED: TlsFailure.BROKER_REVOKED,
    _X509_V_ERR_HOSTNAME_MISMATCH: TlsFailure.BROKER_NAME,
    _X509_V_ERR_IP_ADDRESS_MISMATCH: TlsFailure.BROKER_NAME,
}


def classify(exc: ssl.SSLError) -> TlsFailure:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY.get(exc.verify_code, TlsFailure.BROKER_UNTRUSTED)
    return _ALERTS.get(exc.reason or "", TlsFailure.OTHER)


def describe(exc: ssl.SSLError) -> str:
    """One line: what failed and what to do (the OpenSSL detail last, for the record)."""
    failure = classify(exc)
    detail = exc.verify_message if isinstance(exc, ssl.SSLCertVerificationError) else (exc.reason or str(exc))
    return f"{failure.what} ({detail}); {failure.advice}"
