"""`nccid sync PREFIX DEST`: copy a warehouse prefix into a local folder, incrementally and resumably.

A file is skipped when its size and MD5 match the object's. Each file is fetched into a hidden temporary file
beside its target, verified against the object's checksum, then renamed into place, so an interrupted sync
never leaves a half file under a real name. The manifest (JSON Lines in DEST) is appended as files complete;
it lists what was fetched and doubles as a checksum cache (size + mtime), so a re-run does not re-hash
files it has already verified.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nccid.errors import SyncError, UsageError
from nccid.files import md5_file
from nccid.store import ObjectInfo, ObjectStore, check_key

MANIFEST_NAME = ".nccid-sync-manifest.jsonl"
PART_SUFFIX = ".nccid-part"
Progress = Callable[[int, int], None]  # (files, bytes)


@dataclass
class SyncResult:
    """What a sync did: files fetched and skipped as unchanged, bytes moved, and where the manifest is."""

    prefix: str
    dest: Path
    fetched: int = 0
    skipped: int = 0
    bytes_fetched: int = 0
    bytes_total: int = 0
    manifest: Path | None = None
    failed: list[tuple[str, str]] | None = None  # (local path, reason) of files that could not be written


class _HashingWriter:
    def __init__(self, handle) -> None:
        self.handle = handle
        self.digest = hashlib.md5(usedforsecurity=False)
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)


def _relative(prefix: str, key: str) -> str:
    """The local path of a key: relative to the prefix's folder (as `aws s3 sync` does)."""
    base = prefix if prefix.endswith("/") or not prefix else prefix.rpartition("/")[0] + "/"
    if base == "/":
        base = ""
    return key[len(base) :]


def _load_cache(manifest: Path) -> dict[str, tuple[int, int, str]]:
    cache: dict[str, tuple[int, int, str]] = {}
    with contextlib.suppress(FileNotFoundError), open(manifest, encoding="utf-8") as handle:
        for line in handle:
            with contextlib.suppress(ValueError, KeyError):
                entry = json.loads(line)
                cache[entry["path"]] = (entry["size"], entry["mtime_ns"], entry["checksum"])
    return cache


def _local_checksum(path: Path, st: os.stat_result, cache: dict[str, tuple[int, int, str]], rel: str) -> str:
    cached = cache.get(rel)
    if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
        return cached[2]
    return md5_file(path)


def fetch(store: ObjectStore, info: ObjectInfo, target: Path) -> os.stat_result:
    """Download one object to `target` atomically, verifying size and checksum on the way."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}{PART_SUFFIX}")
    try:
        with open(part, "wb") as handle:
            writer = _HashingWriter(handle)
            store.download(info.key, writer, info.size)  # type: ignore[arg-type]
        if writer.size != info.size or writer.digest.hexdigest() != info.checksum:
            raise SyncError(
                f"{info.key}: received {writer.size} bytes with MD5 {writer.digest.hexdigest()}, "
                f"expected {info.size} bytes with MD5 {info.checksum}"
            )
        os.replace(part, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    return target.stat()


def remove_partials(dest: Path) -> int:
    """Temporary files a killed sync left behind; they never carry a real file's name."""
    removed = 0
    for folder, _, files in os.walk(dest):
        for name in files:
            if name.endswith(PART_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
    return removed


def sync(
    store: ObjectStore,
    prefix: str,
    dest: str | os.PathLike[str],
    *,
    workers: int = 8,
    progress: Progress | None = None,
) -> SyncResult:
    """Mirror every object below `prefix` into `dest`; returns counts and where the manifest is.

    A file that cannot be written locally (a file stands where a folder must go, a full disk) does not stop
    the others: they are all fetched, then SyncError names how many failed and the first, with its reason.
    Raises UsageError for fewer than one worker and SyncError when `dest` is not a folder.
    """
    if workers < 1:
        raise UsageError(f"workers must be at least 1 (got {workers})")
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise SyncError(f"{dest} is a file, not a folder: choose a folder to sync into")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SyncError(f"cannot create the folder {dest}: {exc.strerror or exc}") from exc
    remove_partials(dest)
    manifest = dest / MANIFEST_NAME
    cache = _load_cache(manifest)
    result = SyncResult(prefix=prefix, dest=dest, manifest=manifest, failed=[])
    tick = progress or (lambda files, nbytes: None)
    lock = threading.Lock()
    with open(manifest, "a", encoding="utf-8") as log, cf.ThreadPoolExecutor(max_workers=workers) as pool:

        def note(info: ObjectInfo, rel: str, st: os.stat_result, action: str) -> None:
            entry = {
                "key": info.key,
                "path": rel,
                "size": info.size,
                "checksum": info.checksum,
                "mtime_ns": st.st_mtime_ns,
                "action": action,
            }
            with lock:
                log.write(json.dumps(entry) + "\n")
                log.flush()

        def get(info: ObjectInfo, rel: str) -> None:
            try:
                st = fetch(store, info, dest / rel)
            except OSError as exc:  # local trouble with this one file: note it, go on with the others
                with lock:
                    result.failed.append((rel, _local_reason(exc, dest)))
                return
            note(info, rel, st, "fetched")
            with lock:
                result.fetched += 1
                result.bytes_fetched += info.size
            tick(1, info.size)

        in_flight: set[cf.Future] = set()
        for info in store.list(prefix):
            rel = _relative(prefix, info.key)
            check_key(rel)  # never write outside dest
            result.bytes_total += info.size
            target = dest / rel
            try:
                st = target.stat()
            except (FileNotFoundError, NotADirectoryError):  # not there yet, or a file stands in its way
                st = None
            if st and st.st_size == info.size and _local_checksum(target, st, cache, rel) == info.checksum:
                result.skipped += 1
                if rel not in cache or cache[rel][1] != st.st_mtime_ns:
                    note(info, rel, st, "verified")
                tick(1, 0)
                continue
            in_flight.add(pool.submit(get, info, rel))
            if len(in_flight) >= workers * 4:  # keep memory flat however large the prefix
                done, in_flight = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    future.result()
        for future in cf.as_completed(in_flight):
            future.result()
    if result.failed:
        rel, reason = result.failed[0]
        raise SyncError(
            f"{len(result.failed)} file(s) could not be written under {dest} ({result.fetched} fetched, "
            f"{result.skipped} unchanged), first {rel}: {reason}"
        )
    return result


def _local_reason(exc: OSError, dest: Path) -> str:
    """Why a local write failed, naming the path inside `dest` that is in the way."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename:
        blocker = Path(exc.filename)
        while blocker != dest and not blocker.is_file() and blocker.parent != blocker:
            blocker = blocker.parent
        if blocker.is_file():
            return f"{blocker} is a file where a folder is needed"
    return exc.strerror or str(exc)
