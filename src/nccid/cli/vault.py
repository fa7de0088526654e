"""`nccid vault ...`: the pseudonym key, data managers and re-identification for linkage."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from nccid.cli._common import KeyFileOption, VaultOption, fail, pseudonym_key
from nccid.console import console

app = typer.Typer(
    help="The pseudonym vault: keys, data managers, re-identification for linkage.", no_args_is_help=True
)


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
def vault_add_manager(name: str = typer.Argument(...), vault: Path = VaultOption) -> None:
    """Name a data manager: only they may reveal a pseudonym."""
    from nccid.site.vault import Vault

    with Vault(vault) as v:
        v.add_manager(name)
    console.print(f"{name} is a data manager of {vault}")


@app.command("reveal")
def vault_reveal(
    pseudonym: str = typer.Argument(...),
    actor: str = typer.Option(os.environ.get("USER", ""), "--as", help="Who is asking (default: $USER)."),
    vault: Path = VaultOption,
    key_file: Path | None = KeyFileOption,
) -> None:
    """Re-identify a pseudonym for approved linkage. Needs the key and the data-manager role; audited."""
    from nccid.site.vault import Vault

    key = pseudonym_key(key_file)
    with Vault(vault) as v:
        print(v.reveal(pseudonym, key=key, actor=actor))


