"""`nccid portal ...`: the web portal (serve it, add accounts and sites from the command line)."""

from __future__ import annotations

from pathlib import Path

import typer

from nccid.cli._common import KeyFileOption, StoreOption
from nccid.console import console
from nccid.errors import UsageError

app = typer.Typer(help="The web portal: site uploads and summaries, the central team's pages.", no_args_is_help=True)
StateOption = typer.Option(
    None, "--state", help="The portal's state folder: portal.sqlite, the vault (default: beside a local store)."
)
PortalVaultOption = typer.Option(
    None, "--vault", envvar="NCCID_VAULT", help="The vault (default: <state>/vault.sqlite)."
)


def _settings(store: str | None, state: Path | None, **extra: object):
    from nccid.portal.settings import PortalSettings, default_state_dir

    if not store:
        raise UsageError("no store given: pass --store PATH|s3://bucket or set NCCID_STORE")
    return PortalSettings(store_url=store, state_dir=state or default_state_dir(store), **extra)


@app.command("serve")
def serve(
    store: str = StoreOption,
    state: Path | None = StateOption,
    vault: Path | None = PortalVaultOption,
    key_file: Path | None = KeyFileOption,
    catalog: Path | None = typer.Option(None, "--catalog", envvar="NCCID_CATALOG", help="The loader's catalog."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (keep 127.0.0.1 behind a proxy)."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    secure_cookies: bool = typer.Option(
        False, "--secure-cookies", help="Mark cookies Secure and send HSTS: on whenever users reach it over HTTPS."
    ),
    ssl_keyfile: str | None = typer.Option(None, "--ssl-keyfile", help="Serve HTTPS directly with this key."),
    ssl_certfile: str | None = typer.Option(None, "--ssl-certfile", help="... and this certificate."),
) -> None:
    """Run the portal (Ctrl-C stops it)."""
    from nccid.portal.app import serve as run

    https = bool(ssl_keyfile and ssl_certfile)
    settings = _settings(
        store, state, vault_path=vault, key_file=key_file, catalog_path=catalog, secure_cookies=secure_cookies or https
    )
    run(
        settings,
        host=host,
        port=port,
        ssl_keyfile=ssl_keyfile,
        ssl_certfile=ssl_certfile,
        ready=lambda url: console.print(
            f"portal on {url} for {store} (state in {settings.state_dir}); Ctrl-C stops", highlight=False
        ),
    )


@app.command("add-user")
def add_user(
    username: str = typer.Argument(..., help="Lower-case user name."),
    role: str = typer.Option(..., "--role", help="site, data_manager, admin, committee, researcher or validator."),
    site: str = typer.Option("", "--site", help="The uploader name of the site (site accounts)."),
    link: bool = typer.Option(False, "--link", help="Make a one-time set-up link instead of a password."),
    store: str = StoreOption,
    state: Path | None = StateOption,
) -> None:
    """Create an account; its password (or set-up token) and TOTP secret are printed once, never stored."""
    from nccid.portal.accounts import PortalDB, generate_password

    settings = _settings(store, state)
    with PortalDB(settings.db_path) as db:
        made = db.create_account(username, role, site=site, actor="cli", password=None if link else generate_password())
    console.print(
        f"account {made.username} ({made.role}{', site ' + made.site if made.site else ''}) in {settings.db_path}"
    )
    if made.setup_token:
        console.print(f"one-time set-up link (72 h): <portal address>/setup/{made.setup_token}")
    else:
        console.print(f"password (shown once): {made.password}")
    if made.totp_secret and not made.setup_token:
        console.print(f"TOTP secret for the authenticator app (shown once): {made.totp_secret}")


@app.command("add-site")
def add_site(
    uploader: str = typer.Argument(..., help="Uploader name: the site's prefix is raw-<uploader>/."),
    name: str = typer.Option(..., "--name", help="Its SubmittingCentre, as in its clinical records."),
    rule: str = typer.Option("split", "--rule", help="split, training or validation."),
    alias: list[str] = typer.Option([], "--alias", help="Another SubmittingCentre spelling (repeatable)."),
    hospital: list[str] = typer.Option(
        [], "--hospital", help="Another name its sheets' Hospital column may carry (repeatable)."
    ),
    store: str = StoreOption,
    state: Path | None = StateOption,
) -> None:
    """Add or change a site: in the portal and in config.json (validated as the loader validates it)."""
    from nccid.portal.accounts import PortalDB
    from nccid.portal.central import save_site
    from nccid.store import open_store

    settings = _settings(store, state)
    with PortalDB(settings.db_path) as db:
        site = save_site(
            open_store(store, must_exist=True),
            db,
            uploader=uploader,
            name=name,
            aliases=alias,
            rule=rule,
            actor="cli",
            hospitals=hospital,
        )
    console.print(f"site {site.name}: prefix {site.prefix}, rule {site.rule}; config.json updated")
