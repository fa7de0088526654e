"""Fixtures shared by the tests: servers, stores and catalogs. Helper functions live in helpers.py."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid

import pytest
from helpers import (  # noqa: F401  (tests not yet moved to `from helpers import`)
    BOGUS_ENV_KEY,
    SPLIT_SITE,
    TEST_BUCKET,
    TRAINING_SITE,
    VALIDATION_SITE,
    clinical,
    configure,
    image,
    image_bytes,
    key_env,
    listing,
    put_clinical,
    put_image,
    run_cli,
)
from hypothesis import configuration

from nccid.store import LocalStore, ObjectStore
from nccid.warehouse.catalog import Catalog

# Hypothesis keeps its example database in a throw-away folder, never in the working tree
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="nccid-hypothesis-")
configuration.set_hypothesis_home_dir(_HYPOTHESIS_HOME)
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A real SeaweedFS on loopback for this test worker; tools talk to it as the central administrator.

    The parent environment carries an AWS key pair when the server starts, as a careless shell would: the
    server must not adopt it (tested in test_s3_access).
    """
    from nccid.s3server.seaweedfs import SeaweedFS

    saved = {k: os.environ.get(k) for k in _AWS_VARS}
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = BOGUS_ENV_KEY, "bogus-secret-from-env"
    server = SeaweedFS(tmp_path_factory.mktemp("seaweed"))
    server.start()
    os.environ.update(server.admin_env())
    yield server
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


_AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


@pytest.fixture
def make_store(request, tmp_path):
    """A fresh empty store of the requested backend: 'local' (a folder) or 's3' (a new bucket)."""
    made = []

    def make(backend: str, name: str = "store") -> ObjectStore:
        if backend == "local":
            return LocalStore(tmp_path / name)
        from nccid.store.s3 import S3Store

        request.getfixturevalue("seaweed")
        store = S3Store(TEST_BUCKET, prefix=f"t-{uuid.uuid4().hex[:16]}")  # a fresh, empty prefix per store
        store.create_bucket()
        made.append(store)
        return store

    return make


@pytest.fixture(params=["local", "s3"])
def store(request, make_store) -> ObjectStore:
    """The same tests run against the embedded local store and a real S3 server."""
    return make_store(request.param)


@pytest.fixture
def local_store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def catalog(tmp_path):
    cat = Catalog(tmp_path / "catalog.sqlite")
    yield cat
    cat.close()


