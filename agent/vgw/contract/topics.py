"""The topics of README "Topics": who publishes what where, as names and subscription filters.

Device topics live under ``<prefix>/<device>/``; enrollment requests of a device that has no certificate yet
under ``<prefix>/enroll/<device>/`` (README "Enrollment"). The prefix is ``vgw`` unless a deployment sets
``[mqtt] topic_prefix``. Pure: strings in, strings out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "ENROLL_SEGMENT",
    "PREFIX",
    "DeviceTopic",
    "Kind",
    "Stream",
    "consent_topic",
    "data_filter",
    "data_topic",
    "device_filters",
    "parse_device_topic",
    "parse_request_topic",
    "receipt_filter",
    "receipt_topic",
    "request_filters",
    "request_topic",
    "response_topic",
    "status_filter",
    "status_topic",
]

PREFIX = "vgw"
ENROLL_SEGMENT = "enroll"  # vgw/enroll/<device>/...: never a device id (the service refuses it in an allow file)


# ---------------------------------------------------------------- a device's own topics


class Stream(StrEnum):
    """The kinds of message under ``<prefix>/<device>/`` (README "Topics")."""

    CONSENT = "consent"  # cloud -> device, QoS 1, retained: the consent document
    DATA = "data"  # device -> cloud, QoS 1: a telemetry envelope, one topic per grant
    RECEIPT = "receipt"  # device -> cloud, QoS 1: a signed receipt
    STATUS = "status"  # device -> cloud, QoS 1, retained, also the last will


def consent_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/{Stream.CONSENT}"


def data_topic(prefix: str, device: str, grant: str) -> str:
    return f"{prefix}/{device}/{Stream.DATA}/{grant}"


def receipt_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/{Stream.RECEIPT}"


def status_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/{Stream.STATUS}"


def data_filter(prefix: str, share: str | None = None) -> str:
    """Every device's telemetry; through the MQTT 5 shared subscription ``$share/<share>/...`` when given."""
    topic = f"{prefix}/+/{Stream.DATA}/+"
    return f"$share/{share}/{topic}" if share else topic


def receipt_filter(prefix: str) -> str:
    return f"{prefix}/+/{Stream.RECEIPT}"


def status_filter(prefix: str) -> str:
    return f"{prefix}/+/{Stream.STATUS}"


def device_filters(prefix: str, share: str | None = None) -> list[str]:
    """What the cloud reads from devices: data (shared when ``share``), receipts and status."""
    return [data_filter(prefix, share), receipt_filter(prefix), status_filter(prefix)]


@dataclass(frozen=True)
class DeviceTopic:
    """A parsed device-to-cloud topic; ``grant`` only for :attr:`Stream.DATA`."""

    stream: Stream
    device: str
    grant: str | None = None


def parse_device_topic(prefix: str, topic: str) -> DeviceTopic | None:
    """The stream, device and grant of ``<prefix>/<device>/data/<grant>``, ``.../receipt``, ``.../status`` or
    ``.../consent``; None for any other topic (an empty device or grant segment included)."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != prefix or not parts[1]:
        return None
    if len(parts) == 4 and parts[2] == Stream.DATA and parts[3]:
        return DeviceTopic(Stream.DATA, parts[1], parts[3])
    if len(parts) == 3 and parts[2] in (Stream.RECEIPT, Stream.STATUS, Stream.CONSENT):
        return DeviceTopic(Stream(parts[2]), parts[1])
    return None


# ---------------------------------------------------------------- enrollment and renewal (README "Enrollment")


class Kind(StrEnum):
    """Which certificate exchange a topic belongs to."""

    ENROLL = "enroll"  # first certificate, over the claim identity, with a one-time token
    RENEW = "renew"  # next certificate, over the device's own identity


def request_topic(prefix: str, kind: Kind, device: str) -> str:
    return f"{prefix}/{ENROLL_SEGMENT}/{device}/request" if kind is Kind.ENROLL else f"{prefix}/{device}/cert/request"


def response_topic(prefix: str, kind: Kind, device: str) -> str:
    return f"{prefix}/{ENROLL_SEGMENT}/{device}/response" if kind is Kind.ENROLL else f"{prefix}/{device}/cert/response"


def request_filters(prefix: str) -> list[str]:
    """What the enrollment service reads: every enrollment request and every renewal request."""
    return [f"{prefix}/{ENROLL_SEGMENT}/+/request", f"{prefix}/+/cert/request"]


def parse_request_topic(prefix: str, topic: str) -> tuple[Kind, str] | None:
    """(kind, device) of a request topic, or None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != prefix or not parts[2] or parts[3] != "request":
        return None
    if parts[1] == ENROLL_SEGMENT:
        return Kind.ENROLL, parts[2]
    if parts[2] == "cert" and parts[1]:
        return Kind.RENEW, parts[1]
    return None
