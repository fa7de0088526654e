"""The de-identification gate: scan every element of every output file (file meta, nested sequences and private
tags included) for any identifier the site knows for that patient. One finding stops the batch."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

_NON_ALNUM = re.compile(r"[^A-Z0-9]")
_NAME_PARTS = re.compile(r"[\s^,.'-]+")
_WORD_SPLIT = re.compile(r"[^A-Z0-9]+")


def _norm(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin-1", "replace")
    return _NON_ALNUM.sub("", str(value).upper())


@dataclass
class KnownIdentifiers:
    """What the site holds about one patient, as written anywhere (names, numbers, dates, address, text)."""

    names: list[str] = field(default_factory=list)  # family and given names, physicians
    numbers: list[str] = field(default_factory=list)  # NHS/CHI, hospital number, accession numbers
    birth_date: str = ""  # YYYYMMDD
    address: list[str] = field(default_factory=list)  # lines and postcode
    free_text: list[str] = field(default_factory=list)  # comments known to carry identifiers

    def tokens(self) -> list[tuple[str, str]]:
        """(kind, normalised token) pairs worth searching for; very short tokens would only add noise."""
        out: list[tuple[str, str]] = []
        for name in self.names:
            # a name part is matched as a whole word (AVA is a name, Avanto a scanner); the full name anywhere
            out += [("name", t) for t in {_norm(p) for p in _NAME_PARTS.split(name)} if len(t) >= 3]
            if len(_norm(name)) >= 6:
                out.append(("full name", _norm(name)))
        out += [("number", _norm(n)) for n in self.numbers if len(_norm(n)) >= 4]
        if self.birth_date:
            ymd = _norm(self.birth_date)
            out += [("birth date", ymd), ("birth date", ymd[6:8] + ymd[4:6] + ymd[0:4])]
        out += [("address", _norm(a)) for a in self.address if len(_norm(a)) >= 4]
        out += [("free text", _norm(t)) for t in self.free_text if len(_norm(t)) >= 6]
        return out


@dataclass(frozen=True)
class Finding:
    """One identifier the gate found: which file, where in it (tag path or field), and what kind of thing."""

    file: str
    tag_path: str  # e.g. (0040,0275)[0]>(0040,1001)
    kind: str

    def __str__(self) -> str:
        return f"{self.file}: {self.kind} found in {self.tag_path}"


_PIXEL_DATA, _BIRTH_DATE = 0x7FE00010, 0x00100030
_BINARY = {"US", "SS", "UL", "SL", "FL", "FD", "AT", "OF", "OD", "OL", "OV", "OW"}


def _elements(ds: Dataset, path: str = "") -> Iterator[tuple[str, object, str, object]]:
    """Every element, at every depth. Values are read as their raw bytes where possible: decoding each one
    would cost more than the search, and text is text either way."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.VR not in (None, "SQ"):
            vr, value = raw.VR, raw.value  # undecoded bytes
        else:
            elem = ds[tag]
            vr, value = elem.VR, elem.value
        here = f"{path}({tag.group:04X},{tag.element:04X})"
        if vr == "SQ":
            for n, item in enumerate(value):
                yield from _elements(item, f"{here}[{n}]>")
        elif vr not in _BINARY:
            yield here, tag, vr, value


def _meaningful_in(vr: str, raw: object, token: str) -> bool:
    """Whether finding `token` inside a value of this VR can mean an identifier leaked.

    UIDs are long digit strings, so short tokens match them by chance. A UID a site's system made may embed a
    date or a number (some PACS build them that way): there, tokens of 8 digits and more count. A keyed UID of
    the 2.25 form is a hash output: an 8-digit date turns up in one by chance about once in a thousand demo
    runs, so there only tokens of 10 digits and more (NHS/CHI numbers) count.
    """
    if vr != "UI":
        return True
    text = raw.decode("latin-1", "replace") if isinstance(raw, bytes) else str(raw)
    return len(token) >= (10 if text.strip("\x00 ").startswith("2.25.") else 8)


def scan(ds: Dataset, known: KnownIdentifiers, source: str) -> list[Finding]:
    """Every element whose text contains one of the patient's identifiers."""
    tokens = known.tokens()
    findings: list[Finding] = []
    meta = getattr(ds, "file_meta", None)
    pairs = list(_elements(meta, "meta:")) if meta is not None else []
    for path, tag, vr, value in pairs + list(_elements(ds)):
        if value is None or tag == _PIXEL_DATA:
            continue
        raw = value if not isinstance(value, list | tuple) else "\\".join(map(str, value))
        text = _norm(raw)
        if not text:
            continue
        words = None
        if tag == _BIRTH_DATE and text.endswith("0101") and len(text) == 8:
            continue  # the NCCID policy's reduced birth date (year + 0101) is allowed
        for kind, token in tokens:
            if kind == "name":
                if token not in text:  # cheap test first
                    continue
                if words is None:
                    upper = (raw.decode("latin-1", "replace") if isinstance(raw, bytes) else str(raw)).upper()
                    words = set(_WORD_SPLIT.split(upper))
                if token in words:
                    findings.append(Finding(source, path, kind))
                    break
            elif token and token in text and _meaningful_in(vr, raw, token):
                findings.append(Finding(source, path, kind))
                break
    return findings
