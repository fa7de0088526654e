"""Where the portal keeps its state and the limits it enforces, in one frozen value."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nccid.store import LocalStore, open_store


def default_state_dir(store_url: str) -> Path:
    """Beside a local store (`<root>.portal/`, next to its catalog); for S3 under the user's state folder."""
    store = open_store(store_url)
    if isinstance(store, LocalStore):
        root = Path(store.root)
        return root.with_name(root.name + ".portal")
    state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "nccid"
    slug = "".join(c if c.isalnum() else "_" for c in store.url)[:120]
    return state / f"{slug}.portal"


@dataclass(frozen=True)
class PortalSettings:
    """Everything `create_app` needs. Times are in seconds.

    `secure_cookies` must be on whenever the portal is reached over HTTPS (behind a reverse proxy or with
    uvicorn's `--ssl-keyfile/--ssl-certfile`): cookies then carry `Secure` and the `__Host-` prefix, and
    responses carry `Strict-Transport-Security`.
    """

    store_url: str
    state_dir: Path
    catalog_path: Path | None = None  # None: the loader's default for this store
    vault_path: Path | None = None  # None: <state_dir>/vault.sqlite
    key_file: Path | None = None  # None: $NCCID_PSEUDONYM_KEY (uploads are refused without a key)
    secure_cookies: bool = False
    idle_timeout_s: int = 30 * 60
    absolute_timeout_s: int = 12 * 3600
    max_upload_bytes: int = 5 * 1024 * 1024
    account_lock_after: int = 5  # failures within lock_window_s lock the account
    address_lock_after: int = 20  # failures within lock_window_s lock the address
    lock_window_s: int = 15 * 60
    lock_s: int = 15 * 60
    failure_delay_s: float = 0.5  # first failure's delay; doubles per recent failure, capped at 4 s
    load_workers: int = 1  # the loader runs in a thread of the server: no forked workers there

    @property
    def db_path(self) -> Path:
        return self.state_dir / "portal.sqlite"

    @property
    def vault(self) -> Path:
        return self.vault_path or self.state_dir / "vault.sqlite"

    def catalog(self) -> Path:
        if self.catalog_path is not None:
            return self.catalog_path
        from nccid.warehouse.catalog import default_catalog_path

        return default_catalog_path(open_store(self.store_url).url)
