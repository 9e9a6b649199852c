"""Simulators that stand in for the car and the cloud on one machine, with no hardware.

- :mod:`vgw_sim.vehicle`: a deterministic vehicle model driving a drive cycle along a route.
- :mod:`vgw_sim.can_sim`: encodes that model with a DBC onto a python-can bus or into a trace.
- :mod:`vgw_sim.slcan_pty`: an SLCAN (Lawicel) adapter on a pseudo-terminal.
- :mod:`vgw_sim.paths`: where the shipped DBC and signal map live.
"""
