"""The central team's actions: sites into `config.json`, the configuration form, and loads run in the
background (one at a time) with their progress.

`config.json` is validated by the loader's own parser (`WarehouseConfig.from_json`) before it is written, so
the portal can never save a configuration the loader would refuse.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from nccid.errors import ConfigError, NccidError
from nccid.portal.accounts import SPLIT_RULES, PortalDB, PortalError, Site, check_uploader
from nccid.portal.background import OneAtATimeRunner, now
from nccid.store import ObjectNotFound, ObjectStore
from nccid.warehouse.config import CONFIG_KEY, WarehouseConfig

EMPTY_CONFIG = {"raw_prefixes": [], "training_percentage": 80, "sites": {"split": [], "training": [], "validation": []}}


def read_config_doc(store: ObjectStore) -> dict:
    """config.json as a JSON object (the empty configuration when there is none yet)."""
    try:
        return json.loads(store.read(CONFIG_KEY))
    except ObjectNotFound:
        return copy.deepcopy(EMPTY_CONFIG)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{CONFIG_KEY}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc


def config_with_site(doc: dict, site: Site, previous: Site | None = None) -> dict:
    """A copy of the configuration with the site's prefix listed and its names (name and aliases) under its
    split rule only; names the site no longer uses are taken out. Pure."""
    out = copy.deepcopy(doc)
    prefixes = out.setdefault("raw_prefixes", [])
    if not any(p.rstrip("/") == site.prefix.rstrip("/") for p in prefixes):
        prefixes.append(site.prefix)
    sites = out.setdefault("sites", {})
    old_names = set(previous.centres) if previous else set()
    for rule in SPLIT_RULES:
        names = [n for n in sites.get(rule, []) if n not in old_names and n not in site.centres]
        if rule == site.rule:
            names.extend(site.centres)
        sites[rule] = sorted(set(names))
    return out


def save_config_doc(store: ObjectStore, doc: object, *, db: PortalDB, actor: str) -> WarehouseConfig:
    """Validate with the loader's parser, then write; raises ConfigError naming the field."""
    config = WarehouseConfig.from_json(doc)
    store.write(CONFIG_KEY, (json.dumps(doc, indent=2) + "\n").encode())
    db.audit(
        actor,
        "config.save",
        f"{len(config.raw_prefixes)} prefixes, {len(config.sites)} sites, training {config.training_percentage}%",
    )
    return config


def save_site(
    store: ObjectStore,
    db: PortalDB,
    *,
    uploader: str,
    name: str,
    aliases: list[str],
    rule: str,
    actor: str,
    hospitals: list[str] = (),  # type: ignore[assignment]
) -> Site:
    """Add or change a site in the portal and in config.json together (config first: it may refuse)."""
    check_uploader(uploader)
    name = name.strip()
    if not name:
        raise PortalError("a site needs its SubmittingCentre name")
    if rule not in SPLIT_RULES:
        raise PortalError(f"the split rule is one of {', '.join(SPLIT_RULES)}")
    site = Site(
        uploader,
        name,
        tuple(a.strip() for a in aliases if a.strip() and a.strip() != name),
        rule,
        tuple(h.strip() for h in hospitals if h.strip()),
    )
    for other in db.sites():
        clash = set(other.centres) & set(site.centres)
        if other.uploader != uploader and clash:
            raise PortalError(f"{sorted(clash)[0]!r} already belongs to site {other.uploader}")
    save_config_doc(store, config_with_site(read_config_doc(store), site, db.site(uploader)), db=db, actor=actor)
    db.save_site(site, actor=actor)
    return site


@dataclass
class LoadJob:
    """The state of the one background load: its phase and counters, then its result or error."""

    started_by: str = ""
    started: str = ""
    phase: str = "idle"
    objects: int = 0
    bytes: int = 0
    running: bool = False
    finished: str = ""
    run_id: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    error: str = ""


class LoadRunner(OneAtATimeRunner[LoadJob]):
    """Runs `nccid.warehouse.loader.load` in a thread, one at a time, and keeps its progress for the page."""

    def __init__(self, store_url: str, catalog_path: Path | None, db_path: Path, *, workers: int = 1) -> None:
        super().__init__(LoadJob(), "nccid-portal-load")
        self.store_url = store_url
        self.db_path = db_path
        self.catalog_path = catalog_path
        self.workers = workers

    def start(self, actor: str, db: PortalDB) -> bool:
        """Start a load unless one runs; returns whether it started."""
        if not self.begin(LoadJob(started_by=actor, started=now(), phase="starting", running=True)):
            return False
        db.audit(actor, "load.start")
        return True

    def _progress(self, phase: str, objects: int, size: int) -> None:
        self.job.phase, self.job.objects, self.job.bytes = phase, objects, size

    def _run(self) -> None:
        with PortalDB(self.db_path) as db:
            self._load(db)

    def _load(self, db: PortalDB) -> None:
        from nccid.store import open_store
        from nccid.warehouse.catalog import catalog_for
        from nccid.warehouse.loader import load

        job = self.job
        try:
            store = open_store(self.store_url)
            catalog = catalog_for(store, self.catalog_path, writing=True)
            try:
                report = load(store, catalog, workers=self.workers, progress=self._progress)
            finally:
                catalog.close()
            job.run_id, job.counts = report.run_id, dict(report.counts)
            db.audit(job.started_by, "load.finish", f"run {report.run_id}: {dict(sorted(report.counts.items()))}")
        except NccidError as exc:
            job.error = str(exc)
            db.audit(job.started_by, "load.finish", job.error, outcome="failed")
        except Exception as exc:
            job.error = f"the load stopped unexpectedly ({type(exc).__name__}); see the server log"
            db.audit(job.started_by, "load.finish", job.error, outcome="failed")
        finally:
            job.finished, job.running, job.phase = now(), False, "finished"
