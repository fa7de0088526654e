"""Independent validation of AI models, as a validator and a vendor meet it: a small synthetic warehouse (made
by nccid.synth and loaded by the loader), the two example models, and hostile models in the bubblewrap sandbox.
"""

from __future__ import annotations

import json
import os
import socket
import textwrap
from pathlib import Path

import pydicom
import pytest
from helpers import loaded_radiograph_warehouse, run_cli

from nccid.errors import CohortError, SubmissionError, ValidationRunError
from nccid.validation import audit
from nccid.validation.demo import default_models_dir, train_baseline
from nccid.validation.manifest import MANIFEST_NAME, load_manifest
from nccid.validation.predictions import PREDICTIONS_NAME, read_predictions
from nccid.validation.sandbox import Limits
from nccid.validation.service import Workspace

MODELS = default_models_dir()
FAST = Limits(memory_mb=1024, processes=32, wall_seconds=60)


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    """A loaded warehouse: 220 patients at five hospitals, every one with one radiograph (tiny images, the sign
    of disease a little stronger than the default so that this small a set shows it clearly)."""
    return loaded_radiograph_warehouse(tmp_path_factory.mktemp("warehouse"), seed=3, patients=220, signal=1.5)


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("validation") / "ws", create=True)


@pytest.fixture(scope="module")
def validated(warehouse, space, tmp_path_factory):
    """Both example models trained / submitted, dry-run, sealed-run and released."""
    trained, printed = train_baseline(str(warehouse.root), MODELS, tmp_path_factory.mktemp("build"))
    runs = {}
    for name, folder in (("baseline", trained), ("coin-flip", MODELS / "coin-flip")):
        sub = space.submit(folder, "vera.validator")
        dry = space.dry_run(sub.id, "vera.validator", limits=FAST)
        sealed = space.sealed_run(sub.id, warehouse, "vera.validator", limits=FAST)
        runs[name] = (sub, dry, sealed, space.release(sealed.run, "rita.releaser"))
    return printed, runs


def _model(
    tmp_path: Path, name: str, code: str, *, entry: list[str] | None = None, score: bool = False, **use
) -> Path:
    """A submission folder whose predict.py is `code`, then (with `score`) code scoring every case 0.5; run
    with the extra arguments `entry`, if given."""
    folder = tmp_path / name
    folder.mkdir()
    manifest = json.loads((MODELS / "coin-flip" / "nccid-model.json").read_text())
    manifest["name"] = name
    manifest["intended_use"].update(use)
    manifest["entry"] += entry or []
    (folder / "nccid-model.json").write_text(json.dumps(manifest))
    (folder / "predict.py").write_text(textwrap.dedent(code) + (SCORE_ALL if score else ""))
    return folder


def _dry(space: Workspace, tmp_path: Path, name: str, code: str, limits: Limits = FAST, entry=None, score=False):
    sub = space.submit(_model(tmp_path, name, code, entry=entry, score=score), "vera.validator")
    return space.dry_run(sub.id, "vera.validator", limits=limits, cases=20)


SCORE_ALL = """
import os
from pathlib import Path
cases = sorted(p.name for p in Path(os.environ["NCCID_INPUT"]).iterdir())
Path(os.environ["NCCID_OUTPUT"], "predictions.csv").write_text("case,score\\n" + "".join(f"{c},0.5\\n" for c in cases))
"""


def _no_process_left(marker: str) -> list[str]:
    """Processes whose command line mentions `marker` (an argument of a hostile model's entry command, which
    its forked children inherit)."""
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            left.append(f"{pid}: {cmdline}")
    return left


# -- the examples: a baseline that learned, a coin flip that did not -----------------------------------
def test_baseline_learns_the_planted_sign_and_the_coin_flip_does_not(validated):
    printed, runs = validated
    assert "trained on" in printed
    baseline = runs["baseline"][2].results["overall"]["auc"]
    coin = runs["coin-flip"][2].results["overall"]["auc"]
    assert coin["low"] <= 0.5 <= coin["high"], coin
    assert baseline["low"] > 0.7, baseline
    for _sub, dry, sealed, _released in runs.values():
        assert dry.sandbox.status == sealed.sandbox.status == "completed"
        assert sealed.results["predictions"]["missing"] == 0
        cohort = sealed.results["cohort"]
        assert cohort["positives"] >= 20 and cohort["negatives"] >= 20


def test_sealed_cohort_is_adults_first_frontal_radiograph_from_validation_only(validated, warehouse, space):
    _printed, runs = validated
    sealed = runs["baseline"][2]
    private = space.root / "runs" / sealed.run / "private"
    manifest = json.loads((private / "cohort.json").read_text())
    keys = [c["key"] for c in manifest["cases"]]
    assert keys and all(k.startswith("validation/xray/") for k in keys)
    patients = [k.split("/")[2] for k in keys]
    assert len(patients) == len(set(patients))  # one case per patient
    truth = json.loads((private / "ground_truth.json").read_text())
    assert {t["age band"] for t in truth.values()} <= {"18-39", "40-59", "60-79", "80+"}
    assert manifest["excluded"].get("age outside the intended population", 0) > 0
    for key in keys:
        meta = json.loads(warehouse.read(key.replace("/xray/", "/xray-metadata/", 1)[: -len(".dcm")] + ".json"))
        assert meta["00185101"]["Value"][0] in ("PA", "AP")
    assert not (private / "input").exists()  # the run's own folder holds no input: they are the frozen cohort's
    assert sealed.results["cohort"]["cases"] == len(keys)
    coin = runs["coin-flip"][2]  # the same intended use, run second: the same frozen files, the same hashes
    assert not sealed.frozen.reused and coin.frozen.reused and coin.frozen.id == sealed.frozen.id
    reports = [json.loads((r.report_dir / "report.json").read_text())["run"] for r in (sealed, coin)]
    assert [r["cohort_hash"] for r in reports[1:]] == [reports[0]["cohort_hash"]]
    assert [r["truth_hash"] for r in reports[1:]] == [reports[0]["truth_hash"]]


def test_model_sees_only_opaque_inputs_and_no_host(space, warehouse, tmp_path):
    """A curious model lists everything it can see; the validator reads its private log."""
    code = """
    import os, pydicom, json
    from pathlib import Path
    seen = {"files": [], "ids": []}
    for top in ("/",):
        for root, dirs, files in os.walk(top):
            if root.startswith(("/proc", "/sys", "/usr", "/dev")) or "/lib/python" in root:
                dirs[:] = []
                continue
            seen["files"] += [os.path.join(root, f) for f in files]
    for path in Path("/input").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        seen["ids"] += [str(ds.PatientID), str(ds.PatientName), ds.SOPInstanceUID, ds.StudyInstanceUID,
                        ds.SeriesInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID]
    print(json.dumps(seen))
    """
    sub = space.submit(_model(tmp_path, "curious", code, score=True), "vera.validator")
    sealed = space.sealed_run(sub.id, warehouse, "vera.validator", limits=FAST, require_dry_run=False)
    assert sealed.sandbox.status == "completed", sealed.sandbox
    seen = json.loads((space.root / "runs" / sealed.run / "private" / "logs" / "stdout.txt").read_text())
    tops = {f.split("/")[1] for f in seen["files"]}
    assert tops <= {"input", "model", "root", "tmp", "output"}, tops  # 'root': only the Python installation
    assert not [f for f in seen["files"] if f.startswith("/root/") and "/.pyenv/" not in f]
    warehouse_ids = set()
    for info in warehouse.list("validation/xray/"):
        ds = pydicom.dcmread(warehouse.open(info.key), stop_before_pixels=True)
        warehouse_ids |= {ds.PatientID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID}
    assert seen["ids"] and not warehouse_ids & set(seen["ids"])
    assert all(i.startswith("case-") for i in seen["ids"][::6])


def test_vendor_report_holds_no_pseudonym_sop_uid_or_per_patient_row(validated, warehouse, space):
    _printed, runs = validated
    identifiers = set()
    for info in warehouse.list("validation/"):
        if info.key.endswith(".dcm"):
            ds = pydicom.dcmread(warehouse.open(info.key), stop_before_pixels=True)
            identifiers |= {ds.PatientID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID}
    assert len(identifiers) > 100
    for _sub, _dry, sealed, released in runs.values():
        cases = json.loads((space.root / "runs" / sealed.run / "private" / "cohort.json").read_text())["cases"]
        secrets = identifiers | {c["case"] for c in cases} | {c["sha256"] for c in cases}
        files = [p for p in released.rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {"report.html", "report.json", "roc_points.csv", "SHA256SUMS"}
        for path in files:
            text = path.read_text()
            leaks = [s for s in secrets if s in text]
            assert leaks == [], f"{path.name} holds {leaks[:3]}"
            assert "Covid" not in text  # no pseudonym of any form
        report = json.loads((released / "report.json").read_text())
        assert "logs" not in json.dumps(report["run"]) or report["run"]["logs"] is None  # sealed: no logs
        # every shown subgroup cell has at least the minimum size
        for table in report["results"]["subgroups"] + report["results"]["robustness"]:
            for level in table["levels"]:
                assert level["suppressed"] or level["n"] >= report["results"]["min_cell"]


def test_report_files_are_checksummed_and_self_contained(validated):
    _printed, runs = validated
    released = runs["baseline"][3]
    import hashlib

    sums = dict(reversed(line.split("  ")) for line in (released / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {str(p.relative_to(released)) for p in released.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    for name, digest in sums.items():
        assert hashlib.sha256((released / name).read_bytes()).hexdigest() == digest
    html = (released / "report.html").read_text()
    assert html.count("<svg") >= 3
    for fetch in ("src=", 'href="http', "<link", "@import", "url(http"):  # nothing fetched from anywhere
        assert fetch not in html
    report = json.loads((released / "report.json").read_text())
    run = report["run"]
    assert len(run["model_hash"]) == len(run["cohort_hash"]) == len(run["truth_hash"]) == 64
    assert run["code_version"].startswith("nccid ") and run["limits"]["memory_mb"] == FAST.memory_mb
    for name in ("roc", "calibration", "forest", "operating_point"):
        assert json.loads((released / "figures" / f"{name}.json").read_text())
    attributes = {t["attribute"] for t in report["results"]["subgroups"]}
    assert attributes == {"sex", "age band", "ethnicity group", "site", "scanner manufacturer", "modality"}
    robustness = {t["attribute"] for t in report["results"]["robustness"]}
    assert "scanner model" in robustness and "comorbidity: hypertension" in robustness


def test_operating_point_view_moves_with_threshold_and_prevalence(validated, tmp_path):
    """The inline script in a real browser: the counts at the vendor's threshold match the report's."""
    from playwright.sync_api import sync_playwright

    _printed, runs = validated
    released = runs["baseline"][3]
    point = json.loads((released / "report.json").read_text())["results"]["operating_point"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium")
        page = browser.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto((released / "report.html").as_uri())
        cells = {k: page.text_content(f"#op-{k}") for k in ("tp", "fn", "tn", "fp")}
        assert cells == {k: str(point[k]) for k in ("tp", "fn", "tn", "fp")}
        page.fill("#op-t", "0")
        page.dispatch_event("#op-t", "input")
        assert page.text_content("#op-fn") == "0" and page.text_content("#op-se") == "1.000"
        page.fill("#op-p", "0.5")
        page.dispatch_event("#op-p", "input")
        assert page.text_content("#op-ppv") == "0.500"  # everyone called positive: PPV is the prevalence
        browser.close()
    assert [u for u in requests if not u.startswith("file://")] == []


def test_dry_run_report_shows_logs_and_outputs_to_the_vendor(validated):
    _printed, runs = validated
    dry = runs["baseline"][1]
    html = (dry.report_dir / "report.html").read_text()
    assert "scored 40 cases" in html  # the model's own standard output
    assert (dry.report_dir / "outputs" / "predictions.csv").read_text().startswith("case,score")
    assert dry.results["overall"]["auc"]["low"] > 0.5  # the planted sign is there in the synthetic set too


# -- audit ---------------------------------------------------------------------------------------------
def test_audit_log_lists_every_step_and_detects_an_edit(validated, space):
    events = space.events()
    kinds = [(e["event"], e["who"]) for e in events]
    for event in ("submission", "dry_run", "sealed_run"):
        assert (event, "vera.validator") in kinds
    assert ("release", "rita.releaser") in kinds
    listed = run_cli("validate", "runs", "--workspace", space.root, check=True).stdout
    assert "rita.releaser" in listed and "sealed_run" in listed and "hash chain is intact" in listed
    with pytest.raises(ValidationRunError, match="already released"):
        space.release(validated[1]["baseline"][2].run, "rita.releaser")
    copy = space.root.parent / "edited"
    copy.mkdir()
    lines = space.audit_path.read_text().splitlines()
    lines[1] = lines[1].replace("vera.validator", "someone.else")
    (copy / "audit.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValidationRunError, match="line 3 does not follow line 2"):
        audit.verify(copy / "audit.jsonl")
    failed = run_cli("validate", "runs", "--workspace", copy)
    assert failed.returncode == 1 and "line 3 does not follow line 2" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_a_mistyped_workspace_is_reported_not_created(tmp_path):
    result = run_cli("validate", "runs", "--workspace", tmp_path / "typo")
    assert result.returncode == 1 and "no validation workspace at" in result.stderr
    assert not (tmp_path / "typo").exists()


def test_sealed_run_needs_a_completed_dry_run(space, warehouse, tmp_path):
    sub = space.submit(_model(tmp_path, "hasty", "", score=True), "vera.validator")
    with pytest.raises(ValidationRunError, match="has no completed dry run"):
        space.sealed_run(sub.id, warehouse, "vera.validator")


def test_submission_refuses_bad_manifests_and_symlinks(space, tmp_path):
    folder = _model(tmp_path, "linked", "", score=True)
    (folder / "key").symlink_to("/etc/hostname")
    with pytest.raises(SubmissionError, match="symbolic links"):
        space.submit(folder, "vera.validator")
    bad = _model(tmp_path, "bad", "", unit="image")
    result = run_cli("validate", "submit", bad, "--workspace", space.root)
    assert result.returncode == 1 and "field 'intended_use.unit' = 'image'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("task", [["covid19"], {"name": "covid19"}, 19])
def test_a_task_that_is_not_a_string_is_refused_naming_file_and_field(tmp_path, task):
    folder = _model(tmp_path, "odd-task", "", task=task)
    with pytest.raises(SubmissionError) as caught:
        load_manifest(folder)
    message = str(caught.value)
    assert message.startswith(str(folder / MANIFEST_NAME)) and "field 'intended_use.task'" in message
    assert len(message.splitlines()) == 1


def test_predictions_with_a_field_too_long_for_csv_are_counted_unreadable(tmp_path):
    cases = {"case-1", "case-2"}
    (tmp_path / PREDICTIONS_NAME).write_text("case,score\ncase-1,0.5\ncase-2," + "9" * 200_000 + "\n")
    got = read_predictions(tmp_path, cases)
    assert got.to_json() == {
        "expected": 2,
        "valid": 0,
        "missing": 2,
        "problems": {"predictions.csv unreadable as CSV": 1},
    }


def test_intended_use_without_a_cohort_is_refused(space, warehouse, tmp_path):
    sub = space.submit(_model(tmp_path, "ct-model", "", input={"modalities": ["CT"]}), "vera.validator")
    with pytest.raises(CohortError, match="radiograph cohorts only"):
        space.sealed_run(sub.id, warehouse, "vera.validator", require_dry_run=False)
    old = _model(tmp_path, "nonagenarian", "", population={"min_age": 120, "max_age": 130})
    sub = space.submit(old, "vera.validator")
    with pytest.raises(CohortError, match="no case in validation/ fits the intended use"):
        space.sealed_run(sub.id, warehouse, "vera.validator", require_dry_run=False)


# -- hostile models: each is stopped and reported ------------------------------------------------------
def test_a_model_that_opens_a_socket_reaches_nothing(space, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        run = _dry(space, tmp_path, "phone-home", f"""
        import socket
        socket.create_connection(("127.0.0.1", {port}), timeout=5).sendall(b"leak")
        """, score=True)  # fmt: skip
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()
    assert run.sandbox.status == "failed" and "ConnectionRefusedError" in run.sandbox.stderr
    assert run.results["predictions"]["valid"] == 0
    assert "failed with exit code 1" in (run.report_dir / "report.html").read_text()


def test_a_model_cannot_read_keys_vault_store_or_ground_truth(space, warehouse, tmp_path):
    secret = tmp_path / "site.key"
    secret.write_text("top-secret-key-material")
    targets = [str(secret), str(warehouse.root / "config.json"), str(space.root / "runs"), "/etc/passwd"]
    run = _dry(space, tmp_path, "reader", f"""
    import os, sys
    got = []
    for target in {targets!r}:
        try:
            got.append(open(target).read() if not os.path.isdir(target) else ",".join(os.listdir(target)))
        except OSError as exc:
            print(target, type(exc).__name__, file=sys.stderr)
    print("READ", got)
    if got and any(g for g in got):
        raise SystemExit(3)
    """, score=True)  # fmt: skip
    assert run.sandbox.status == "completed", run.sandbox.stderr  # every read failed, so it went on to score
    assert "READ []" in run.sandbox.stdout
    assert run.sandbox.stderr.count("FileNotFoundError") == 4
    assert "top-secret" not in (run.report_dir / "report.html").read_text()


def test_a_model_cannot_write_outside_its_output(space, tmp_path):
    escape = tmp_path / "escaped.txt"
    run = _dry(space, tmp_path, "writer", f"""
    import sys
    for target in ({str(escape)!r}, "/input/planted.txt", "/model/planted.txt", "/usr/planted.txt"):
        try:
            open(target, "w").write("x")
            print("WROTE", target)
        except OSError as exc:
            print(target, type(exc).__name__, file=sys.stderr)
    """, score=True)  # fmt: skip
    assert "WROTE" not in run.sandbox.stdout
    assert run.sandbox.stderr.count("Error") == 4
    assert not escape.exists()
    model = space.root / "submissions" / run.submission / "model"
    assert not (model / "planted.txt").exists()


def test_a_fork_bomb_is_stopped_by_the_process_limit(space, tmp_path):
    marker = f"forker-{os.getpid()}"
    run = _dry(space, tmp_path, "forker", """
    import os, time
    children = 0
    for _ in range(500):  # bounded: never more than 500 even without the limit
        if os.fork() == 0:
            time.sleep(120)
            os._exit(0)
        children += 1
    print("forked", children)
    """, limits=Limits(memory_mb=1024, processes=16, wall_seconds=60), entry=[marker])  # fmt: skip
    assert run.sandbox.status == "failed" and "BlockingIOError" in run.sandbox.stderr
    assert "forked" not in run.sandbox.stdout
    assert _no_process_left(marker) == []  # the PID namespace took every child with it


def test_a_model_past_its_time_limit_is_killed(space, tmp_path):
    marker = f"sleeper-{os.getpid()}"
    run = _dry(space, tmp_path, "sleeper", """
    import os, time
    if os.fork() == 0:
        time.sleep(300)
    time.sleep(300)
    """, limits=Limits(memory_mb=1024, processes=16, wall_seconds=2), entry=[marker])  # fmt: skip
    assert run.sandbox.status == "timed_out"
    assert "stopped at the wall-clock limit" in (run.report_dir / "report.html").read_text()
    assert _no_process_left(marker) == []


def test_a_model_that_eats_memory_is_stopped(space, tmp_path):
    run = _dry(space, tmp_path, "glutton", """
    blocks = [bytearray(64 * 1024 * 1024) for _ in range(64)]  # 4 GiB, above the limit
    """, limits=Limits(memory_mb=512, processes=16, wall_seconds=60))  # fmt: skip
    assert run.sandbox.status == "failed" and "MemoryError" in run.sandbox.stderr


def test_a_model_cannot_fill_the_disk_or_memory_through_its_files(space, tmp_path):
    run = _dry(space, tmp_path, "filler", """
    import sys
    try:
        for n in range(25):  # 25 files of 4 MB in /tmp: each under the file limit, 100 MB in all
            open(f"/tmp/part{n}", "wb").write(b"0" * (4 << 20))
    except OSError as exc:
        print("/tmp", exc.strerror, file=sys.stderr)
    try:
        with open("/output/big", "wb") as handle:
            for _ in range(100):
                handle.write(b"0" * (1 << 20))  # 100 MB, above the 16 MB limit
    except OSError as exc:
        print("/output/big", exc.strerror, file=sys.stderr)
    """, limits=Limits(memory_mb=1024, processes=16, wall_seconds=60, output_mb=16))  # fmt: skip
    assert "/tmp No space left on device" in run.sandbox.stderr
    assert "/output/big File too large" in run.sandbox.stderr
    big = space.root / "runs" / run.run / "private" / "output" / "big"
    assert big.stat().st_size <= 16 * 1024 * 1024


def test_malformed_and_partial_predictions_are_reported(space, tmp_path):
    run = _dry(space, tmp_path, "sloppy", """
    import os
    from pathlib import Path
    cases = sorted(p.name for p in Path(os.environ["NCCID_INPUT"]).iterdir())
    rows = [f"{c},0.{i % 10}" for i, c in enumerate(cases[:12])]
    rows += [f"{cases[12]},high", f"{cases[13]},1.7", "case-unknown,0.5", f"{cases[0]},0.9"]
    Path(os.environ["NCCID_OUTPUT"], "predictions.csv").write_text("case,score\\n" + "\\n".join(rows) + "\\n")
    """)  # fmt: skip
    assert run.sandbox.status == "completed"
    got = run.results["predictions"]
    assert (got["expected"], got["valid"], got["missing"]) == (20, 12, 8)
    assert got["problems"] == {
        "duplicate case (first score kept)": 1,
        "score not a number": 1,
        "score outside [0, 1]": 1,
        "unknown case": 1,
    }
    html = (run.report_dir / "report.html").read_text()
    assert "rows refused: score not a number" in html and "rows refused: unknown case" in html


def test_a_sandbox_that_cannot_start_is_an_error_not_a_model_failure(tmp_path):
    from nccid.errors import SandboxError
    from nccid.validation.sandbox import prepare_output, run_sandboxed

    (tmp_path / "model").mkdir()
    prepare_output(tmp_path / "out")
    with pytest.raises(SandboxError, match="the sandbox could not start: bwrap: Can't find source path"):
        run_sandboxed(["/bin/true"], tmp_path / "model", tmp_path / "missing", tmp_path / "out", tmp_path / "l", FAST)
    # a model that merely prints what bubblewrap would is the model's own failure
    run = run_sandboxed(
        ["/bin/sh", "-c", "echo 'bwrap: fake' >&2; exit 1"], tmp_path / "model", tmp_path / "model",
        tmp_path / "out", tmp_path / "l2", FAST,
    )  # fmt: skip
    assert (run.status, run.exit_code) == ("failed", 1)


def test_the_commands_print_what_they_did(warehouse, tmp_path):
    """submit, dry-run, run, release and runs as a validator types them, on the coin flip."""
    ws = tmp_path / "ws"
    submitted = run_cli("validate", "submit", MODELS / "coin-flip", "-w", ws, "--as", "val", check=True).stdout
    sub_id = submitted.split()[1]
    assert sub_id.startswith("coin-flip-1.0-") and "model SHA-256" in submitted
    dry = run_cli("validate", "dry-run", sub_id, "-w", ws, "--cases", "20", "--as", "val", check=True).stdout
    assert "dry run" in dry and "20 cases (10 positive)" in dry and "report.html" in dry
    sealed = run_cli("validate", "run", sub_id, "-w", ws, "-s", warehouse.root, "--as", "val", check=True).stdout
    assert "sealed run" in sealed and "valid predictions, 0 missing" in sealed and "AUC 0." in sealed
    run_id = sealed.split()[2]
    released = run_cli("validate", "release", run_id, "-w", ws, "--as", "rel", check=True).stdout
    assert f"released the report of {run_id} to" in released and (ws / "releases" / run_id / "report.html").exists()
    listed = run_cli("validate", "runs", "-w", ws, check=True).stdout
    assert "5 event(s)" in listed and "cohort_frozen" in listed  # the sealed run froze its cohort
    missing = run_cli("validate", "runs", "-w", ws.parent / "typo")
    assert missing.returncode == 1 and "give yours with -w/--workspace or $NCCID_VALIDATION" in missing.stderr


def test_inputs_of_an_interrupted_run_are_swept_by_the_next(space, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = space.root / "runs" / "20200101T000000-sealed-dead01" / "private"
    (folder / "input" / "case-1").mkdir(parents=True)
    (folder / "input" / "case-1" / "image-1.dcm").write_bytes(b"DICM")
    (folder / "input").chmod(0o555)
    (folder / "pid").write_text(dead.stdout.strip())
    alive = space.root / "runs" / "20200101T000000-sealed-live01" / "private"
    (alive / "input").mkdir(parents=True)
    (alive / "pid").write_text(str(os.getpid()))
    assert space.sweep_interrupted() == ["20200101T000000-sealed-dead01"]
    assert not (folder / "input").exists() and (alive / "input").exists()
