"""The site outbox has one owner (issue 14.3) and keeps the site's secrets at the site (issue 10, defects 7 and 9):
`Outbox` files, holds and releases; `site status` shows without changing; one `Pseudonymiser` per run asks the
vault once per person; input paths never reach the console or the upload; ages over 89 follow the site setting;
`site check` takes the store from -s / $NCCID_STORE; every `site` command and argument says what it is."""

from __future__ import annotations

import os
import random
import stat
import threading

import pydicom
import pytest
import typer.main
from helpers import run_cli

from nccid.site.batch import deidentify_folder
from nccid.site.deid import DeidKeys, deidentify
from nccid.site.outbox import Outbox, SiteSettings
from nccid.site.pseudonymiser import Pseudonymiser
from nccid.site.upload import upload
from nccid.site.vault import PseudonymKey, Vault
from nccid.synth.hospital import hospital_patient, pacs_image
from nccid.synth.site_exports import pacs_export


def _tree(root) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*")}


@pytest.fixture
def site(tmp_path):
    key = PseudonymKey.generate()
    return {
        "key": key,
        "key_file": key.save(tmp_path / "site.key"),
        "vault": tmp_path / "vault.sqlite",
        "pseudonymiser": Pseudonymiser.with_vault(key, tmp_path / "vault.sqlite", "test"),
    }


def test_status_shows_what_could_be_released_without_moving_it(tmp_path, site):
    rng = random.Random(41)
    people = [hospital_patient(rng) for _ in range(2)]
    export = pacs_export(tmp_path / "pacs", people, modality="DX", seed=2)
    box = Outbox(tmp_path / "outbox")
    result = deidentify_folder(export.root, box.root, site["pseudonymiser"])
    assert len(result.waiting) == 2 and result.written == []
    first, _ = site["pseudonymiser"].of_numbers([p.nhs for p in people])
    (box.data).mkdir()
    (box.data / f"{first}_data.json").write_text(f'{{"Pseudonym": "{first}"}}')  # a record arrives by hand
    before = _tree(box.root)
    proc = run_cli("site", "status", box.root)
    assert proc.returncode == 0, proc.stderr
    assert "ready to upload: 1 clinical record(s), 0 image(s)" in proc.stdout
    assert "held, waiting for a clinical sheet: 2 image(s) of 2 patient(s)" in proc.stdout
    assert "1 of them now have their clinical record" in proc.stdout
    assert _tree(box.root) == before  # showing the outbox changed nothing
    assert box.release() == 1 and [p.name for p in box.images.iterdir()] == [first]


def test_an_image_held_while_its_record_arrives_is_released_and_uploads_skip_held_and_reports(tmp_path, site):
    rng = random.Random(43)
    people = [hospital_patient(rng) for _ in range(2)]
    box = Outbox(tmp_path / "outbox")
    pseudonyms = site["pseudonymiser"].of_numbers([p.nhs for p in people])
    box.add_record({"Pseudonym": pseudonyms[0]}, "data")
    keys, ready = DeidKeys.derive(site["key"].key), []
    for person, pseudonym in zip(people, pseudonyms, strict=True):
        person_cipher = site["key"].encrypt(person.nhs)
        ds = deidentify(
            pacs_image(person, rng, modality="CR", seed="u"), pseudonym=pseudonym, person=person_cipher, keys=keys
        )
        # told "no record" (a node's stale view), the outbox still finds the record and releases at once
        added = box.add_image(ds, pseudonym, person_cipher, ready=False)
        assert added.held == (pseudonym != pseudonyms[0]) and added.path.exists()
        ready += [] if added.held else [added.path.relative_to(box.root).as_posix()]
    held_dir = box.held / pseudonyms[1]
    assert stat.S_IMODE((held_dir / ".person").stat().st_mode) == 0o600
    report = box.write_identifiable_report("deid", ["input", "path"], [["1", "/pacs/SMITH^JOHN_9434765919/1.dcm"]])
    files = [p.relative_to(box.root).as_posix() for p in box.upload_files()]
    assert files == [f"data/{pseudonyms[0]}_data.json", *ready] and ready[0].startswith(f"images/{pseudonyms[0]}/")
    from nccid.store import LocalStore

    store = LocalStore(tmp_path / "store")
    sent = upload(box.root, store, "northfield", date="2020-05-01")
    keys = [info.key for info in store.list()]
    assert sent.uploaded == 2 and len(keys) == 2 and not any("held" in k or "site-reports" in k for k in keys)
    assert [h.pseudonym for h in sent.held] == [pseudonyms[1]]
    assert report.exists() and "9434765919" not in "".join(keys)


def test_one_vault_round_trip_per_person_from_any_thread(tmp_path, site):
    calls: list[list[str]] = []
    with Vault(tmp_path / "v.sqlite") as vault:

        def issue(ciphertexts: list[str]) -> list[str]:
            calls.append(list(ciphertexts))
            return vault.issue(ciphertexts, actor="t")

        pseudonymiser = Pseudonymiser(site["key"], issue)
        numbers = [hospital_patient(random.Random(n)).nhs for n in range(5)]
        first = pseudonymiser.of_numbers(numbers + numbers)
        threads = [threading.Thread(target=pseudonymiser.of_numbers, args=(numbers,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert first[:5] == first[5:] and len(set(first)) == 5
        assert calls == [[site["key"].encrypt(n) for n in numbers]]  # one call, each person once
        assert vault.lookup([site["key"].encrypt(n) for n in numbers]) == first[:5]


def test_site_deid_never_shows_input_paths_and_writes_them_to_an_owner_only_report(tmp_path, site):
    rng = random.Random(47)
    people = [hospital_patient(rng) for _ in range(3)]
    export = pacs_export(tmp_path / "pacs", people, modality="CR", seed=6)
    broken = next(iter(export.files))  # a file that cannot be read, in a folder named after the patient
    broken.write_bytes(b"")
    outbox = tmp_path / "outbox"
    env = {**os.environ, "NCCID_LOG": "debug"}
    proc = run_cli(
        "site", "deid", export.root, outbox, "--key-file", site["key_file"], "--vault", site["vault"], env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "not sent: input #1: empty file (0 bytes)" in proc.stdout
    assert "site.deid" in proc.stderr  # the logs were on, and are checked below
    for person in people:  # the folder names carry them; the console and the logs do not
        for identifier in (person.family, person.nhs, "ACC06"):
            assert identifier not in proc.stdout + proc.stderr
    (report,) = (outbox / "site-reports").glob("deid-*.IDENTIFIABLE.tsv")
    assert stat.S_IMODE(report.stat().st_mode) == 0o600
    assert stat.S_IMODE(report.parent.stat().st_mode) == 0o700
    text = report.read_text()
    assert text.startswith("# IDENTIFIABLE") and str(broken) in text and str(report) in proc.stdout
    assert all(not p.is_relative_to(outbox / "site-reports") for p in Outbox(outbox).upload_files())


@pytest.mark.parametrize(("policy", "age", "birth_year"), [("keep", "093Y", "1927"), ("cap", "090Y", "1930")])
def test_ages_over_89_follow_the_site_setting(tmp_path, site, policy, age, birth_year):
    rng = random.Random(53)
    person = hospital_patient(rng)
    ds = pacs_image(person, rng, modality="CR", seed="old")
    ds.PatientAge, ds.PatientBirthDate, ds.StudyDate = "093Y", "19270611", "20200401"
    (tmp_path / "pacs").mkdir()
    ds.save_as(tmp_path / "pacs" / "old.dcm", enforce_file_format=True)
    box = Outbox(tmp_path / "outbox")
    proc = run_cli("site", "settings", box.root, "--ages-over-89", policy)
    assert proc.returncode == 0 and f"ages over 89: {policy}" in proc.stdout
    assert box.settings() == SiteSettings(ages_over_89=policy)
    (path,) = deidentify_folder(tmp_path / "pacs", box.root, site["pseudonymiser"]).waiting
    out = pydicom.dcmread(path)
    assert (out.PatientAge, out.PatientBirthDate) == (age, f"{birth_year}0101")
    sheet = tmp_path / "s.csv"
    sheet.write_text(
        '"NHS/CHI Number",Hospital,Age,"Sex (Male = 1, Female = 0)","Date of Positive Covid Swab"\n'
        f"{person.nhs},Northfield Trust,93,1,04/01/2020\n"
    )
    proc = run_cli(
        "site", "clinical", sheet, box.root, "--template", "positive", "--centre", "Northfield Trust",
        "--key-file", site["key_file"], "--vault", site["vault"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (record,) = box.data.glob("*.json")
    assert f'"Age": {int(age[:3])}' in record.read_text()
    assert ("column 'Age': read '93', wrote 90" in proc.stdout) == (policy == "cap")


def test_a_bad_age_setting_is_refused_in_one_line(tmp_path):
    proc = run_cli("site", "settings", tmp_path / "outbox", "--ages-over-89", "round")
    assert proc.returncode == 2 and "'round' is not one of keep, cap" in proc.stderr and "Traceback" not in proc.stderr


def test_site_check_takes_the_store_from_the_environment(tmp_path):
    from nccid.store import LocalStore

    store = LocalStore(tmp_path / "store")
    store.write("raw-x/2020-05-01/data/Covid1_data.json", b'{"Pseudonym": "Covid1"}')
    proc = run_cli("site", "check", env={**os.environ, "NCCID_STORE": str(tmp_path / "store")})
    assert proc.returncode == 0, proc.stderr
    assert "1 files in" in proc.stdout and "1 clinical records" in proc.stdout
    proc = run_cli("site", "check", "-s", tmp_path / "store")
    assert proc.returncode == 0 and "1 clinical records" in proc.stdout


def test_every_site_command_and_argument_says_what_it_is():
    from nccid.cli import site, site_node

    app = typer.Typer()
    app.add_typer(site.app, name="site")
    site.app.command("node")(site_node.site_node)
    group = typer.main.get_command(app).commands["site"]
    for name in ("deid", "status", "settings", "check", "upload", "template", "clinical", "node"):
        assert f"`{name}`" in group.help  # the group's help names every command
    for name, command in group.commands.items():
        assert command.help and "<" not in command.help.replace("<uploader>", "").replace("<date>", ""), name
        for param in command.params:
            assert getattr(param, "help", None), f"site {name}: {param.name} has no help"
    proc = run_cli("site", "check", "--help")
    assert "<list[" not in proc.stdout and "FILE" in proc.stdout


@pytest.mark.filterwarnings("ignore:Invalid value:UserWarning")  # pydicom's warning as the bad value is set
def test_a_failed_image_write_leaves_no_temporary_file(tmp_path, site):
    """A data set pydicom cannot encode (a value too large for its VR): `add_image` raises, and neither images/
    nor held/ keeps the half-written temporary file; the next image is filed as usual."""
    rng = random.Random(59)
    person = hospital_patient(rng)
    box = Outbox(tmp_path / "outbox")
    (pseudonym,) = site["pseudonymiser"].of_numbers([person.nhs])
    cipher, keys = site["key"].encrypt(person.nhs), DeidKeys.derive(site["key"].key)
    for ready in (False, True):
        ds = deidentify(pacs_image(person, rng, modality="CR", seed="w"), pseudonym=pseudonym, person=cipher, keys=keys)
        ds.add_new(0x00091010, "US", 70000)
        with pytest.raises(OSError):  # pydicom wraps the encoding error in an OSError
            box.add_image(ds, pseudonym, cipher, ready=ready)
        assert [p.name for p in box.root.rglob("*") if p.is_file() and p.name != ".person"] == []
    ds = deidentify(pacs_image(person, rng, modality="CR", seed="w"), pseudonym=pseudonym, person=cipher, keys=keys)
    assert box.add_image(ds, pseudonym, cipher).held and [h.images for h in box.held_patients()] == [1]


def test_clearing_a_process_s_temporary_files_leaves_other_writers_alone(tmp_path):
    """What a killed writer left is deleted by its PID, read from the temporary file's name, never matched inside
    a SOP Instance UID (which is dots and digits too): another process's write in progress is left alone."""
    from nccid.site.outbox import partial_path

    box, pid = Outbox(tmp_path / "outbox"), os.getpid()
    mine = partial_path(box.image_path("Covid1", f"1.2.{pid}.5"))
    others = [
        box.held / "Covid2" / f".1.2.{pid}.9.dcm.{pid + 1}.7.part",  # this PID inside the UID, another writer
        box.data / f".Covid1_data.json.{pid + 1}.3.part",
    ]
    for path in [mine, *others]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert box.discard_partial_writes(pid=pid) == 1 and not mine.exists() and all(p.exists() for p in others)
    assert box.discard_partial_writes() == 2 and not any(p.exists() for p in others)  # after a crash: all
