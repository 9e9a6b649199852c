"""The one place where OBD-II request bytes are made (the safety choke point).

A vehicle gateway must never change the vehicle. On OBD-II the dangerous requests are one byte away from
the harmless ones: service 04 clears the stored trouble codes and resets the emission monitors (a car
then fails inspection, and a workshop loses the evidence), service 08 commands on-board actuators, and the
UDS services behind the same connector (0x10 session control, 0x11 ECU reset, 0x14 clear DTCs, 0x22/0x2E
read/write data by identifier, 0x27 security access, 0x2F I/O control, 0x31 routines, 0x34 download ...)
can reset, unlock or reflash an ECU. So:

* :func:`build_request` is the only function that returns an :class:`ObdRequest`, and the transports
  (:mod:`vgw.sources.obd.elm327`, :mod:`vgw.sources.obd.isotp`) send nothing else to the vehicle: they accept no raw
  bytes or hex text, and the ELM327 client sends only ``AT`` commands besides.
* An :class:`ObdRequest` can only be made with this module's private token, and it re-checks its bytes on
  construction, so a caller that bypasses :func:`build_request` still cannot hold a forbidden request.
* The allow-list is positive: service 01 (current data) and 09 (vehicle information), plus 03 and 07
  (stored / pending DTCs) only while ``read_diagnostics`` is granted. Everything else raises
  :class:`ForbiddenRequest`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from vgw.base.errors import ForbiddenRequest as ForbiddenRequest

SERVICE_CURRENT_DATA = 0x01
SERVICE_STORED_DTCS = 0x03
SERVICE_PENDING_DTCS = 0x07
SERVICE_VEHICLE_INFO = 0x09

MAX_PIDS_PER_REQUEST = 6  # ISO 15765-4 / J1979: a request carries at most six service 01 PIDs
_ALWAYS_ALLOWED = frozenset({SERVICE_CURRENT_DATA, SERVICE_VEHICLE_INFO})
_DIAGNOSTIC_SERVICES = frozenset({SERVICE_STORED_DTCS, SERVICE_PENDING_DTCS})
DIAGNOSTICS_SCOPE = "read_diagnostics"

_TOKEN = object()


def _check(payload: bytes) -> None:
    """Raise ForbiddenRequest unless ``payload`` is a read-only request vgw may ever send."""
    if not payload:
        raise ForbiddenRequest("empty OBD request")
    service = payload[0]
    if service not in _ALWAYS_ALLOWED and service not in _DIAGNOSTIC_SERVICES:
        # Blocks 04 (clear DTCs), 08 (actuator tests) and every UDS service (0x10, 0x11, 0x14, 0x22,
        # 0x27, 0x2E, 0x2F, 0x31, 0x34 ...): vgw only ever reads.
        raise ForbiddenRequest(f"OBD service {service:02X} is not allowed (only 01, 09, 03, 07 are)")
    pids = payload[1:]
    if service == SERVICE_CURRENT_DATA and not 1 <= len(pids) <= MAX_PIDS_PER_REQUEST:
        raise ForbiddenRequest(f"service 01 takes 1..{MAX_PIDS_PER_REQUEST} PIDs, got {len(pids)}")
    if service == SERVICE_VEHICLE_INFO and len(pids) != 1:
        raise ForbiddenRequest(f"service 09 takes exactly one PID, got {len(pids)}")
    if service in _DIAGNOSTIC_SERVICES and pids:
        raise ForbiddenRequest(f"service {service:02X} takes no parameter bytes")


@dataclass(frozen=True, slots=True)
class ObdRequest:
    """A checked, read-only OBD-II request. Make one with :func:`build_request` only."""

    payload: bytes
    _token: object = field(repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self._token is not _TOKEN:
            raise ForbiddenRequest("ObdRequest objects are made by vgw.pipeline.obd.request.build_request only")
        _check(self.payload)

    @property
    def service(self) -> int:
        return self.payload[0]

    @property
    def pids(self) -> bytes:
        return self.payload[1:]

    @property
    def hex(self) -> str:
        """The request as an ELM327 command line, e.g. ``010D0C``."""
        return self.payload.hex().upper()


def build_request(service: int, pids: Iterable[int] = (), *, scopes: frozenset[str]) -> ObdRequest:
    """The single choke point: a request for ``service`` and ``pids`` allowed under ``scopes``.

    Raises :class:`ForbiddenRequest` for any service other than 01 and 09, for 03/07 unless
    ``read_diagnostics`` is in ``scopes``, for more than six PIDs, and for a PID outside 0x00-0xFF.
    """
    if not isinstance(service, int) or not 0 <= service <= 0xFF:
        raise ForbiddenRequest(f"OBD service {service!r} is not a byte")
    pid_list = list(pids)
    if any(not isinstance(p, int) or not 0 <= p <= 0xFF for p in pid_list):
        raise ForbiddenRequest(f"OBD PIDs must be bytes, got {pid_list!r}")
    if service in _DIAGNOSTIC_SERVICES and DIAGNOSTICS_SCOPE not in scopes:
        # Minimisation at the source: DTCs are read only while a grant holds read_diagnostics.
        raise ForbiddenRequest(f"OBD service {service:02X} needs the {DIAGNOSTICS_SCOPE} scope")
    return ObdRequest(bytes([service, *pid_list]), _TOKEN)
