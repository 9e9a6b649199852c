"""The consent scopes vgw knows (README "Scopes"): Smartcar's read permission names, nothing else."""

from __future__ import annotations

SCOPES: frozenset[str] = frozenset(
    {
        "read_vehicle_info",
        "read_vin",
        "read_odometer",
        "read_fuel",
        "read_battery",
        "read_charge",
        "read_engine_oil",
        "read_tires",
        "read_diagnostics",
        "read_speedometer",
        "read_thermometer",
        "read_location",
        "read_compass",
        "read_security",
        "read_climate",
    }
)
