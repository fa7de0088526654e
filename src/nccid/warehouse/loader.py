"""The warehouse loader: raw uploads -> the processed layout, incrementally and idempotently.

Clinical records first (they decide each patient's group), then images. Each raw object ends in exactly one
outcome, recorded in the catalog and the run report:

- filed: copied into the processed layout (images with their metadata JSON beside them);
- duplicate: the same bytes were filed already (same SOP Instance UID, or the same clinical record);
- pending: an image whose patient has no clinical record yet; filed by a later run once one arrives;
- conflict: different bytes under a SOP Instance UID (or clinical file) that is already filed: held;
- quarantined: an image that cannot be filed (unreadable, truncated, not DICOM, a missing tag, a modality
  other than CR/DX/CT/MR); it stays in the raw prefix and is reported;
- held: a clinical record (or a stray file) that cannot be filed yet, with the reason.

Crash safety: every processed object is written atomically and never overwritten; the catalog is updated
after the objects exist. A run killed at any moment leaves at worst objects the catalog does not know of;
the next run finds them already present with the same checksum and records them. Worker processes die with
the loader (even on kill -9); one load holds the catalog at a time (CatalogBusy names the other run).

The decisions are the pure rules of `nccid.warehouse.rules`; this module is the pipeline around them:
list -> examine (workers read headers) -> decide -> file (workers) -> record, streamed in small chunks (see
`Loader.load_images`).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import errno
import json
import multiprocessing
import os
import re
import secrets
import signal
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from nccid.contracts.layout import (
    LayoutError,
    clinical_key,
    image_key,
    is_upload_date,
    metadata_key,
    parse_raw_key,
)
from nccid.errors import CatalogError, ImageRejected, NccidError, StoreError
from nccid.log import event
from nccid.store import LocalStore, ObjectExists, ObjectInfo, ObjectStore
from nccid.warehouse import rules
from nccid.warehouse.catalog import Catalog, ClinicalRow, Instance, RawRow, StagedRecord, bind
from nccid.warehouse.clinical import ClinicalRecord, ClinicalRejected, check_clinical, clinical_size_reason
from nccid.warehouse.config import WarehouseConfig, group_for, load_config
from nccid.warehouse.rules import Outcome

if TYPE_CHECKING:
    from nccid.contracts.dicom import ImageFacts

REPORT_PREFIX = "reports/load/"
_PSEUDONYM_IN_TEXT = re.compile(r"\bCovid[0-9]+\b")
BATCH = 256
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_ADVICE = "run the same load again once that is fixed: it resumes where it stopped"
Progress = Callable[[str, int, int], None]  # (phase, objects, bytes)


class Mode(Enum):
    LOAD = "load"
    DRY_RUN = "dry-run"  # decide everything, write nothing (on a throw-away copy of the catalog)
    REBUILD = "rebuild"  # record what the store already holds, write nothing


@dataclass
class LoadReport:
    run_id: str
    store: str
    mode: str
    started: str
    finished: str = ""
    duration_s: float = 0.0
    counts: Counter = field(default_factory=Counter)  # outcome -> objects touched this run
    bytes_filed: int = 0
    images_filed: int = 0
    unchanged: int = 0  # objects seen before and skipped
    images_examined: int = 0
    header_bytes_read: int = 0  # bytes fetched to read raw headers (remote stores; 0 for a local one)
    items: list[dict] = field(default_factory=list)  # this run's non-filed outcomes, with reasons
    warnings: list[str] = field(default_factory=list)
    outstanding: dict[str, int] = field(default_factory=dict)  # all-time pending/held/... totals
    report_key: str = ""

    def add(self, row: RawRow) -> None:
        outcome = str(row.outcome)  # a plain string in the report, whatever the rules returned
        self.counts[outcome] += 1
        if outcome != "filed":
            self.items.append(
                {
                    "key": row.key,
                    "kind": row.kind,
                    "outcome": outcome,
                    "reason": row.reason,
                    "dest": row.dest,
                }
            )

    def grouped_items(self) -> list[tuple[str, str, int, str]]:
        """(outcome, reason with pseudonyms masked, count, first key): the not-filed items at a glance."""
        groups: dict[tuple[str, str], list[str]] = {}
        for item in self.items:
            reason = _PSEUDONYM_IN_TEXT.sub("<patient>", item["reason"])
            groups.setdefault((item["outcome"], reason), []).append(item["key"])
        return [(o, r, len(keys), keys[0]) for (o, r), keys in groups.items()]

    def to_json(self) -> dict:
        return {
            "run_id": self.run_id,
            "store": self.store,
            "mode": self.mode,
            "started": self.started,
            "finished": self.finished,
            "duration_s": round(self.duration_s, 3),
            "counts": dict(sorted(self.counts.items())),
            "unchanged": self.unchanged,
            "images_filed": self.images_filed,
            "images_examined": self.images_examined,
            "header_bytes_read": self.header_bytes_read,
            "bytes_filed": self.bytes_filed,
            "outstanding": self.outstanding,
            "warnings": self.warnings,
            "items": self.items,
        }


# -- work done in worker processes (top level, so it pickles) -----------------------------------------
@dataclass(frozen=True, slots=True)
class Examined:
    key: str
    facts: ImageFacts | None = None
    metadata: bytes = b""
    reason: str = ""
    bytes_read: int = 0  # fetched from a remote store to read the header (0 where not measured)
    checksum: str = ""  # the raw object's MD5 (the listing's, or computed here when the listing had none)


def examine_image(store: ObjectStore, key: str, size: int, checksum: str = "") -> Examined:
    """Read only the header of a raw image, decide whether it can be filed, and prepare its metadata JSON.

    An empty `checksum` (a raw file the listing did not hash: see `ObjectStore.list_unhashed`) is computed
    here, in a worker, so that each raw byte is read once and files are hashed in parallel; the header read
    that follows finds the bytes in the page cache. Returns the facts and metadata, or the reason the image is
    quarantined, with the checksum. A store failure (or an unreadable file) propagates: the load stops, to be
    re-run; any other failure while examining this ONE object becomes its quarantine reason (defence in depth:
    one bad file must never stop every load).
    """
    from nccid.contracts.dicom import image_facts, metadata_json, read_header  # see `_Stream.examine`

    checksum = checksum or store.checksum(key)
    reader = None
    try:
        with store.open(key, size) as reader:
            ds = read_header(reader, size, bounded=True)  # large values are skipped, never held in memory
            facts = image_facts(ds)
            metadata = metadata_json(ds)
    except ImageRejected as exc:
        return Examined(key, reason=exc.reason, bytes_read=_fetched(reader), checksum=checksum)
    except StoreError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # see the docstring; a decoder's Rust panic is a BaseException, not an Exception
        return Examined(key, reason=rules.unexpected(exc), bytes_read=_fetched(reader), checksum=checksum)
    return Examined(key, facts=facts, metadata=metadata, bytes_read=_fetched(reader), checksum=checksum)


def _fetched(reader: object) -> int:
    return int(getattr(getattr(reader, "raw", None), "bytes_fetched", 0))


@dataclass(frozen=True, slots=True)
class ImagePlan:
    key: str
    checksum: str
    dest: str
    meta_key: str
    metadata: bytes


def place(store: ObjectStore, src: str, dst: str, checksum: str, write: bool) -> str:
    """Copy `src` to `dst` unless it is there: 'new', 'present' (same bytes), 'different' or 'absent' (no write),
    or 'changed' when what was copied is not `checksum` (the raw object was replaced after it was examined; the
    copy is taken back).

    Create-only first and look only when refused: one request when all is well (the copy is atomic and
    never overwrites, so trying is safe; the store's answer carries the checksum of what it copied).
    """
    if write:
        try:
            copied = store.copy(src, dst, overwrite=False)
        except ObjectExists:
            pass
        else:
            if rules.copied_other_bytes(checksum, copied):
                now = store.stat(src)  # the copy's checksum is not always an MD5 (an encrypted bucket's ETag)
                if now is None or now.checksum != checksum:  # the raw object changed after it was examined
                    store.delete(dst)
                    return "changed"
            return "new"
    info = store.stat(dst)
    if info is None:
        return "absent"
    return "present" if info.checksum == checksum else "different"


def file_image(store: ObjectStore, plan: ImagePlan, write: bool) -> str:
    """Metadata first, image last, both create-only: an image in the layout always has its metadata beside it.

    Two requests when all is well. If the image is already there with other bytes (a conflict), metadata this
    call created is taken back, so that no metadata ever describes bytes other than its image's.
    """
    if not write:
        info = store.stat(plan.dest)
        return "absent" if info is None else ("present" if info.checksum == plan.checksum else "different")
    created = _write_once(store, plan.meta_key, plan.metadata)
    status = place(store, plan.key, plan.dest, plan.checksum, write)
    if (status == "different" and created) or status == "changed":  # no image of these bytes: no metadata either
        store.delete(plan.meta_key)
    return status


def _threaded(fn: Callable, items: list, threads: int) -> list:
    if threads <= 1 or len(items) <= 1:
        return [fn(*item) for item in items]
    with cf.ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda item: fn(*item), items))


def examine_many(store: ObjectStore, items: list[tuple[str, int, str]], threads: int) -> list[Examined]:
    """One worker process's share of a batch of (key, size, listed checksum or ''); threads overlap the round
    trips of a remote store."""
    return _threaded(lambda key, size, checksum: examine_image(store, key, size, checksum), items, threads)


def file_many(store: ObjectStore, plans: list[ImagePlan], write: bool, threads: int) -> list[str]:
    return _threaded(lambda plan: file_image(store, plan, write), [(p,) for p in plans], threads)


def _chunks(items: list, size: int) -> Iterator[list]:
    """Consecutive chunks of `size` items: small enough that one slow chunk (a big CT series) never leaves the other
    workers idle for long, big enough that handing a chunk to a worker costs little beside the work."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _write_once(store: ObjectStore, key: str, data: bytes) -> bool:
    """Create `key` unless it exists (written by an earlier, interrupted run from the same header)."""
    try:
        store.write(key, data, overwrite=False)
        return True
    except ObjectExists:
        return False


class _InlineExecutor:
    """One worker: run in this process (tests, small loads, and easier debugging)."""

    def submit(self, fn: Callable, *args: object) -> cf.Future:
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # handed to whoever takes the result, as a pool does
            future.set_exception(exc)
        return future

    def __enter__(self) -> _InlineExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _die_with_parent(parent: int) -> None:
    """In a worker: ask the kernel for SIGKILL when the loader dies (even by kill -9), and exit if it already has.

    Without this a killed loader leaves its workers blocked on their pipe forever (issue 13.6).
    """
    import ctypes  # here, in the worker: the loader's own start-up stays light

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pool's own pipe watch remains
        pass
    if os.getppid() != parent:
        os._exit(1)


def _executor(workers: int) -> cf.Executor | _InlineExecutor:
    if workers <= 1:
        return _InlineExecutor()
    return cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_die_with_parent,
        initargs=(os.getpid(),),
    )


def _batches(items: Iterable, size: int = BATCH) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


class _Stream:
    """The image pipeline's moving parts: chunks being examined, then chunks being filed, each a bounded FIFO.

    Chunks are decided in the order they were listed and their outcomes recorded in that order too (the run
    report lists them as the listing does); the catalog is committed every `BATCH` outcomes. Objects are always
    placed before the catalog records them, so a run killed at any moment is finished by the next one.
    """

    def __init__(self, loader: Loader, pool: cf.Executor | _InlineExecutor) -> None:
        self.loader = loader
        self.pool = pool
        self.window = 2 * max(1, loader.workers)  # per stage: one chunk in hand and one queued per worker
        self.examining: deque[tuple[list[ObjectInfo], cf.Future]] = deque()
        self.filing: deque[tuple[list[ObjectInfo], list[RawRow], list, dict, cf.Future | None]] = deque()
        self.in_flight: dict[str, Instance] = {}  # planned, not yet recorded, by SOP Instance UID
        self.not_filed: set[str] = set()  # raw keys of planned instances that were not filed in the end
        self.uncommitted = 0

    def examine(self, chunk: list[ObjectInfo]) -> None:
        """Hand a chunk to the workers, first taking whatever has finished (waiting when the window is full)."""
        import nccid.contracts.dicom  # noqa: F401  (pydicom: here, so a no-op run never pays for it, and
        #                                before the first task forks the workers, so they inherit it loaded)

        loader = self.loader
        items = [(i.key, i.size, i.checksum) for i in chunk]
        self.examining.append((chunk, self.pool.submit(examine_many, loader.store, items, loader.threads)))
        self._advance()

    def drain(self) -> None:
        """Wait for everything in flight and record it."""
        while self.examining:
            self._decide(*self.examining.popleft())
        while self.filing:
            self._record(*self.filing.popleft())

    def _advance(self) -> None:
        while True:
            if self.filing and (self.filing[0][-1] is None or self.filing[0][-1].done()):
                self._record(*self.filing.popleft())
            elif self.examining and (self.examining[0][1].done() or len(self.examining) > self.window):
                self._decide(*self.examining.popleft())
            else:
                return

    def _decide(self, chunk: list[ObjectInfo], examining: cf.Future) -> None:
        loader = self.loader
        rows, plans, leaning = loader._decide_images(chunk, examining.result(), self.in_flight)
        filing = None
        if plans:
            filing = self.pool.submit(file_many, loader.store, [p[0] for p in plans], loader.write, loader.threads)
        self.filing.append((chunk, rows, plans, leaning, filing))
        while len(self.filing) > self.window:
            self._record(*self.filing.popleft())

    def _record(
        self,
        chunk: list[ObjectInfo],
        rows: list[RawRow],
        plans: list,
        leaning: dict[str, Instance],
        filing: cf.Future | None,
    ) -> None:
        """Record a chunk's outcomes. Chunks are recorded in order, so an instance an outcome leans on (see
        `Loader._decide_images`) is settled by now: if it was not filed, that outcome is not recorded either."""
        loader = self.loader
        placed = loader._filed(plans, filing.result()) if filing is not None else []
        for (_plan, inst, _base), row in zip(plans, placed, strict=True):
            if self.in_flight.get(inst.sop) is inst:
                del self.in_flight[inst.sop]
            if row.outcome != Outcome.FILED:
                self.not_filed.add(inst.source)
        rows = [
            rules.decided_against_unfiled(row, leaning[row.key].source)
            if row.key in leaning and leaning[row.key].source in self.not_filed
            else row
            for row in rows
        ]
        loader._record(rows + placed)
        loader.progress("images", len(chunk), sum(i.size for i in chunk))
        self.uncommitted += len(chunk)
        if self.uncommitted >= BATCH:
            loader.catalog.commit()
            self.uncommitted = 0


# -- the loader -----------------------------------------------------------------------------------------
class Loader:
    """One load of everything new under the configured raw prefixes: list -> examine -> decide -> file -> record.

    Clinical records go first (they decide patients' groups), then images. The decisions are the pure rules of
    `nccid.warehouse.rules`; this class does the I/O around them. `run` returns the :class:`LoadReport`; it raises
    :class:`~nccid.errors.ConfigError` for a missing or malformed config.json, :class:`~nccid.errors.StoreError`
    when the store fails (nothing half-done survives: re-run the same load), and
    :class:`~nccid.errors.CatalogError` when the catalog belongs to another store or another load holds it.
    """

    def __init__(
        self,
        store: ObjectStore,
        catalog: Catalog,
        *,
        mode: Mode = Mode.LOAD,
        workers: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.mode = mode
        self.write = mode is Mode.LOAD
        self.workers = workers if workers is not None else (os.cpu_count() or 1)
        #: concurrent requests per worker: a remote store answers in milliseconds, so overlap them
        self.threads = 8 if store.remote else 1
        #: images per task handed to a worker: a few seconds of work at most, so no worker idles behind another
        self.chunk = 2 * self.threads if store.remote else 4
        self.io = cf.ThreadPoolExecutor(max_workers=16 if store.remote else 4)
        self.progress = progress or (lambda phase, n, b: None)
        self.config: WarehouseConfig = load_config(store)
        self.report = LoadReport(run_id=new_run_id(), store=store.url, mode=mode.value, started=_now())

    # .. the run ..........................................................................................
    def run(self) -> LoadReport:
        """Load clinical records, then images; write the run report; return it."""
        start = time.perf_counter()
        if self.mode is not Mode.REBUILD:
            bind(self.store, self.catalog, writing=self.write)
        if self.write:
            self.catalog.hold_for_run(self.report.run_id)
            if isinstance(self.store, LocalStore):
                self.store.clean_temp()
        try:
            with _executor(self.workers) as pool, self.io:
                self.load_clinical()
                self.load_images(pool)
            self._finish(time.perf_counter() - start)
        except StoreError as exc:
            if "run the same" in str(exc):  # the store already says what to do
                raise
            raise type(exc)(f"{exc}; {_ADVICE}") from exc
        except NccidError:
            raise
        except Exception as exc:
            failure = _store_failure(self.store, exc)
            if failure is None:
                raise
            raise failure from exc
        finally:
            with contextlib.suppress(CatalogError):  # a catalog that failed has said so already
                self.catalog.release()
        return self.report

    # .. clinical records .................................................................................
    def load_clinical(self) -> None:
        """List -> read and check -> decide each new patient's group -> file -> record."""
        self.catalog.stage_begin()
        for batch in _batches(self._clinical_listing()):
            known = self.catalog.raw_rows([i.key for i in batch])
            todo = [i for i in batch if rules.clinical_needs_checking(known.get(i.key), i.size, i.checksum)]
            self.report.unchanged += len(batch) - len(todo)
            held: list[RawRow] = []
            staged: list[StagedRecord] = []
            for info, record in zip(todo, self.io.map(self._check_clinical, todo), strict=True):
                if isinstance(record, ClinicalRejected):
                    held.append(RawRow(info.key, info.size, info.checksum, "clinical", Outcome.HELD, record.reason))
                    continue
                proposed = group_for(record.centre, record.pseudonym, self.config) or ""
                staged.append(
                    StagedRecord(
                        info.key,
                        info.size,
                        info.checksum,
                        record.pseudonym,
                        record.kind,
                        record.date,
                        record.centre,
                        proposed,
                    )
                )
            self.catalog.stage(staged)
            self._record(held)
            self.progress("clinical", len(batch), 0)
        self._decide_groups()
        self._file_clinical()
        self.catalog.stage_end()
        self.catalog.commit()

    def _clinical_listing(self) -> Iterator[ObjectInfo]:
        for prefix in self.config.raw_prefixes:
            for date_dir in self.store.list_dirs(prefix):
                if is_upload_date(date_dir[len(prefix) : -1]):
                    yield from self.store.list(date_dir + "data/")

    def _check_clinical(self, info: ObjectInfo) -> ClinicalRecord | ClinicalRejected:
        """The record, or the reason it is held (returned, not raised, so that reads can run in threads).

        A store failure propagates (the load stops, to be re-run); any other failure while checking ONE record
        holds that record with the reason, never stops the load.
        """
        too_big = clinical_size_reason(info.size)
        if too_big:  # held by its listed size: a huge object is never read
            return ClinicalRejected(too_big)
        try:
            return check_clinical(parse_raw_key(info.key), self.store.read(info.key))
        except LayoutError as exc:
            return ClinicalRejected(str(exc))
        except ClinicalRejected as exc:
            return exc
        except StoreError:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # defence in depth: one bad record must not stop every load
            return ClinicalRejected(rules.unexpected(exc))

    def _decide_groups(self) -> None:
        """A new patient's group comes from their first record; records that disagree are held, not guessed."""
        for records in self.catalog.staged_new_patients():
            pseudonym = records[0].pseudonym
            decision = rules.decide_group(pseudonym, records)
            if decision.disagreement:
                self.catalog.stage_disagreement(pseudonym, decision.disagreement)
            elif self.mode is not Mode.REBUILD:  # a rebuild only records what the store already decided
                self.catalog.add_patient(pseudonym, decision.group, decision.centre, decision.decided_by)

    def _file_clinical(self) -> None:
        for batch in self.catalog.staged(BATCH):
            groups = self.catalog.patient_groups(r.pseudonym for r in batch)
            planned: dict[str, ClinicalRow] = {}
            decided: list[RawRow | ClinicalRow] = []
            for staged in batch:
                group = groups.get(staged.pseudonym)
                dest = clinical_key(group, staged.pseudonym, staged.kind, staged.date) if group else ""
                existing = (planned.get(dest) or self.catalog.clinical_at(dest)) if group else None
                decision, warning = rules.clinical_decision(staged, group, existing, dest)
                if warning:
                    self.report.warnings.append(warning)
                if isinstance(decision, ClinicalRow):
                    planned[dest] = decision
                decided.append(decision)
            to_place = [d for d in decided if isinstance(d, ClinicalRow)]
            statuses = self.io.map(lambda c: place(self.store, c.source, c.dest, c.checksum, self.write), to_place)
            status_of = dict(zip((c.source for c in to_place), statuses, strict=True))
            rows: list[RawRow] = []
            for decision in decided:
                if isinstance(decision, RawRow):
                    rows.append(decision)
                    continue
                base = RawRow(
                    decision.source,
                    decision.size,
                    decision.checksum,
                    "clinical",
                    Outcome.HELD,
                    patient=decision.patient,
                    centre=decision.centre,
                    dest=decision.dest,
                )
                row = rules.placed(base, status_of[decision.source], decision.dest, self.mode is Mode.REBUILD)
                if row.outcome == Outcome.FILED:
                    self.catalog.record_clinical(decision)
                rows.append(row)
            self._record(rows)
        self.catalog.commit()

    # .. images ...........................................................................................
    def load_images(self, pool: cf.Executor | _InlineExecutor) -> None:
        """Stream the raw listing through select -> examine (workers) -> decide -> file (workers) -> record.

        No batch waits for its slowest member: small chunks of images are examined as workers come free, each
        chunk is decided as soon as its results arrive (in listing order, so that which of two raw files with
        the same SOP Instance UID is filed never depends on timing), its plans go straight back to the workers to
        be filed, and outcomes are recorded as filing finishes. At most `window` chunks wait at each stage, so
        memory stays flat whatever the input size.
        """
        stream = _Stream(self, pool)
        for prefix in self.config.raw_prefixes:
            # unhashed: a raw file without a cached checksum is hashed by a worker, not here one after another
            listing = (i for i in self.store.list_unhashed(prefix) if not self._is_clinical_area(i.key))
            for batch in _batches(listing):  # catalog look-ups a batch at a time
                todo = self._select_images(batch)
                self.progress("images", len(batch) - len(todo), 0)
                for chunk in _chunks(todo, self.chunk):
                    stream.examine(chunk)
        stream.drain()
        self.catalog.commit()

    @staticmethod
    def _is_clinical_area(key: str) -> bool:
        parts = key.split("/", 3)
        return len(parts) == 4 and parts[2] == "data" and is_upload_date(parts[1])

    def _select_images(self, batch: list[ObjectInfo]) -> list[ObjectInfo]:
        """The images of the batch to examine; unchanged ones are counted, stray files held (and recorded).
        Whole catalog rows are read only for objects not settled and unchanged (on a re-run, hardly any)."""
        states = self.catalog.raw_states([i.key for i in batch])
        unsettled = [i for i in batch if not rules.settled_and_unchanged(states.get(i.key), i.size, i.checksum)]
        self.report.unchanged += len(batch) - len(unsettled)
        batch = unsettled
        known = self.catalog.raw_rows([i.key for i in batch]) if batch else {}
        pending_patients = {r.patient for r in known.values() if r.outcome == Outcome.PENDING}
        grouped = self.catalog.patient_groups(pending_patients) if pending_patients else {}
        todo: list[ObjectInfo] = []
        stray: list[RawRow] = []
        for info in batch:
            if not rules.image_needs_examining(known.get(info.key), info.size, info.checksum, grouped):
                self.report.unchanged += 1
                continue
            try:
                parse_raw_key(info.key)
            except LayoutError as exc:
                checksum = info.checksum or self.store.checksum(info.key)  # a stray file: rare, hashed here
                stray.append(RawRow(info.key, info.size, checksum, "other", Outcome.HELD, str(exc)))
                continue
            todo.append(info)
        self._record(stray)
        return todo

    def _drop_unchanged(
        self, todo: list[ObjectInfo], examined: list[Examined]
    ) -> tuple[list[ObjectInfo], list[Examined]]:
        """Give each listed image the checksum its worker computed; those listed without one (no cached checksum,
        say on a filesystem without xattrs) that turn out to be what the catalog recorded are unchanged."""
        unhashed = [i.key for i in todo if not i.checksum]
        if not unhashed:
            return todo, examined
        known = self.catalog.raw_rows(unhashed)
        pending = {r.patient for r in known.values() if r.outcome == Outcome.PENDING}
        grouped = self.catalog.patient_groups(pending) if pending else {}
        kept: list[tuple[ObjectInfo, Examined]] = []
        for info, exam in zip(todo, examined, strict=True):
            if not info.checksum:
                info = replace(info, checksum=exam.checksum)
                if not rules.image_needs_examining(known.get(info.key), info.size, info.checksum, grouped):
                    self.report.unchanged += 1
                    continue
            kept.append((info, exam))
        return [i for i, _ in kept], [e for _, e in kept]

    def _decide_images(
        self, todo: list[ObjectInfo], examined: list[Examined], in_flight: dict[str, Instance]
    ) -> tuple[list[RawRow], list[tuple[ImagePlan, Instance, RawRow]], dict[str, Instance]]:
        """Each examined image's outcome, or its plan to be filed (with its catalog row).

        `in_flight` holds the instances planned but not yet recorded (by SOP Instance UID): a second raw file
        with the same UID is decided against the first, as if it were filed already; it gains this chunk's plans.
        Returns (outcomes, plans, the in-flight instance each outcome decided that way leans on, by raw key): if
        that instance is not filed in the end, the outcome must not stand (see `_Stream._record`).
        """
        self.report.images_examined += len(examined)
        self.report.header_bytes_read += sum(e.bytes_read for e in examined)
        todo, examined = self._drop_unchanged(todo, examined)
        groups = self.catalog.patient_groups(e.facts.patient for e in examined if e.facts)
        instances = self.catalog.instances_by_sop([e.facts.sop for e in examined if e.facts])
        rows: list[RawRow] = []
        plans: list[tuple[ImagePlan, Instance, RawRow]] = []
        leaning: dict[str, Instance] = {}
        for info, exam in zip(todo, examined, strict=True):
            base = RawRow(info.key, info.size, info.checksum, "image", Outcome.QUARANTINED)
            if exam.facts is None:
                rows.append(rules.quarantined(base, exam.reason))
                continue
            facts = exam.facts
            base = replace(base, patient=facts.patient)
            group = groups.get(facts.patient)
            held = self.catalog.held_clinical_reason(facts.patient) if group is None else None
            prior = in_flight.get(facts.sop)
            decision = rules.image_decision(base, group, prior or instances.get(facts.sop), held)
            if decision is not None:
                rows.append(decision)
                if prior is not None:
                    leaning[info.key] = prior
                continue
            assert group is not None
            inst = _instance(info, exam, group)
            in_flight[facts.sop] = inst
            plans.append(
                (ImagePlan(info.key, info.checksum, inst.dest, metadata_key(inst.dest), exam.metadata), inst, base)
            )
        return rows, plans, leaning

    def _filed(self, plans: list[tuple[ImagePlan, Instance, RawRow]], statuses: list[str]) -> list[RawRow]:
        """Record each filed instance of a chunk whose plans were placed; returns their outcomes."""
        rows = []
        for (plan, inst, base), status in zip(plans, statuses, strict=True):
            row = rules.placed(base, status, plan.dest, self.mode is Mode.REBUILD)
            if row.outcome == Outcome.FILED:
                self.catalog.record_instance(inst)
                self.report.images_filed += 1
                self.report.bytes_filed += inst.size + inst.meta_size
            rows.append(row)
        return rows

    # .. recording ........................................................................................
    def _record(self, rows: list[RawRow]) -> None:
        """Record outcomes; one looked at again with the same result (a held record) counts as unchanged."""
        if not rows:
            return
        for row in rows:
            if row.outcome == Outcome.UNFILED and self.mode is not Mode.REBUILD:
                self.report.warnings.append(f"{row.key}: {row.reason}")
        rows = [r for r in rows if r.outcome != Outcome.UNFILED]  # never recorded: the next run looks again
        before = self.catalog.raw_rows([r.key for r in rows])
        changed = [r for r in rows if before.get(r.key) != r]
        self.catalog.record_raw(changed, self.report.run_id)
        self.report.unchanged += len(rows) - len(changed)
        for row in changed:
            self.report.add(row)

    def _finish(self, duration_s: float) -> None:
        """Totals, the log event, the run report in the store (load mode) and its row in the catalog."""
        report = self.report
        report.counts.pop(Outcome.UNFILED.value, None)
        report.finished = _now()
        report.duration_s = duration_s
        report.outstanding = {
            k: v for k, v in sorted(self.catalog.outcome_counts().items()) if k not in ("filed", "duplicate")
        }
        event(
            "warehouse.load",
            run_id=report.run_id,
            mode=report.mode,
            duration_s=round(report.duration_s, 3),
            counts=dict(report.counts),
            unchanged=report.unchanged,
            images_filed=report.images_filed,
            bytes_filed=report.bytes_filed,
            outstanding=report.outstanding,
        )
        if self.write:
            report.report_key = f"{REPORT_PREFIX}{report.run_id}.json"
            self.store.write(report.report_key, (json.dumps(report.to_json(), indent=2) + "\n").encode())
            self.catalog.record_run(
                report.run_id,
                report.started,
                report.finished,
                report.report_key,
                json.dumps(dict(report.counts)),
            )
        self.catalog.commit()


def _store_failure(store: ObjectStore, exc: Exception) -> StoreError | None:
    """One line for a store that failed in a way its backend did not translate (a full disk, a server gone).

    Nothing half-done survives such a failure (writes are atomic and create-only), so the advice is always the
    same: fix the cause and run the same load again. None for anything else (a bug: let it be seen).
    """
    if isinstance(exc, OSError):
        cause = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        where = f" ({exc.filename})" if exc.filename else ""
        return StoreError(f"{store.url}: {cause}{where}; {_ADVICE}")
    if type(exc).__module__.split(".")[0] in ("botocore", "boto3", "urllib3", "requests"):
        text = " ".join(str(exc).split())[:300]
        return StoreError(f"{store.url}: the S3 server stopped answering ({type(exc).__name__}: {text}); {_ADVICE}")
    return None


def _instance(info: ObjectInfo, exam: Examined, group: str) -> Instance:
    """The catalog row of an image about to be filed in `group`."""
    facts = exam.facts
    assert facts is not None
    return Instance(
        sop=facts.sop,
        dest=image_key(group, facts.folder, facts.patient, facts.study, facts.series, facts.sop),
        checksum=info.checksum,
        size=info.size,
        meta_size=len(exam.metadata),
        patient=facts.patient,
        grp=group,
        folder=facts.folder,
        modality=facts.modality,
        study=facts.study,
        series=facts.series,
        sex=facts.fields["PatientSex"],
        age=facts.fields["PatientAge"],
        study_date=facts.fields["StudyDate"],
        body_part=facts.fields["BodyPartExamined"],
        manufacturer=facts.fields["Manufacturer"],
        model=facts.fields["ManufacturerModelName"],
        source=info.key,
    )


def load(
    store: ObjectStore,
    catalog: Catalog,
    *,
    dry_run: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
) -> LoadReport:
    """Load everything new under the configured raw prefixes into the processed layout; return the run's report.

    Incremental and idempotent: what the catalog already records is skipped, a re-run after any interruption
    ends in the uninterrupted state. `dry_run` decides everything on a throw-away copy of the catalog and writes
    nothing anywhere. `workers` processes read headers and copy (default: one per CPU). Raises
    :class:`~nccid.errors.ConfigError` (config.json), :class:`~nccid.errors.StoreError` (the store failed; run
    again once fixed), :class:`~nccid.errors.CatalogError` (the catalog belongs to another store, or is empty
    for a store with processed data: rebuild it) and :class:`~nccid.errors.CatalogBusy` (another load runs).
    """
    if not dry_run:
        return Loader(store, catalog, workers=workers, progress=progress).run()
    with tempfile.TemporaryDirectory(prefix="nccid-dry-run-") as tmp:
        scratch = catalog.snapshot(Path(tmp) / "catalog.sqlite")
        try:
            return Loader(store, scratch, mode=Mode.DRY_RUN, workers=workers, progress=progress).run()
        finally:
            scratch.close()
