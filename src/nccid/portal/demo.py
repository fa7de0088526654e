"""The portal on the demo's data: accounts for its sites, and the one command that opens it (for `nccid demo`)."""

from __future__ import annotations

import shlex
from pathlib import Path

from nccid.portal.accounts import NewAccount, PortalDB, Site, create_demo_accounts
from nccid.portal.settings import default_state_dir


def set_up_demo_portal(
    store_url: str,
    sites: list[Site],
    *,
    key_file: Path,
    vault: Path,
    catalog: Path | None = None,
    state_dir: Path | None = None,
) -> tuple[list[NewAccount], str]:
    """Save the demo's sites in the portal and make one uploader per site, a data manager and an administrator.

    Returns the accounts (their passwords and TOTP secrets exist only in this answer: print them once) and the
    command that serves the portal on the demo's store, vault and key. A portal set up before keeps its
    accounts: only missing ones are made.
    """
    state = state_dir or default_state_dir(store_url)
    with PortalDB(state / "portal.sqlite") as db:
        known = {u.username for u in db.users()}
        made = [] if known else create_demo_accounts(db, sites)
    command = ["nccid", "portal", "serve", "--store", store_url, "--key-file", str(key_file), "--vault", str(vault)]
    if catalog is not None:
        command += ["--catalog", str(catalog)]
    if state_dir is not None:
        command += ["--state", str(state_dir)]
    return made, shlex.join(command)
