"""Checks on a raw clinical record before it is filed (pure; the loader does the I/O).

A clinical record is a small, flat JSON object written by the site tools (or by hand). Whatever arrives, the
check ends in a `ClinicalRecord` or a `ClinicalRejected` whose reason names the defect; it never raises
anything else, and it costs bounded time and memory. The decisions, each with its reason:

* **size**: at most `MAX_CLINICAL_BYTES` (1 MiB; a real record is about 2 KB), checked before any parsing.
  The loader can check `clinical_size_reason(size)` from the listing and not read a larger object at all.
* **encoding**: UTF-8 only (RFC 8259 for JSON exchanged between systems). A byte-order mark, UTF-16 or
  UTF-32 text is refused with a reason saying which, rather than silently decoded: researchers read the filed
  bytes with their own tools, which expect UTF-8 without a BOM.
* **nesting**: arrays and objects nested at most `MAX_CLINICAL_DEPTH` (20) deep, counted before parsing (a
  record is flat; Python's parser would otherwise hit its recursion limit on thousands of levels).
* **numbers**: `NaN`, `Infinity` and `-Infinity` are not JSON and are refused; a number that overflows a
  double (`1e999`) is refused; integers are limited to 64 bits (what SQLite and the statistics can store),
  which also keeps thousands of digits from reaching Python's int-string limit.
* **strings**: a lone surrogate (`"\\ud800"`, a half of a UTF-16 pair) is not a character and cannot be stored
  as UTF-8; refused, naming the field. So are NUL characters, which C-based readers truncate at.
* **duplicate keys** at any level: refused, naming the key (JSON leaves their meaning open; the last would
  silently win).
* then: a JSON object, with `Pseudonym` equal to the file name's and a non-empty `SubmittingCentre`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from nccid.contracts.layout import LayoutError, RawKey, is_pseudonym, parse_clinical_name
from nccid.errors import ClinicalRejected

#: the largest clinical record filed; larger ones are held with a reason and need not be read at all
MAX_CLINICAL_BYTES = 1024 * 1024
#: arrays and objects nested deeper than this are refused (records are flat)
MAX_CLINICAL_DEPTH = 20
_INT64 = 2**63
_BOMS = (
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian, with a byte-order mark)"),
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian, with a byte-order mark)"),
    (b"\xef\xbb\xbf", "UTF-8 with a byte-order mark"),
    (b"\xfe\xff", "UTF-16 (big-endian, with a byte-order mark)"),
    (b"\xff\xfe", "UTF-16 (little-endian, with a byte-order mark)"),
)
#: a JSON string (skipped whole) or one bracket: enough to count nesting without parsing
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


@dataclass(frozen=True, slots=True)
class ClinicalRecord:
    pseudonym: str
    kind: str  # 'data' (positive record) or 'status' (negative status record)
    centre: str
    date: str  # the upload date, from the raw folder


def clinical_size_reason(size: int) -> str:
    """The reason a record of `size` bytes is held, or '' when its size is fine (checked before reading)."""
    if size > MAX_CLINICAL_BYTES:
        return f"record of {size} bytes is over the {MAX_CLINICAL_BYTES // 1024**2} MiB limit for one clinical record"
    if size == 0:
        return "empty file (0 bytes): not a JSON object"
    return ""


def check_clinical(raw: RawKey, content: bytes) -> ClinicalRecord:
    """A record is filed only if its size, encoding, JSON, Pseudonym and SubmittingCentre all make sense.

    Raises ClinicalRejected with a one-line reason (see the module docstring for each case); nothing else.
    """
    try:
        name = parse_clinical_name(raw.rest)
    except LayoutError as exc:
        raise ClinicalRejected(str(exc)) from exc
    size_reason = clinical_size_reason(len(content))
    if size_reason:
        raise ClinicalRejected(size_reason)
    doc = parse_record(content)
    if not isinstance(doc, dict):
        raise ClinicalRejected(f"expected a JSON object, found {_json_type(doc)}")
    pseudonym = doc.get("Pseudonym")
    if pseudonym in (None, ""):
        raise ClinicalRejected("missing field 'Pseudonym'")
    if pseudonym != name.pseudonym:
        # a pseudonym may be named centrally; anything else in the field (an NHS number, a name) never is
        shown = repr(pseudonym) if isinstance(pseudonym, str) and is_pseudonym(pseudonym) else "not a pseudonym"
        raise ClinicalRejected(f"file name says {name.pseudonym} but field 'Pseudonym' is {shown}")
    centre = doc.get("SubmittingCentre")
    if not isinstance(centre, str) or not centre.strip():
        raise ClinicalRejected("missing field 'SubmittingCentre'")
    return ClinicalRecord(pseudonym=name.pseudonym, kind=name.kind, centre=centre, date=raw.date)


def parse_record(content: bytes) -> object:
    """Strict JSON: UTF-8 without BOM, bounded nesting, finite numbers, 64-bit integers, no lone surrogates,
    no NUL characters, no duplicate keys. Raises ClinicalRejected naming the defect."""
    for bom, label in _BOMS:
        if content.startswith(bom):
            raise ClinicalRejected(f"the record is {label}; clinical records are UTF-8 without a byte-order mark")
    if len(content) >= 2 and (content[0] == 0 or content[1] == 0):
        raise ClinicalRejected("the record is UTF-16 or UTF-32 text; clinical records are UTF-8")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClinicalRejected(f"not UTF-8 text at byte {exc.start}") from exc
    _check_depth(content)
    try:
        doc = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
            object_pairs_hook=_unique_object,
        )
    except json.JSONDecodeError as exc:
        raise ClinicalRejected(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except RecursionError as exc:  # not reached after _check_depth; kept so that no input can raise it
        raise ClinicalRejected(f"JSON nested deeper than {MAX_CLINICAL_DEPTH} levels") from exc
    _check_strings(doc, "")
    return doc


def _check_depth(content: bytes) -> None:
    depth = 0
    for match in _TOKENS.finditer(content):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_CLINICAL_DEPTH:
                raise ClinicalRejected(f"JSON nested deeper than {MAX_CLINICAL_DEPTH} levels (a record is flat)")
        elif token in (b"]", b"}"):
            depth -= 1


def _refuse_constant(name: str) -> object:
    raise ClinicalRejected(f"{name} is not a JSON number (NaN and Infinity are not allowed)")


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > 19:
        raise ClinicalRejected(f"integer of {len(digits.lstrip('-'))} digits is out of the 64-bit range")
    value = int(digits)
    if not -_INT64 <= value < _INT64:
        raise ClinicalRejected(f"integer {digits} is out of the 64-bit range")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ClinicalRejected(f"number {text[:40]} is too large for a double (it would read as infinity)")
    return value


def _unique_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    doc: dict[str, object] = {}
    for key, value in pairs:
        if key in doc:
            raise ClinicalRejected(f"duplicate field {_safe(key)} (JSON leaves its meaning open)")
        doc[key] = value
    return doc


def _check_strings(value: object, where: str) -> None:
    """Every string (keys included) must be storable as UTF-8 and free of NUL characters."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_string(key, f"a field name{where}")
            _check_strings(item, where or f" in field {_safe(key)}")
    elif isinstance(value, list):
        for item in value:
            _check_strings(item, where)
    elif isinstance(value, str):
        _check_string(value, f"a value{where}")


def _check_string(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ClinicalRejected(
            f"{what} holds a lone surrogate \\u{ord(text[exc.start]):04x} (half of a UTF-16 pair, not a character)"
        ) from exc
    if "\x00" in text:
        raise ClinicalRejected(f"{what} holds a NUL character (\\u0000)")


def _safe(key: str) -> str:
    """A field name fit for a one-line reason: printable, short, no lone surrogates."""
    return repr(key.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:40])


def _json_type(doc: object) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false"}.get(
        type(doc), "null"
    )
