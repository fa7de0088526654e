"""check_clinical: every malformed clinical record is one named reason (ClinicalRejected), never another
exception; each decision of the module docstring is pinned here; and the loader holds such records."""

from __future__ import annotations

import json

import pytest
from helpers import SPLIT_SITE, clinical, configure, listing
from hypothesis import given, settings
from hypothesis import strategies as st

from nccid.contracts.layout import parse_raw_key
from nccid.errors import ClinicalRejected
from nccid.warehouse.catalog import Catalog
from nccid.warehouse.clinical import (
    MAX_CLINICAL_BYTES,
    MAX_CLINICAL_DEPTH,
    check_clinical,
    clinical_size_reason,
)
from nccid.warehouse.loader import load

RAW = parse_raw_key("raw-site/2020-04-01/data/Covid1_data.json")
GOOD = {"Pseudonym": "Covid1", "SubmittingCentre": SPLIT_SITE, "Age": 60, "Sex": 1}


def with_field(raw: str) -> bytes:
    """The good record with `, <raw>` added before its closing brace (raw JSON text, not escaped)."""
    return (json.dumps(GOOD)[:-1] + ", " + raw + "}").encode()


def reason(content: bytes) -> str:
    try:
        check_clinical(RAW, content)
    except ClinicalRejected as exc:
        return exc.reason
    return ""


HUGE = with_field('"Comment": "' + "a" * MAX_CLINICAL_BYTES + '"')
CASES = {
    "deep": (
        with_field('"x": ' + "[" * 5000 + "]" * 5000),
        f"JSON nested deeper than {MAX_CLINICAL_DEPTH} levels (a record is flat)",
    ),
    "long integer": (with_field('"Age": ' + "9" * 5000), "integer of 5000 digits is out of the 64-bit range"),
    "integer over 64 bits": (
        with_field('"x": 9223372036854775808'),
        "integer 9223372036854775808 is out of the 64-bit range",
    ),
    "lone surrogate": (
        with_field('"Comment": "\\ud800"'),
        "a value in field 'Comment' holds a lone surrogate \\ud800 (half of a UTF-16 pair, not a character)",
    ),
    "lone surrogate in a name": (
        with_field('"\\udfff": 1'),
        "a field name holds a lone surrogate \\udfff (half of a UTF-16 pair, not a character)",
    ),
    "NUL": (with_field('"Comment": "a\\u0000b"'), "a value in field 'Comment' holds a NUL character (\\u0000)"),
    "NaN": (with_field('"x": NaN'), "NaN is not a JSON number (NaN and Infinity are not allowed)"),
    "Infinity": (with_field('"x": -Infinity'), "-Infinity is not a JSON number (NaN and Infinity are not allowed)"),
    "1e999": (with_field('"x": 1e999'), "number 1e999 is too large for a double (it would read as infinity)"),
    "duplicate": (with_field('"Age": 61'), "duplicate field 'Age' (JSON leaves its meaning open)"),
    "nested duplicate": (with_field('"x": {"a": 1, "a": 2}'), "duplicate field 'a' (JSON leaves its meaning open)"),
    "UTF-16": (
        json.dumps(GOOD).encode("utf-16"),
        "the record is UTF-16 (little-endian, with a byte-order mark); clinical records are UTF-8 without a "
        "byte-order mark",
    ),
    "UTF-16 without BOM": (
        json.dumps(GOOD).encode("utf-16-be"),
        "the record is UTF-16 or UTF-32 text; clinical records are UTF-8",
    ),
    "UTF-32": (
        json.dumps(GOOD).encode("utf-32-be"),
        "the record is UTF-16 or UTF-32 text; clinical records are UTF-8",
    ),
    "UTF-8 BOM": (
        json.dumps(GOOD).encode("utf-8-sig"),
        "the record is UTF-8 with a byte-order mark; clinical records are UTF-8 without a byte-order mark",
    ),
    "Latin-1": (with_field('"Comment": "caf\xe9"').replace(b"\xc3\xa9", b"\xe9"), "not UTF-8 text at byte"),
    "huge": (HUGE, f"record of {len(HUGE)} bytes is over the 1 MiB limit for one clinical record"),
    "empty": (b"", "empty file (0 bytes): not a JSON object"),
    "array": (b"[1, 2]", "expected a JSON object, found an array"),
    "invalid": (b'{"Pseudonym": "Covid1",, }', "invalid JSON at line 1 column 24: Expecting property name"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_malformed_record_has_its_named_reason(case):
    content, expected = CASES[case]
    assert reason(content).startswith(expected), reason(content)


def test_a_good_record_with_unicode_and_nesting_within_the_limit_passes():
    content = with_field('"Comment": "caf\\u00e9 \\ud83d\\ude00", "x": [[1, 2.5, null, true]]')  # a surrogate pair
    assert reason(content) == ""
    record = check_clinical(RAW, json.dumps({**GOOD, "Comment": "Zoë"}, ensure_ascii=False).encode())
    assert record.pseudonym == "Covid1" and record.centre == SPLIT_SITE and record.kind == "data"
    assert reason(with_field('"x": ' + "[" * (MAX_CLINICAL_DEPTH - 1) + "]" * (MAX_CLINICAL_DEPTH - 1))) == ""


def test_the_size_limit_is_known_before_reading():
    assert clinical_size_reason(MAX_CLINICAL_BYTES) == ""
    assert clinical_size_reason(MAX_CLINICAL_BYTES + 1) == (
        f"record of {MAX_CLINICAL_BYTES + 1} bytes is over the 1 MiB limit for one clinical record"
    )
    assert clinical_size_reason(0) == "empty file (0 bytes): not a JSON object"


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_are_a_record_or_one_named_reason(content):
    assert "\n" not in reason(content)


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
        max_leaves=20,
    )
)
def test_any_json_value_in_a_record_is_accepted_or_named(value):
    text = json.dumps({**GOOD, "x": value})  # json.dumps writes NaN / Infinity for such floats
    result = reason(text.encode("utf-8", "surrogatepass"))
    assert "\n" not in result


def test_the_loader_holds_each_malformed_record_and_files_the_good_one(tmp_path):
    from nccid.store import LocalStore

    store = LocalStore(tmp_path / "store")
    configure(store)
    keys = {}
    for n, case in enumerate(sorted(CASES)):
        content = CASES[case][0].replace(b"Covid1", f"Covid{100 + n}".encode())
        key = f"raw-site/2020-04-01/data/Covid{100 + n}_data.json"
        store.write(key, content)
        keys[key] = reason(content).replace("Covid1", f"Covid{100 + n}")
        assert keys[key], case
    store.write("raw-site/2020-04-01/data/Covid1_data.json", clinical("Covid1"))
    catalog = Catalog(tmp_path / "catalog.sqlite")
    try:
        report = load(store, catalog, workers=1)
        rows = dict(catalog.sql_query("SELECT key, outcome || ': ' || reason FROM raw_objects"))
    finally:
        catalog.close()
    for key, expected in keys.items():
        assert rows[key] == f"held: {expected}", key
    assert report.counts["filed"] == 1
    assert [k for k in listing(store) if k.startswith(("training/", "validation/"))] == [
        "training/data/Covid1/data_2020-04-01.json"
    ]


def test_a_pseudonym_field_holding_something_else_is_never_quoted():
    """Reasons are kept centrally: an NHS number typed into the Pseudonym field must not reach the catalog."""
    with pytest.raises(ClinicalRejected) as refused:
        check_clinical(RAW, json.dumps({**GOOD, "Pseudonym": "9434765919"}).encode())
    assert "9434765919" not in refused.value.reason and "is not a pseudonym" in refused.value.reason
