"""`nccid site node`: the site DICOM node the PACS sends to."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from nccid.cli._common import KeyFileOption, VaultOption, fail, pseudonym_key, vault_issuer
from nccid.console import console


def site_node(
    outbox: Path = typer.Argument(..., help="The outbox the de-identified images go to."),
    ae_title: str = typer.Option("NCCID", "--ae-title", help="This node's AE title (the PACS calls it)."),
    port: int = typer.Option(11112, help="TCP port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; loopback unless told otherwise."),
    max_associations: int = typer.Option(
        16, "--max-associations", help="Associations served at once (peers stalled mid-message do not count)."
    ),
    max_connections: int = typer.Option(
        64, "--max-connections", help="Connections at once per process, stalled or not; more are closed at once."
    ),
    read_timeout: float = typer.Option(
        30.0, "--read-timeout", help="Seconds one message (PDU) may take to arrive once it started."
    ),
    acse_timeout: float = typer.Option(
        30.0, "--acse-timeout", help="Seconds a peer may take to request or release an association."
    ),
    network_timeout: float = typer.Option(
        60.0, "--network-timeout", help="Seconds an association may stay idle before the node closes it."
    ),
    workers: int = typer.Option(
        os.cpu_count() or 1, "--workers", help="Processes sharing the port (default: one per core)."
    ),
    key_file: Path | None = KeyFileOption,
    vault: Path = VaultOption,
    actor: str = typer.Option(os.environ.get("USER", "site"), "--as", help="Who runs the node (for the audit)."),
) -> None:
    """Run the site DICOM node: a Storage SCP (C-ECHO, C-STORE of CR, DX, CT, MR) that de-identifies on arrival."""
    from nccid.site.node import NodeConfig, SiteNode
    from nccid.site.supervisor import run_node

    key = pseudonym_key(key_file)

    def report(calling_ae: str, counts) -> None:
        parts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "nothing stored"
        # the AE title is the peer's: printed as text (brackets are not styles)
        console.print(f"association from {calling_ae or '?'} ended: {parts}", markup=False, highlight=False)

    config = NodeConfig(
        outbox,
        ae_title=ae_title,
        host=host,
        port=port,
        max_associations=max_associations,
        max_connections=max_connections,
        read_timeout=read_timeout,
        acse_timeout=acse_timeout,
        network_timeout=network_timeout,
        workers=max(1, workers),
    )
    node = SiteNode(config, key=key, pseudonymise=vault_issuer(key, vault, actor), on_association=report)
    console.print(
        f"site node {ae_title} listening on {host}:{port} ({config.workers} process(es)); outbox {outbox}; "
        f"held images wait in {outbox / 'held'} for their clinical sheet. Ctrl-C stops."
    )
    try:
        totals = run_node(node)
    except OSError as exc:
        raise fail(OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}")) from exc
    console.print(
        f"node stopped: {totals['filed']} filed, {totals['held']} held, {totals['refused']} refused "
        f"(details in {outbox / 'node-events.jsonl'})"
    )
