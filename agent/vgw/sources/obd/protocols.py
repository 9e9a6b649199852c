"""The ELM327's OBD-II protocol numbers and their names (ELM327 data sheet, "AT SP" / "AT DPN").

Pure data, shared by the ELM327 driver (:mod:`vgw.sources.obd.elm327`) and the ELM327 simulator.
"""

from __future__ import annotations

PROTOCOL_NAMES: dict[str, str] = {
    "1": "SAE J1850 PWM",
    "2": "SAE J1850 VPW",
    "3": "ISO 9141-2",
    "4": "ISO 14230-4 (KWP 5BAUD)",
    "5": "ISO 14230-4 (KWP FAST)",
    "6": "ISO 15765-4 (CAN 11/500)",
    "7": "ISO 15765-4 (CAN 29/500)",
    "8": "ISO 15765-4 (CAN 11/250)",
    "9": "ISO 15765-4 (CAN 29/250)",
    "A": "SAE J1939 (CAN 29/250)",
    "B": "USER1 CAN (11* /125)",
    "C": "USER2 CAN (11* /50)",
}
