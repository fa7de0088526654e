"""The embedded default: a local directory as an object store.

A reader never sees half an object. A create-only write (how the loader files everything) fills an unnamed
file (O_TMPFILE) in the key's own folder and links it into place: a single atomic `link()` that fails if the
key exists, and a writer killed half-way leaves nothing behind. Overwrites (and filesystems without unnamed
files) go through a temporary file in the store's own `.nccid-tmp/` folder, renamed or hard-linked into place.

The MD5 checksum of each object is cached in an extended attribute, stamped with the file's size and mtime,
so listings are cheap and a file changed behind our back is re-hashed rather than trusted. `list_unhashed`
reads no bytes at all: a file without a current cached checksum is listed with '' and hashed by whoever reads
it (the loader's workers, in parallel).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
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
        cached = os.getxattr(path, _XATTR)  # b'<md5>:<mtime_ns>:<size>'
    except OSError:
        return ""
    digest, _, stamp = cached.partition(b":")
    return digest.decode("ascii", "replace") if stamp == b"%d:%d" % (st.st_mtime_ns, st.st_size) else ""


def _remember_checksum(path: str | int, digest: str, st: os.stat_result | None = None) -> None:
    with contextlib.suppress(OSError):  # a filesystem without user xattrs just re-hashes next time
        st = st or os.stat(path)
        os.setxattr(path, _XATTR, f"{digest}:{_stamp(st)}".encode())


def _copy_bytes(fin: int, fout: int) -> None:
    """Kernel-side copy between two open files (reflink where the filesystem can), else a plain copy."""
    remaining = os.fstat(fin).st_size
    try:
        while remaining > 0:
            copied = os.copy_file_range(fin, fout, min(remaining, 1 << 30))
            if copied == 0:
                break
            remaining -= copied
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
        os.lseek(fin, 0, os.SEEK_SET)
        os.lseek(fout, 0, os.SEEK_SET)
        os.ftruncate(fout, 0)
        while chunk := os.read(fin, _CHUNK):
            os.write(fout, chunk)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_UNNAMED_UNSUPPORTED = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL}
_PROC_FD = "/proc/self/fd"
_proc_fd_dirs: dict[int, int] = {}
_FOLDERS_REMEMBERED = 4096


def _link_unnamed(fd: int, path: str) -> None:
    """Give the unnamed file open as `fd` the name `path`: linkat(2) through /proc with AT_SYMLINK_FOLLOW.
    Raises FileExistsError if `path` exists (create-only), FileNotFoundError if its folder does not."""
    os.link(str(fd), path, src_dir_fd=_proc_fd_dir(), follow_symlinks=True)


def _proc_fd_dir() -> int:
    """This process's own /proc/self/fd folder, opened once per process (a forked worker opens its own): linking
    an unnamed file's entry there into place with AT_SYMLINK_FOLLOW gives it its name (linkat(2))."""
    pid = os.getpid()
    if pid not in _proc_fd_dirs:
        _proc_fd_dirs.clear()  # an inherited parent's entry must never be used
        _proc_fd_dirs[pid] = os.open(_PROC_FD, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return _proc_fd_dirs[pid]


def _s3_order(entries: list[os.DirEntry]) -> list[os.DirEntry]:
    """S3 order: a folder sorts as its name followed by '/', so 'a-b' comes before everything in 'a/'."""
    return sorted(entries, key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name)


class LocalStore(ObjectStore):
    """Objects are files below `root`; the key is the path relative to it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()
        self._tmp = self.root / TMP_DIR
        self._folders: set[str] = set()  # folders this process knows exist (saves a mkdir per object)
        self._unnamed: bool | None = None  # whether create-only writes use unnamed files (see _can_link_unnamed)

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
        return ObjectInfo(key, st.st_size, digest, st.st_mtime)

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
        """Files below `entries` in S3 key order, depth first without recursion (a no-op load walks every raw
        file: per-file cost is what makes it fast or slow)."""
        stack = [(base, _s3_order(entries), 0)]  # (key prefix, sorted entries, where to go on from)
        while stack:
            base, todo, start = stack.pop()
            for n in range(start, len(todo)):
                entry = todo[n]
                if entry.is_dir(follow_symlinks=False):
                    try:
                        with os.scandir(entry.path) as it:
                            children = _s3_order(list(it))
                    except (FileNotFoundError, NotADirectoryError):
                        continue  # removed by another writer while we listed
                    stack.append((base, todo, n + 1))  # the rest of this folder, after the subfolder
                    stack.append((f"{base}{entry.name}/", children, 0))
                    break
                if entry.is_file(follow_symlinks=False):
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
        """Write so that a reader never sees half an object: create-only (`overwrite=False`) fills an unnamed file
        in the key's folder and links it into place, refused with ObjectExists if the key exists; otherwise a
        temporary file is renamed over the key. Raises StoreError naming the key and cause (a full disk, ...);
        no temporary file is left behind."""
        path = self._path(key)
        if not overwrite and os.path.exists(path):
            raise ObjectExists(f"object {key!r} already exists in {self.url}")

        def fill(fd: int) -> str:
            digest = hashlib.md5(usedforsecurity=False)
            if isinstance(data, bytes | bytearray | memoryview):
                digest.update(data)
                _write_all(fd, data)
            else:
                while chunk := data.read(_CHUNK):
                    digest.update(chunk)
                    _write_all(fd, chunk)
            return digest.hexdigest()

        self._create(key, path, fill, overwrite)
        return self._info(key, path, os.stat(path))

    def copy(self, src: str, dst: str, *, overwrite: bool = True) -> str:
        """Copy an object atomically like `write`, keeping its cached MD5; returns that MD5 (of `src` as it is
        now: a file changed since it was last hashed is hashed again). Raises ObjectNotFound for a missing
        `src`, ObjectExists with `overwrite=False` on an existing `dst`, StoreError when the write fails."""
        src_path, dst_path = self._path(src), self._path(dst)
        if not overwrite and os.path.exists(dst_path):
            raise ObjectExists(f"object {dst!r} already exists in {self.url}")
        try:
            fin = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ObjectNotFound(f"no object {src!r} in {self.url}") from exc
        try:
            st = os.fstat(fin)
            if not stat.S_ISREG(st.st_mode):
                raise ObjectNotFound(f"no object {src!r} in {self.url}")
            digest = cached_checksum(src_path, st)  # from the xattr cache unless the file changed since

            def fill(fd: int) -> str:
                _copy_bytes(fin, fd)
                return digest

            self._create(dst, dst_path, fill, overwrite)
            return digest
        finally:
            os.close(fin)

    def _create(self, key: str, path: str, fill: Callable[[int], str], overwrite: bool) -> None:
        """Fill a new file (`fill` writes to the descriptor and returns the MD5) and put it at `path` atomically.

        Create-only writes use an unnamed file (O_TMPFILE) in the key's own folder, linked into place: one
        `link()` that fails if the key exists, and a writer killed half-way leaves nothing at all. Where the
        filesystem has no unnamed files (or for an overwrite), a named file in `.nccid-tmp/` is used instead.
        """
        folder = os.path.dirname(path)
        self._make_folder(folder)
        if not overwrite and self._can_link_unnamed():
            try:
                fd = self._open_unnamed(folder)
            except OSError as exc:
                if exc.errno not in _UNNAMED_UNSUPPORTED:
                    raise self._write_failed(None, key, exc) from exc
                self._unnamed = False  # this filesystem cannot: named temporary files from now on
            else:
                try:
                    digest = fill(fd)
                    _remember_checksum(fd, digest, os.fstat(fd))
                    try:
                        _link_unnamed(fd, path)
                    except FileNotFoundError:  # another writer tidied the folder away meanwhile (see `delete`)
                        self._folders.discard(folder)
                        self._make_folder(folder)
                        _link_unnamed(fd, path)
                except FileExistsError as exc:
                    raise ObjectExists(f"object {key!r} already exists in {self.url}") from exc
                except OSError as exc:
                    raise self._write_failed(None, key, exc) from exc
                finally:
                    os.close(fd)
                return
        tmp = self._temp_path()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            try:
                digest = fill(fd)
            finally:
                os.close(fd)
            _remember_checksum(tmp, digest)
            self._publish(tmp, key, path, overwrite)
        except OSError as exc:
            raise self._write_failed(tmp, key, exc) from exc

    def _can_link_unnamed(self) -> bool:
        """Whether unnamed files can be created and linked into place here: probed once per process in
        `.nccid-tmp/` (a filesystem without O_TMPFILE, or a /proc that refuses the link, as in some sandboxes,
        means named temporary files instead)."""
        if self._unnamed is None:
            self._unnamed = False
            if hasattr(os, "O_TMPFILE") and os.path.isdir(_PROC_FD):
                probe = ""
                try:
                    self._tmp.mkdir(exist_ok=True)
                    fd = os.open(self._tmp, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
                    try:
                        probe = os.path.join(self._tmp, f"{uuid.uuid4().hex}.probe")
                        _link_unnamed(fd, probe)
                        self._unnamed = True
                    finally:
                        os.close(fd)
                except OSError:
                    pass
                finally:
                    with contextlib.suppress(OSError):
                        if probe:
                            os.unlink(probe)
        return self._unnamed

    def _open_unnamed(self, folder: str) -> int:
        try:
            return os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:  # the folder was tidied away (see `delete`) since this process made it
            self._folders.discard(folder)
            self._make_folder(folder)
            return os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)

    def _make_folder(self, folder: str) -> None:
        if folder not in self._folders:
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise self._write_failed(None, os.path.relpath(folder, self.root), exc) from exc
            if len(self._folders) >= _FOLDERS_REMEMBERED:  # bounded: memory stays flat over a long load
                self._folders.clear()
            self._folders.add(folder)

    def _write_failed(self, tmp: str | None, key: str, exc: OSError) -> StoreError:
        """No temporary file outlives a failed write; one line naming the key and the cause (a full disk, ...)."""
        if tmp is not None:
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
