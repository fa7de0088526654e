"""The house's import rules, checked on the source so that they stay true (DESIGN.md: dependencies point one way:
shells -> library rooms -> shared contracts)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "nccid"
CATALOG_TABLES = ("raw_objects", "patients", "clinical", "instances", "runs", "stage", "store_identity")
_WRITE_SQL = re.compile(
    r"\b(INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE|DELETE\s+FROM|CREATE\s+(TEMP\s+)?TABLE(\s+IF\s+NOT\s+EXISTS)?|DROP\s+TABLE"
    r"(\s+IF\s+EXISTS)?)\s+(temp\.)?(" + "|".join(CATALOG_TABLES) + r")\b",
    re.IGNORECASE,
)


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(SRC.parent).with_suffix("").parts): p for p in SRC.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every nccid module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("nccid")}


def _offenders(room: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {name}"
        for module, path in _modules().items()
        if module == room or module.startswith(room + ".")
        for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )


@pytest.mark.parametrize(
    ("room", "forbidden"),
    [
        # the site never reaches into the warehouse's insides: layouts and DICOM reading are shared contracts
        ("nccid.site", ("nccid.warehouse", "nccid.access", "nccid.stats", "nccid.cli", "nccid.portal")),
        # researchers' access does not depend on the managed server it may run against
        ("nccid.access", ("nccid.s3server", "nccid.warehouse", "nccid.site", "nccid.cli", "nccid.portal")),
        # contracts and stores depend on no room
        (
            "nccid.contracts",
            ("nccid.site", "nccid.warehouse", "nccid.access", "nccid.stats", "nccid.cli", "nccid.s3server"),
        ),
        (
            "nccid.store",
            ("nccid.site", "nccid.warehouse", "nccid.access", "nccid.stats", "nccid.cli", "nccid.s3server"),
        ),
        ("nccid.errors", ("nccid.site", "nccid.warehouse", "nccid.access", "nccid.store", "nccid.cli")),
        # library rooms never import a shell
        ("nccid.warehouse", ("nccid.cli", "nccid.demo", "nccid.portal", "nccid.site")),
        ("nccid.stats", ("nccid.cli", "nccid.demo", "nccid.portal")),
        ("nccid.synth", ("nccid.cli", "nccid.demo", "nccid.portal")),
        ("nccid.validation", ("nccid.cli", "nccid.demo", "nccid.portal")),
        # the demo is a shell beside the CLI, not above it
        ("nccid.demo", ("nccid.cli",)),
    ],
)
def test_dependencies_point_one_way(room, forbidden):
    assert _offenders(room, forbidden) == []


def test_no_module_outside_the_catalog_writes_sql_against_its_tables():
    offenders = []
    for module, path in _modules().items():
        if module == "nccid.warehouse.catalog":
            continue
        text = path.read_text()
        offenders += [f"{module}: {m.group(0)}" for m in _WRITE_SQL.finditer(text)]
        if re.search(r"\bcatalog\.db\b|\bcat\.db\b|self\.catalog\.db\b", text):
            offenders.append(f"{module}: reaches the catalog's connection")
    assert offenders == []


def test_the_cli_holds_no_sql_and_no_rule_tables():
    for path in (SRC / "cli").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bSELECT\b|\bINSERT\b|\.execute\(", text), path.name
        assert ".query(" not in text, f"{path.name} queries the catalog itself"


def test_every_library_error_derives_from_the_one_base():
    import nccid.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert len(classes) > 15
    for cls in classes:
        assert issubclass(cls, errors.NccidError), cls
        assert cls.__doc__ and len(cls.__doc__) > 40, f"{cls.__name__} needs a docstring saying how to recover"
    # and no module defines an exception class outside errors.py
    strays = []
    for module, path in _modules().items():
        if module == "nccid.errors" or module == "nccid.portal.web":  # the web shell's HTTP answers, not errors
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if bases & {"Exception", "ValueError", "RuntimeError", "PermissionError", "OSError", "NccidError"}:
                    strays.append(f"{module}.{node.name}")
    assert strays == []
