"""nccid: an open, self-hostable national chest imaging research database."""

from __future__ import annotations

__version__ = "0.1.0"

from nccid.access.api import Warehouse, open_warehouse

__all__ = ["Warehouse", "__version__", "open_warehouse"]
