"""Developer tools that run the whole product on one machine: ``vgw demo`` and ``vgw bench``.

Layer: tools (README "Layout"), just under the CLI: the only part of the package besides the CLI that may
import :mod:`vgw_sim` (a private broker, the CAN simulator, the reference cloud peer).
"""
