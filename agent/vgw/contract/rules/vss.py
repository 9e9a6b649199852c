"""Which consent scope each VSS path of a collection rule belongs to, for judging a document on its own.

A rule or condition that names a path must name one whose scope the same grant holds (README "Collection rules"). The
verifier is pure and device-independent, so it judges paths against this fixed table rather than one
vehicle's signal map: a path not in it is refused (fail closed: the agent cannot prove such a path stays
inside the grant). At run time a rule engine additionally sees only the samples the grant's own scopes let
through, so even a signal map that files a path under another scope never lets a condition read it.

The table holds every path the agent's own decoders produce (dbc/signals.toml, the OBD-II PIDs) and the VSS
6.0 leaves next to them that a Smartcar scope covers.
"""

from __future__ import annotations

VSS_SCOPES: dict[str, str] = {
    "Vehicle.Speed": "read_speedometer",
    "Vehicle.TraveledDistance": "read_odometer",
    "Vehicle.OBD.DistanceSinceDTCClear": "read_odometer",
    "Vehicle.Powertrain.FuelSystem.RelativeLevel": "read_fuel",
    "Vehicle.Powertrain.FuelSystem.Range": "read_fuel",
    "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current": "read_battery",
    "Vehicle.Powertrain.TractionBattery.CurrentCurrent": "read_battery",
    "Vehicle.Powertrain.TractionBattery.Range": "read_battery",
    "Vehicle.OBD.HybridBatteryRemaining": "read_battery",
    "Vehicle.Powertrain.TractionBattery.Charging.IsCharging": "read_charge",
    "Vehicle.Powertrain.TractionBattery.Charging.IsChargingCableConnected": "read_charge",
    "Vehicle.Powertrain.CombustionEngine.EngineOil.LifeRemaining": "read_engine_oil",
    "Vehicle.Chassis.Axle.Row1.Wheel.Left.Tire.Pressure": "read_tires",
    "Vehicle.Chassis.Axle.Row1.Wheel.Right.Tire.Pressure": "read_tires",
    "Vehicle.Chassis.Axle.Row2.Wheel.Left.Tire.Pressure": "read_tires",
    "Vehicle.Chassis.Axle.Row2.Wheel.Right.Tire.Pressure": "read_tires",
    "Vehicle.Powertrain.CombustionEngine.EngineCoolant.Temperature": "read_diagnostics",
    "Vehicle.Powertrain.CombustionEngine.Speed": "read_diagnostics",
    "Vehicle.Powertrain.Transmission.CurrentGear": "read_diagnostics",
    "Vehicle.OBD.Status.IsMILOn": "read_diagnostics",
    "Vehicle.OBD.EngineLoad": "read_diagnostics",
    "Vehicle.OBD.IntakeTemp": "read_diagnostics",
    "Vehicle.OBD.ThrottlePosition": "read_diagnostics",
    "Vehicle.OBD.RunTime": "read_diagnostics",
    "Vehicle.OBD.ControlModuleVoltage": "read_diagnostics",
    "Vehicle.OBD.DTCList": "read_diagnostics",
    "Vehicle.OBD.PendingDTCList": "read_diagnostics",
    "Vehicle.Exterior.AirTemperature": "read_thermometer",
    "Vehicle.CurrentLocation.Latitude": "read_location",
    "Vehicle.CurrentLocation.Longitude": "read_location",
    "Vehicle.CurrentLocation.Altitude": "read_location",
    "Vehicle.CurrentLocation.Heading": "read_compass",
    "Vehicle.Cabin.Door.Row1.DriverSide.IsLocked": "read_security",
    "Vehicle.Cabin.Door.Row1.PassengerSide.IsLocked": "read_security",
    "Vehicle.Cabin.Door.Row2.DriverSide.IsLocked": "read_security",
    "Vehicle.Cabin.Door.Row2.PassengerSide.IsLocked": "read_security",
    "Vehicle.Cabin.HVAC.AmbientAirTemperature": "read_climate",
    "Vehicle.VehicleIdentification.VIN": "read_vin",
}
