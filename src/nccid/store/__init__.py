"""One object-store interface; `open_store(url)` picks the backend from the URL."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

from nccid.store.base import (
    InvalidKey,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StoreError,
    check_key,
)
from nccid.store.local import LocalStore

__all__ = [
    "InvalidKey",
    "LocalStore",
    "ObjectExists",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "StoreError",
    "check_key",
    "open_store",
]


def open_store(url: str | os.PathLike[str]) -> ObjectStore:
    """`file:///path`, a plain path, or (with the S3 backend) `s3://bucket[/prefix]`."""
    text = os.fspath(url)
    parsed = urlparse(text)
    if parsed.scheme in ("", "file"):
        path = unquote(parsed.path) if parsed.scheme == "file" else text
        return LocalStore(os.path.expanduser(path))
    if parsed.scheme == "s3":
        try:
            from nccid.store.s3 import S3Store
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise StoreError(f"S3 support is not installed, needed for {text}: {exc}") from exc
        return S3Store.from_url(text)
    raise StoreError(f"unsupported store URL {text!r}: use a path, file:///path or s3://bucket")
