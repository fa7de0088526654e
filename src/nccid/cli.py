"""The one `nccid` command. Every sub-command is a thin shell over a library function."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from nccid.console import console, err_console, human_bytes, progress_bar, table
from nccid.store import ObjectStore, StoreError, open_store
from nccid.warehouse.catalog import Catalog, default_catalog_path
from nccid.warehouse.config import ConfigError, load_config
from nccid.warehouse.loader import LoadReport

app = typer.Typer(
    help="nccid: a national chest imaging research database (synthetic data, warehouse, researcher access).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
warehouse_app = typer.Typer(
    help="Central data team: load raw uploads, rebuild the catalog, inspect centres.", no_args_is_help=True
)
app.add_typer(warehouse_app, name="warehouse")

STORE_HELP = "Warehouse store: a path, file:///path or s3://bucket (default: $NCCID_STORE)."
StoreOption = typer.Option(None, "--store", "-s", help=STORE_HELP, envvar="NCCID_STORE")
CatalogOption = typer.Option(
    None,
    "--catalog",
    help="Catalog file (default: beside a local store, or under ~/.local/state/nccid).",
    envvar="NCCID_CATALOG",
)


def _store(url: str | None) -> ObjectStore:
    if not url:
        err_console.print("[red]error:[/] no store given: pass --store PATH|s3://bucket or set NCCID_STORE")
        raise typer.Exit(2)
    try:
        return open_store(url)
    except StoreError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc


def _catalog(store: ObjectStore, path: Path | None) -> Catalog:
    return Catalog(path or default_catalog_path(store.url))


def _fail(exc: Exception) -> typer.Exit:
    err_console.print(f"[red]error:[/] {exc}")
    return typer.Exit(1)


# -- reports ------------------------------------------------------------------------------------------
def show_load_report(report: LoadReport, *, limit: int = 20) -> None:
    order = ["filed", "duplicate", "pending", "conflict", "quarantined", "held"]
    rows = [
        [o, report.counts.get(o, 0), report.outstanding.get(o, "") if o not in ("filed", "duplicate") else ""]
        for o in order
    ]
    rows.append(["unchanged (seen before)", report.unchanged, ""])
    title = f"Load {report.run_id} ({report.mode}) in {report.duration_s:.1f} s"
    console.print(table(title, ["outcome", "this run", "outstanding in total"], rows))
    rate = report.bytes_filed / report.duration_s if report.duration_s else 0
    console.print(f"images filed: {report.images_filed}, {human_bytes(report.bytes_filed)} ({human_bytes(rate)}/s)")
    if report.items:
        rows = [[outcome, count, reason, example] for outcome, reason, count, example in report.grouped_items()]
        console.print(
            table(
                f"Not filed this run ({len(report.items)} objects, by reason)",
                ["outcome", "objects", "reason", "first raw key"],
                rows[:limit],
            )
        )
        if len(rows) > limit:
            console.print(f"... and {len(rows) - limit} more reasons in the report")
    for warning in report.warnings[:limit]:
        console.print(f"[yellow]warning:[/] {warning}")
    if report.report_key:
        console.print(f"report: {report.store.rstrip('/')}/{report.report_key}")


def show_summary(summary: dict[str, dict]) -> None:
    labels = [
        ("centres", "Centres with data"),
        ("patients", "Total patients"),
        ("patients_with_images", "Patients with images"),
        ("positive", "COVID positive"),
        ("negative", "COVID negative"),
        ("xray_studies", "X-ray studies"),
        ("ct_studies", "CT studies"),
        ("mri_studies", "MRI studies"),
        ("xray_images", "X-ray images"),
        ("ct_images", "CT images"),
        ("mri_images", "MRI images"),
    ]
    rows = [[label, *(summary[s][k] for s in ("training", "validation", "all"))] for k, label in labels]
    console.print(table("Summary", ["", "training", "validation", "all"], rows))


# -- synthetic data -------------------------------------------------------------------------------------
@app.command()
def synth(
    store: str = StoreOption,
    patients: int = typer.Option(300, help="Number of patients."),
    hospitals: int = typer.Option(5, help="Number of configured hospitals (1-7)."),
    days: int = typer.Option(4, help="Number of weekly upload dates."),
    scale: float = typer.Option(1.0, help="Image size multiplier: 1.0 realistic (~2000x2500 radiographs)."),
    imaged: float = typer.Option(0.3, help="Share of patients with images."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same bytes."),
    awkward: bool = typer.Option(True, help="Include the awkward cases (duplicates, truncated files, ...)."),
    manifest: Path | None = typer.Option(None, help="Write what was made (and where) as JSON."),
) -> None:
    """Write a synthetic national dataset (config.json + raw uploads) into a store."""
    from nccid.synth.national import SynthSpec, generate

    target = _store(store)
    spec = SynthSpec(
        seed=seed,
        patients=patients,
        hospitals=hospitals,
        days=days,
        scale=scale,
        imaged_fraction=imaged,
        awkward=awkward,
    )
    with progress_bar("synthesising") as tick:
        result = generate(target, spec, progress=lambda n: tick(1, n))
    console.print(
        f"wrote {result.patients} patients, {result.clinical_records} clinical records and "
        f"{result.images} images ({human_bytes(result.bytes)}) to {target.url}"
    )
    if manifest:
        manifest.write_text(json.dumps(result.to_json(), indent=1) + "\n")
        console.print(f"manifest: {manifest}")


# -- warehouse ------------------------------------------------------------------------------------------
@warehouse_app.command("load")
def warehouse_load(
    store: str = StoreOption,
    catalog: Path | None = CatalogOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would happen; write nothing."),
    workers: int = typer.Option(os.cpu_count() or 1, help="Worker processes for reading headers and copying."),
    as_json: bool = typer.Option(False, "--json", help="Print the run report as JSON."),
) -> None:
    """File new raw uploads into the processed layout (incremental, idempotent, safe to interrupt)."""
    from nccid.warehouse.loader import load

    target = _store(store)
    cat = _catalog(target, catalog)
    try:
        with progress_bar("loading") as tick:
            report = load(target, cat, dry_run=dry_run, workers=workers, progress=tick)
    except (ConfigError, StoreError) as exc:
        raise _fail(exc) from exc
    finally:
        cat.close()
    if as_json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        show_load_report(report)


@warehouse_app.command("rebuild-catalog")
def warehouse_rebuild(
    store: str = StoreOption,
    catalog: Path | None = CatalogOption,
    workers: int = typer.Option(os.cpu_count() or 1, help="Worker processes."),
) -> None:
    """Recreate the catalog from the store alone (the store is the truth)."""
    from nccid.warehouse.rebuild import rebuild_catalog

    target = _store(store)
    path = catalog or default_catalog_path(target.url)
    with progress_bar("rebuilding") as tick:
        report = rebuild_catalog(target, path, workers=workers, progress=tick)
    cat = Catalog(path)
    counts = cat.outcome_counts()
    patients = cat.query("SELECT COUNT(*) FROM patients")[0][0]
    instances = cat.query("SELECT COUNT(*) FROM instances")[0][0]
    cat.close()
    console.print(f"rebuilt {path}: {patients} patients, {instances} images, raw objects by outcome: {counts}")
    for warning in report.warnings[:20]:
        console.print(f"[yellow]warning:[/] {warning}")


@warehouse_app.command("centres")
def warehouse_centres(store: str = StoreOption, catalog: Path | None = CatalogOption) -> None:
    """Submitting centres seen in clinical records, and which are not configured in config.json."""
    target = _store(store)
    try:
        config = load_config(target)
    except ConfigError as exc:
        raise _fail(exc) from exc
    cat = _catalog(target, catalog)
    seen = {centre: (records, filed) for centre, records, filed in cat.centres()}
    cat.close()
    rows = []
    for centre in sorted(set(seen) | config.sites):
        rule = (
            "split"
            if centre in config.split_sites
            else "training"
            if centre in config.training_sites
            else "validation"
            if centre in config.validation_sites
            else "NOT CONFIGURED"
        )
        records, filed = seen.get(centre, (0, 0))
        rows.append([centre, rule, records, filed])
    console.print(table("Submitting centres", ["SubmittingCentre", "rule", "records seen", "filed"], rows))
    missing = [r[0] for r in rows if r[1] == "NOT CONFIGURED"]
    if missing:
        console.print(f"{len(missing)} centre(s) not configured: add them to config.json 'sites' and load again")


@warehouse_app.command("status")
def warehouse_status(
    store: str = StoreOption,
    catalog: Path | None = CatalogOption,
    limit: int = typer.Option(50, help="How many outstanding items to list."),
) -> None:
    """Everything not filed: pending, held, conflicting and quarantined objects with their reasons."""
    target = _store(store)
    cat = _catalog(target, catalog)
    counts = cat.outcome_counts()
    items = [[r.key, r.outcome, r.reason] for _, r in zip(range(limit), cat.outstanding(), strict=False)]
    cat.close()
    console.print(table("Raw objects by outcome", ["outcome", "objects"], sorted(counts.items())))
    if items:
        console.print(table("Outstanding", ["raw key", "outcome", "reason"], items))


# -- researcher access ----------------------------------------------------------------------------------
@app.command("ls")
def ls(
    prefix: str = typer.Argument("", help="Key prefix, e.g. training/ or training/data/"),
    store: str = StoreOption,
    recursive: bool = typer.Option(False, "--recursive", "-r", help="List every object below the prefix."),
) -> None:
    """List folders and objects below a prefix (like `aws s3 ls`)."""
    from nccid.access.api import Warehouse

    wh = Warehouse(_store(store))
    count = 0
    try:
        for entry in wh.ls(prefix, recursive=recursive):
            _print_entry(entry)
            count += 1
    except StoreError as exc:
        raise _fail(exc) from exc
    if count == 0:
        err_console.print(f"nothing below {prefix!r}")


def _print_entry(entry) -> None:
    import datetime as dt

    from nccid.access.api import Folder

    if isinstance(entry, Folder):
        print(f"{'PRE':>30} {entry.key}")
    else:
        when = dt.datetime.fromtimestamp(entry.mtime).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{when} {entry.size:>10} {entry.key}")


@app.command("cat")
def cat_(
    key: str = typer.Argument(..., help="Object key."),
    store: str = StoreOption,
    header: bool = typer.Option(False, "--header", help="For DICOM: print the header (no pixels) as text."),
) -> None:
    """Write an object to standard output (or show a DICOM header)."""
    from nccid.access.api import Warehouse

    wh = Warehouse(_store(store))
    try:
        if header:
            print(wh.dicom_header(key))
        else:
            sys.stdout.buffer.write(wh.read(key))
    except StoreError as exc:
        raise _fail(exc) from exc


@app.command("sync")
def sync_(
    prefix: str = typer.Argument(..., help="Key prefix to copy, e.g. training/ct/"),
    dest: Path = typer.Argument(..., help="Local folder."),
    store: str = StoreOption,
    workers: int = typer.Option(8, help="Parallel downloads."),
) -> None:
    """Copy a prefix into a local folder: skips unchanged files, verifies checksums, resumes after a stop."""
    from nccid.access.api import Warehouse

    wh = Warehouse(_store(store))
    try:
        with progress_bar(f"syncing {prefix}") as tick:
            result = wh.sync(prefix, dest, workers=workers, progress=tick)
    except StoreError as exc:
        raise _fail(exc) from exc
    console.print(
        f"fetched {result.fetched} files ({human_bytes(result.bytes_fetched)}), "
        f"skipped {result.skipped} unchanged, into {dest}; manifest: {result.manifest}"
    )


# -- statistics -----------------------------------------------------------------------------------------
@app.command("stats")
def stats_(
    store: str = StoreOption,
    catalog: Path | None = CatalogOption,
    date: str | None = typer.Option(None, help="Folder date (default: today)."),
) -> None:
    """Compute the patient, study, storage and summary tables; write them into stats/<date>/ of the store."""
    from nccid.stats.summary import compute, publish

    target = _store(store)
    cat = _catalog(target, catalog)
    try:
        stats = compute(target, cat, date)
        prefix = publish(target, stats)
    except StoreError as exc:
        raise _fail(exc) from exc
    finally:
        cat.close()
    show_summary(stats.summary)
    console.print(
        f"tables: {target.url.rstrip('/')}/{prefix} (patients, xray, ct, mri, storage, summary; "
        f"CSV and JSON); latest: stats/latest.json"
    )


# -- the managed S3 server and access control ---------------------------------------------------------
s3_app = typer.Typer(help="A managed local S3 server (SeaweedFS on loopback) for S3 mode.", no_args_is_help=True)
access_app = typer.Typer(
    help="Access groups: grant, revoke, rotate and list keys; IAM policies; the audit.", no_args_is_help=True
)
app.add_typer(s3_app, name="s3")
app.add_typer(access_app, name="access")
HomeOption = typer.Option(
    Path("~/.local/share/nccid/s3").expanduser(),
    "--home",
    envvar="NCCID_S3_HOME",
    help="The server's home: data, identities, grants and audit log ($NCCID_S3_HOME).",
)
BucketOption = typer.Option("nccid-data-warehouse-prod", "--bucket", help="The warehouse bucket.")


def _server(home: Path):
    from nccid.store.seaweedfs import SeaweedFS

    return SeaweedFS(home)


@s3_app.command("serve")
def s3_serve(
    home: Path = HomeOption,
    port: int = typer.Option(8333, help="S3 port."),
    bind: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback is your decision."),
    bucket: list[str] = typer.Option(["nccid-data-warehouse-prod"], "--bucket", help="Buckets to create."),
    sweep_interval: float = typer.Option(60.0, help="Seconds between checks for expired grants."),
) -> None:
    """Start SeaweedFS in the foreground; Ctrl-C (or SIGTERM) stops it cleanly."""
    import signal
    import threading

    from nccid.access.grants import Registry
    from nccid.store.s3 import S3Store
    from nccid.store.seaweedfs import SeaweedFS, ServerError

    if bind not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]warning:[/] listening on {bind}: reachable beyond this machine")
    server = SeaweedFS(home, bind=bind, s3_port=port)
    try:
        state = server.start()
    except ServerError as exc:
        raise _fail(exc) from exc
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        env = server.admin_env()
        for name in bucket:
            store = S3Store(name, endpoint_url=state.endpoint)
            os.environ.update(env)
            store.create_bucket()
        console.print(f"S3 ready at {state.endpoint} (SeaweedFS pid {state.weed_pid}), buckets: {', '.join(bucket)}")
        console.print(f"home: {server.home}; administrator environment: nccid s3 env --home {server.home}")
        console.print("ready", soft_wrap=True)
        sys.stdout.flush()
        registry = Registry(server)
        while not stop.wait(sweep_interval):
            for grant in registry.sweep():
                console.print(f"expired: {grant.access_key} ({grant.org}, {grant.group})")
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        console.print("stopped")


@s3_app.command("stop")
def s3_stop(home: Path = HomeOption) -> None:
    """Stop a server started with `nccid s3 serve` (by its PID)."""
    import signal
    import time

    from nccid.store.seaweedfs import alive

    server = _server(home)
    state = server.state()
    if state is None:
        raise _fail(RuntimeError(f"no running server recorded in {home}"))
    if state.supervisor_pid != os.getpid() and alive(state.supervisor_pid):
        os.kill(state.supervisor_pid, signal.SIGTERM)  # `nccid s3 serve` stops SeaweedFS and its audit receiver
        deadline = time.monotonic() + 30
        while alive(state.supervisor_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    if alive(state.weed_pid):
        server.stop()
    console.print("stopped")


@s3_app.command("env")
def s3_env(home: Path = HomeOption) -> None:
    """Print the administrator's environment (endpoint and key pair) as shell exports."""
    for name, value in _server(home).admin_env().items():
        print(f"export {name}={value}")


@access_app.command("grant")
def access_grant(
    org: str = typer.Argument(..., help="The organisation receiving access."),
    group: str = typer.Option(..., "--group", "-g", help="training-ct, training-all, validation-all, uploader, ..."),
    expires: str = typer.Option("", help="YYYY-MM-DD (or a date-time); the key stops working then."),
    uploader: str | None = typer.Option(None, help="For --group uploader: the raw-<uploader>/ prefix it writes."),
    bucket: str = BucketOption,
    home: Path = HomeOption,
) -> None:
    """Issue a key pair for one access group. The secret is shown once, here, and stored nowhere readable."""
    from nccid.access.grants import GrantError, Registry
    from nccid.access.groups import GroupError

    try:
        creds = Registry(_server(home)).grant(org, group, bucket=bucket, expires=expires, uploader=uploader)
    except (GrantError, GroupError) as exc:
        raise _fail(exc) from exc
    console.print(f"granted {group} on s3://{bucket} to {org}" + (f" until {expires}" if expires else ""))
    _show_credentials(creds)


@access_app.command("revoke")
def access_revoke(access_key: str = typer.Argument(...), home: Path = HomeOption) -> None:
    """Stop a key working, at once, on the running server."""
    from nccid.access.grants import GrantError, Registry

    try:
        grant = Registry(_server(home)).revoke(access_key)
    except GrantError as exc:
        raise _fail(exc) from exc
    console.print(f"revoked {grant.access_key} ({grant.org}, {grant.group})")


@access_app.command("rotate")
def access_rotate(access_key: str = typer.Argument(...), home: Path = HomeOption) -> None:
    """Replace a key pair: same organisation and group, new secret; the old key stops working."""
    from nccid.access.grants import GrantError, Registry

    try:
        creds = Registry(_server(home)).rotate(access_key)
    except GrantError as exc:
        raise _fail(exc) from exc
    console.print(f"rotated {access_key} -> {creds.access_key} ({creds.grant.org}, {creds.grant.group})")
    _show_credentials(creds)


def _show_credentials(creds) -> None:
    """On standard output only (never a log), once."""
    print(f"AWS_ACCESS_KEY_ID={creds.access_key}")
    print(f"AWS_SECRET_ACCESS_KEY={creds.secret_key}")
    err_console.print("The secret is shown only now: hand it over securely.")


@access_app.command("list")
def access_list(home: Path = HomeOption) -> None:
    """Every grant: organisation, group, key, dates and status (never a secret)."""
    from nccid.access.grants import Registry

    registry = Registry(_server(home))
    registry.sweep()
    rows = [
        [
            g.org,
            g.group + (f" ({g.uploader})" if g.uploader else ""),
            g.access_key,
            g.created[:10],
            g.expires or "-",
            g.status,
        ]
        for g in registry.grants()
    ]
    console.print(table("Grants", ["organisation", "group", "access key", "granted", "expires", "status"], rows))


@access_app.command("policy")
def access_policy(
    group: str = typer.Argument(..., help="Access group."),
    bucket: str = BucketOption,
    uploader: str | None = typer.Option(None, help="For the uploader group."),
) -> None:
    """The AWS IAM policy document for a group, for a deployment on AWS S3."""
    from nccid.access.groups import GroupError, iam_policy

    try:
        print(json.dumps(iam_policy(group, bucket, uploader), indent=2))
    except GroupError as exc:
        raise _fail(exc) from exc


@access_app.command("audit")
def access_audit(
    org: str | None = typer.Option(None, help="Only this organisation."),
    since: str | None = typer.Option(None, help="YYYY-MM-DD: only requests from that day on."),
    home: Path = HomeOption,
) -> None:
    """Requests per organisation, prefix and action, allowed and denied, from the server's access log."""
    import datetime as dt

    from nccid.access.audit import summarise
    from nccid.access.grants import Registry

    server = _server(home)
    rows = summarise(
        server.audit_dir, Registry(server).by_key(), org=org, since=dt.date.fromisoformat(since) if since else None
    )
    console.print(
        table(
            "Access audit",
            ["organisation", "group", "prefix", "action", "outcome", "requests"],
            [[r.org, r.group, r.prefix, r.action, r.outcome, r.requests] for r in rows],
        )
    )


# -- the linkage vault ------------------------------------------------------------------------------------
vault_app = typer.Typer(
    help="The pseudonym vault: keys, data managers, re-identification for linkage.", no_args_is_help=True
)
app.add_typer(vault_app, name="vault")
VaultOption = typer.Option(
    Path("~/.local/share/nccid/vault.sqlite").expanduser(),
    "--vault",
    envvar="NCCID_VAULT",
    help="The vault database ($NCCID_VAULT).",
)
KeyFileOption = typer.Option(None, "--key-file", help="Owner-only key file (else $NCCID_PSEUDONYM_KEY).")


def _pseudonym_key(key_file: Path | None):
    """The key from the owner-only file or NCCID_PSEUDONYM_KEY, or a clear error and exit 1."""
    from nccid.site.vault import PseudonymKey, VaultError

    try:
        return PseudonymKey.load(key_file)
    except (VaultError, FileNotFoundError) as exc:
        raise _fail(exc) from exc


@vault_app.command("keygen")
def vault_keygen(key_file: Path = typer.Argument(..., help="Where to write the new key (owner-only).")) -> None:
    """Make a new pseudonym key (AES-SIV key + salt). Keep it out of the store and the repository."""
    from nccid.site.vault import PseudonymKey

    try:
        PseudonymKey.generate().save(key_file)
    except FileExistsError as exc:
        raise _fail(FileExistsError(f"{key_file} exists: a key is never overwritten")) from exc
    console.print(f"new pseudonym key in {key_file} (mode 600)")


@vault_app.command("add-manager")
def vault_add_manager(name: str = typer.Argument(...), vault: Path = VaultOption) -> None:
    """Name a data manager: only they may reveal a pseudonym."""
    from nccid.site.vault import Vault

    with Vault(vault) as v:
        v.add_manager(name)
    console.print(f"{name} is a data manager of {vault}")


@vault_app.command("reveal")
def vault_reveal(
    pseudonym: str = typer.Argument(...),
    actor: str = typer.Option(os.environ.get("USER", ""), "--as", help="Who is asking (default: $USER)."),
    vault: Path = VaultOption,
    key_file: Path | None = KeyFileOption,
) -> None:
    """Re-identify a pseudonym for approved linkage. Needs the key and the data-manager role; audited."""
    from nccid.site.vault import Vault, VaultError

    key = _pseudonym_key(key_file)
    with Vault(vault) as v:
        try:
            print(v.reveal(pseudonym, key=key, actor=actor))
        except VaultError as exc:
            raise _fail(exc) from exc


# -- the hospital side ------------------------------------------------------------------------------------
site_app = typer.Typer(help="What runs at a hospital: de-identification with its gate.", no_args_is_help=True)
app.add_typer(site_app, name="site")


@site_app.command("deid")
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

    key = _pseudonym_key(key_file)
    with Vault(vault) as v, progress_bar("de-identifying") as tick:
        result = deidentify_folder(src, out, key=key, pseudonymise=lambda c: v.issue(c, actor=actor), progress=tick)
    console.print(f"de-identified {len(result.written)} files into {out}; held {len(result.held)}")
    for name, reason in result.held[:50]:
        console.print(f"  held {name}: {reason}")
    if not result.clean:
        for finding in result.findings[:50]:
            err_console.print(f"[red]gate:[/] {finding}")
        raise _fail(
            RuntimeError(f"the gate found {len(result.findings)} identifier(s): this batch must not be uploaded")
        )
    console.print("gate: no identifiers found in any output file")


def _vault_issuer(vault: Path, actor: str):
    """Pseudonyms from the vault, opening it per call: safe from any thread (the node's associations)."""
    from nccid.site.vault import Vault

    def issue(ciphertexts: list[str]) -> list[str]:
        with Vault(vault) as v:
            return v.issue(ciphertexts, actor=actor)

    return issue


@site_app.command("node")
def site_node(
    outbox: Path = typer.Argument(..., help="The outbox the de-identified images go to."),
    ae_title: str = typer.Option("NCCID", "--ae-title", help="This node's AE title (the PACS calls it)."),
    port: int = typer.Option(11112, help="TCP port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; loopback unless told otherwise."),
    max_associations: int = typer.Option(16, "--max-associations", help="Associations served at once."),
    workers: int = typer.Option(
        os.cpu_count() or 1, "--workers", help="Processes sharing the port (default: one per core)."
    ),
    key_file: Path | None = KeyFileOption,
    vault: Path = VaultOption,
    actor: str = typer.Option(os.environ.get("USER", "site"), "--as", help="Who runs the node (for the audit)."),
) -> None:
    """Run the site DICOM node: a Storage SCP (C-ECHO, C-STORE of CR, DX, CT, MR) that de-identifies on arrival."""
    from nccid.site.node import NodeConfig, SiteNode

    key = _pseudonym_key(key_file)

    def report(calling_ae: str, counts) -> None:
        parts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "nothing stored"
        console.print(f"association from {calling_ae or '?'} ended: {parts}")

    config = NodeConfig(
        outbox, ae_title=ae_title, host=host, port=port, max_associations=max_associations, workers=max(1, workers)
    )
    node = SiteNode(config, key=key, pseudonymise=_vault_issuer(vault, actor), on_association=report)
    console.print(
        f"site node {ae_title} listening on {host}:{port} ({config.workers} process(es)); outbox {outbox}; "
        f"held images wait in {outbox / 'held'} for their clinical sheet. Ctrl-C stops."
    )
    try:
        node.serve_forever()
    except OSError as exc:
        raise _fail(OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}")) from exc
    totals = node.totals
    console.print(
        f"node stopped: {totals['filed']} filed, {totals['held']} held, {totals['refused']} refused "
        f"(details in {outbox / 'node-events.jsonl'})"
    )


@site_app.command("status")
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
    key = _pseudonym_key(key_file) if show_numbers and held else None
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


def _gate(identifiers: list[Path], key_file: Path | None, vault: Path):
    """The gate with the site's knowledge, keyed by pseudonym through the vault (nothing new is issued)."""
    from nccid.site.check import Gate, people_by_pseudonym, read_identifiers
    from nccid.site.vault import Vault

    known = {}
    for path in identifiers:
        known.update(read_identifiers(path))
    if not known:
        return Gate({})
    key = _pseudonym_key(key_file)
    with Vault(vault) as v:
        return Gate(people_by_pseudonym(known, v.lookup, key.encrypt))


@site_app.command("check")
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
        raise _fail(ValueError("give an OUTBOX folder or --store URL (one of them)"))
    gate = _gate(identifiers, key_file, vault)
    if store is not None:
        target = _store(store)
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
        raise _fail(RuntimeError(f"{summary}: {len(report.findings)} finding(s): must not be uploaded or released"))
    console.print(f"{summary}: no identifiers found")


@site_app.command("upload")
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
    target = _store(store)
    try:
        with progress_bar("uploading") as tick:
            result = upload(
                outbox, target, uploader, date=date, progress=tick, gate=_gate(identifiers, key_file, vault)
            )
    except StoreError as exc:
        raise _fail(exc) from exc
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


@site_app.command("template")
def site_template(
    kind: str = typer.Argument(..., help="positive or negative"),
    out: Path = typer.Argument(..., help="Where to write it: .xlsx or .csv"),
) -> None:
    """Write a blank clinical template (COVID-19 positive v1.5, or negative status)."""
    from nccid.site.templates import TEMPLATES, blank_template

    if kind not in TEMPLATES:
        raise _fail(ValueError(f"template must be one of: {', '.join(TEMPLATES)}"))
    console.print(f"blank {kind} template: {blank_template(kind, out)}")


@site_app.command("clinical")
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
        raise _fail(ValueError(f"--template must be one of: {', '.join(TEMPLATES)}"))
    key = _pseudonym_key(key_file)
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
        raise _fail(RuntimeError(f"{len(result.errors)} error(s) in {len(result.held_rows)} row(s): nothing written"))
    console.print(
        f"{len(filed.written)} record(s) written to {outbox / 'data'}; {len(result.held_rows)} row(s) held back"
    )
    if filed.released:
        console.print(f"released {filed.released} held image(s) whose clinical record has now arrived")


@app.command()
def demo(
    directory: Path = typer.Option(Path("nccid-demo"), "--dir", help="Where the hospitals, store and catalog go."),
    patients: int = typer.Option(300, help="Synthetic patients, spread over four hospitals."),
    scale: float = typer.Option(0.5, help="Radiograph size (1.0: full detector size, about 10 MB each)."),
    seed: int = typer.Option(0, help="Random seed."),
    store: str | None = typer.Option(None, "--store", help="An empty store to use instead (e.g. s3://bucket/demo)."),
) -> None:
    """End to end: identifiable hospital data through the site tools and node, upload, load, statistics, and
    the de-identification gate over everything in the warehouse."""
    from nccid.demo import run_demo

    run_demo(directory, patients=patients, scale=scale, seed=seed, store_url=store)


@app.callback()
def _setup() -> None:
    """Structured JSON logs on standard error when NCCID_LOG is set (info, debug)."""
    from nccid.log import configure

    configure()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # python -m nccid.cli
    main()
