"""The embedded default: a local directory as an object store.

Writes go to a temporary file inside the store's own `.nccid-tmp/` folder (same filesystem) and are then
renamed or hard-linked into place, so a reader never sees half an object and a no-overwrite write is a
single atomic `link()` that fails if the key exists. The MD5 checksum of each object is cached in an extended
attribute, stamped with the file's size and mtime, so listings are cheap and a file changed behind our back
is re-hashed rather than trusted. `list_unhashed` reads no bytes at all: a file without a current cached
checksum is listed with '' and hashed by whoever reads it (the loader's workers, in parallel).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from nccid.files import md5_file
from nccid.store.base import (
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StoreError,
    check_key,
    check_prefix,
)

TMP_DIR = ".nccid-tmp"
_XATTR = "user.nccid.md5"
_CHUNK = 1 << 20


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns}:{st.st_size}"


def cached_checksum(path: str, st: os.stat_result | None = None) -> str:
    """The file's MD5, from the xattr cache when it still matches size and mtime, else computed and cached."""
    st = st or os.stat(path)
    digest = known_checksum(path, st)
    if digest:
        return digest
    digest = md5_file(path)
    _remember_checksum(path, digest, st)
    return digest


def known_checksum(path: str, st: os.stat_result) -> str:
    """The file's MD5 from the xattr cache when it still matches size and mtime, else '' (nothing is read)."""
    try:
        digest, stamp = os.getxattr(path, _XATTR).decode().split(":", 1)
    except (OSError, ValueError):
        return ""
    return digest if stamp == _stamp(st) else ""


def _remember_checksum(path: str, digest: str, st: os.stat_result | None = None) -> None:
    with contextlib.suppress(OSError):  # a filesystem without user xattrs just re-hashes next time
        st = st or os.stat(path)
        os.setxattr(path, _XATTR, f"{digest}:{_stamp(st)}".encode())


def _copy_bytes(src: str, dst: str) -> None:
    """Kernel-side copy (reflink where the filesystem can), falling back to a plain copy."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        remaining = os.fstat(fin.fileno()).st_size
        try:
            while remaining > 0:
                copied = os.copy_file_range(fin.fileno(), fout.fileno(), min(remaining, 1 << 30))
                if copied == 0:
                    break
                remaining -= copied
        except OSError:
            fin.seek(0)
            fout.seek(0)
            fout.truncate()
            shutil.copyfileobj(fin, fout, _CHUNK)


class LocalStore(ObjectStore):
    """Objects are files below `root`; the key is the path relative to it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()
        self._tmp = self.root / TMP_DIR

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (LocalStore, (str(self.root),))

    # -- paths -----------------------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        check_key(key)
        if key.split("/", 1)[0] == TMP_DIR:
            raise StoreError(f"{key!r} is inside the store's private temporary folder")
        return os.path.join(self.root, key)

    def _temp_path(self) -> str:
        self._tmp.mkdir(exist_ok=True)
        return os.path.join(self._tmp, f"{uuid.uuid4().hex}.part")

    def _info(self, key: str, path: str, st: os.stat_result, *, hashed: bool = True) -> ObjectInfo:
        """`hashed=False` gives '' for a checksum not cached (see `list_unhashed`) instead of reading the file."""
        digest = cached_checksum(path, st) if hashed else known_checksum(path, st)
        return ObjectInfo(key=key, size=st.st_size, checksum=digest, mtime=st.st_mtime)

    # -- listing ---------------------------------------------------------------------------------------
    def _entries(self, prefix: str) -> tuple[str, list[os.DirEntry]]:
        """The folder a prefix points into ('a/b/c' -> 'a/b/') and its entries starting with the rest ('c')."""
        check_prefix(prefix)
        dir_part, _, name_part = prefix.rpartition("/")
        base = f"{dir_part}/" if dir_part else ""
        try:
            with os.scandir(os.path.join(self.root, dir_part) if dir_part else self.root) as it:
                entries = [e for e in it if e.name.startswith(name_part) and not (base == "" and e.name == TMP_DIR)]
        except (FileNotFoundError, NotADirectoryError):
            return base, []
        return base, entries

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base, entries = self._entries(prefix)
        yield from self._walk(base, entries, hashed=True)

    def list_unhashed(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Like `list`, with '' for a checksum the xattr cache does not hold for the file's current size and
        mtime (a file copied in by `cp`, rsync or a sync): the listing reads no file's bytes."""
        base, entries = self._entries(prefix)
        yield from self._walk(base, entries, hashed=False)

    def checksum(self, key: str) -> str:
        """The object's MD5, from the cache or read now and cached for the next listing. Raises ObjectNotFound."""
        path = self._path(key)
        try:
            if os.path.isfile(path):
                return cached_checksum(path)
        except (FileNotFoundError, NotADirectoryError):
            pass
        raise ObjectNotFound(f"no object {key!r} in {self.url}")

    def _walk(self, base: str, entries: list[os.DirEntry], *, hashed: bool) -> Iterator[ObjectInfo]:
        # S3 order: a folder sorts as its name followed by '/', so 'a-b' comes before everything in 'a/'.
        entries.sort(key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                try:
                    with os.scandir(entry.path) as it:
                        children = list(it)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # removed by another writer while we listed
                yield from self._walk(f"{base}{entry.name}/", children, hashed=hashed)
            elif entry.is_file(follow_symlinks=False):
                yield self._info(base + entry.name, entry.path, entry.stat(follow_symlinks=False), hashed=hashed)

    def list_level(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base, entries = self._entries(prefix)
        for entry in sorted((e for e in entries if e.is_file(follow_symlinks=False)), key=lambda e: e.name):
            yield self._info(base + entry.name, entry.path, entry.stat(follow_symlinks=False))

    def list_dirs(self, prefix: str = "") -> list[str]:
        base, entries = self._entries(prefix)
        return sorted(f"{base}{e.name}/" for e in entries if e.is_dir(follow_symlinks=False))

    # -- reading ---------------------------------------------------------------------------------------
    def stat(self, key: str) -> ObjectInfo | None:
        """Size, MD5 and time of one object; None when absent or when a folder stands at that key."""
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not os.path.isfile(path):
            return None
        return self._info(key, path, st)

    def read(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as handle:
                return handle.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from exc

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with self.open(key) as handle:
            handle.seek(start)
            return handle.read(length)

    def open(self, key: str, size: int | None = None) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from exc

    def local_path(self, key: str) -> str:
        """Where the object lives on disk (the local backend only; used for zero-copy downloads)."""
        return self._path(key)

    def download(self, key: str, dest: BinaryIO, size: int | None = None) -> None:
        with self.open(key) as handle:
            shutil.copyfileobj(handle, dest, _CHUNK)

    # -- writing ---------------------------------------------------------------------------------------
    def _publish(self, tmp: str, key: str, path: str, overwrite: bool) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # atomic create-if-absent
                except FileExistsError as exc:
                    raise ObjectExists(f"object {key!r} already exists in {self.url}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def write(self, key: str, data: bytes | BinaryIO, *, overwrite: bool = True) -> ObjectInfo:
        """Write to a temporary file, then rename (or hard-link, create-only) it into place, so a reader never
        sees half an object. Raises ObjectExists with `overwrite=False` on an existing key, and StoreError
        naming the key and cause (a full disk, ...) when the write fails; no temporary file is left."""
        path = self._path(key)
        if not overwrite and os.path.exists(path):
            raise ObjectExists(f"object {key!r} already exists in {self.url}")
        tmp = self._temp_path()
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with open(tmp, "wb") as out:
                if isinstance(data, bytes | bytearray | memoryview):
                    digest.update(data)
                    out.write(data)
                else:
                    while chunk := data.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            _remember_checksum(tmp, digest.hexdigest())
            self._publish(tmp, key, path, overwrite)
        except OSError as exc:
            raise self._write_failed(tmp, key, exc) from exc
        return self._info(key, path, os.stat(path))

    def copy(self, src: str, dst: str, *, overwrite: bool = True) -> None:
        """Copy an object atomically like `write`, keeping its cached MD5. Raises ObjectNotFound for a missing
        `src`, ObjectExists with `overwrite=False` on an existing `dst`, StoreError when the write fails."""
        src_path, dst_path = self._path(src), self._path(dst)
        if not os.path.isfile(src_path):
            raise ObjectNotFound(f"no object {src!r} in {self.url}")
        if not overwrite and os.path.exists(dst_path):
            raise ObjectExists(f"object {dst!r} already exists in {self.url}")
        digest = cached_checksum(src_path)
        tmp = self._temp_path()
        try:
            _copy_bytes(src_path, tmp)
            _remember_checksum(tmp, digest)
            self._publish(tmp, dst, dst_path, overwrite)
        except OSError as exc:
            raise self._write_failed(tmp, dst, exc) from exc

    def _write_failed(self, tmp: str, key: str, exc: OSError) -> StoreError:
        """No temporary file outlives a failed write; one line naming the key and the cause (a full disk, ...)."""
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        return StoreError(f"{self.url}: cannot write {key!r}: {cause}; fix that, then run the same command again")

    def delete(self, key: str) -> None:
        """Remove one object (absent is fine) and the folders it leaves empty, as S3 leaves no folders behind."""
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        # tidy empty folders up to the root, as S3 has no folders to leave behind
        parent = os.path.dirname(path)
        while parent != str(self.root):
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)

    def clean_temp(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary files left by a killed writer; young ones may belong to a live writer."""
        removed = 0
        cutoff = time.time() - older_than_s
        with contextlib.suppress(FileNotFoundError), os.scandir(self._tmp) as it:
            for entry in it:
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
        return removed
