"""`nccid demo`: from identifiable hospital data to published statistics, through the same library calls as the
site and warehouse commands, ending with the de-identification gate over everything in the warehouse.

Four synthetic hospitals start with what a real one has: PACS images full of identifiers, filled clinical sheets
(one with real-world defects) and a PAS extract. Three de-identify a folder export; the fourth runs the site
DICOM node and its PACS sends over two associations, before part of its clinical sheet has arrived. Every outbox
passes the gate and is uploaded; the warehouse loads, loads again (a no-op) and publishes statistics.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from nccid.console import console, human_bytes, progress_bar
from nccid.errors import DemoFailed, UsageError
from nccid.site.batch import deidentify_folder
from nccid.site.check import Gate, check_files, people_by_pseudonym, read_identifiers, store_files
from nccid.site.node import NodeConfig, SiteNode
from nccid.site.outbox import Outbox
from nccid.site.pseudonymiser import Pseudonymiser
from nccid.site.templates import file_sheet
from nccid.site.upload import upload
from nccid.site.vault import PseudonymKey, Vault
from nccid.stats.summary import compute, publish
from nccid.store import LocalStore, ObjectStore, open_store
from nccid.store.s3 import S3Store
from nccid.synth.hospital import HospitalSite, hospital_site
from nccid.synth.national import HOSPITALS, Hospital, SynthSpec, make_config
from nccid.warehouse.catalog import catalog_for, default_catalog_path
from nccid.warehouse.config import save_config
from nccid.warehouse.loader import load

MARKER = ".nccid-demo"
PACS_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.4",
)


@dataclass(frozen=True)
class DemoSite:
    """One demo hospital: how its images reach the outbox, which clinical template it fills, and its quirks."""

    hospital: Hospital
    route: str  # "folder": a PACS export de-identified in a batch; "node": sent to the site DICOM node
    template: str
    defects: bool = False
    late_sheet: bool = False


SITES = [
    DemoSite(HOSPITALS[0], "folder", "positive", defects=True),  # split
    DemoSite(HOSPITALS[1], "folder", "negative"),  # split
    DemoSite(HOSPITALS[3], "folder", "positive"),  # all training
    DemoSite(HOSPITALS[4], "node", "positive", late_sheet=True),  # all validation
]


def _fresh(directory: Path) -> None:
    """Start clean, but only ever delete a folder an earlier demo made."""
    if directory.exists():
        if not (directory / MARKER).exists():
            raise UsageError(f"{directory} exists and was not made by `nccid demo`: choose another folder")
        console.print(f"replacing the earlier demo in {directory}")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / MARKER).write_text("made by nccid demo; deleted and remade by the next demo run\n")


def _empty_store(url: str) -> ObjectStore:
    """A store given by URL must be empty: the demo never mixes its data into a real warehouse."""
    store = open_store(url)
    if isinstance(store, S3Store):
        store.create_bucket()
    if next(iter(store.list()), None) is not None:
        raise UsageError(
            f"{store.url} is not empty: give the demo an empty bucket or prefix, e.g. s3://nccid-demo/run-1"
        )
    return store


def _send_from_pacs(site: HospitalSite, port: int, associations: int = 2) -> None:
    """The hospital PACS: pynetdicom as Storage SCU, the export split over concurrent associations."""
    from pynetdicom import AE

    files = sorted(Path(site.pacs).glob("*.dcm"))
    failures: list[str] = []

    def send(batch: list[Path]) -> None:
        ae = AE(ae_title="PACS")
        for sop_class in PACS_SOP_CLASSES:
            ae.add_requested_context(sop_class)
        assoc = ae.associate("127.0.0.1", port, ae_title="NCCID")
        if not assoc.is_established:
            failures.append("association refused")
            return
        for path in batch:
            status = assoc.send_c_store(path)
            if getattr(status, "Status", None) != 0:
                failures.append(f"{path.name}: status {getattr(status, 'Status', 'none')}")
        assoc.release()

    threads = [threading.Thread(target=send, args=(files[n::associations],)) for n in range(associations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise DemoFailed(f"the PACS could not send everything to the node: {failures[:5]}")


def _file_sheets(demo: DemoSite, outbox: Path, pseudonymiser: Pseudonymiser, sheets) -> None:
    for path, template in sheets:
        filed = file_sheet(
            path,
            outbox,
            pseudonymiser,
            template=template,
            centre=demo.hospital.centre,
            aliases=[demo.hospital.name],  # the sheets' Hospital column names the hospital, not the trust
        )
        result = filed.result
        line = f"  sheet {Path(path).name}: {len(filed.written)} record(s), {len(result.held_rows)} row(s) held back"
        console.print(line + (f", {filed.released} held image(s) released" if filed.released else ""))
        for error in result.errors[:4]:
            console.print(f"    [yellow]{error}[/]")
        for conversion in result.conversions[:2]:
            console.print(f"    converted: {conversion}", highlight=False)


def _site_round(
    demo: DemoSite, site: HospitalSite, work: Path, store: ObjectStore, vault: Vault, key: PseudonymKey
) -> tuple[int, int]:
    """One hospital: sheets, de-identification (folder or node), the gate, upload. (images sent, uploaded)."""
    outbox = Outbox(work / "outbox")
    sheets = Pseudonymiser(key, lambda c: vault.issue(c, actor="demo-site"))
    if demo.route == "folder":
        _file_sheets(demo, outbox.root, sheets, site.sheets)
        with progress_bar("de-identifying") as tick:
            result = deidentify_folder(Path(site.pacs), outbox.root, sheets, progress=tick)
        console.print(
            f"  de-identified {len(result.written)} image(s) ready, {len(result.waiting)} held for a clinical "
            f"record; {len(result.held)} not sent (inputs by path in the site's IDENTIFIABLE report)"
        )
        for ref, reason in result.held[:3]:
            console.print(f"    not sent: {ref}: {reason}")
        if not result.clean:
            raise DemoFailed(f"the gate stopped the batch: {result.findings[0]}")
    else:
        _file_sheets(demo, outbox.root, sheets, site.sheets[:1])
        node = SiteNode(
            NodeConfig(outbox.root, port=0, workers=1),
            key=key,
            pseudonymise=Pseudonymiser.with_vault(key, vault.path, "demo-node"),
        )
        node.start()
        try:
            _send_from_pacs(site, node.config.port)
            held = outbox.held_patients()
            console.print(
                f"  node on 127.0.0.1:{node.config.port} received {sum(node.totals.values())} image(s) over 2 "
                f"associations: {node.totals['filed']} filed, {sum(h.images for h in held)} held for "
                f"{len(held)} patient(s) whose sheet has not arrived"
            )
            _file_sheets(demo, outbox.root, sheets, site.sheets[1:])
        finally:
            node.stop()
    gate = Gate(people_by_pseudonym(read_identifiers(site.identifiers), vault.lookup, key.encrypt))
    uploaded = upload(outbox.root, store, demo.hospital.uploader, gate=gate)  # the gate runs first
    console.print(
        f"  gate: {uploaded.checked} file(s) checked against {len(gate.people)} patients' identifiers: "
        "no identifiers found"
    )
    waiting = sum(h.images for h in uploaded.held or [])
    console.print(
        f"  uploaded {uploaded.uploaded} object(s) ({human_bytes(uploaded.bytes)}) to raw-{demo.hospital.uploader}/"
        + (f"; {waiting} image(s) stay held at the site for a clinical record" if waiting else "")
    )
    return site.images, uploaded.uploaded


def _demo_portal(store: ObjectStore, directory: Path, catalog: Path):
    """The demo's sites and accounts in the portal; returns the new accounts and the command that serves it."""
    from nccid.portal.accounts import Site
    from nccid.portal.demo import set_up_demo_portal

    sites = [Site(d.hospital.uploader, d.hospital.centre, (), d.hospital.rule, (d.hospital.name,)) for d in SITES]
    url = str(store.root) if isinstance(store, LocalStore) else store.url
    return set_up_demo_portal(
        url,
        sites,
        key_file=directory / "site.key",
        vault=directory / "vault.sqlite",
        catalog=None if isinstance(store, LocalStore) else catalog,  # a local store's is found by the default rule
        state_dir=directory / "portal",
    )


MIN_PATIENTS_PER_SITE = 4  # a site's story (held rows, late sheets, burned-in annotation) needs a few patients


def patients_per_site(patients: int) -> list[int]:
    """`patients` spread over the demo's hospitals, exactly (the first take one more while some are left over).
    Raises UsageError below MIN_PATIENTS_PER_SITE per hospital."""
    least = MIN_PATIENTS_PER_SITE * len(SITES)
    if patients < least:
        raise UsageError(
            f"the demo needs at least {least} patients ({MIN_PATIENTS_PER_SITE} per hospital), not {patients}"
        )
    base, extra = divmod(patients, len(SITES))
    return [base + (1 if n < extra else 0) for n in range(len(SITES))]


def run_demo(
    directory: Path, *, patients: int = 300, scale: float = 0.5, seed: int = 0, store_url: str | None = None
) -> None:
    """Run the whole story end to end in `directory` (or against the empty store at `store_url`), printing
    each step and where the results are, so a newcomer can see every stage work on synthetic data.

    Raises UsageError for too few patients, a `directory` the demo did not make or a store that is not empty,
    and DemoFailed when a stage fails (the PACS cannot send, the gate finds an identifier in the warehouse).
    """
    from nccid.render import show_load_report, show_summary

    patients_per_site(patients)  # refuse a count the demo cannot tell its story with, before touching anything
    directory = directory.resolve()
    _fresh(directory)
    store = _empty_store(store_url) if store_url else LocalStore(directory / "store")
    # the one default rule (beside a local store), so that `nccid stats --store ...` finds it; an S3 demo keeps
    # its catalog in the demo's folder, as the store is new each run
    catalog_path = default_catalog_path(store.url) if isinstance(store, LocalStore) else directory / "catalog.sqlite"
    catalog = catalog_for(store, catalog_path, writing=True)
    key = PseudonymKey.generate()
    key.save(directory / "site.key")
    vault = Vault(directory / "vault.sqlite")
    save_config(store, make_config(SynthSpec(seed=seed), [s.hospital for s in SITES]))

    console.rule("1. four hospitals hold identifiable data")
    start = time.perf_counter()
    sites = []
    for n, demo in enumerate(SITES):
        folder = directory / "hospitals" / demo.hospital.uploader
        site = hospital_site(
            str(folder),
            patients=patients_per_site(patients)[n],
            seed=seed * 100 + n,
            template=demo.template,
            defects=demo.defects,
            late_sheet=demo.late_sheet,
            scale=scale,
            hospital=demo.hospital,
        )
        sites.append(site)
        console.print(
            f"{demo.hospital.name}: {len(site.people)} patients, {site.images} identifiable images "
            f"({human_bytes(site.bytes)}), {len(site.sheets)} {demo.template} sheet(s), a PAS extract; "
            f"images via {'the site DICOM node' if demo.route == 'node' else 'a PACS folder export'}"
        )
    console.print(f"made in {time.perf_counter() - start:.1f} s under {directory / 'hospitals'}")

    console.rule("2. at each hospital: sheets, de-identification, the gate, upload")
    for demo, site in zip(SITES, sites, strict=True):
        console.print(f"[bold]{demo.hospital.name}[/] ({demo.hospital.centre})")
        _site_round(demo, site, directory / "hospitals" / demo.hospital.uploader, store, vault, key)

    console.rule("3. the warehouse loads them")
    with progress_bar("loading") as tick:
        first = load(store, catalog, progress=tick)
    show_load_report(first, limit=25)

    console.rule("4. loading again changes nothing")
    second = load(store, catalog)
    console.print(
        f"second load: {sum(second.counts.values())} objects with a new outcome, "
        f"{second.unchanged} unchanged, {second.duration_s:.2f} s"
    )

    console.rule("5. statistics")
    stats = compute(store, catalog)
    prefix = publish(store, stats)
    show_summary(stats.summary)
    catalog.close()

    console.rule("6. the gate over everything in the warehouse")
    known = {}
    for site in sites:
        known.update(read_identifiers(site.identifiers))
    gate = Gate(people_by_pseudonym(known, vault.lookup, key.encrypt))
    vault.close()
    with progress_bar("checking") as tick:
        verdict = check_files(store_files(store), gate, progress=tick)
    console.print(
        f"{verdict.files} objects in the warehouse ({verdict.dicom} DICOM, {verdict.clinical} clinical records, "
        f"{verdict.other} other) checked against the identifiers of all {len(gate.people)} patients"
    )
    if not verdict.clean:
        for finding in verdict.findings[:20]:
            console.print(f"[red]gate:[/] {escape(str(finding))}")
        raise DemoFailed(f"the gate found {len(verdict.findings)} identifier(s) in the warehouse")
    console.print("[bold green]gate verdict: zero identifiers found[/]")

    console.rule("7. the portal: accounts for the sites and the central team")
    accounts, serve_command = _demo_portal(store, directory, catalog_path)
    for account in accounts:
        second_factor = f", TOTP secret {account.totp_secret}" if account.totp_secret else ""
        who = f"{account.role} of {account.site}" if account.site else account.role
        console.print(f"  {account.username:<22} ({who}): password {account.password}{second_factor}")
    console.print("these passwords are shown only now; the portal keeps their argon2id hashes")

    console.rule("where everything is")
    where = str(store.root) if isinstance(store, LocalStore) else store.url
    base = where.rstrip("/") + "/"
    console.print(f"hospitals:   {directory / 'hospitals'}   (identifiable inputs, outboxes, node records)")
    console.print(f"store:       {where}   (processed layout under training/ and validation/)")
    console.print(f"catalog:     {catalog_path}")
    console.print(f"load report: {base}{first.report_key}")
    console.print(f"statistics:  {base}{prefix}")
    console.print(f"portal:      {serve_command}   (then open http://127.0.0.1:8080/)")
    console.print("try:")
    console.print(f"  nccid ls training/ --store {where}")
    console.print(f"  nccid warehouse status --store {where}")
    console.print(f"  nccid stats --store {where}")
    console.print(f"  nccid sync training/data/ ./clinical --store {where}")
    console.print(f"  nccid site status {directory / 'hospitals' / SITES[-1].hospital.uploader / 'outbox'}")
    console.print(
        f"  nccid site check --store {where} --identifiers {sites[0].identifiers} "
        f"--key-file {directory / 'site.key'} --vault {directory / 'vault.sqlite'}"
    )
    console.print(f"  nccid validate demo --store {where}   (AI models on the held-out set; the validation extra)")
