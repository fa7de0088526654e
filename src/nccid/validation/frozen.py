"""Frozen cohorts: the opaque inputs of a sealed run, kept for every later sealed run of the same intended use on
the same warehouse.

Why. Materialising a cohort copies each of its images (hundreds of MB for radiographs, far more for CT), and a
validator runs many models for one intended use: every vendor's COVID-19 model, each new version of it. On a
frozen cohort those runs read the very same bytes, so their reports carry the same cohort-manifest and
ground-truth hashes (they compare like with like), and every run after the first starts at once.

When one is used. A frozen cohort's id is `cohort_fingerprint`: the SHA-256 of the intended use's selection
fields, the warehouse group, every key listed below `<group>/data/` and `<group>/xray-metadata/`, and the code
version. Processed objects are never overwritten (a key names its bytes), so the same fingerprint means the same
selection, the same labels and the same images. Anything loaded into the validation set, or another nccid
version, gives another fingerprint: a new cohort is frozen, and those of the same intended use that it
supersedes are dropped.

Layout (in the owner-only workspace):
    cohorts/<id>/cohort.json       the selection (case -> warehouse key, label, attributes; exclusion counts),
                                   when it was frozen, and a stamp of every path below input/
    cohorts/<id>/input/            the opaque images, read-only: <case>/image-1.dcm (see cohort.write_inputs)
    cohorts/<id>/sha256.json       case -> SHA-256 of its file, as the first run on the cohort hashed them
    cohorts/.freezing-<hex>/       a cohort being frozen (locked by its freezer; swept once nobody holds it)
    cohorts/.dropping-<hex>/       a cohort being deleted (renamed here first, so a cohort is whole or absent)

Integrity. Before a run, the stamp of every path (type and permissions, size, inode, change time) is compared
with the one taken when the cohort was frozen: a write, a chmod, a file added or removed changes a change time,
which no user can set back; records that cannot be read count as altered. An altered cohort is dropped (the
caller audits it) and a new one is frozen. While the model runs, every file is hashed as for a new cohort; a
hash that differs from the recorded one fails the run. A run holds a shared lock on its cohort from opening it
to its end; dropping and pruning skip a cohort a run holds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

import nccid
from nccid.errors import ValidationRunError
from nccid.files import write_private
from nccid.validation import cohort as cohort_module
from nccid.validation.cohort import Cohort, CohortSources, canonical_hash
from nccid.validation.manifest import IntendedUse
from nccid.validation.sandbox import remove_tree

COHORTS_DIR = "cohorts"
KEEP = 4  # frozen cohorts kept in a workspace, the most recently used first
_FREEZING = ".freezing-"
_DROPPING = ".dropping-"
_SELECTION_FIELDS = ("task", "modalities", "views", "unit", "min_age", "max_age", "window_days")


# -- pure rules ----------------------------------------------------------------------------------------
def selection_json(use: IntendedUse) -> dict[str, Any]:
    """The fields of an intended use that decide its cohort (not the vendor's threshold or wording), as JSON
    values (lists, not tuples: equal to what a cohort record reads back)."""
    return {
        name: list(value) if isinstance(value := getattr(use, name), tuple) else value for name in _SELECTION_FIELDS
    }


def cohort_code_version() -> str:
    """nccid's and pydicom's versions and the SHA-256 of the code that selects and materialises a cohort
    (cohort.py): a frozen cohort is used only by the code that would have made the same one."""
    source = hashlib.sha256(Path(cohort_module.__file__).read_bytes()).hexdigest()
    return f"nccid {nccid.__version__}, pydicom {pydicom.__version__}, cohort.py {source}"


def cohort_fingerprint(use: IntendedUse, sources: CohortSources, version: str) -> str:
    """The id of the frozen cohort of `use` on the warehouse as listed in `sources`, for code `version` (see
    `cohort_code_version`)."""
    return canonical_hash(
        {"use": selection_json(use), "group": sources.group, "keys": sources.keys(), "version": version}
    )


def stamp_changes(recorded: dict[str, list[int]], current: dict[str, list[int]]) -> list[str]:
    """The paths added, removed or changed between two `tree_stamps`, sorted (empty when nothing changed)."""
    return sorted(path for path in recorded.keys() | current.keys() if recorded.get(path) != current.get(path))


def hash_changes(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """The cases whose SHA-256 is not the recorded one (or that are new or missing), sorted."""
    return sorted(case for case in recorded.keys() | current.keys() if recorded.get(case) != current.get(case))


# -- the file system -----------------------------------------------------------------------------------
def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_mode, st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_ino, st.st_ctime_ns]


def tree_stamps(folder: Path) -> dict[str, list[int]]:
    """Relative path ('.' for `folder` itself) -> [mode, size of a file, inode, change time in ns], for every
    path below `folder`, symbolic links not followed. Raises OSError if `folder` cannot be read."""
    stamps = {".": _stamp(os.lstat(folder))}
    pending = [("", str(folder))]
    while pending:
        prefix, path = pending.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                name = prefix + entry.name
                stamps[name] = _stamp(entry.stat(follow_symlinks=False))
                if entry.is_dir(follow_symlinks=False):
                    pending.append((name + "/", entry.path))
    return stamps


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class FrozenCohort:
    """A frozen cohort as a run uses it: opened (or frozen) by `CohortShelf`, which holds a shared lock on it
    until `CohortShelf.release`, so that no drop or prune deletes it under the run."""

    id: str
    folder: Path
    group: str  # the warehouse group it was selected from
    cohort: Cohort = field(repr=False)
    frozen_at: str = ""  # UTC, ISO 8601
    reused: bool = False  # False for the run that froze it
    hashes: dict[str, str] | None = field(default=None, repr=False)  # case -> SHA-256, once a run hashed them
    lock: int = field(default=-1, repr=False, compare=False)  # the folder's descriptor holding the shared lock
    stamps: dict[str, list[int]] = field(default_factory=dict, repr=False)  # as taken when it was frozen

    @property
    def input(self) -> Path:
        """The read-only folder the sandbox shows the model as /input."""
        return self.folder / "input"


@dataclass(frozen=True)
class FrozenInfo:
    """One frozen cohort as `nccid validate cohorts` lists it."""

    id: str
    task: str
    group: str
    cases: int
    positives: int
    bytes: int
    frozen_at: str
    last_used: str
    in_use: bool


def _locked(folder: Path, how: int) -> int | None:
    """A descriptor of `folder` holding the flock `how` (LOCK_SH, or LOCK_EX | LOCK_NB); None when the folder is
    not there, or (non-blocking) another holds it."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, how)
        if os.fstat(fd).st_ino != os.lstat(folder).st_ino:  # renamed away (dropped) before the lock was ours
            raise FileNotFoundError(folder)
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class CohortShelf:
    """The frozen cohorts of a workspace (`<workspace>/cohorts/`).

    Locks: a run holds a shared flock on its cohort's folder from `open` or `freeze` to `release`; `drop` takes
    the exclusive lock without waiting (so it never deletes a cohort a run holds), renames the folder out of the
    way (`.dropping-*`) and only then deletes it, so that a cohort is whole or absent, never half deleted. A
    folder being frozen (`.freezing-*`) is locked by its freezer; `sweep` deletes those nobody holds.
    """

    def __init__(self, workspace: Path) -> None:
        self.root = workspace / COHORTS_DIR
        self._held: dict[int, FrozenCohort] = {}  # descriptor -> the cohort whose lock it holds (closed once)

    def open(self, cohort_id: str) -> tuple[FrozenCohort | None, list[str]]:
        """The frozen cohort `cohort_id`, locked for the caller (see `release`), if it exists and nothing below
        its input folder changed since it was frozen: (cohort, []). (None, []) when there is none; (None, what
        is wrong) when it was altered or its records cannot be read (left for the caller to drop and audit)."""
        folder = self.root / cohort_id
        fd = _locked(folder, fcntl.LOCK_SH)
        if fd is None:
            return None, []
        try:
            try:
                record = json.loads((folder / "cohort.json").read_text())
                cohort = Cohort.from_json(record["cohort"])
                group, frozen_at, stamps = str(record["group"]), str(record["frozen_at"]), dict(record["stamps"])
                changed = stamp_changes(stamps, tree_stamps(folder / "input"))
            except FileNotFoundError as exc:
                changed = [f"{Path(exc.filename or '').name or 'a file'} (missing)"]
            except (OSError, ValueError, KeyError, TypeError):
                changed = ["cohort.json (unreadable)"]
            hashes = None
            if not changed:
                try:
                    hashes = json.loads((folder / "sha256.json").read_text())
                except FileNotFoundError:
                    pass
                except (OSError, ValueError):
                    changed = ["sha256.json (unreadable)"]
            if changed:
                os.close(fd)
                return None, changed
            os.utime(folder)  # last used
            frozen = FrozenCohort(cohort_id, folder, group, cohort, frozen_at, True, hashes, fd, stamps)
        except BaseException:
            os.close(fd)
            raise
        self._held[fd] = frozen
        return frozen, []

    def changes(self, frozen: FrozenCohort) -> list[str]:
        """What changed below the cohort's input folder since it was frozen (empty: nothing), for a check after a
        run: a file changed while the model read it."""
        try:
            return stamp_changes(frozen.stamps, tree_stamps(frozen.input))
        except FileNotFoundError:
            return ["input (missing)"]

    def release(self, frozen: FrozenCohort | None) -> None:
        """Let go of the lock `open` or `freeze` took (a run has ended); a second call does nothing (nor does it
        close a descriptor that has since been reused for another cohort's lock)."""
        if frozen is not None and self._held.get(frozen.lock) is frozen:
            del self._held[frozen.lock]
            os.close(frozen.lock)

    def freeze(
        self, cohort_id: str, use: IntendedUse, cohort: Cohort, group: str, write: Callable[[Path], None]
    ) -> FrozenCohort:
        """Freeze `cohort` as `cohort_id`: `write(folder)` materialises its inputs into a new folder, then the
        stamps and the selection are recorded and the whole is moved into place in one rename, so a frozen
        cohort is complete or absent. If another run froze the same cohort meanwhile, that one is returned (with
        its own cases: use the returned cohort, never `cohort`). The result is locked for the caller (see
        `release`). Raises whatever `write` raises (leaving nothing behind), or ValidationRunError when the
        cohort another run froze meanwhile cannot be opened."""
        self.root.mkdir(mode=0o700, exist_ok=True)
        fd = None
        while fd is None:  # a sweep may take a new folder before its lock is ours: then make another
            staging = self.root / f"{_FREEZING}{secrets.token_hex(6)}"
            staging.mkdir(mode=0o700)
            fd = _locked(staging, fcntl.LOCK_SH)  # kept through the rename: the lock is the folder's, not its name's
        try:
            write(staging / "input")
            frozen_at = _now()
            record = {
                "id": cohort_id,
                "use": selection_json(use),
                "group": group,
                "frozen_at": frozen_at,
                "cohort": cohort.to_json(),
                "stamps": tree_stamps(staging / "input"),
            }
            write_private(staging / "cohort.json", json.dumps(record) + "\n")
            os.rename(staging, self.root / cohort_id)
        except OSError as exc:
            os.close(fd)
            remove_tree(staging)
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            frozen, changed = self.open(cohort_id)  # frozen by another run meanwhile
            if frozen is None:
                raise ValidationRunError(
                    f"another run froze the cohort {cohort_id[:12]} meanwhile and it cannot be used "
                    f"({', '.join(changed) or 'it is gone'}): run again"
                ) from None
            return frozen
        except BaseException:
            os.close(fd)
            remove_tree(staging)
            raise
        frozen = FrozenCohort(
            cohort_id, self.root / cohort_id, group, cohort, frozen_at, False, None, fd, record["stamps"]
        )
        self._held[fd] = frozen
        return frozen

    def record_hashes(self, frozen: FrozenCohort, hashes: dict[str, str]) -> None:
        """Keep the SHA-256 of each input file, as the first run on the cohort hashed them (later runs compare).
        Written whole or not at all (a new file renamed into place)."""
        if frozen.hashes is None:
            partial = frozen.folder / f".sha256-{secrets.token_hex(4)}.json"
            write_private(partial, json.dumps(hashes, sort_keys=True, indent=1) + "\n")
            os.replace(partial, frozen.folder / "sha256.json")

    def drop(self, cohort_id: str) -> bool:
        """Delete a frozen cohort (inputs and records) unless a run holds it. Returns False if a run holds it or
        there is none."""
        if not cohort_id or "/" in cohort_id or cohort_id.startswith("."):
            return False
        folder = self.root / cohort_id
        fd = _locked(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:
            return False
        try:
            grave = self.root / f"{_DROPPING}{secrets.token_hex(6)}"
            os.rename(folder, grave)
        finally:
            os.close(fd)
        remove_tree(grave)
        return True

    def in_use(self, cohort_id: str) -> bool:
        """Whether a run holds the cohort now."""
        fd = _locked(self.root / cohort_id, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:
            return (self.root / cohort_id).is_dir()
        os.close(fd)
        return False

    def ids(self) -> list[str]:
        """The ids of the frozen cohorts, most recently used first."""
        found = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self.root) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                with contextlib.suppress(FileNotFoundError):  # dropped meanwhile
                    found.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
        return [name for _, name in sorted(found, reverse=True)]

    def _record(self, cohort_id: str) -> dict[str, Any]:
        try:
            return json.loads((self.root / cohort_id / "cohort.json").read_text())
        except (OSError, ValueError):
            return {}

    def prune(self, keep: FrozenCohort, use: IntendedUse) -> list[tuple[str, str]]:
        """Drop the frozen cohorts that `keep` supersedes (same intended use, older warehouse state) and any
        beyond the `KEEP` most recently used, except those a run holds. Returns (id, why) of each dropped."""
        dropped = []
        selection = selection_json(use)
        for rank, cohort_id in enumerate(self.ids()):
            if cohort_id == keep.id:
                continue
            record = self._record(cohort_id)
            superseded = record.get("use") == selection and record.get("group") == keep.group
            if (superseded or rank >= KEEP) and self.drop(cohort_id):
                why = "least recently used"
                if superseded:
                    why = f"superseded by {keep.id[:12]} (the validation set changed)"
                dropped.append((cohort_id, why))
        return dropped

    def sweep(self) -> list[str]:
        """Delete what an interrupted freeze or drop left (`.freezing-*` nobody holds, `.dropping-*`). Returns the
        folders swept."""
        swept = []
        leftovers = [*self.root.glob(f"{_FREEZING}*"), *self.root.glob(f"{_DROPPING}*")] if self.root.is_dir() else []
        for folder in sorted(leftovers):
            fd = _locked(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fd is None:
                continue  # still being frozen (or already gone)
            try:
                remove_tree(folder)  # under the lock: a freezer that makes a folder and locks it finds it gone
            finally:
                os.close(fd)
            swept.append(folder.name)
        return swept

    def listing(self) -> list[FrozenInfo]:
        """Every frozen cohort, most recently used first, for `nccid validate cohorts` (from the records: no
        input file is read)."""
        out = []
        for cohort_id in self.ids():
            record = self._record(cohort_id)
            try:
                cases = record["cohort"]["cases"]
                size = sum(stamp[1] for stamp in record["stamps"].values())
                used = dt.datetime.fromtimestamp((self.root / cohort_id).stat().st_mtime, dt.UTC)
            except (KeyError, TypeError, OSError):
                continue  # unreadable or dropped meanwhile
            info = FrozenInfo(
                cohort_id, record["use"]["task"], record["group"], len(cases), sum(c["label"] for c in cases),
                size, record["frozen_at"], used.isoformat(timespec="seconds"), self.in_use(cohort_id),
            )  # fmt: skip
            out.append(info)
        return out
