"""Shared test helpers (imported by tests as `from helpers import ...`; fixtures stay in conftest.py).

Small hand-made raw uploads (tiny images) so each test states exactly what it feeds in, and the one way tests
run the `nccid` command as a user types it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

from nccid.store import ObjectStore
from nccid.synth import dicom as synth_dicom
from nccid.synth.dicom import Subject, encode
from nccid.warehouse.config import WarehouseConfig, save_config

SPLIT_SITE = "Split Hospital"
TRAINING_SITE = "Training Hospital"
VALIDATION_SITE = "Validation Hospital"


BOGUS_ENV_KEY = "AKIABOGUSFROMENV0000"
TEST_BUCKET = "nccid-tests"


def configure(store: ObjectStore, uploaders=("site",), pct: int = 50, **sites) -> WarehouseConfig:
    config = WarehouseConfig(
        raw_prefixes=tuple(f"raw-{u}/" for u in uploaders),
        training_percentage=pct,
        split_sites=frozenset(sites.get("split", [SPLIT_SITE])),
        training_sites=frozenset(sites.get("training", [TRAINING_SITE])),
        validation_sites=frozenset(sites.get("validation", [VALIDATION_SITE])),
    )
    save_config(store, config)
    return config


def clinical(pseudonym: str, centre: str = SPLIT_SITE, **fields) -> bytes:
    return json.dumps({"Pseudonym": pseudonym, "SubmittingCentre": centre, "Age": 60, "Sex": 1, **fields}).encode()


def put_clinical(store, pseudonym, date="2020-04-01", kind="data", centre=SPLIT_SITE, uploader="site", **fields):
    key = f"raw-{uploader}/{date}/data/{pseudonym}_{kind}.json"
    store.write(key, clinical(pseudonym, centre, **fields))
    return key


def image(patient: str, study: str, series: str, sop: str, modality: str = "CR", seed: int = 0, slices: int = 1):
    """A tiny but complete DICOM file (or CT/MR series) with exactly these identifiers."""
    rng = np.random.default_rng(seed)
    subject = Subject(patient, patient, "F", 61, study, "20200402")
    if modality in ("CR", "DX"):
        return [synth_dicom.xray(subject, rng, modality=modality, scale=0.02, series_uid=series, sop_uid=sop)]
    maker = synth_dicom.ct_slices if modality == "CT" else synth_dicom.mr_slices
    datasets = maker(subject, rng, slices=slices, scale=0.05, series_uid=series, uid_seed=sop)
    if slices == 1:
        datasets[0].SOPInstanceUID = sop
        datasets[0].file_meta.MediaStorageSOPInstanceUID = sop
    return datasets


def image_bytes(patient, study, series, sop, modality="CR", seed=0) -> bytes:
    return encode(image(patient, study, series, sop, modality, seed)[0])


def put_image(
    store, patient, study, series, sop, date="2020-04-01", modality="CR", name=None, uploader="site", seed=0
) -> str:
    key = f"raw-{uploader}/{date}/images/{name or sop + '.dcm'}"
    store.write(key, image_bytes(patient, study, series, sop, modality, seed))
    return key


def listing(store: ObjectStore, prefix: str = "") -> dict[str, tuple[int, str]]:
    return {i.key: (i.size, i.checksum) for i in store.list(prefix)}


def key_env(seaweed, creds) -> dict[str, str]:
    """Only what the NCCID guide asks of a user: an endpoint and their key pair (no administrator variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=seaweed.state().endpoint,
        AWS_ACCESS_KEY_ID=creds.access_key,
        AWS_SECRET_ACCESS_KEY=creds.secret_key,
        AWS_DEFAULT_REGION="eu-west-2",
    )
    return env


def run_cli(
    *args, env=None, check: bool = False, timeout: float | None = None, **kwargs
) -> subprocess.CompletedProcess:
    """`nccid ARGS` as a user types it, in a subprocess, output captured as text. With `check`, a non-zero exit
    fails the test showing what the command printed."""
    proc = subprocess.run(
        [sys.executable, "-m", "nccid.cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    if check:
        assert proc.returncode == 0, (
            f"nccid {' '.join(map(str, args))} exited {proc.returncode}: " + proc.stderr + proc.stdout
        )
    return proc


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a server a test starts and stops itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loaded_radiograph_warehouse(root, *, seed: int, patients: int, signal: float | None = None):
    """A warehouse below `root` made by nccid.synth and loaded by the loader: `patients` patients at five
    hospitals, each with one tiny radiograph (and, with `signal`, the planted sign of disease that strong).
    Returns its LocalStore."""
    from nccid.store import LocalStore
    from nccid.synth.national import SynthSpec, generate
    from nccid.warehouse.catalog import Catalog
    from nccid.warehouse.loader import load

    store = LocalStore(root / "store")
    spec = SynthSpec(seed=seed, patients=patients, scale=0.04, imaged_fraction=1.0, xray_share=1.0, mr_share=0.0)
    extra = {"signal": signal} if signal is not None else {}
    generate(store, SynthSpec(**{**spec.__dict__, **extra, "awkward": False, "days": 1}))
    catalog = Catalog(root / "catalog.sqlite")
    try:
        load(store, catalog, workers=1)
    finally:
        catalog.close()
    return store


def header_end(data: bytes) -> int:
    """Where the header of a DICOM file's bytes ends: after the pixel data element's tag, VR and length (the
    whole file when it has none)."""
    return data.rindex(b"\xe0\x7f\x10\x00") + 12 if b"\xe0\x7f\x10\x00" in data else len(data)


def header_mutants(seeds: dict[str, bytes], *, within: int | None = None):
    """A hypothesis strategy: one of `seeds` with 1 to 4 random edits (a bit flipped, a byte set, the file cut,
    bytes inserted or deleted) after the preamble and inside its header (its first `within` bytes, if given)."""
    from hypothesis import strategies as st

    @st.composite
    def mutants(draw) -> bytes:
        seed = seeds[draw(st.sampled_from(sorted(seeds)))]
        data = bytearray(seed)
        end = header_end(seed) if within is None else min(header_end(seed), within)
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["flip", "byte", "cut", "insert", "delete"]))
            at = draw(st.integers(128, max(128, min(end, len(data)) - 1)))
            if kind == "flip":
                data[at] ^= 1 << draw(st.integers(0, 7))
            elif kind == "byte":
                data[at] = draw(st.integers(0, 255))
            elif kind == "cut":
                del data[at:]
                break
            elif kind == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            else:
                del data[at : at + draw(st.integers(1, 8))]
        return bytes(data)

    return mutants()


def written(ds, syntax: str | None = None) -> bytes:
    """The bytes of `ds` as pydicom writes a DICOM file (in transfer syntax `syntax`, if given)."""
    import io

    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
