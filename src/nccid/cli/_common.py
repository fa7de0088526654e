"""What every command module shares: the common options and the few helpers that turn options into objects.

No rules live here: each helper opens what an option names and lets the library's errors (nccid.errors) reach
the one handler in `nccid.cli`, which prints them as a single line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from nccid.errors import NccidError, UsageError
from nccid.store import ObjectStore, open_store
from nccid.warehouse.catalog import Catalog, catalog_for

if TYPE_CHECKING:  # imported where used: `nccid --help` does not load the site's crypto
    from nccid.site.pseudonymiser import Pseudonymiser
    from nccid.site.vault import PseudonymKey

STORE_HELP = "Warehouse store: a path, file:///path or s3://bucket (default: $NCCID_STORE)."
StoreOption = typer.Option(None, "--store", "-s", help=STORE_HELP, envvar="NCCID_STORE")
CatalogOption = typer.Option(
    None,
    "--catalog",
    help="Catalog file (default: <store>.catalog.sqlite beside a local store, or under ~/.local/state/nccid).",
    envvar="NCCID_CATALOG",
)
HomeOption = typer.Option(
    Path("~/.local/share/nccid/s3").expanduser(),
    "--home",
    envvar="NCCID_S3_HOME",
    help="The server's home: data, identities, grants and audit log ($NCCID_S3_HOME).",
)
BucketOption = typer.Option("nccid-data-warehouse-prod", "--bucket", help="The warehouse bucket.")
VaultOption = typer.Option(
    Path("~/.local/share/nccid/vault.sqlite").expanduser(),
    "--vault",
    envvar="NCCID_VAULT",
    help="The vault database ($NCCID_VAULT).",
)
KeyFileOption = typer.Option(None, "--key-file", help="Owner-only key file (else $NCCID_PSEUDONYM_KEY).")


def fail(exc: Exception | str) -> NccidError:
    """An error for the one handler to print (one line, exit 1), for a shell-level check with no library error."""
    return exc if isinstance(exc, NccidError) else NccidError(str(exc))


def open_store_option(url: str | None, *, create: bool = False) -> ObjectStore:
    """The store named by --store / $NCCID_STORE. Raises UsageError when none is given, and StoreMissing when
    it does not exist, unless the command is one that makes a store (`create`)."""
    if not url:
        raise UsageError("no store given: pass --store PATH|s3://bucket or set NCCID_STORE")
    return open_store(url, must_exist=not create)


def open_catalog(store: ObjectStore, path: Path | None, *, writing: bool = False) -> Catalog:
    """The store's catalog by the one default rule (`catalog_for`), or `path`; checked to belong to the store.
    Raises CatalogError (saying how to rebuild it) for another store's catalog, or for a missing or empty one
    while the store holds processed data."""
    return catalog_for(store, path, writing=writing)


def server(home: Path):
    """The managed SeaweedFS server whose home is `home` (not started)."""
    from nccid.s3server.seaweedfs import SeaweedFS

    return SeaweedFS(home)


def pseudonym_key(key_file: Path | None):
    """The pseudonym key from the owner-only file or $NCCID_PSEUDONYM_KEY. Raises VaultError if neither works."""
    from nccid.errors import VaultError
    from nccid.site.vault import PseudonymKey

    try:
        return PseudonymKey.load(key_file)
    except FileNotFoundError as exc:
        raise VaultError(f"no key file at {key_file}: make one with `nccid vault keygen`") from exc


def vault_issuer(key: PseudonymKey, vault: Path, actor: str) -> Pseudonymiser:
    """The run's `Pseudonymiser`: `key`'s pseudonyms from the vault at `vault`, issued as `actor`, opening the vault
    per call (safe from any thread: the node's associations) and asking it once per person."""
    from nccid.site.pseudonymiser import Pseudonymiser

    return Pseudonymiser.with_vault(key, vault, actor)


def default_actor(fallback: str) -> str:
    """Who runs a command, for the audit: $USER, else `fallback`."""
    return os.environ.get("USER", fallback)
