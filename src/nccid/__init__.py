"""nccid: an open, self-hostable national chest imaging research database."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Warehouse", "__version__", "open_warehouse"]


def __getattr__(name: str) -> object:
    """`nccid.Warehouse` and `nccid.open_warehouse` load on first use: a command that does not need the
    researcher's API (or pydicom, numpy and boto3 behind it) does not pay for importing them."""
    if name in ("Warehouse", "open_warehouse"):
        from nccid.access import api

        return getattr(api, name)
    raise AttributeError(f"module 'nccid' has no attribute {name!r}")
