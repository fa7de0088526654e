"""The local object store: S3 ordering, atomic no-overwrite writes, checksums, safe keys."""

import hashlib
import os

import pytest

from nccid.store import InvalidKey, LocalStore, ObjectExists, ObjectNotFound, open_store


def test_local_listing_is_in_s3_key_order_and_honours_partial_prefixes(local_store):
    store = local_store
    for key in ["a/c", "a-b", "a/b/d", "ab", "b", "a/b/c"]:
        store.write(key, key.encode())
    assert [i.key for i in store.list()] == ["a-b", "a/b/c", "a/b/d", "a/c", "ab", "b"]
    assert [i.key for i in store.list("a/")] == ["a/b/c", "a/b/d", "a/c"]
    assert [i.key for i in store.list("a")] == ["a-b", "a/b/c", "a/b/d", "a/c", "ab"]
    assert [i.key for i in store.list("a/b/")] == ["a/b/c", "a/b/d"]
    assert list(store.list("zzz/")) == []
    assert store.list_dirs("") == ["a/"]
    assert store.list_dirs("a/") == ["a/b/"]
    assert [i.key for i in store.list_level("a/")] == ["a/c"]


def test_listing_prefixes_folders_and_levels(store):
    for key in ["a/c", "a-b", "a/b/d", "ab", "b", "a/b/c"]:
        store.write(key, key.encode())
    assert sorted(i.key for i in store.list()) == ["a-b", "a/b/c", "a/b/d", "a/c", "ab", "b"]
    assert sorted(i.key for i in store.list("a/")) == ["a/b/c", "a/b/d", "a/c"]
    assert sorted(i.key for i in store.list("a")) == ["a-b", "a/b/c", "a/b/d", "a/c", "ab"]
    assert store.list_dirs("") == ["a/"]
    assert store.list_dirs("a/") == ["a/b/"]
    assert [i.key for i in store.list_level("a/")] == ["a/c"]
    assert list(store.list("zzz/")) == []


def test_listing_streams(store):
    for n in range(5):
        store.write(f"k/{n}", b"x")
    it = store.list("k/")
    assert next(it).key == "k/0"  # a generator: nothing forces the whole listing into memory


def test_checksum_is_md5_and_follows_changes_made_behind_the_stores_back(local_store):
    store = local_store
    info = store.write("x/y.bin", b"hello")
    assert info.checksum == hashlib.md5(b"hello").hexdigest() and info.size == 5
    path = store.local_path("x/y.bin")
    with open(path, "wb") as handle:
        handle.write(b"changed!")
    os.utime(path, ns=(1, 1))
    assert store.stat("x/y.bin").checksum == hashlib.md5(b"changed!").hexdigest()


def test_read_whole_and_range(store):
    store.write("r", bytes(range(100)))
    assert store.read("r") == bytes(range(100))
    assert store.read_range("r", 10, 5) == bytes(range(10, 15))
    assert store.read_range("r", 95, 50) == bytes(range(95, 100))
    with pytest.raises(ObjectNotFound, match="nope"):
        store.read("nope")
    with store.open("r", 100) as reader:
        reader.seek(50)
        assert reader.read(3) == bytes([50, 51, 52])


def test_no_overwrite_write_and_copy_keep_the_original(store):
    store.write("k", b"first")
    with pytest.raises(ObjectExists, match="'k'"):
        store.write("k", b"second", overwrite=False)
    store.write("src", b"other")
    with pytest.raises(ObjectExists):
        store.copy("src", "k", overwrite=False)
    assert store.read("k") == b"first"
    store.copy("src", "dst/copy", overwrite=False)
    info = store.stat("dst/copy")
    assert store.read("dst/copy") == b"other" and info.checksum == hashlib.md5(b"other").hexdigest()
    assert store.stat("k").checksum == hashlib.md5(b"first").hexdigest()
    assert store.stat("missing") is None


def test_empty_and_tiny_objects_round_trip(store):
    for n in range(3):  # an empty PUT once stalled the next request on the same connection (SeaweedFS)
        store.write(f"e/empty{n}", b"")
        store.write(f"e/tiny{n}", b"x")
    assert {i.key: i.size for i in store.list("e/")} == {
        **{f"e/empty{n}": 0 for n in range(3)},
        **{f"e/tiny{n}": 1 for n in range(3)},
    }
    assert store.read("e/empty1") == b"" and store.read("e/tiny2") == b"x"


def test_large_objects_stream_in_and_out(store, tmp_path):
    import io

    blob = os.urandom(3 * 1024 * 1024 + 17)
    store.write("big/blob.bin", io.BytesIO(blob))
    assert store.stat("big/blob.bin").size == len(blob)
    out = io.BytesIO()
    store.download("big/blob.bin", out)
    assert out.getvalue() == blob
    assert store.read_range("big/blob.bin", len(blob) - 10, 100) == blob[-10:]


def test_temporary_files_of_a_killed_writer_are_invisible_and_cleaned(local_store):
    store = local_store
    tmp = store._temp_path()
    with open(tmp, "wb") as handle:
        handle.write(b"half an object")
    os.utime(tmp, (0, 0))
    assert list(store.list()) == []
    assert store.list_dirs() == []
    assert store.clean_temp() == 1


@pytest.mark.parametrize("unnamed", [True, False], ids=["unnamed-files", "named-temporary-files"])
def test_create_only_writes_leave_no_temporary_file_and_cache_their_checksum(local_store, unnamed):
    """Create-only writes (how the loader files everything) use unnamed files linked into place, or named
    temporary files on a filesystem without them: either way the object, its mode and its cached MD5 are the
    same, a refused write changes nothing, and no temporary file is left behind."""
    store = local_store
    if unnamed:
        assert store._can_link_unnamed()  # this machine's filesystem and /proc allow it: that path is the one tested
    else:
        store._unnamed = False  # as on a filesystem without O_TMPFILE, or a /proc that refuses the link
    store.write("raw/a.bin", b"raw bytes")
    store.write("meta/a.json", b"{}", overwrite=False)
    store.copy("raw/a.bin", "filed/deep/a.bin", overwrite=False)
    with pytest.raises(ObjectExists):
        store.copy("meta/a.json", "filed/deep/a.bin", overwrite=False)
    with pytest.raises(ObjectNotFound):
        store.copy("raw/missing.bin", "filed/deep/b.bin", overwrite=False)
    assert store.read("filed/deep/a.bin") == b"raw bytes"
    for key, data in (("filed/deep/a.bin", b"raw bytes"), ("meta/a.json", b"{}")):
        path = store.root / key
        assert os.getxattr(path, "user.nccid.md5").decode().startswith(hashlib.md5(data).hexdigest() + ":")
        umask = os.umask(0)
        os.umask(umask)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes
    assert not (store.root / "filed/deep/b.bin").exists()
    temporary = store.root / ".nccid-tmp"
    assert (list(temporary.iterdir()) if temporary.exists() else []) == []


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/abs", "a//b", "a/./b", "", "a\\b", "a\x00b"])
def test_keys_that_could_escape_or_hide_are_refused(store, key):
    with pytest.raises(InvalidKey):
        store.write(key, b"x")
    with pytest.raises(InvalidKey):
        store.stat(key)


def test_open_store_by_path_and_file_url(tmp_path):
    a = open_store(tmp_path / "s")
    b = open_store((tmp_path / "s").as_uri())
    assert isinstance(a, LocalStore) and a.root == b.root
    a.write("k", b"v")
    assert b.read("k") == b"v"
