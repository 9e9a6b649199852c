"""A deterministic vehicle model: a plug-in hybrid driving a city loop, for the CAN and ELM327 simulators.

The car follows a looping drive cycle (urban hops, then extra-urban cruising, in the spirit of WLTP's
low/medium/high phases), then parks for a charging session and starts over. Everything else is derived
from the speed trace so the values agree with each other:

- distance = trapezoidal integral of speed; it feeds the odometer, the position along :data:`ROUTE`
  (heading = bearing of the current segment), fuel use, oil life and the distance since DTCs were cleared;
- road-load power (inertia, aerodynamic drag, rolling resistance) splits into engine power, electric
  assist and regeneration, which drive fuel use, battery current and state of charge;
- the automatic gearbox picks its gear from speed; engine speed follows speed and gear (idle at rest,
  0 with the engine off while parked).

All randomness comes from one ``random.Random(seed)``: the same seed and the same ``step`` calls give the
same states. The model does no I/O and reads no clock (except ``time.time()`` once when no
``start_time`` is given). Units are those of ``dbc/vehicle.dbc``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

# --- constants --------------------------------------------------------------------------------------

EARTH_RADIUS_M = 6_371_008.8  # mean Earth radius (IUGG)
YEAR_S = 365 * 86_400

# A synthetic loop through Berlin-Mitte (about 9 km); closed: the last point joins the first.
ROUTE: tuple[tuple[float, float], ...] = (
    (52.516270, 13.377700),
    (52.517050, 13.388700),
    (52.518200, 13.397200),
    (52.521900, 13.413200),
    (52.514300, 13.418700),
    (52.507800, 13.405000),
    (52.505100, 13.390500),
    (52.509500, 13.376000),
)

DEFAULT_VIN = "1M8GDM9AXKP042788"  # a well-known sample VIN with a valid check digit (ISO 3779 / 49 CFR 565)

# Six-speed automatic gearbox (ratios typical of a transverse 6-speed), final drive, wheel.
GEAR_RATIOS: tuple[float, ...] = (4.17, 2.34, 1.52, 1.14, 0.87, 0.69)
FINAL_DRIVE = 3.46
WHEEL_RADIUS_M = 0.32
IDLE_RPM = 780.0
UPSHIFT_KMH: tuple[float, ...] = (15.0, 30.0, 45.0, 60.0, 75.0)  # 1->2 ... 5->6
DOWNSHIFT_HYSTERESIS_KMH = 7.0
GEAR_PARK = 126  # VSS CurrentGear convention

# Vehicle and powertrain.
MASS_KG = 1650.0
CDA_M2 = 0.62  # drag coefficient x frontal area
ROLLING_RESISTANCE = 0.010
AIR_DENSITY = 1.2
G = 9.81
TANK_L = 45.0
FUEL_MJ_PER_L = 32.0
ENGINE_EFFICIENCY = 0.30
IDLE_FUEL_L_PER_S = 0.15e-3  # ~0.54 l/h friction and pumping losses while the engine turns
ENGINE_MAX_KW = 110.0
BATTERY_AH = 37.0
BATTERY_NOMINAL_V = 345.0
CHARGER_KW = 3.6
REGEN_SHARE = 0.65
ASSIST_SHARE = 0.25
ASSIST_MAX_KW = 20.0
SOC_HOLD_PCT = 25.0  # below it the engine charges the battery instead of being assisted
SOC_CHARGE_LIMIT_PCT = 95.0
OIL_LIFE_KM = 15_000.0  # oil change interval by distance (and one year by time)
CABIN_SET_POINT_C = 21.5

# The drive cycle: (target speed km/h, seconds held once reached). Stops are target 0.
DRIVE_CYCLE: tuple[tuple[float, float], ...] = (
    (0.0, 12.0),
    (32.0, 20.0),
    (0.0, 10.0),
    (50.0, 35.0),
    (18.0, 6.0),
    (50.0, 25.0),
    (0.0, 15.0),
    (45.0, 20.0),
    (0.0, 20.0),
    (70.0, 40.0),
    (90.0, 60.0),
    (60.0, 20.0),
    (0.0, 12.0),
    (110.0, 45.0),
    (80.0, 30.0),
    (0.0, 20.0),
)
PARK_S = 90.0  # charging stop at the end of each loop of the cycle
DOORS_OPEN_S = 8.0  # doors stay unlocked this long after parking (driver gets out)
AUTO_LOCK_KMH = 8.0
MAX_SUBSTEP_S = 0.1

_VIN_ALPHABET = frozenset("0123456789ABCDEFGHJKLMNPRSTUVWXYZ")
_VIN_VALUES = {
    **{str(d): d for d in range(10)},
    **dict(zip("ABCDEFGH", range(1, 9), strict=True)),
    **dict(zip("JKLMN", range(1, 6), strict=True)),
    "P": 7,
    "R": 9,
    **dict(zip("STUVWXYZ", range(2, 10), strict=True)),
}
_VIN_WEIGHTS = (8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2)


# --- helpers ----------------------------------------------------------------------------------------


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres between two WGS84 points given in degrees."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def initial_bearing_deg(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Initial great-circle bearing from point 1 to point 2, degrees clockwise from north in [0, 360)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dl = math.radians(lon2 - lon1)
    x = math.sin(dl) * math.cos(p2)
    y = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return math.degrees(math.atan2(x, y)) % 360.0


def vin_check_digit(vin: str) -> str:
    """The North-American check digit (position 9) for a 17-character VIN.

    Raises ``ValueError`` if ``vin`` is not 17 characters of the VIN alphabet (no I, O, Q).
    """
    vin = vin.upper()
    if len(vin) != 17 or not set(vin) <= _VIN_ALPHABET:
        raise ValueError("a VIN is 17 characters of 0-9 and A-Z without I, O, Q")
    total = sum(_VIN_VALUES[c] * w for c, w in zip(vin, _VIN_WEIGHTS, strict=True))
    rest = total % 11
    return "X" if rest == 10 else str(rest)


def engine_rpm_for(speed_kmh: float, gear: int) -> float:
    """Engine speed for a road speed in a forward gear (1..6), never below idle.

    Below the speed where the locked-up driveline would turn the engine slower than idle, the torque
    converter slips and the engine idles. Raises ``ValueError`` for a gear outside 1..6.
    """
    if not 1 <= gear <= len(GEAR_RATIOS):
        raise ValueError(f"gear {gear} is not a forward gear")
    wheel_rpm = (speed_kmh / 3.6) / (2 * math.pi * WHEEL_RADIUS_M) * 60.0
    return max(IDLE_RPM, wheel_rpm * GEAR_RATIOS[gear - 1] * FINAL_DRIVE)


def _gear_for(speed_kmh: float, gear: int) -> int:
    """Shift schedule with hysteresis: upshift at UPSHIFT_KMH, downshift a few km/h lower."""
    gear = max(1, min(gear, len(GEAR_RATIOS)))
    while gear < len(GEAR_RATIOS) and speed_kmh >= UPSHIFT_KMH[gear - 1]:
        gear += 1
    while gear > 1 and speed_kmh < UPSHIFT_KMH[gear - 2] - DOWNSHIFT_HYSTERESIS_KMH:
        gear -= 1
    return gear


class Route:
    """A closed polyline of (lat, lon) waypoints walked by distance.

    Between waypoints the position is interpolated linearly in latitude/longitude, which over a few
    hundred metres differs from the great circle by millimetres.
    """

    def __init__(self, waypoints: Sequence[tuple[float, float]] = ROUTE) -> None:
        """Raises ``ValueError`` for fewer than two waypoints."""
        if len(waypoints) < 2:
            raise ValueError("a route needs at least two waypoints")
        self.waypoints = tuple(waypoints)
        n = len(self.waypoints)
        self._segments: list[tuple[float, float, float, float, float, float]] = []
        start = 0.0
        for i in range(n):
            lat1, lon1 = self.waypoints[i]
            lat2, lon2 = self.waypoints[(i + 1) % n]
            length = haversine_m(lat1, lon1, lat2, lon2)
            self._segments.append((start, length, lat1, lon1, lat2, lon2))
            start += length
        self.length_m = start
        self._bearings = [initial_bearing_deg(s[2], s[3], s[4], s[5]) for s in self._segments]

    def segment_at(self, distance_m: float) -> int:
        """Index of the segment holding ``distance_m`` (taken modulo the loop length)."""
        d = distance_m % self.length_m
        for i, seg in enumerate(self._segments):
            if d < seg[0] + seg[1]:
                return i
        return len(self._segments) - 1

    def segment_start_m(self, index: int) -> float:
        """Distance along the loop where segment ``index`` starts."""
        return self._segments[index][0]

    def position(self, distance_m: float) -> tuple[float, float, float]:
        """(latitude, longitude, heading) at ``distance_m`` along the loop; heading of the segment."""
        i = self.segment_at(distance_m)
        start, length, lat1, lon1, lat2, lon2 = self._segments[i]
        f = 0.0 if length <= 0 else ((distance_m % self.length_m) - start) / length
        f = min(1.0, max(0.0, f))
        return lat1 + (lat2 - lat1) * f, lon1 + (lon2 - lon1) * f, self._bearings[i]


# --- state ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VehicleState:
    """A snapshot of the vehicle, in the physical units of ``dbc/vehicle.dbc`` (plus OBD-II extras)."""

    t: float  # simulated seconds since the model started
    timestamp: float  # Unix time of this state: start_time + t
    speed_kmh: float
    accel_mps2: float
    engine_rpm: float
    engine_running: bool
    gear: int  # VSS CurrentGear: -1 reverse, 0 neutral, 1..6, 126 park
    odometer_km: float
    fuel_level_pct: float
    fuel_l: float
    battery_soc_pct: float
    battery_current_a: float  # positive into the battery (VSS CurrentCurrent)
    battery_voltage_v: float
    charging: bool
    charge_cable_connected: bool
    latitude_deg: float
    longitude_deg: float
    heading_deg: float
    tire_pressure_fl_kpa: float
    tire_pressure_fr_kpa: float
    tire_pressure_rl_kpa: float
    tire_pressure_rr_kpa: float
    tire_temp_c: float
    oil_life_remaining_s: float
    oil_life_pct: float
    ambient_temp_c: float
    cabin_temp_c: float
    door_locked_fl: bool
    door_locked_fr: bool
    door_locked_rl: bool
    door_locked_rr: bool
    vin: str
    # OBD-II mode 01 extras (SAE J1979 units)
    coolant_temp_c: float
    intake_air_temp_c: float
    module_voltage_v: float
    engine_load_pct: float
    throttle_pct: float
    runtime_s: float  # since engine start (PID 1F)
    distance_since_dtc_clear_km: float  # PID 31
    mil_on: bool
    dtcs: tuple[str, ...]


# --- model ------------------------------------------------------------------------------------------


class VehicleModel:
    """The vehicle: call :meth:`step` to advance simulated time, read :attr:`state`.

    ``seed`` picks the start conditions (odometer, fuel, SoC, oil life, climate, tyre pressures, place
    on the route) and the small speed fluctuations. ``start_time`` is the Unix time of ``t = 0``
    (default: now). ``dtcs`` are stored trouble codes the OBD-II simulator reports (e.g. ``("P0420",)``).

    Raises ``ValueError`` for a malformed VIN or DTC.
    """

    def __init__(
        self,
        seed: int = 1,
        vin: str = DEFAULT_VIN,
        start_time: float | None = None,
        *,
        dtcs: Sequence[str] = (),
        route: Route | None = None,
    ) -> None:
        vin = vin.upper()
        vin_check_digit(vin)  # validates length and alphabet
        for code in dtcs:
            if len(code) != 5 or code[0] not in "PCBU" or not all(c in "0123456789ABCDEF" for c in code[1:]):
                raise ValueError(f"DTC {code!r} is not of the form P0420")
        self.vin = vin
        self.seed = seed
        self.start_time = time.time() if start_time is None else float(start_time)
        self.route = route or Route()
        self.dtcs = tuple(dtcs)
        rng = random.Random(seed)
        self._rng = rng
        self.t = 0.0

        # Drive-cycle state.
        self._phase = 0
        self._hold_left = DRIVE_CYCLE[0][1]
        self._parked_left = 0.0  # > 0 while parked for charging
        self._base_kmh = 0.0  # profile speed without fluctuation
        self._jitter_kmh = 0.0
        self._speed_kmh = 0.0
        self._accel = 0.0
        self._gear = 1
        self._engine_running = True
        self._runtime_s = 0.0
        self._engine_power_w = 600.0

        # Start conditions, drawn in a fixed order.
        self._odometer_km = round(rng.uniform(8_000.0, 60_000.0), 1)
        self._fuel_l = TANK_L * rng.uniform(0.55, 0.85)
        self._soc = rng.uniform(45.0, 80.0)
        self._battery_current = 0.0
        self._oil_life_s = YEAR_S * rng.uniform(0.35, 0.9)
        self._ambient_base = rng.uniform(8.0, 24.0)
        self._ambient_phase = rng.uniform(0.0, 2 * math.pi)
        self._ambient = self._ambient_base
        self._cabin = self._ambient_base + rng.uniform(-1.0, 4.0)
        self._coolant = self._ambient_base + rng.uniform(0.0, 40.0)
        cold_20c = (
            250.0 + rng.uniform(-6.0, 6.0),
            250.0 + rng.uniform(-6.0, 6.0),
            240.0 + rng.uniform(-6.0, 6.0),
            240.0 + rng.uniform(-6.0, 6.0),
        )
        self._tire_cold_kpa = cold_20c  # cold inflation pressures referred to 20 degC
        self._tire_temp = self._ambient_base
        self._route_m = rng.uniform(0.0, self.route.length_m)
        self._dtc_clear_km = rng.uniform(50.0, 3_000.0)
        self._locked = False
        self._charging = False
        self._cable = False

    # --- public ---------------------------------------------------------------------------------

    @property
    def route_distance_m(self) -> float:
        """Distance travelled along the route since the start point of the loop (unwrapped)."""
        return self._route_m

    @property
    def parked(self) -> bool:
        """True during the charging stop at the end of each drive-cycle loop."""
        return self._parked_left > 0.0

    def step(self, dt: float) -> None:
        """Advance simulated time by ``dt`` seconds (internally in steps of at most 0.1 s).

        Raises ``ValueError`` for a negative or non-finite ``dt``.
        """
        if not math.isfinite(dt) or dt < 0:
            raise ValueError(f"dt must be a finite non-negative number, got {dt!r}")
        n = max(1, math.ceil(dt / MAX_SUBSTEP_S - 1e-9))
        h = dt / n
        for _ in range(n):
            if h > 0:
                self._substep(h)

    @property
    def state(self) -> VehicleState:
        """A snapshot of the current state (a new immutable object each call)."""
        lat, lon, heading = self.route.position(self._route_m)
        speed = self._speed_kmh
        if self.parked:
            gear = GEAR_PARK
        else:
            gear = self._gear
        rpm = engine_rpm_for(speed, self._gear) if self._engine_running else 0.0
        tire_factor = (self._tire_temp + 273.15) / 293.15  # ideal gas, volume constant
        cold = self._tire_cold_kpa
        power_kw = self._engine_power_w / 1000.0
        available_kw = ENGINE_MAX_KW * min(1.0, max(rpm, IDLE_RPM) / 5500.0)
        load = 0.0 if not self._engine_running else min(100.0, 20.0 + 80.0 * power_kw / available_kw)
        throttle = 0.0 if not self._engine_running else min(100.0, 12.0 + 0.8 * (load - 20.0))
        volts = BATTERY_NOMINAL_V + 0.4 * (self._soc - 50.0)
        module_v = 14.3 if self._engine_running else (13.8 if self._charging else 12.5)
        locked = self._locked
        return VehicleState(
            t=self.t,
            timestamp=self.start_time + self.t,
            speed_kmh=speed,
            accel_mps2=self._accel,
            engine_rpm=rpm,
            engine_running=self._engine_running,
            gear=gear,
            odometer_km=self._odometer_km,
            fuel_level_pct=100.0 * self._fuel_l / TANK_L,
            fuel_l=self._fuel_l,
            battery_soc_pct=self._soc,
            battery_current_a=self._battery_current,
            battery_voltage_v=volts,
            charging=self._charging,
            charge_cable_connected=self._cable,
            latitude_deg=lat,
            longitude_deg=lon,
            heading_deg=heading,
            tire_pressure_fl_kpa=cold[0] * tire_factor,
            tire_pressure_fr_kpa=cold[1] * tire_factor,
            tire_pressure_rl_kpa=cold[2] * tire_factor,
            tire_pressure_rr_kpa=cold[3] * tire_factor,
            tire_temp_c=self._tire_temp,
            oil_life_remaining_s=self._oil_life_s,
            oil_life_pct=max(0.0, min(100.0, 100.0 * self._oil_life_s / YEAR_S)),
            ambient_temp_c=self._ambient,
            cabin_temp_c=self._cabin,
            door_locked_fl=locked,
            door_locked_fr=locked,
            door_locked_rl=locked,
            door_locked_rr=locked,
            vin=self.vin,
            coolant_temp_c=self._coolant,
            intake_air_temp_c=self._ambient + max(1.0, 8.0 - 0.05 * speed),
            module_voltage_v=module_v,
            engine_load_pct=max(0.0, load),
            throttle_pct=max(0.0, throttle),
            runtime_s=self._runtime_s,
            distance_since_dtc_clear_km=self._dtc_clear_km,
            mil_on=bool(self.dtcs),
            dtcs=self.dtcs,
        )

    # --- internals ------------------------------------------------------------------------------

    def _advance_profile(self, dt: float) -> None:
        """Move the profile speed toward the current phase's target; hold; go to the next phase."""
        if self._parked_left > 0.0:
            self._parked_left -= dt
            if self._parked_left <= 0.0:
                self._parked_left = 0.0
                self._phase = 0
                self._hold_left = DRIVE_CYCLE[0][1]
            return
        target, _hold = DRIVE_CYCLE[self._phase]
        v = self._base_kmh
        if v < target:
            a_max = max(0.5, 1.8 - 0.012 * v)  # m/s^2, less punch at speed
            v = min(target, v + a_max * 3.6 * dt)
        elif v > target:
            v = max(target, v - 1.4 * 3.6 * dt)
        elif self._hold_left > 0.0:
            self._hold_left -= dt
        else:
            self._phase += 1
            if self._phase >= len(DRIVE_CYCLE):
                self._phase = 0
                self._parked_left = PARK_S
            self._hold_left = DRIVE_CYCLE[self._phase][1]
        self._base_kmh = v

    def _substep(self, dt: float) -> None:
        rng = self._rng
        self.t += dt
        was_parked = self.parked
        self._advance_profile(dt)
        parked = self.parked

        # Speed: the profile plus a slow, mean-reverting fluctuation while cruising.
        target = 0.0 if parked else DRIVE_CYCLE[self._phase][0]
        if self._base_kmh > 0.0 and self._base_kmh == target:
            self._jitter_kmh += -0.05 * self._jitter_kmh * dt + rng.gauss(0.0, 0.25) * math.sqrt(dt)
            self._jitter_kmh = max(-2.0, min(2.0, self._jitter_kmh))
        else:
            self._jitter_kmh *= max(0.0, 1.0 - dt)
        v_prev = self._speed_kmh
        v_new = max(0.0, self._base_kmh + (self._jitter_kmh if self._base_kmh > 0.0 else 0.0))
        self._speed_kmh = v_new
        self._accel = (v_new - v_prev) / 3.6 / dt

        # Distance: trapezoid of the speed over the step.
        dist_m = (v_prev + v_new) / 2.0 / 3.6 * dt
        self._odometer_km += dist_m / 1000.0
        self._route_m += dist_m
        self._dtc_clear_km += dist_m / 1000.0

        # Parking: engine off, cable in, charge; leave: cable out, engine on.
        if parked and not was_parked:
            self._engine_running = False
            self._runtime_s = 0.0
            self._cable = True
            if self._fuel_l < 0.07 * TANK_L:
                self._fuel_l = 0.95 * TANK_L  # refuelled at the charging stop
        elif was_parked and not parked:
            self._cable = False
            self._charging = False
            self._engine_running = True
            self._runtime_s = 0.0
        if self._engine_running:
            self._runtime_s += dt
        self._gear = _gear_for(v_new, self._gear)

        # Road load and its split between engine and battery.
        v_ms = (v_prev + v_new) / 2.0 / 3.6
        p_wheel = (
            MASS_KG * self._accel * v_ms
            + 0.5 * AIR_DENSITY * CDA_M2 * v_ms**3
            + MASS_KG * G * ROLLING_RESISTANCE * v_ms
        )
        volts = BATTERY_NOMINAL_V + 0.4 * (self._soc - 50.0)
        p_engine = 0.0
        if parked:
            self._charging = self._soc < SOC_CHARGE_LIMIT_PCT
            current = CHARGER_KW * 1000.0 / volts if self._charging else 0.0
        elif p_wheel < 0.0:
            current = min(-p_wheel * REGEN_SHARE, 40_000.0) / volts
            p_engine = 600.0
        elif self._soc > SOC_HOLD_PCT:
            assist = min(ASSIST_SHARE * p_wheel, ASSIST_MAX_KW * 1000.0)
            current = -assist / volts - 1.2  # minus the 12 V DC/DC load
            p_engine = (p_wheel - assist) / 0.92 + 600.0
        else:
            current = 8.0  # the engine charges the battery
            p_engine = p_wheel / 0.92 + 8.0 * volts / 0.9 + 600.0
        self._battery_current = current
        self._engine_power_w = p_engine if self._engine_running else 0.0
        self._soc = min(100.0, max(0.0, self._soc + current * dt / 3600.0 / BATTERY_AH * 100.0))

        # Fuel: engine power at a fixed efficiency, plus idle losses.
        if self._engine_running:
            burn = p_engine / (ENGINE_EFFICIENCY * FUEL_MJ_PER_L * 1e6) + IDLE_FUEL_L_PER_S
            self._fuel_l = max(0.0, self._fuel_l - burn * dt)

        # Oil life falls with time and, much faster, with distance (1 year or 15,000 km).
        self._oil_life_s -= dt + dist_m / 1000.0 * (YEAR_S / OIL_LIFE_KM)

        # Climate: ambient drifts slowly; cabin converges to the set point while the HVAC runs.
        self._ambient = self._ambient_base + 1.5 * math.sin(
            2 * math.pi * self.t / 3600.0 + self._ambient_phase
        )
        cabin_goal, cabin_tau = (
            (CABIN_SET_POINT_C, 240.0) if self._engine_running else (self._ambient, 3600.0)
        )
        self._cabin += (cabin_goal - self._cabin) * min(1.0, dt / cabin_tau)
        coolant_goal, coolant_tau = (90.0, 240.0) if self._engine_running else (self._ambient, 1800.0)
        self._coolant += (coolant_goal - self._coolant) * min(1.0, dt / coolant_tau)
        tire_goal = self._ambient + 0.25 * v_new
        self._tire_temp += (tire_goal - self._tire_temp) * min(1.0, dt / 900.0)

        # Doors: auto-lock when moving; unlocked while the driver gets out at the charging stop.
        if v_new >= AUTO_LOCK_KMH:
            self._locked = True
        elif parked:
            self._locked = (PARK_S - self._parked_left) >= DOORS_OPEN_S
