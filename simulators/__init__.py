"""Simulators that stand in for the car and the cloud on one machine, with no hardware.

- :mod:`vgw.simulators.vehicle`: a deterministic vehicle model driving a drive cycle along a route.
- :mod:`vgw.simulators.can_sim`: encodes that model with a DBC onto a python-can bus or into a trace.
- :mod:`vgw.simulators.slcan_pty`: an SLCAN (Lawicel) adapter on a pseudo-terminal.
- :mod:`vgw.simulators.paths`: where the shipped DBC and signal map live.
"""
