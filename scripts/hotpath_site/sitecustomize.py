"""Loads scripts/hotpath_patches.py into every interpreter started with this folder on PYTHONPATH and
VGW_PATCH set (the bench's agent child included). Measurement only."""
import os
import sys

if os.environ.get("VGW_PATCH"):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import hotpath_patches  # noqa: F401
