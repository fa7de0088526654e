"""The warehouse configuration (`config.json` at the store root) and the training/validation rules."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from nccid.errors import ConfigError
from nccid.store import ObjectNotFound, ObjectStore

CONFIG_KEY = "config.json"


@dataclass(frozen=True)
class WarehouseConfig:
    raw_prefixes: tuple[str, ...]
    training_percentage: int
    split_sites: frozenset[str] = field(default_factory=frozenset)
    training_sites: frozenset[str] = field(default_factory=frozenset)
    validation_sites: frozenset[str] = field(default_factory=frozenset)

    @property
    def sites(self) -> frozenset[str]:
        return self.split_sites | self.training_sites | self.validation_sites

    def rule_for(self, centre: str) -> str:
        """How a centre's new patients get their group: 'split', 'training', 'validation', or '' (not configured)."""
        for rule, sites in (
            ("split", self.split_sites),
            ("training", self.training_sites),
            ("validation", self.validation_sites),
        ):
            if centre in sites:
                return rule
        return ""

    @property
    def digest(self) -> str:
        """Changes whenever the rules change, so records held for an unknown site are looked at again."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {
            "raw_prefixes": list(self.raw_prefixes),
            "training_percentage": self.training_percentage,
            "sites": {
                "split": sorted(self.split_sites),
                "training": sorted(self.training_sites),
                "validation": sorted(self.validation_sites),
            },
        }

    @classmethod
    def from_json(cls, doc: object, source: str = CONFIG_KEY) -> WarehouseConfig:
        if not isinstance(doc, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        prefixes = doc.get("raw_prefixes")
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise ConfigError(f"{source}: 'raw_prefixes' must be a list of strings")
        for prefix in prefixes:
            if not prefix.startswith("raw-") or "/" in prefix.rstrip("/") or ".." in prefix:
                raise ConfigError(f"{source}: raw prefix {prefix!r} must look like 'raw-<uploader>/'")
        pct = doc.get("training_percentage")
        if isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100:
            raise ConfigError(f"{source}: 'training_percentage' must be a whole number from 0 to 100")
        sites = doc.get("sites", {})
        if not isinstance(sites, dict):
            raise ConfigError(f"{source}: 'sites' must be an object with split/training/validation lists")
        unknown = set(sites) - {"split", "training", "validation"}
        if unknown:
            raise ConfigError(f"{source}: unknown entries in 'sites': {sorted(unknown)}")
        lists: dict[str, frozenset[str]] = {}
        for name in ("split", "training", "validation"):
            value = sites.get(name, [])
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise ConfigError(f"{source}: 'sites.{name}' must be a list of site names")
            lists[name] = frozenset(value)
        for a, b in (("split", "training"), ("split", "validation"), ("training", "validation")):
            both = lists[a] & lists[b]
            if both:
                raise ConfigError(f"{source}: sites listed under both '{a}' and '{b}': {sorted(both)}")
        return cls(
            raw_prefixes=tuple(p if p.endswith("/") else p + "/" for p in prefixes),
            training_percentage=pct,
            split_sites=lists["split"],
            training_sites=lists["training"],
            validation_sites=lists["validation"],
        )


@dataclass(frozen=True, slots=True)
class CentreRow:
    """One submitting centre: its rule in config.json ('' when not configured), clinical records seen, filed."""

    centre: str
    rule: str
    records: int
    filed: int


def centre_rows(config: WarehouseConfig, seen: Iterable[tuple[str, int, int]]) -> list[CentreRow]:
    """Every centre seen in a record (catalog `centres()`) or configured, with its rule; sorted by name. Pure."""
    counts = {centre: (records, filed) for centre, records, filed in seen}
    return [
        CentreRow(centre, config.rule_for(centre), *counts.get(centre, (0, 0)))
        for centre in sorted(set(counts) | config.sites)
    ]


def load_config(store: ObjectStore) -> WarehouseConfig:
    """The store's `config.json`; raises :class:`ConfigError` naming the field when it is missing or malformed."""
    try:
        raw = store.read(CONFIG_KEY)
    except ObjectNotFound as exc:
        raise ConfigError(f"{store.url}: no {CONFIG_KEY} at the store root") from exc
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{CONFIG_KEY}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    return WarehouseConfig.from_json(doc)


def save_config(store: ObjectStore, config: WarehouseConfig) -> None:
    """Write `config.json` at the store root (replacing it)."""
    store.write(CONFIG_KEY, (json.dumps(config.to_json(), indent=2) + "\n").encode())


# -- the split rules (pure) ---------------------------------------------------------------------------
def hash_split_is_training(pseudonym: str, training_percentage: int) -> bool:
    """The NCCID reference rule: int(sha512(pseudonym.strip().upper()).hexdigest(), 16) % 100 < pct."""
    digest = hashlib.sha512(pseudonym.strip().upper().encode("utf-8")).hexdigest()
    return int(digest, 16) % 100 < training_percentage


def group_for(centre: str, pseudonym: str, config: WarehouseConfig) -> str | None:
    """The group a first record from `centre` puts a new patient in; None when the centre is not configured."""
    if centre in config.training_sites:
        return "training"
    if centre in config.validation_sites:
        return "validation"
    if centre in config.split_sites:
        return "training" if hash_split_is_training(pseudonym, config.training_percentage) else "validation"
    return None
