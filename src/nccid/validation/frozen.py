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
    cohorts/.freezing-<pid>-<hex>/ a cohort being frozen (swept once its process is gone)

Integrity. Before a run, the stamp of every path (type and permissions, size, inode, change time) is compared
with the one taken when the cohort was frozen: a write, a chmod, a file added or removed changes a change time,
which no user can set back. An altered cohort is dropped (the caller audits it) and a new one is frozen. While
the model runs, every file is hashed as for a new cohort; a hash that differs from the recorded one fails the run.
A run holds a shared lock on its cohort, and pruning skips a cohort another run holds.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nccid
from nccid.files import write_private
from nccid.validation import cohort as cohort_module
from nccid.validation.cohort import Cohort, CohortSources, canonical_hash
from nccid.validation.manifest import IntendedUse
from nccid.validation.sandbox import remove_tree

COHORTS_DIR = "cohorts"
KEEP = 4  # frozen cohorts kept in a workspace, the most recently used first
_FREEZING = ".freezing-"
_SELECTION_FIELDS = ("task", "modalities", "views", "unit", "min_age", "max_age", "window_days")


# -- pure rules ----------------------------------------------------------------------------------------
def selection_json(use: IntendedUse) -> dict[str, Any]:
    """The fields of an intended use that decide its cohort (not the vendor's threshold or wording), as JSON
    values (lists, not tuples: equal to what a cohort record reads back)."""
    return {
        name: list(value) if isinstance(value := getattr(use, name), tuple) else value for name in _SELECTION_FIELDS
    }


def cohort_code_version() -> str:
    """nccid's version and the SHA-256 of the code that selects and materialises a cohort (cohort.py): a frozen
    cohort is used only by the code that would have made the same one."""
    return f"{nccid.__version__} {hashlib.sha256(Path(cohort_module.__file__).read_bytes()).hexdigest()}"


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
    """A frozen cohort as a run uses it."""

    id: str
    folder: Path
    group: str  # the warehouse group it was selected from
    cohort: Cohort = field(repr=False)
    frozen_at: str = ""  # UTC, ISO 8601
    reused: bool = False  # False for the run that froze it
    hashes: dict[str, str] | None = field(default=None, repr=False)  # case -> SHA-256, once a run hashed them

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


class CohortShelf:
    """The frozen cohorts of a workspace (`<workspace>/cohorts/`)."""

    def __init__(self, workspace: Path) -> None:
        self.root = workspace / COHORTS_DIR

    def open(self, cohort_id: str) -> tuple[FrozenCohort | None, list[str]]:
        """The frozen cohort `cohort_id` if it exists and nothing below its input folder changed since it was
        frozen: (cohort, []). (None, []) when there is none; (None, what changed) when it was altered (it is
        left for the caller to drop and audit)."""
        folder = self.root / cohort_id
        try:
            record = json.loads((folder / "cohort.json").read_text())
        except FileNotFoundError:
            return None, []
        except (OSError, ValueError):
            return None, ["cohort.json (unreadable)"]
        try:
            changed = stamp_changes(record["stamps"], tree_stamps(folder / "input"))
        except FileNotFoundError:
            changed = ["input (missing)"]
        if changed:
            return None, changed
        hashes = None
        with contextlib.suppress(FileNotFoundError):
            hashes = json.loads((folder / "sha256.json").read_text())
        os.utime(folder)  # last used
        cohort = Cohort.from_json(record["cohort"])
        return FrozenCohort(cohort_id, folder, record["group"], cohort, record["frozen_at"], True, hashes), []

    def freeze(
        self, cohort_id: str, use: IntendedUse, cohort: Cohort, group: str, write: Callable[[Path], None]
    ) -> FrozenCohort:
        """Freeze `cohort` as `cohort_id`: `write(folder)` materialises its inputs into a new folder, then the
        stamps and the selection are recorded and the whole is moved into place in one rename, so a frozen
        cohort is complete or absent. If another run froze the same cohort meanwhile, that one is returned.
        Returns the FrozenCohort; raises whatever `write` raises (leaving nothing behind)."""
        self.root.mkdir(mode=0o700, exist_ok=True)
        staging = self.root / f"{_FREEZING}{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir(mode=0o700)
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
            remove_tree(staging)
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            frozen, _changed = self.open(cohort_id)  # frozen by another run meanwhile
            if frozen is None:
                raise
            return frozen
        except BaseException:
            remove_tree(staging)
            raise
        return FrozenCohort(cohort_id, self.root / cohort_id, group, cohort, frozen_at, False, None)

    def record_hashes(self, frozen: FrozenCohort, hashes: dict[str, str]) -> None:
        """Keep the SHA-256 of each input file, as the first run on the cohort hashed them (later runs compare)."""
        if frozen.hashes is None:
            write_private(frozen.folder / "sha256.json", json.dumps(hashes, sort_keys=True, indent=1) + "\n")

    @contextlib.contextmanager
    def using(self, frozen: FrozenCohort) -> Iterator[None]:
        """Hold a shared lock on the cohort for a run: `prune` leaves a cohort alone while any run holds it."""
        fd = os.open(frozen.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _busy(self, folder: Path) -> bool:
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def drop(self, cohort_id: str) -> bool:
        """Delete a frozen cohort (inputs and record). Returns False if there was none."""
        folder = self.root / cohort_id
        if not cohort_id or "/" in cohort_id or cohort_id.startswith(".") or not folder.is_dir():
            return False
        remove_tree(folder)
        return True

    def drop_idle(self, cohort_id: str) -> bool:
        """Drop a frozen cohort unless a run holds it. Returns False if it is held (or there is none)."""
        return not self._busy(self.root / cohort_id) and self.drop(cohort_id)

    def ids(self) -> list[str]:
        """The ids of the frozen cohorts, most recently used first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)]

    def prune(self, keep: FrozenCohort, use: IntendedUse) -> list[tuple[str, str]]:
        """Drop the frozen cohorts that `keep` supersedes (same intended use, older warehouse state) and any
        beyond the `KEEP` most recently used, except those a run holds. Returns (id, why) of each dropped."""
        dropped = []
        selection = selection_json(use)
        for rank, cohort_id in enumerate(self.ids()):
            if cohort_id == keep.id:
                continue
            folder = self.root / cohort_id
            try:
                record = json.loads((folder / "cohort.json").read_text())
            except (OSError, ValueError):
                record = {}
            superseded = record.get("use") == selection and record.get("group") == keep.group
            if (superseded or rank >= KEEP) and self.drop_idle(cohort_id):
                why = "least recently used"
                if superseded:
                    why = f"superseded by {keep.id[:12]} (the validation set changed)"
                dropped.append((cohort_id, why))
        return dropped

    def sweep(self) -> list[str]:
        """Delete cohorts whose freezing process died before the end. Returns the folders swept."""
        swept = []
        for staging in sorted(self.root.glob(f"{_FREEZING}*")) if self.root.is_dir() else []:
            pid = staging.name[len(_FREEZING) :].split("-")[0]
            try:
                os.kill(int(pid), 0)
                continue  # still freezing
            except (ProcessLookupError, ValueError):
                pass
            except PermissionError:
                continue
            remove_tree(staging)
            swept.append(staging.name)
        return swept

    def listing(self) -> list[FrozenInfo]:
        """Every frozen cohort, most recently used first, for `nccid validate cohorts`."""
        out = []
        for cohort_id in self.ids():
            folder = self.root / cohort_id
            try:
                record = json.loads((folder / "cohort.json").read_text())
            except (OSError, ValueError):
                continue
            cases = record["cohort"]["cases"]
            size = sum(p.stat().st_size for p in (folder / "input").rglob("*.dcm"))
            used = dt.datetime.fromtimestamp(folder.stat().st_mtime, dt.UTC).isoformat(timespec="seconds")
            info = FrozenInfo(
                cohort_id, record["use"]["task"], record["group"], len(cases), sum(c["label"] for c in cases),
                size, record["frozen_at"], used, self._busy(folder),
            )  # fmt: skip
            out.append(info)
        return out
