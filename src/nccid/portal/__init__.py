"""The nccid web portal: one FastAPI application, server-rendered with Jinja2, no JavaScript at all.

Sites upload clinical sheets and see what the warehouse holds from them; the central team configures sites,
accounts and `config.json`, starts loads and reads the queues. The access committee, the dashboard and the
validation service of later issues join as further routers behind the same login, roles and layout.

The portal is a thin shell: validation, pseudonymisation, loading and summaries are library calls
(`nccid.site.templates`, `nccid.site.vault`, `nccid.warehouse.loader`, `nccid.stats.site_summary`). What it
keeps itself (accounts, sessions, the audit log, upload history) lives in `portal.sqlite` in its state folder.
"""

from nccid.portal.settings import PortalSettings

__all__ = ["PortalSettings", "create_app"]


def create_app(settings: PortalSettings):
    """The ASGI application for these settings (see :mod:`nccid.portal.app`)."""
    from nccid.portal.app import create_app as _create

    return _create(settings)
