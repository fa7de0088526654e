"""Small file helpers every room shares: owner-only writes and the MD5 of a file (an object store's ETag)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, owner-only from the first byte: secrets and identifiable reports are never
    world-readable, not even for a moment. Creates the parent folder; replaces an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def md5_file(path: str | os.PathLike[str]) -> str:
    """The hex MD5 of the file's bytes (what S3 reports as the ETag of a single-part object), read by the
    standard library into one reused buffer. Raises OSError if the file cannot be read."""
    with open(path, "rb", buffering=0) as handle:
        return hashlib.file_digest(handle, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()
