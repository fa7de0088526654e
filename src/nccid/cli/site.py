"""`nccid site ...`: what runs at a hospital (the node's command is in site_node.py).

Each command parses its options, calls one library function (nccid.site) and renders what it returns. Input
paths of PACS exports are never printed: they carry names and NHS numbers; the library names inputs by number
and writes their paths to an owner-only IDENTIFIABLE report in the outbox.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path

import typer
from rich.markup import escape

from nccid.cli._common import (
    STORE_HELP,
    KeyFileOption,
    StoreOption,
    VaultOption,
    default_actor,
    fail,
    open_store_option,
    pseudonym_key,
    vault_issuer,
)
from nccid.console import console, err_console, human_bytes, progress_bar
from nccid.errors import UsageError

app = typer.Typer(
    help=(
        "What runs at a hospital. Clinical sheets: `template` (a blank sheet), `clinical` (validate and file a "
        "filled sheet). Images: `deid` (de-identify a PACS folder export), `node` (the DICOM node the PACS sends "
        "to). The outbox: `status` (ready, held, refused), `settings` (ages over 89), `check` (the gate over an "
        "outbox or a store), `upload` (to the warehouse's raw prefix)."
    ),
    no_args_is_help=True,
)
ActorOption = typer.Option(default_actor("site"), "--as", help="Who runs it, for the vault's audit (default: $USER).")
#: refused presentation contexts `site status` lists (a PACS offering every storage class it knows refuses dozens)
REFUSED_CONTEXTS_SHOWN = 30
OutboxArgument = typer.Argument(
    ..., help="The site outbox: data/ and images/ are uploaded, held/ waits for clinical sheets.", show_default=False
)


@app.command("deid")
def site_deid(
    src: Path = typer.Argument(..., help="Folder of PACS exports (identifiable; never named on screen)."),
    out: Path = OutboxArgument,
    key_file: Path | None = KeyFileOption,
    vault: Path = VaultOption,
    actor: str = ActorOption,
) -> None:
    """De-identify a folder of PACS exports into the outbox; the gate checks every output for the originals'
    identifiers. Images of patients without a clinical record wait in held/. Exit 1 on any gate finding."""
    from nccid.site.batch import deidentify_folder

    if not src.is_dir():
        raise UsageError("the PACS export folder does not exist or is not a folder")
    pseudonymiser = vault_issuer(pseudonym_key(key_file), vault, actor)
    with progress_bar("de-identifying") as tick:
        result = deidentify_folder(src, out, pseudonymiser, progress=tick)
    console.print(
        f"de-identified {len(result.written) + len(result.waiting)} of {result.inputs} input file(s) into {out}: "
        f"{len(result.written)} ready in images/, {len(result.waiting)} held in held/ until their clinical record "
        f"arrives; {len(result.held)} not sent"
    )
    for ref, reason in result.held[:50]:
        console.print(f"  not sent: {ref}: {escape(reason)}")
    if result.report is not None:
        console.print(f"inputs by path: {result.report} (IDENTIFIABLE, owner-only, never uploaded)")
    if not result.clean:
        for finding in result.findings[:50]:
            err_console.print(f"[red]gate:[/] {escape(str(finding))}")
        raise fail(f"the gate found {len(result.findings)} identifier(s): this batch must not be uploaded")
    console.print("gate: no identifiers found in any output file")


@app.command("status")
def site_status(
    outbox: Path = OutboxArgument,
    show_numbers: bool = typer.Option(
        False, "--show-numbers", help="Show the NHS/CHI numbers of held patients (needs the key; screen only)."
    ),
    key_file: Path | None = KeyFileOption,
    all_refused: bool = typer.Option(
        False,
        "--all-refused",
        help=f"List every SOP class refused at association, not only the {REFUSED_CONTEXTS_SHOWN} most recent.",
    ),
) -> None:
    """What is ready to upload, which patients' images wait for a clinical sheet, and what the node refused: the
    C-STOREs (by reason) and the SOP classes a PACS offered that it does not take (by calling AE). Only reads the
    outbox: nothing is moved."""
    from nccid.site.node import node_events, refused_contexts
    from nccid.site.outbox import Outbox

    if not outbox.is_dir():
        raise UsageError(f"no outbox at {outbox}")
    status = Outbox(outbox).status()
    console.print(f"ready to upload: {status.records} clinical record(s), {status.images} image(s)")
    console.print(f"held, waiting for a clinical sheet: {status.held_images} image(s) of {len(status.held)} patient(s)")
    if status.releasable:
        console.print(
            f"  {status.releasable} of them now have their clinical record: `nccid site upload` releases them"
        )
    key = pseudonym_key(key_file) if show_numbers and status.held else None
    for h in status.held:
        since = dt.datetime.fromtimestamp(h.since, dt.UTC).strftime("%Y-%m-%d %H:%M")
        number = f"  NHS/CHI {key.decrypt(h.person)}" if key is not None and h.person else ""
        console.print(f"  {h.pseudonym}: {h.images} image(s) since {since} UTC{number}")
    refused = Counter(e["reason"] for e in node_events(outbox) if e["outcome"] == "refused")
    if refused:
        console.print(f"refused by the node at C-STORE (the PACS keeps these): {sum(refused.values())}")
        for reason, n in refused.most_common():
            console.print(f"  {n} × {reason}", highlight=False, markup=False)
    contexts = refused_contexts(outbox)
    if contexts:
        console.print(
            f"refused at association (offered by the PACS, not taken by the node; nothing was sent): "
            f"{len(contexts)} SOP class(es) from {len({c.calling_ae for c in contexts})} calling AE(s)"
        )
        shown = contexts if all_refused else contexts[:REFUSED_CONTEXTS_SHOWN]
        for c in shown:
            name = c.sop_class if c.sop_class == c.sop_class_uid else f"{c.sop_class} ({c.sop_class_uid})"
            console.print(
                f"  {c.calling_ae or '?'}: {name}: {c.reason}; {c.associations} association(s), last {_when(c.last)}",
                highlight=False,
                markup=False,  # the AE title is the peer's: its brackets are text, not styles
            )
        if len(contexts) > len(shown):
            console.print(f"  ... and {len(contexts) - len(shown)} more (--all-refused lists them)")


def _when(iso: str) -> str:
    """An event log time (ISO 8601, UTC) as `YYYY-MM-DD HH:MM:SS UTC`; unchanged if it is not one."""
    try:
        return dt.datetime.fromisoformat(iso).astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return iso


@app.command("settings")
def site_settings(
    outbox: Path = OutboxArgument,
    ages_over_89: str | None = typer.Option(
        None,
        "--ages-over-89",
        help="keep (the original programme's policy, the default) or cap: PatientAge and clinical Age become 90, "
        "the birth year moves to match.",
        show_default=False,
    ),
    hospitals: list[str] = typer.Option(
        [],
        "--hospital",
        metavar="NAME",
        show_default=False,
        help="A name in the sheets' Hospital column that is this site's (repeatable; replaces the list).",
    ),
) -> None:
    """Show the site's settings kept in the outbox, or change them (both image routes and the sheets follow
    them)."""
    import dataclasses

    from nccid.site.outbox import Outbox

    box = Outbox(outbox)
    settings = box.settings()
    if ages_over_89 is not None:
        settings = dataclasses.replace(settings, ages_over_89=ages_over_89)
    if hospitals:
        settings = dataclasses.replace(settings, hospitals=tuple(hospitals))
    if ages_over_89 is not None or hospitals:
        console.print(f"saved {box.save_settings(settings)}")
    console.print(f"ages over 89: {settings.ages_over_89}")
    console.print(f"this site's hospitals besides its centre: {', '.join(settings.hospitals) or '(none)'}")


IdentifiersOption = typer.Option(
    [],
    "--identifiers",
    metavar="FILE",
    show_default=False,
    help="What the site knows of its patients (PAS extract or filled template, CSV/XLSX); repeatable.",
)


def site_gate(identifiers: list[Path], key_file: Path | None, vault: Path):
    """The gate with the site's knowledge, keyed by pseudonym through the vault (nothing new is issued)."""
    from nccid.site.check import Gate, people_by_pseudonym, read_identifiers
    from nccid.site.vault import Vault

    known = {}
    for path in identifiers:
        known.update(read_identifiers(path))
    if not known:
        return Gate({})
    key = pseudonym_key(key_file)
    with Vault(vault) as v:
        return Gate(people_by_pseudonym(known, v.lookup, key.encrypt))


@app.command("check")
def site_check(
    outbox: Path | None = typer.Argument(
        None, help="An outbox (data/, images/, held/); else the store of --store.", show_default=False
    ),
    store: str | None = typer.Option(
        None, "--store", "-s", envvar="NCCID_STORE", help=f"Check a whole store instead. {STORE_HELP}"
    ),
    prefix: str = typer.Option("", help="Only under this prefix of the store."),
    identifiers: list[Path] = IdentifiersOption,
    key_file: Path | None = KeyFileOption,
    vault: Path = VaultOption,
) -> None:
    """The de-identification gate over every file: the patient's own identifiers, any known NHS/CHI or hospital
    number, NHS-number patterns, private tags, the de-identified marks, and whether the warehouse can file each
    image. Exit 1 on any finding."""
    from nccid.site.check import check_files, outbox_files, store_files

    if outbox is None and not store:
        raise UsageError("give an OUTBOX folder or --store (or $NCCID_STORE)")
    gate = site_gate(identifiers, key_file, vault)
    if outbox is not None:
        if not outbox.is_dir():
            raise UsageError(f"no outbox at {outbox}")
        items, where = outbox_files(outbox), str(outbox)
    else:
        target = open_store_option(store)
        items, where = store_files(target, prefix), target.url.rstrip("/") + "/" + prefix
    with progress_bar("checking") as tick:
        report = check_files(items, gate, progress=tick)
    for finding in report.findings[:100]:
        err_console.print(f"[red]gate:[/] {escape(str(finding))}")
    summary = (
        f"{report.files} files in {where}: {report.dicom} DICOM, {report.clinical} clinical records, "
        f"{report.other} other; checked against {len(gate.people)} known patient(s)"
    )
    if not report.clean:
        raise fail(f"{summary}: {len(report.findings)} finding(s): must not be uploaded or released")
    console.print(f"{summary}: no identifiers found")


@app.command("upload")
def site_upload(
    outbox: Path = OutboxArgument,
    uploader: str = typer.Option(..., "--uploader", help="Your raw-<uploader>/ prefix."),
    store: str = StoreOption,
    date: str | None = typer.Option(None, help="Upload date folder (default today, UTC; fixed by the journal)."),
    identifiers: list[Path] = IdentifiersOption,
    key_file: Path | None = KeyFileOption,
    vault: Path = VaultOption,
) -> None:
    """Upload the outbox to raw-<uploader>/<date>/ after the gate passes: verified object by object, resumable.
    Held images whose clinical record has arrived are released first; the others stay held."""
    from nccid.site.upload import upload

    target = open_store_option(store)
    with progress_bar("uploading") as tick:
        result = upload(
            outbox, target, uploader, date=date, progress=tick, gate=site_gate(identifiers, key_file, vault)
        )
    if result.released:
        console.print(f"released {result.released} held image(s) whose clinical record has arrived")
    console.print(
        f"uploaded {result.uploaded} objects ({human_bytes(result.bytes)}) to "
        f"{target.url.rstrip('/')}/raw-{uploader}/{result.date}/, {result.skipped} already there, after the gate "
        f"passed {result.checked} file(s); "
        f"journal: {outbox / '.upload-journal.jsonl'}"
    )
    held = result.held or []
    if held:
        console.print(
            f"not uploaded: {sum(h.images for h in held)} image(s) of {len(held)} patient(s) held for a clinical "
            f"sheet (nccid site status {outbox})"
        )


@app.command("template")
def site_template(
    kind: str = typer.Argument(..., help="Which template: positive (COVID-19 positive v1.5) or negative (status)."),
    out: Path = typer.Argument(..., help="Where to write it: a .xlsx or .csv file."),
) -> None:
    """Write a blank clinical template (COVID-19 positive v1.5, or negative status) as XLSX or CSV."""
    from nccid.site.templates import blank_template

    console.print(f"blank {kind} template: {blank_template(kind, out)}")


@app.command("clinical")
def site_clinical(
    sheet: Path = typer.Argument(..., help="A filled template, .xlsx or .csv (UTF-8 or as Excel saves it)."),
    outbox: Path = OutboxArgument,
    kind: str = typer.Option(..., "--template", help="Which template the sheet is: positive or negative."),
    centre: str = typer.Option(..., "--centre", help="Your SubmittingCentre, as configured centrally."),
    alias: list[str] = typer.Option(
        [],
        "--alias",
        metavar="HOSPITAL",
        show_default=False,
        help="Another name in the sheet's Hospital column that is this site's (repeatable); rows of other "
        "hospitals are held.",
    ),
    strict: bool = typer.Option(False, "--strict", help="Refuse the whole sheet if any row is invalid."),
    key_file: Path | None = KeyFileOption,
    vault: Path = VaultOption,
    actor: str = ActorOption,
) -> None:
    """Validate a clinical sheet row by row; valid rows become pseudonymised clinical JSON in the outbox and
    release their patients' held images. Unambiguous values are converted with a warning."""
    from nccid.site.templates import file_sheet

    filed = file_sheet(
        sheet,
        outbox,
        vault_issuer(pseudonym_key(key_file), vault, actor),
        template=kind,
        centre=centre,
        aliases=alias,
        strict=strict,
    )
    result = filed.result
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    for error in result.errors:
        err_console.print(escape(f"{sheet.name}: {error}"), highlight=False)
    if not filed.written and result.errors:
        raise fail(f"{len(result.errors)} error(s) in {len(result.held_rows)} row(s): nothing written")
    console.print(
        f"{len(filed.written)} record(s) written to {outbox / 'data'}; {len(result.held_rows)} row(s) held back"
    )
    if filed.released:
        console.print(f"released {filed.released} held image(s) whose clinical record has now arrived")
