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
    StoreMissing,
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
    "StoreMissing",
    "check_key",
    "open_store",
]


def open_store(url: str | os.PathLike[str], *, must_exist: bool = False) -> ObjectStore:
    """The store at `file:///path`, a plain path, or (with the S3 backend) `s3://bucket[/prefix]`.

    With `must_exist`, a store that is not there (a mistyped folder, a path that is a file, a bucket that does
    not exist) raises StoreMissing instead of being created: only commands that make a store create one.
    Raises StoreError for a URL of another scheme.
    """
    text = os.fspath(url)
    parsed = urlparse(text)
    if parsed.scheme in ("", "file"):
        path = os.path.expanduser(unquote(parsed.path) if parsed.scheme == "file" else text)
        if must_exist and not os.path.isdir(path):
            what = "is a file, not a store folder" if os.path.exists(path) else "does not exist"
            raise StoreMissing(f"store {path} {what}: check the path (nothing was created)")
        if os.path.isfile(path):
            raise StoreMissing(f"store {path} is a file, not a store folder")
        return LocalStore(path)
    if parsed.scheme == "s3":
        try:
            from nccid.store.s3 import S3Store
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise StoreError(f"S3 support is not installed, needed for {text}: {exc}") from exc
        store = S3Store.from_url(text)
        if must_exist:
            store.check_bucket()
        return store
    raise StoreError(f"unsupported store URL {text!r}: use a path, file:///path or s3://bucket")
