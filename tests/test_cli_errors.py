"""What a new user meets first: a mistyped store, a wrong key, odd options. One clear line and a non-zero exit,
never a traceback, and nothing created or changed that the user did not ask for."""

from __future__ import annotations

import json
import os
import re

import click
import pytest
from click.testing import CliRunner
from helpers import configure, put_clinical, put_image, run_cli

from nccid.store import LocalStore


def _no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["ls", "training/"],
        ["stats"],
        ["sync", "training/", "{tmp}/dest"],
        ["warehouse", "status"],
        ["warehouse", "centres"],
        ["warehouse", "load"],
        ["warehouse", "rebuild-catalog"],
        ["cat", "config.json"],
    ],
)
def test_a_store_that_does_not_exist_is_named_not_created(tmp_path, args):
    missing = tmp_path / "no-such-store"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    catalog = ["--catalog", tmp_path / "c.sqlite"] if args[0] in ("stats", "warehouse") else []
    proc = run_cli(*argv, "--store", missing, *catalog)
    assert proc.returncode != 0
    assert f"store {missing} does not exist" in proc.stderr
    _no_traceback(proc)
    assert not missing.exists()
    assert not list(tmp_path.glob("*.rebuilding")) and not (tmp_path / "dest").exists()


def test_a_store_path_that_is_a_file_is_refused(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("not a store")
    proc = run_cli("ls", "--store", afile)
    assert proc.returncode == 1 and f"store {afile} is a file, not a store folder" in proc.stderr
    assert afile.read_text() == "not a store"


def test_only_commands_that_make_a_store_create_one(tmp_path):
    new = tmp_path / "new-store"
    run_cli("synth", "--store", new, "--patients", 4, "--hospitals", 1, "--imaged", 0, "--days", 1, check=True)
    assert (new / "config.json").exists()


@pytest.fixture
def small_store(tmp_path) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    configure(store)
    put_clinical(store, "Covid1")
    put_image(store, "Covid1", "1.2", "1.2.3", "1.2.3.4")
    put_image(store, "Covid1", "1.2", "1.2.3", "1.2.3.5", seed=1)
    run_cli("warehouse", "load", "--store", store.root, "--catalog", tmp_path / "c.sqlite", check=True)
    return store


def test_cat_header_of_a_json_key_says_it_is_not_dicom(small_store):
    proc = run_cli("cat", "training/data/Covid1/data_2020-04-01.json", "--header", "--store", small_store.root)
    assert proc.returncode == 1
    assert "training/data/Covid1/data_2020-04-01.json is not a DICOM file" in proc.stderr
    _no_traceback(proc)


def test_sync_into_a_file_or_past_a_file_says_which_and_copies_the_rest(small_store, tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("mine")
    into_file = run_cli("sync", "training/", target, "--store", small_store.root)
    assert into_file.returncode == 1 and f"{target} is a file, not a folder" in into_file.stderr
    assert target.read_text() == "mine"
    _no_traceback(into_file)

    dest = tmp_path / "mirror"
    dest.mkdir()
    (dest / "xray").write_text("a file where the xray folder goes")
    blocked = run_cli("sync", "training/", dest, "--store", small_store.root)
    assert blocked.returncode == 1 and f"{dest / 'xray'} is a file where a folder is needed" in blocked.stderr
    assert "2 file(s) could not be written" in blocked.stderr  # the two images, under xray/
    _no_traceback(blocked)
    # everything not under the blocked folder arrived: the clinical record and both metadata files
    assert json.loads((dest / "data" / "Covid1" / "data_2020-04-01.json").read_text())["Pseudonym"] == "Covid1"
    assert len(list((dest / "xray-metadata").rglob("*.json"))) == 2


def test_sync_with_no_workers_is_a_usage_error(small_store, tmp_path):
    proc = run_cli("sync", "training/", tmp_path / "d", "--store", small_store.root, "--workers", 0)
    assert proc.returncode == 2 and "workers must be at least 1 (got 0)" in proc.stderr
    assert not (tmp_path / "d").exists()


def test_rebuild_catalog_with_an_invalid_config_names_the_field(small_store, tmp_path):
    (small_store.root / "config.json").write_text('{"raw_prefixes": ["raw-site/"], "training_percentage": 150}')
    proc = run_cli("warehouse", "rebuild-catalog", "--store", small_store.root, "--catalog", tmp_path / "new.sqlite")
    assert proc.returncode == 1 and "training_percentage" in proc.stderr
    _no_traceback(proc)
    assert not list(tmp_path.glob("new.sqlite*.rebuilding"))


def test_version():
    from importlib.metadata import version

    proc = run_cli("--version", check=True)
    assert proc.stdout.strip() == f"nccid {version('nccid')}"


def _commands(command: click.Command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_every_help_text_describes_its_command_without_placeholders():
    from nccid.cli import command

    root = command()
    runner = CliRunner()
    seen = 0
    for path, cmd in _commands(root):
        out = runner.invoke(root, [*path, "--help"], prog_name="nccid").output
        assert "<list[" not in out and "{" not in out.split("\n", 1)[0], (path, out)
        for param in cmd.params:
            if getattr(param, "param_type_name", "") == "argument":
                assert param.help, f"nccid {' '.join(path)}: argument {param.name} has no help"
        seen += 1
    assert seen > 30
    site_help = runner.invoke(root, ["site", "--help"]).output
    assert all(word in site_help for word in ("clinical", "node", "upload"))


def test_servers_listen_with_the_same_option_and_stores_take_the_same_flag():
    from nccid.cli import command

    root = command()
    runner = CliRunner()
    for path in (["s3", "serve"], ["site", "node"]):
        assert "--host" in runner.invoke(root, [*path, "--help"]).output, path
    for path in (["demo"], ["site", "check"], ["ls"], ["stats"]):
        out = runner.invoke(root, [*path, "--help"]).output
        assert "-s, --store" in out and "NCCID_STORE" in out, path


def test_the_environment_store_is_used_when_no_flag_is_given(small_store):
    proc = run_cli("ls", "training/", env={**os.environ, "NCCID_STORE": str(small_store.root)}, check=True)
    assert "PRE training/data/" in proc.stdout


def test_the_demo_makes_exactly_the_patients_asked_for_or_says_why_not(tmp_path):
    from nccid.demo import patients_per_site

    assert patients_per_site(41) == [11, 10, 10, 10] and sum(patients_per_site(300)) == 300
    proc = run_cli("demo", "--dir", tmp_path / "demo", "--patients", 8)
    assert proc.returncode == 2 and "the demo needs at least 16 patients (4 per hospital), not 8" in proc.stderr
    assert not (tmp_path / "demo").exists()


def test_a_statistics_date_that_is_not_a_date_writes_nothing(small_store, tmp_path):
    proc = run_cli("stats", "--store", small_store.root, "--catalog", tmp_path / "c.sqlite", "--date", "notadate")
    assert proc.returncode == 2 and "statistics date 'notadate' is not a date as YYYY-MM-DD" in proc.stderr
    assert not small_store.exists("stats/latest.json") and not list(small_store.list("stats/"))


def test_the_store_leads_to_its_catalog_without_a_catalog_option(tmp_path):
    store = LocalStore(tmp_path / "store")
    configure(store)
    put_clinical(store, "Covid1")
    put_image(store, "Covid1", "1.2", "1.2.3", "1.2.3.4")
    run_cli("warehouse", "load", "--store", store.root, check=True)
    assert (tmp_path / "store.catalog.sqlite").exists()
    status = run_cli("warehouse", "status", "--store", store.root, check=True).stdout
    assert re.search(r"filed\s*│\s*2\s*│", status), status  # the record and the image, not an empty catalog
    stats = run_cli("stats", "--store", store.root, check=True).stdout
    assert re.search(r"Total patients\s*│\s*\d+\s*│\s*\d+\s*│\s*1\s*│", stats), stats


def test_an_error_message_is_printed_as_text_not_as_terminal_markup(small_store):
    proc = run_cli("cat", "training/[bold]notes.json", "--store", small_store.root)
    assert proc.returncode == 1 and "training/[bold]notes.json" in proc.stderr
