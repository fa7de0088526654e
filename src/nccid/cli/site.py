"""`nccid site ...`: what runs at a hospital (the node's command is in site_node.py)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from nccid.cli._common import (
    KeyFileOption,
    StoreOption,
    VaultOption,
    fail,
    open_store_option,
    pseudonym_key,
)
from nccid.console import console, err_console, human_bytes, progress_bar

app = typer.Typer(
    help="What runs at a hospital: clinical sheets, de-identification, the DICOM node, the gate, upload.",
    no_args_is_help=True,
)


@app.command("deid")
def site_deid(
    src: Path = typer.Argument(..., help="Folder of PACS exports (identifiable)."),
    out: Path = typer.Argument(..., help="The outbox: images/<pseudonym>/<SOPInstanceUID>.dcm."),
    key_file: Path | None = KeyFileOption,
    vault: Path = VaultOption,
    actor: str = typer.Option(os.environ.get("USER", "site"), "--as", help="Who runs the batch (for the audit)."),
) -> None:
    """De-identify a folder; the gate checks every output for the originals' identifiers. Exit 1 on any finding."""
    from nccid.site.batch import deidentify_folder
    from nccid.site.vault import Vault

    key = pseudonym_key(key_file)
    with Vault(vault) as v, progress_bar("de-identifying") as tick:
        result = deidentify_folder(src, out, key=key, pseudonymise=lambda c: v.issue(c, actor=actor), progress=tick)
    console.print(f"de-identified {len(result.written)} files into {out}; held {len(result.held)}")
    for name, reason in result.held[:50]:
        console.print(f"  held {name}: {reason}")
    if not result.clean:
        for finding in result.findings[:50]:
            err_console.print(f"[red]gate:[/] {finding}")
        raise fail(
            RuntimeError(f"the gate found {len(result.findings)} identifier(s): this batch must not be uploaded")
        )
    console.print("gate: no identifiers found in any output file")




@app.command("status")
def site_status(
    outbox: Path = typer.Argument(..., help="The outbox."),
    show_numbers: bool = typer.Option(
        False, "--show-numbers", help="Show the NHS/CHI numbers of held patients (needs the key; screen only)."
    ),
    key_file: Path | None = KeyFileOption,
) -> None:
    """What is ready to upload, which patients' images wait for a clinical sheet, and what the node refused."""
    import datetime as dt
    from collections import Counter

    from nccid.site.node import node_events
    from nccid.site.outbox import held_patients, ready_counts, release_held

    released = release_held(outbox)
    records, images = ready_counts(outbox)
    console.print(
        f"ready to upload: {records} clinical record(s), {images} image(s)"
        + (f" ({released} just released from held/)" if released else "")
    )
    held = held_patients(outbox)
    key = pseudonym_key(key_file) if show_numbers and held else None
    console.print(
        f"held, waiting for a clinical sheet: {sum(h.images for h in held)} image(s) of {len(held)} patient(s)"
    )
    for h in held:
        since = dt.datetime.fromtimestamp(h.since, dt.UTC).strftime("%Y-%m-%d %H:%M")
        number = f"  NHS/CHI {key.decrypt(h.person)}" if key is not None and h.person else ""
        console.print(f"  {h.pseudonym}: {h.images} image(s) since {since} UTC{number}")
    refused = Counter(e["reason"] for e in node_events(outbox) if e["outcome"] == "refused")
    if refused:
        console.print(f"refused by the node (the PACS keeps these): {sum(refused.values())}")
        for reason, n in refused.most_common():
            console.print(f"  {n} × {reason}")


IdentifiersOption = typer.Option(
    [],
    "--identifiers",
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
    outbox: Path | None = typer.Argument(None, help="An outbox (data/, images/, held/)."),
    store: str | None = typer.Option(None, "--store", help="Check a whole store instead (path or s3:// URL)."),
    prefix: str = typer.Option("", help="Only under this prefix of --store."),
    identifiers: list[Path] = IdentifiersOption,
    key_file: Path | None = KeyFileOption,
    vault: Path = VaultOption,
) -> None:
    """The de-identification gate over every file: the patient's own identifiers, any known NHS/CHI or hospital
    number, NHS-number patterns, private tags, and the de-identified marks. Exit 1 on any finding."""
    from nccid.site.check import check_files, outbox_files, store_files

    if (outbox is None) == (store is None):
        raise fail(ValueError("give an OUTBOX folder or --store URL (one of them)"))
    gate = site_gate(identifiers, key_file, vault)
    if store is not None:
        target = open_store_option(store)
        items, where = store_files(target, prefix), target.url.rstrip("/") + "/" + prefix
    else:
        items, where = outbox_files(outbox), str(outbox)
    with progress_bar("checking") as tick:
        report = check_files(items, gate, progress=tick)
    for finding in report.findings[:100]:
        err_console.print(f"[red]gate:[/] {finding}")
    summary = (
        f"{report.files} files in {where}: {report.dicom} DICOM, {report.clinical} clinical records, "
        f"{report.other} other; checked against {len(gate.people)} known patient(s)"
    )
    if not report.clean:
        raise fail(RuntimeError(f"{summary}: {len(report.findings)} finding(s): must not be uploaded or released"))
    console.print(f"{summary}: no identifiers found")


@app.command("upload")
def site_upload(
    outbox: Path = typer.Argument(..., help="De-identified outbox with data/ and images/."),
    uploader: str = typer.Option(..., "--uploader", help="Your raw-<uploader>/ prefix."),
    store: str = StoreOption,
    date: str | None = typer.Option(None, help="Upload date folder (default today, UTC; fixed by the journal)."),
    identifiers: list[Path] = IdentifiersOption,
    key_file: Path | None = KeyFileOption,
    vault: Path = VaultOption,
) -> None:
    """Upload the outbox to raw-<uploader>/<date>/ after the gate passes: verified object by object, resumable."""
    from nccid.site.outbox import held_patients, release_held
    from nccid.site.upload import upload

    release_held(outbox)
    target = open_store_option(store)
    with progress_bar("uploading") as tick:
        result = upload(
            outbox, target, uploader, date=date, progress=tick, gate=site_gate(identifiers, key_file, vault)
        )
    console.print(
        f"uploaded {result.uploaded} objects ({human_bytes(result.bytes)}) to "
        f"{target.url.rstrip('/')}/raw-{uploader}/{result.date}/, {result.skipped} already there, after the gate "
        f"passed {result.checked} file(s); "
        f"journal: {outbox / '.upload-journal.jsonl'}"
    )
    held = held_patients(outbox)
    if held:
        console.print(
            f"not uploaded: {sum(h.images for h in held)} image(s) of {len(held)} patient(s) held for a clinical "
            f"sheet (nccid site status {outbox})"
        )


@app.command("template")
def site_template(
    kind: str = typer.Argument(..., help="positive or negative"),
    out: Path = typer.Argument(..., help="Where to write it: .xlsx or .csv"),
) -> None:
    """Write a blank clinical template (COVID-19 positive v1.5, or negative status)."""
    from nccid.site.templates import TEMPLATES, blank_template

    if kind not in TEMPLATES:
        raise fail(ValueError(f"template must be one of: {', '.join(TEMPLATES)}"))
    console.print(f"blank {kind} template: {blank_template(kind, out)}")


@app.command("clinical")
def site_clinical(
    sheet: Path = typer.Argument(..., help="A filled template, .xlsx or .csv."),
    outbox: Path = typer.Argument(..., help="The outbox: records go to data/<Pseudonym>_{data,status}.json."),
    kind: str = typer.Option(..., "--template", help="positive or negative"),
    centre: str = typer.Option(..., "--centre", help="Your SubmittingCentre, as configured centrally."),
    strict: bool = typer.Option(False, "--strict", help="Refuse the whole sheet if any row is invalid."),
    key_file: Path | None = KeyFileOption,
    vault: Path = VaultOption,
    actor: str = typer.Option(os.environ.get("USER", "site"), "--as", help="Who runs it (for the audit)."),
) -> None:
    """Validate a clinical sheet row by row; valid rows become pseudonymised clinical JSON in the outbox."""
    from nccid.site.templates import TEMPLATES, file_sheet
    from nccid.site.vault import Vault

    if kind not in TEMPLATES:
        raise fail(ValueError(f"--template must be one of: {', '.join(TEMPLATES)}"))
    key = pseudonym_key(key_file)
    with Vault(vault) as v:
        filed = file_sheet(
            sheet,
            outbox,
            template=kind,
            centre=centre,
            strict=strict,
            pseudonymise=lambda c: v.issue([key.encrypt(n) for n in c], actor=actor),
        )
    result = filed.result
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    for error in result.errors:
        err_console.print(f"{sheet.name}: {error}")
    if not filed.written and result.errors:
        raise fail(RuntimeError(f"{len(result.errors)} error(s) in {len(result.held_rows)} row(s): nothing written"))
    console.print(
        f"{len(filed.written)} record(s) written to {outbox / 'data'}; {len(result.held_rows)} row(s) held back"
    )
    if filed.released:
        console.print(f"released {filed.released} held image(s) whose clinical record has now arrived")


