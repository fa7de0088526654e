"""S3 mode with real access control, against a real SeaweedFS on loopback.

The NCCID data-access guide's examples run unchanged with a researcher's credentials; every access group is
checked both ways (allowed and denied); grants, revocations, rotation and expiry take effect on the running
server; and the server's own access log says who did what.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from helpers import BOGUS_ENV_KEY, key_env, run_cli

from nccid.access.audit import summarise
from nccid.access.grants import GrantError, Registry
from nccid.access.groups import GROUPS, GroupError, iam_policy, seaweed_actions
from nccid.store.s3 import S3Store
from nccid.synth.national import SynthSpec, generate
from nccid.warehouse.catalog import Catalog
from nccid.warehouse.loader import load

BUCKET = "nccid-data-warehouse-prod"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def warehouse(seaweed, tmp_path_factory):
    """A loaded warehouse in the guide's bucket, written by the central team."""
    store = S3Store(BUCKET)
    store.create_bucket()
    if not any(True for _ in store.list("training/")):
        generate(
            store,
            SynthSpec(
                seed=21, patients=50, imaged_fraction=0.9, scale=0.03, ct_slices=(3, 5), mr_slices=(2, 3), mr_share=0.15
            ),
        )
        catalog = Catalog(tmp_path_factory.mktemp("cat") / "catalog.sqlite")
        load(store, catalog, workers=2)
        catalog.close()
    return store


@pytest.fixture(scope="module")
def registry(seaweed):
    return Registry(seaweed)


def client(seaweed, access_key: str, secret: str):
    return boto3.client(
        "s3",
        endpoint_url=seaweed.state().endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret,
        region_name="eu-west-2",
        config=Config(retries={"max_attempts": 1}),
    )


def denied(call) -> bool:
    try:
        call()
    except ClientError as exc:
        return exc.response["Error"]["Code"] in (
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "InvalidRequest",
            "403",
        )
    return False


def keys_below(store, prefix: str) -> dict[str, int]:
    return {i.key[len(prefix) :]: i.size for i in store.list(prefix)}


def local_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


# -- the documented examples ------------------------------------------------------------------------------
def test_aws_cli_examples_run_unchanged(seaweed, warehouse, registry, tmp_path):
    creds = registry.grant("Imperial AI Lab", "training-all", bucket=BUCKET)
    aws = shutil.which("aws")
    assert aws, "the AWS CLI is installed by the test command"
    script = (EXAMPLES / "aws_cli_sync.sh").read_text()
    proc = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=key_env(seaweed, creds),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for folder in ("data", "ct", "ct-metadata", "mri", "mri-metadata", "xray", "xray-metadata"):
        expected = keys_below(warehouse, f"training/{folder}/")
        assert expected, folder
        assert local_files(tmp_path / folder) == expected, folder
    assert not (tmp_path / "validation").exists()


def test_boto3_examples_run_unchanged(seaweed, warehouse, registry, tmp_path):
    creds = registry.grant("Oxford Radiology", "training-all", bucket=BUCKET)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "boto3_examples.py"), str(tmp_path / "data")],
        env=key_env(seaweed, creds),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    records = keys_below(warehouse, "training/data/")
    listed = [line.split(" ", 2) for line in lines if line.startswith("training/data/")]
    assert {k: int(size) for k, size, _ in listed} == {f"training/data/{k}": n for k, n in records.items()}
    assert all(dt.datetime.fromisoformat(when) for _, _, when in listed)  # last-modified printed
    assert sum(line.startswith("downloaded ") for line in lines) == len(records)
    assert sum(line.startswith("skipped ") for line in lines) == len(records)  # second pass: same sizes
    assert local_files(tmp_path / "data") == records
    (header,) = [line.split() for line in lines if line.startswith("header ")]
    assert header[2].startswith("Covid") and header[3] in ("CR", "DX") and header[4] == "False"
    (record,) = [line for line in lines if line.startswith("record ")]
    assert " Covid" in record


def test_nccid_sync_and_api_work_with_researcher_credentials(seaweed, warehouse, registry, tmp_path):
    creds = registry.grant("Cambridge AI", "training-ct", bucket=BUCKET)
    env = key_env(seaweed, creds)
    nccid_sync = ["sync", "--store", f"s3://{BUCKET}"]
    proc = run_cli(*nccid_sync, "training/ct/", tmp_path / "ct", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {k: v for k, v in local_files(tmp_path / "ct").items() if not k.startswith(".")} == keys_below(
        warehouse, "training/ct/"
    )
    refused = run_cli(*nccid_sync, "training/xray/", tmp_path / "x", env=env, timeout=300)
    assert refused.returncode != 0 and "AccessDenied" in refused.stderr
    fetched = local_files(tmp_path / "x") if (tmp_path / "x").exists() else {}
    assert not [name for name in fetched if not name.startswith(".")]  # nothing came through


# -- denials, tested both ways ----------------------------------------------------------------------------
def _first(store, prefix: str) -> str:
    return next(i.key for i in store.list(prefix))


def test_training_all_reads_training_only_and_writes_nowhere(seaweed, warehouse, registry):
    c = client(seaweed, *_pair(registry.grant("Researcher A", "training-all", bucket=BUCKET)))
    assert c.list_objects_v2(Bucket=BUCKET, Prefix="training/")["KeyCount"] > 0
    assert c.get_object(Bucket=BUCKET, Key=_first(warehouse, "training/data/"))["Body"].read()
    assert denied(lambda: c.list_objects_v2(Bucket=BUCKET, Prefix="validation/"))
    assert denied(lambda: c.list_objects_v2(Bucket=BUCKET))
    assert denied(lambda: c.get_object(Bucket=BUCKET, Key=_first(warehouse, "validation/data/")))
    assert denied(lambda: c.put_object(Bucket=BUCKET, Key="training/data/Covid1/evil.json", Body=b"x"))
    assert denied(lambda: c.put_object(Bucket=BUCKET, Key="raw-northfield/2020-01-01/data/x.json", Body=b"x"))
    assert denied(lambda: c.delete_object(Bucket=BUCKET, Key=_first(warehouse, "training/data/")))
    assert denied(lambda: c.get_object(Bucket=BUCKET, Key="config.json"))


def test_training_ct_reads_its_modality_and_the_clinical_data_only(seaweed, warehouse, registry):
    c = client(seaweed, *_pair(registry.grant("Researcher B", "training-ct", bucket=BUCKET)))
    for prefix in ("training/ct/", "training/ct-metadata/", "training/data/"):
        assert c.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["KeyCount"] > 0
        assert c.get_object(Bucket=BUCKET, Key=_first(warehouse, prefix))["Body"].read()
    for prefix in ("training/xray/", "training/mri/", "training/xray-metadata/", "validation/ct/"):
        assert denied(lambda p=prefix: c.list_objects_v2(Bucket=BUCKET, Prefix=p))
        assert denied(lambda p=prefix: c.get_object(Bucket=BUCKET, Key=_first(warehouse, p)))


def test_validation_all_is_the_mirror_image(seaweed, warehouse, registry):
    c = client(seaweed, *_pair(registry.grant("Validator", "validation-all", bucket=BUCKET)))
    assert c.get_object(Bucket=BUCKET, Key=_first(warehouse, "validation/data/"))["Body"].read()
    assert denied(lambda: c.get_object(Bucket=BUCKET, Key=_first(warehouse, "training/data/")))


def test_uploader_writes_its_own_prefix_and_cannot_read_or_list_anything(seaweed, warehouse, registry):
    c = client(
        seaweed, *_pair(registry.grant("Northfield NHS Trust", "uploader", bucket=BUCKET, uploader="northfield"))
    )
    own = "raw-northfield/2030-01-01/data/Covid99999_status.json"
    c.put_object(Bucket=BUCKET, Key=own, Body=b'{"Pseudonym": "Covid99999"}')
    assert warehouse.read(own) == b'{"Pseudonym": "Covid99999"}'
    assert denied(lambda: c.get_object(Bucket=BUCKET, Key=own))  # not even its own uploads
    assert denied(lambda: c.list_objects_v2(Bucket=BUCKET, Prefix="raw-northfield/"))
    assert denied(lambda: c.get_object(Bucket=BUCKET, Key=_first(warehouse, "training/data/")))
    assert denied(lambda: c.put_object(Bucket=BUCKET, Key="raw-riverside/2030-01-01/data/x.json", Body=b"x"))
    assert denied(lambda: c.put_object(Bucket=BUCKET, Key="training/data/Covid1/x.json", Body=b"x"))
    warehouse.delete(own)


def test_path_tricks_leak_nothing(seaweed, warehouse, registry):
    c = client(seaweed, *_pair(registry.grant("Researcher C", "training-all", bucket=BUCKET)))
    secret_key = _first(warehouse, "validation/data/")
    for trick in (
        f"training/../{secret_key}",
        f"training/%2e%2e/{secret_key}",
        f"training//../{secret_key}",
        f"training/./../{secret_key}",
    ):
        try:
            body = c.get_object(Bucket=BUCKET, Key=trick)["Body"].read()
        except ClientError:
            continue
        assert body != warehouse.read(secret_key), trick
    up = client(seaweed, *_pair(registry.grant("Site D", "uploader", bucket=BUCKET, uploader="sited")))
    assert denied(lambda: up.put_object(Bucket=BUCKET, Key="raw-sited/../training/data/x.json", Body=b"x"))
    assert not warehouse.exists("training/data/x.json")


def test_revoked_rotated_and_expired_keys_are_refused(seaweed, warehouse, registry):
    key = _first(warehouse, "training/data/")
    creds = registry.grant("Researcher E", "training-all", bucket=BUCKET)
    assert client(seaweed, *_pair(creds)).get_object(Bucket=BUCKET, Key=key)
    registry.revoke(creds.access_key)
    assert denied(lambda: client(seaweed, *_pair(creds)).get_object(Bucket=BUCKET, Key=key))

    old = registry.grant("Researcher F", "training-all", bucket=BUCKET)
    new = registry.rotate(old.access_key)
    assert new.access_key != old.access_key and new.grant.org == "Researcher F"
    assert client(seaweed, *_pair(new)).get_object(Bucket=BUCKET, Key=key)
    assert denied(lambda: client(seaweed, *_pair(old)).get_object(Bucket=BUCKET, Key=key))

    tomorrow = (dt.date.today() + dt.timedelta(days=1)).isoformat()
    dated = registry.grant("Researcher G", "training-all", bucket=BUCKET, expires=tomorrow)
    assert registry.sweep() == []  # not yet
    assert client(seaweed, *_pair(dated)).get_object(Bucket=BUCKET, Key=key)
    swept = registry.sweep(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    assert [g.access_key for g in swept] == [dated.access_key]
    assert denied(lambda: client(seaweed, *_pair(dated)).get_object(Bucket=BUCKET, Key=key))
    statuses = {g.access_key: g.status for g in registry.grants()}
    assert statuses[creds.access_key] == "revoked" and statuses[dated.access_key] == "expired"
    with pytest.raises(GrantError, match="already past"):
        registry.grant("Researcher H", "training-all", bucket=BUCKET, expires="2020-01-01")


def test_the_registry_keeps_no_secret_and_is_owner_only(seaweed, registry):
    creds = registry.grant("Researcher I", "auditor", bucket=BUCKET)
    text = registry.path.read_text()
    assert creds.secret_key not in text and creds.access_key in text
    assert oct(registry.path.stat().st_mode & 0o777) == "0o600"
    assert oct(seaweed.identities_path.stat().st_mode & 0o777) == "0o600"
    assert oct(seaweed.home.stat().st_mode & 0o777) == "0o700"


def test_a_key_in_the_servers_start_environment_is_not_an_administrator(seaweed, warehouse):
    c = client(seaweed, BOGUS_ENV_KEY, "bogus-secret-from-env")
    assert denied(lambda: c.list_objects_v2(Bucket=BUCKET))


def test_grants_apply_live_without_losing_uploads_in_flight(seaweed, warehouse, registry):
    site = registry.grant("Riverside", "uploader", bucket=BUCKET, uploader="riverside")
    c = client(seaweed, *_pair(site))
    key = "raw-riverside/2030-02-02/images/big.dcm"
    blob = os.urandom(24 * 1024 * 1024)
    errors: list[Exception] = []

    def upload() -> None:
        from boto3.s3.transfer import TransferConfig

        try:
            c.upload_fileobj(
                __import__("io").BytesIO(blob),
                BUCKET,
                key,
                Config=TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20, max_concurrency=1),
            )
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=upload)
    thread.start()
    others = [registry.grant(f"Lab {n}", "training-all", bucket=BUCKET) for n in range(3)]
    registry.revoke(others[0].access_key)
    thread.join(120)
    assert not errors
    assert warehouse.read(key) == blob
    warehouse.delete(key)


# -- audit ------------------------------------------------------------------------------------------------
def test_audit_says_who_read_what_and_what_was_refused(seaweed, warehouse, registry, tmp_path):
    creds = registry.grant("Audit Test Lab", "training-ct", bucket=BUCKET)
    c = client(seaweed, *_pair(creds))
    for _ in range(3):
        c.get_object(Bucket=BUCKET, Key=_first(warehouse, "training/ct/"))["Body"].read()
    assert denied(lambda: c.get_object(Bucket=BUCKET, Key=_first(warehouse, "validation/data/")))
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the server posts its log asynchronously
        rows = summarise(seaweed.audit_dir, registry.by_key(), org="Audit Test Lab")
        if sum(r.requests for r in rows if r.outcome == "denied") and sum(r.requests for r in rows) >= 4:
            break
        time.sleep(0.2)
    by = {(r.prefix, r.action, r.outcome): r.requests for r in rows}
    assert by[("training/ct/", "read", "allowed")] == 3
    assert by[("validation/data/", "read", "denied")] == 1
    assert {r.org for r in rows} == {"Audit Test Lab"} and {r.group for r in rows} == {"training-ct"}
    env = {**os.environ, "NCCID_S3_HOME": str(seaweed.home)}
    out = run_cli("access", "audit", "--org", "Audit Test Lab", env=env, check=True).stdout
    assert "training/ct/" in out and "denied" in out


# -- the group table and its AWS rendering -----------------------------------------------------------------
def test_group_table_renders_to_seaweed_actions_and_iam_policies():
    assert seaweed_actions("training-ct", BUCKET) == [
        f"Read:{BUCKET}/training/ct/*",
        f"List:{BUCKET}/training/ct/*",
        f"Read:{BUCKET}/training/ct-metadata/*",
        f"List:{BUCKET}/training/ct-metadata/*",
        f"Read:{BUCKET}/training/data/*",
        f"List:{BUCKET}/training/data/*",
    ]
    assert seaweed_actions("uploader", BUCKET, "kings") == [f"Write:{BUCKET}/raw-kings/*"]
    with pytest.raises(GroupError, match="needs an uploader name"):
        seaweed_actions("uploader", BUCKET)
    with pytest.raises(GroupError, match="unknown group"):
        seaweed_actions("everything", BUCKET)
    policy = iam_policy("training-ct", BUCKET)
    by_sid = {s["Sid"]: s for s in policy["Statement"]}
    assert by_sid["ListPrefixes"]["Condition"]["StringLike"]["s3:prefix"] == [
        "training/ct/*",
        "training/ct-metadata/*",
        "training/data/*",
    ]
    assert by_sid["Read"]["Resource"] == [
        f"arn:aws:s3:::{BUCKET}/training/ct/*",
        f"arn:aws:s3:::{BUCKET}/training/ct-metadata/*",
        f"arn:aws:s3:::{BUCKET}/training/data/*",
    ]
    assert "Write" not in by_sid
    uploader = {s["Sid"]: s for s in iam_policy("uploader", BUCKET, "kings")["Statement"]}
    assert set(uploader) == {"Write"} and uploader["Write"]["Resource"] == [f"arn:aws:s3:::{BUCKET}/raw-kings/*"]
    assert set(GROUPS) >= {
        "uploader",
        "etl",
        "processing",
        "processed-reader",
        "training-ct",
        "training-mri",
        "training-xray",
        "training-all",
        "validation-all",
        "auditor",
    }


def _pair(creds) -> tuple[str, str]:
    return creds.access_key, creds.secret_key
