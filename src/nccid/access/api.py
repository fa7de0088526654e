"""The Python API researchers use: open a warehouse by URL, list, read, read headers, load clinical JSON, sync.

>>> import nccid
>>> wh = nccid.open_warehouse("s3://nccid-data-warehouse-prod")   # or a local path
>>> for obj in wh.ls("training/data/", recursive=True): ...
>>> header = wh.dicom_header("training/xray/Covid123/1.2/1.2.3/1.2.3.4.dcm")
>>> wh.sync("training/ct/", "ct")
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from nccid.access.sync import Progress, SyncResult, sync
from nccid.errors import NotDicom
from nccid.store import ObjectInfo, ObjectStore, open_store


@dataclass(frozen=True, slots=True)
class Folder:
    """A common prefix in a non-recursive listing (what `aws s3 ls` prints as `PRE name/`)."""

    key: str


class Warehouse:
    """A read-only view of a warehouse store for researchers: list, read objects, DICOM headers, clinical
    JSON and sync, the same whether the warehouse is a local folder or an S3 bucket.

    Reads of a missing key raise ObjectNotFound. Use it as a context manager to close the store.
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @property
    def url(self) -> str:
        return self.store.url

    def ls(self, prefix: str = "", *, recursive: bool = False) -> Iterator[ObjectInfo | Folder]:
        """Objects below `prefix`; without `recursive`, sub-folders first as `Folder` entries."""
        if recursive:
            yield from self.store.list(prefix)
            return
        for folder in self.store.list_dirs(prefix):
            yield Folder(folder)
        yield from self.store.list_level(prefix)

    def read(self, key: str) -> bytes:
        """The whole object as bytes. Raises ObjectNotFound for a missing key."""
        return self.store.read(key)

    def dicom_header(self, key: str) -> Dataset:
        """The DICOM header without pixel data, fetching only the bytes it needs.

        Raises ObjectNotFound for a missing key and NotDicom for an object that is not a DICOM file (a
        clinical or metadata JSON, say)."""
        with warnings.catch_warnings(), self.store.open(key) as reader:
            warnings.simplefilter("ignore")
            try:
                return pydicom.dcmread(reader, stop_before_pixels=True)
            except InvalidDicomError as exc:
                raise NotDicom(f"{key} is not a DICOM file (no 'DICM' prefix): read it as bytes") from exc

    def dicom(self, key: str) -> Dataset:
        """The whole DICOM object, pixels included. Raises NotDicom for an object that is not DICOM."""
        with self.store.open(key) as reader:
            try:
                return pydicom.dcmread(reader)
            except InvalidDicomError as exc:
                raise NotDicom(f"{key} is not a DICOM file (no 'DICM' prefix)") from exc

    def metadata(self, key: str) -> Dataset:
        """A metadata JSON (DICOM JSON model) read back as a pydicom Dataset."""
        return Dataset.from_json(self.store.read(key).decode("utf-8"))

    def clinical(self, key: str) -> dict:
        """A clinical record (`.../data/<Pseudonym>/data_<date>.json` or `status_<date>.json`)."""
        return json.loads(self.store.read(key))

    def sync(
        self, prefix: str, dest: str | os.PathLike[str], *, workers: int = 8, progress: Progress | None = None
    ) -> SyncResult:
        """Mirror `prefix` into the local folder `dest` (see `nccid.access.sync.sync`); returns the counts.

        Raises SyncError when `dest` is not a folder or some files could not be written.
        """
        return sync(self.store, prefix, dest, workers=workers, progress=progress)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_warehouse(url: str | os.PathLike[str]) -> Warehouse:
    """Open the warehouse researchers were given access to: a path, `file:///path`, or `s3://bucket`
    (credentials and endpoint found the standard AWS way). Returns a `Warehouse`.

    Raises StoreError for a URL of another scheme, a path that is a file, or when S3 support is not installed.
    """
    return Warehouse(open_store(url))
