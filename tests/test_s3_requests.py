"""What the S3 store asks of a real server (SeaweedFS on loopback): create-only writes and copies that refuse
an existing key and keep its bytes, even when several writers race for it; the checksum a copy answers with;
clear errors where the server refuses; and the requests a load costs per filed image, as the server's own
audit log counts them (a ranged GET of the header, a PUT of the metadata, a server-side COPY; no HEAD)."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import pickle
import time

import pytest
from conftest import TEST_BUCKET, configure, put_clinical, put_image

from nccid.store import ObjectExists, ObjectNotFound, StoreError
from nccid.store.s3 import S3Store
from nccid.warehouse.catalog import Catalog
from nccid.warehouse.loader import load


@pytest.fixture
def s3(make_store) -> S3Store:
    return make_store("s3")


def test_create_only_write_over_an_existing_object_is_refused_and_keeps_the_original(s3):
    first = s3.write("training/xray-metadata/P/1/2/3.json", b'{"first": true}', overwrite=False)
    assert first.checksum == hashlib.md5(b'{"first": true}').hexdigest()
    with pytest.raises(ObjectExists, match=r"3\.json"):
        s3.write("training/xray-metadata/P/1/2/3.json", b'{"second": true}', overwrite=False)
    assert s3.read("training/xray-metadata/P/1/2/3.json") == b'{"first": true}'
    assert s3.stat("training/xray-metadata/P/1/2/3.json").checksum == first.checksum


def test_create_only_copy_over_an_existing_object_is_refused_and_keeps_the_original(s3):
    s3.write("raw-site/2020-04-01/images/a.dcm", b"image A")
    s3.write("raw-site/2020-04-01/images/b.dcm", b"image B")
    checksum = s3.copy("raw-site/2020-04-01/images/a.dcm", "training/xray/P/1/2/3.dcm", overwrite=False)
    assert checksum == hashlib.md5(b"image A").hexdigest() == s3.stat("training/xray/P/1/2/3.dcm").checksum
    with pytest.raises(ObjectExists, match=r"3\.dcm"):
        s3.copy("raw-site/2020-04-01/images/b.dcm", "training/xray/P/1/2/3.dcm", overwrite=False)
    assert s3.read("training/xray/P/1/2/3.dcm") == b"image A"


def test_racing_create_only_writers_leave_exactly_one_winner_whose_bytes_are_stored(s3):
    """Two loads (or a load and its re-run) may race for the same key: one creates it, every other is refused."""
    sources = [f"raw-site/2020-04-01/images/{n}.dcm" for n in range(8)]
    for n, key in enumerate(sources):
        s3.write(key, f"image {n}".encode() * 1000)

    def attempt(kind: str, n: int) -> int | None:
        try:
            if kind == "write":
                s3.write("race/meta.json", f'{{"writer": {n}}}'.encode(), overwrite=False)
            else:
                s3.copy(sources[n], "race/image.dcm", overwrite=False)
            return n
        except ObjectExists:
            return None

    for kind, key, content in (
        ("write", "race/meta.json", lambda n: f'{{"writer": {n}}}'.encode()),
        ("copy", "race/image.dcm", lambda n: f"image {n}".encode() * 1000),
    ):
        with cf.ThreadPoolExecutor(max_workers=8) as pool:
            winners = [n for n in pool.map(lambda n, kind=kind: attempt(kind, n), range(8)) if n is not None]
        assert len(winners) == 1, (kind, winners)
        assert s3.read(key) == content(winners[0])


def test_keys_that_need_quoting_are_copied_and_read_back(s3):
    source = "raw-site/2020-04-01/images/PACS export/ünïcode+1%.dcm"
    s3.write(source, b"odd name")
    assert s3.copy(source, "dst/a b+c.dcm", overwrite=False) == hashlib.md5(b"odd name").hexdigest()
    assert s3.read("dst/a b+c.dcm") == b"odd name"
    assert s3.read_range(source, 4, 4) == b"name"


def test_a_missing_source_or_object_is_named_not_mistaken_for_an_existing_destination(s3):
    with pytest.raises(ObjectNotFound, match=r"raw-site/gone\.dcm"):
        s3.copy("raw-site/gone.dcm", "dst/x.dcm", overwrite=False)
    with pytest.raises(ObjectNotFound, match=r"raw-site/gone\.dcm"):
        s3.read_range("raw-site/gone.dcm", 0, 16)
    assert s3.stat("dst/x.dcm") is None


def test_a_server_refusing_the_credentials_is_a_store_error_and_nothing_is_written(s3, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    wrong = S3Store(s3.bucket, s3.prefix)
    with pytest.raises(StoreError) as refused:
        wrong.write("k.json", b"{}", overwrite=False)
    assert not isinstance(refused.value, ObjectExists)
    with pytest.raises(StoreError):
        wrong.copy("k.json", "k2.json", overwrite=False)
    monkeypatch.undo()
    assert s3.stat("k.json") is None and s3.stat("k2.json") is None


def _client_id(store: S3Store) -> tuple[int, int]:
    return os.getpid(), id(store.client)


def test_a_worker_process_builds_one_client_for_all_the_tasks_sent_to_it(s3):
    """Each task pickles the store anew; the worker keeps one client (and its open connections) for all."""
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork")) as pool:
        seen = {pool.submit(_client_id, s3).result() for _ in range(4)}
    assert len(seen) == 1
    assert pickle.loads(pickle.dumps(s3)).url == s3.url


# -- requests per filed image, counted by the server ----------------------------------------------------
def _audited(seaweed, prefix: str, since: int) -> list[dict]:
    """The audit records of requests on keys below `prefix` after line `since`, once the log is quiet."""
    last, quiet = -1, time.monotonic()
    while time.monotonic() - quiet < 1.0:
        if seaweed.audit.records != last:
            last, quiet = seaweed.audit.records, time.monotonic()
        time.sleep(0.1)
    lines = [line for path in sorted(seaweed.audit_dir.glob("access-*.jsonl")) for line in path.open()]
    records = [json.loads(line) for line in lines[since:]]
    return [r for r in records if r.get("bucket") == TEST_BUCKET and (r.get("key") or "").startswith(prefix)]


def _audit_lines(seaweed) -> int:
    time.sleep(0.5)
    return sum(1 for path in seaweed.audit_dir.glob("access-*.jsonl") for _ in path.open())


def test_a_load_costs_one_header_get_one_metadata_put_and_one_copy_per_image(seaweed, s3, tmp_path):
    configure(s3)
    put_clinical(s3, "Covid1")
    raw = [
        put_image(s3, "Covid1", "1.2.826.9", "1.2.826.9.1", f"1.2.826.9.1.{n}", name=f"img{n}.dcm", seed=n)
        for n in range(6)
    ]
    since = _audit_lines(seaweed)
    catalog = Catalog(tmp_path / "catalog.sqlite")
    try:
        report = load(s3, catalog, workers=1)
    finally:
        catalog.close()
    assert report.images_filed == 6

    records = _audited(seaweed, s3.prefix, since)
    per_key = collections.Counter((r["operation"], r["key"][len(s3.prefix) :]) for r in records)
    filed = [k for k in (key for _, key in per_key) if k.endswith(".dcm") and k.startswith("training/")]
    assert len(set(filed)) == 6
    for key in raw:
        assert per_key[("REST.GET.OBJECT", key)] == 1, key  # one ranged GET reads the whole header
    for key in set(filed):
        metadata = key.replace("/xray/", "/xray-metadata/").removesuffix(".dcm") + ".json"
        assert per_key[("REST.PUT.OBJECT", key)] == 1, key  # the server-side copy (SeaweedFS logs it as a PUT)
        assert per_key[("REST.PUT.OBJECT", metadata)] == 1, metadata
    assert not [r for r in records if r["operation"] == "REST.HEAD.OBJECT"]
    images = [r for r in records if "/images/" in r["key"] or r["key"].endswith(".dcm") or "-metadata/" in r["key"]]
    assert not [r for r in images if int(r.get("status") or 0) >= 400]  # no image request refused or repeated


def test_a_write_whose_connection_drops_after_its_headers_stores_nothing(s3, monkeypatch):
    """As when a loader is killed mid-write: the request's headers reach the server, its body never does. The
    object must not appear (SeaweedFS keeps an empty one unless the body's Content-MD5 comes with it)."""
    import socket
    import threading
    from urllib.parse import urlparse

    upstream = urlparse(s3.endpoint_url)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def cut_after_headers() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with client, socket.create_connection((upstream.hostname, upstream.port)) as server:
                head = b""
                while b"\r\n\r\n" not in head and (part := client.recv(65536)):
                    head += part
                server.sendall(head.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")  # the headers, no body
                time.sleep(0.05)

    proxy = threading.Thread(target=cut_after_headers, daemon=True)
    proxy.start()
    try:
        port = listener.getsockname()[1]
        monkeypatch.setattr("nccid.store.s3.ATTEMPTS", 2)  # botocore tries again once, not for a minute
        cut = S3Store(s3.bucket, s3.prefix, endpoint_url=f"http://127.0.0.1:{port}")
        with pytest.raises(StoreError, match=r"training/xray-metadata/P/1/2/3\.json"):
            cut.write("training/xray-metadata/P/1/2/3.json", b'{"whole": "metadata"}' * 50, overwrite=False)
    finally:
        stop.set()
        listener.close()
        proxy.join(timeout=10)
    time.sleep(0.5)  # the server has seen every cut request by now
    assert s3.stat("training/xray-metadata/P/1/2/3.json") is None
    s3.write("training/xray-metadata/P/1/2/3.json", b"{}", overwrite=False)  # and the next run can write it
