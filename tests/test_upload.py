"""`nccid site upload`: the outbox lands in raw-<uploader>/<date>/, verified, and resumes after a crash."""

from __future__ import annotations

import hashlib
import os
import re

import pytest
from helpers import key_env, run_cli

from nccid.site.upload import JOURNAL, UploadError, upload
from nccid.store import StoreError


def make_outbox(root, n_images: int = 6):
    for n in range(n_images):
        path = root / "images" / f"Covid{n % 3 + 1}" / f"1.2.{n}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(2000 + n))
    (root / "data").mkdir(parents=True, exist_ok=True)
    for n in range(3):
        (root / "data" / f"Covid{n + 1}_data.json").write_text(f'{{"Pseudonym": "Covid{n + 1}"}}')
    return {
        p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and p.name != JOURNAL
    }


class BreaksAfter:
    """A store whose connection drops after some writes."""

    def __init__(self, inner, writes: int) -> None:
        self.inner, self.left, self.url = inner, writes, inner.url

    def write(self, key, data, overwrite=True):
        self.left -= 1
        if self.left < 0:
            raise StoreError(f"{key}: connection reset")
        return self.inner.write(key, data, overwrite=overwrite)


def test_outbox_lands_in_the_raw_layout_exactly(local_store, tmp_path):
    files = make_outbox(tmp_path / "outbox")
    result = upload(tmp_path / "outbox", local_store, "northfield", date="2020-04-06")
    assert (result.uploaded, result.skipped) == (9, 0)
    assert {i.key: i.checksum for i in local_store.list()} == {
        f"raw-northfield/2020-04-06/{rel}": md5 for rel, md5 in files.items()
    }
    again = upload(tmp_path / "outbox", local_store, "northfield")
    assert (again.uploaded, again.skipped, again.date) == (0, 9, "2020-04-06")


def test_an_interrupted_upload_resumes_under_the_same_date_without_duplicates_or_gaps(local_store, tmp_path):
    files = make_outbox(tmp_path / "outbox")
    with pytest.raises(StoreError, match="connection reset"):
        upload(tmp_path / "outbox", BreaksAfter(local_store, 4), "northfield", date="2020-04-06")
    assert len(list(local_store.list())) == 4
    resumed = upload(tmp_path / "outbox", local_store, "northfield", date="2031-01-01")  # another day
    assert (resumed.uploaded, resumed.skipped, resumed.date) == (5, 4, "2020-04-06")
    assert sorted(i.key for i in local_store.list()) == sorted(f"raw-northfield/2020-04-06/{r}" for r in files)


@pytest.mark.parametrize(
    ("cut", "sent", "skipped"),
    [(25, 6, 3), (1, 5, 4)],  # the 4th object's line half-written (never confirmed), or only its newline lost
)
def test_a_journal_line_torn_by_a_power_cut_is_resent_and_the_journal_stays_readable(
    local_store, tmp_path, cut, sent, skipped
):
    make_outbox(tmp_path / "outbox")
    with pytest.raises(StoreError, match="connection reset"):
        upload(tmp_path / "outbox", BreaksAfter(local_store, 4), "northfield", date="2020-04-06")
    journal = tmp_path / "outbox" / JOURNAL
    journal.write_bytes(journal.read_bytes()[:-cut])
    resumed = upload(tmp_path / "outbox", local_store, "northfield")
    assert (resumed.uploaded, resumed.skipped, resumed.date) == (sent, skipped, "2020-04-06")
    again = upload(tmp_path / "outbox", local_store, "northfield")
    assert (again.uploaded, again.skipped) == (0, 9)


def test_a_journal_broken_before_its_last_line_is_an_error_naming_it(local_store, tmp_path):
    make_outbox(tmp_path / "outbox")
    upload(tmp_path / "outbox", local_store, "northfield", date="2020-04-06")
    journal = tmp_path / "outbox" / JOURNAL
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join([*lines[:2], lines[2][:30] + "\n", *lines[3:]]))
    with pytest.raises(UploadError, match=re.escape(f"{journal}: line 3 is not a journal entry")) as caught:
        upload(tmp_path / "outbox", local_store, "northfield")
    assert len(str(caught.value).splitlines()) == 1


def test_an_object_that_arrives_altered_is_an_error_naming_the_file(local_store, tmp_path):
    make_outbox(tmp_path / "outbox", n_images=1)

    class Corrupting:
        url = local_store.url

        def write(self, key, data, overwrite=True):
            return local_store.write(key, data[:-1] + b"?")

    with pytest.raises(UploadError, match=re.escape("data/Covid1_data.json: the store holds")):
        upload(tmp_path / "outbox", Corrupting(), "northfield")


def test_uploads_with_a_write_only_uploader_key_on_s3(seaweed, tmp_path):
    from nccid.access.grants import Registry
    from nccid.store.s3 import S3Store

    admin = S3Store("nccid-uploads")
    admin.create_bucket()
    creds = Registry(seaweed).grant("Northfield NHS Trust", "uploader", bucket="nccid-uploads", uploader="northfield")
    files = make_outbox(tmp_path / "outbox")
    env = key_env(seaweed, creds)
    proc = run_cli(
        "site",
        "upload",
        tmp_path / "outbox",
        "--uploader",
        "northfield",
        "--store",
        "s3://nccid-uploads",
        "--date",
        "2020-04-06",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "uploaded 9 objects" in proc.stdout
    assert {i.key: i.checksum for i in admin.list("raw-northfield/")} == {
        f"raw-northfield/2020-04-06/{rel}": md5 for rel, md5 in files.items()
    }
    wrong = run_cli(
        "site", "upload", tmp_path / "outbox", "--uploader", "riverside", "--store", "s3://nccid-uploads", env=env
    )
    assert wrong.returncode == 1 and "is being uploaded by northfield" in wrong.stderr
