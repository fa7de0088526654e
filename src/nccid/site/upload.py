"""Upload the de-identified outbox into the warehouse's raw layout: raw-<uploader>/<YYYY-MM-DD>/{data,images}/.

Resumable and verified, with write-only credentials (an uploader may not read or list, not even its own
uploads): each object's checksum comes back from the write itself (the S3 ETag is the MD5 of a single-part
upload) and is compared with the local file's. A journal in the outbox records the batch's date and every
verified object, so an interrupted upload resumes under the same date, without duplicates or gaps.

The de-identification gate runs over the whole outbox first: one finding and nothing is uploaded.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nccid.contracts.layout import raw_prefix
from nccid.errors import UploadError
from nccid.files import md5_file
from nccid.log import event
from nccid.site.check import Gate, check_files, outbox_files
from nccid.site.outbox import UPLOADED_AREAS, HeldPatient, Outbox
from nccid.store import ObjectStore

JOURNAL = ".upload-journal.jsonl"
AREAS = UPLOADED_AREAS


@dataclass
class UploadResult:
    """What an upload did: its batch date, files sent and skipped as already sent, bytes, files the gate
    passed, held images released, and the patients whose images stay held."""

    date: str
    uploaded: int = 0
    skipped: int = 0  # verified by an earlier, interrupted run
    bytes: int = 0
    checked: int = 0  # files the gate passed before anything was sent
    released: int = 0  # held images whose record had arrived, released to images/ before the upload
    held: list[HeldPatient] | None = None  # patients whose images stay held (not uploaded): no record yet


def _journal_entry(line: bytes, first: bool) -> dict | None:
    """One journal line as its dict, or None when it is not JSON or lacks the fields its place needs."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    needed = ("uploader", "store", "date") if first else ("path", "size", "md5")
    if not isinstance(entry, dict) or any(name not in entry for name in needed):
        return None
    return entry


def _journal(outbox: Path) -> tuple[dict, dict[str, dict]]:
    """The journal's head (uploader, store, date) and its verified objects by path ({} and {} when none).

    An unparsable LAST line is a write torn by a power cut, never confirmed: it is cut off the file so the
    next append starts on a fresh line. Raises UploadError naming the journal for a broken line elsewhere."""
    head: dict = {}
    done: dict[str, dict] = {}
    path = outbox / JOURNAL
    if not path.exists():
        return head, done
    lines = path.read_bytes().splitlines(keepends=True)
    kept = 0
    for n, line in enumerate(lines):
        entry = _journal_entry(line, first=n == 0)
        if entry is None:
            if n < len(lines) - 1:
                raise UploadError(f"{path}: line {n + 1} is not a journal entry; move the file aside to start over")
            with open(path, "r+b") as log:
                log.truncate(kept)
            return head, done
        kept += len(line)
        if n == 0:
            head = entry
        else:
            done[entry["path"]] = entry
    if lines and not lines[-1].endswith(b"\n"):
        with open(path, "ab") as log:  # torn just before its newline: end the line so appends start afresh
            log.write(b"\n")
    return head, done


def upload(
    outbox: str | Path,
    store: ObjectStore,
    uploader: str,
    *,
    date: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    gate: Gate | None = None,
) -> UploadResult:
    """Upload the outbox's data/ and images/ to raw-<uploader>/<date>/ after the gate passes over every file
    (with `gate`'s knowledge of the site's patients, or with the structural, warehouse and NHS-number-pattern
    checks alone), so nothing identifiable leaves the site. Held images whose record has arrived are released
    first; the others stay held. A journal in the outbox makes a re-run resume the same batch (same date).

    Returns an UploadResult (what was sent, skipped, released, held). Raises UploadError when the gate finds
    anything (nothing sent), the outbox is mid-upload for another uploader or store, or the store holds other
    bytes than were sent; LayoutError for a bad uploader name. After any failed write, re-run to resume."""
    box = Outbox(outbox)
    outbox = box.root
    released = box.release()
    verdict = check_files(outbox_files(outbox, AREAS), gate or Gate({}))
    if not verdict.clean:
        raise UploadError(
            f"the gate found {len(verdict.findings)} problem(s) in {outbox}, nothing uploaded; first: "
            f"{verdict.findings[0]} (run `nccid site check {outbox}` for all)"
        )
    prefix = raw_prefix(uploader)
    head, done = _journal(outbox)
    if head and (head["uploader"] != uploader or head["store"] != store.url):
        raise UploadError(f"{outbox} is being uploaded by {head['uploader']} to {head['store']}: finish that first")
    batch_date = head.get("date") or date or dt.datetime.now(dt.UTC).date().isoformat()
    if not head:
        with open(outbox / JOURNAL, "w") as log:
            log.write(json.dumps({"uploader": uploader, "store": store.url, "date": batch_date}) + "\n")
    result = UploadResult(date=batch_date, checked=verdict.files, released=released, held=box.held_patients())
    tick = progress or (lambda n, b: None)
    files = box.upload_files()
    with open(outbox / JOURNAL, "a") as log:
        for path in files:
            rel = path.relative_to(outbox).as_posix()
            size, checksum = path.stat().st_size, md5_file(path)
            previous = done.get(rel)
            if previous and previous["size"] == size and previous["md5"] == checksum:
                result.skipped += 1
                continue
            key = f"{prefix}{batch_date}/{rel}"
            with open(path, "rb") as handle:
                info = store.write(key, handle.read())
            if info.size != size or info.checksum != checksum:
                raise UploadError(
                    f"{rel}: the store holds {info.size} bytes with MD5 {info.checksum}, "
                    f"the file has {size} bytes with MD5 {checksum}"
                )
            log.write(json.dumps({"path": rel, "key": key, "size": size, "md5": checksum}) + "\n")
            log.flush()
            result.uploaded += 1
            result.bytes += size
            tick(1, size)
    event(
        "site.upload",
        uploader=uploader,
        date=batch_date,
        uploaded=result.uploaded,
        skipped=result.skipped,
        bytes=result.bytes,
    )
    return result
