"""`nccid vault ...`: the pseudonym key, data managers and re-identification for linkage."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from nccid.cli._common import KeyFileOption, VaultOption, fail, pseudonym_key
from nccid.console import console

app = typer.Typer(help="The pseudonym vault: keys, data managers, re-identification for linkage.", no_args_is_help=True)


@app.command("keygen")
def vault_keygen(key_file: Path = typer.Argument(..., help="Where to write the new key (owner-only).")) -> None:
    """Make a new pseudonym key (AES-SIV key + salt). Keep it out of the store and the repository."""
    from nccid.site.vault import PseudonymKey

    try:
        PseudonymKey.generate().save(key_file)
    except FileExistsError as exc:
        raise fail(FileExistsError(f"{key_file} exists: a key is never overwritten")) from exc
    console.print(f"new pseudonym key in {key_file} (mode 600)")


@app.command("add-manager")
def vault_add_manager(
    name: str = typer.Argument(..., help="The data manager's user name (as given to --as)."), vault: Path = VaultOption
) -> None:
    """Name a data manager: only they may reveal a pseudonym."""
    from nccid.site.vault import Vault

    with Vault(vault) as v:
        v.add_manager(name)
    console.print(f"{name} is a data manager of {vault}")


@app.command("reveal")
def vault_reveal(
    pseudonym: str = typer.Argument(..., help="The pseudonym to re-identify, e.g. Covid1234567."),
    actor: str = typer.Option(os.environ.get("USER", ""), "--as", help="Who is asking (default: $USER)."),
    vault: Path = VaultOption,
    key_file: Path | None = KeyFileOption,
) -> None:
    """Re-identify a pseudonym for approved linkage. Needs the key and the data-manager role; audited."""
    from nccid.site.vault import Vault

    key = pseudonym_key(key_file)
    with Vault(vault) as v:
        print(v.reveal(pseudonym, key=key, actor=actor))


@app.command("link-export")
def vault_link_export(
    dataset: str = typer.Option(..., "--dataset", help="The linked dataset, e.g. isaric."),
    project: str = typer.Option(..., "--project", help="The approved linkage project (recorded in the audit)."),
    out: Path = typer.Option(..., "--out", help="Where to write the CSV (owner-only; never overwritten)."),
    actor: str = typer.Option(os.environ.get("USER", ""), "--as", help="Who exports (a named data manager)."),
    vault: Path = VaultOption,
) -> None:
    """The (pseudonym, external ID) table an approved linkage project needs: data managers only, audited."""
    from nccid.files import write_private
    from nccid.site.isaric import to_csv
    from nccid.site.vault import Vault

    if out.exists():
        raise fail(FileExistsError(f"{out} exists: an export is never overwritten"))
    with Vault(vault) as v:
        rows = v.link_export(dataset, project=project, actor=actor)
    write_private(out, to_csv(["Pseudonym", f"{dataset} ID", "Enrolled"], rows))
    console.print(f"{len(rows)} {dataset} link(s) for project {project} written to {out} (mode 600); audited")
