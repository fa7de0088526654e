"""NHS and Scottish CHI numbers: normalise, validate, and say exactly why a number is invalid. Pure functions.

Both are 10 digits whose last digit is a modulus 11 check digit: weights 10..2 over the first nine digits,
check = 11 - (sum mod 11); 11 means 0, and 10 means the number cannot be valid. A CHI number also starts with
the holder's date of birth as DDMMYY.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Literal

from nccid.errors import IdentifierError

_SEPARATORS = re.compile(r"[\s\-]")


def normalise(text: str) -> str:
    """'943 476 5919' and '943-476-5919' become '9434765919'."""
    return _SEPARATORS.sub("", str(text))


def check_digit(first_nine: str) -> int | None:
    """The modulus 11 check digit of nine digits, or None where it would be 10 (no valid number)."""
    total = sum(int(d) * w for d, w in zip(first_nine, range(10, 1, -1), strict=True))
    check = 11 - total % 11
    if check == 11:
        return 0
    return None if check == 10 else check


def _digits(text: str, kind: str) -> str:
    number = normalise(text)
    if not number:
        raise IdentifierError(f"empty {kind} number")
    if not number.isdigit():
        raise IdentifierError(f"{kind} number has characters other than digits, spaces and dashes")
    if len(number) != 10:
        raise IdentifierError(f"{kind} number has {len(number)} digits, not 10")
    expected = check_digit(number[:9])
    if expected is None:
        raise IdentifierError(f"{kind} number is invalid: its check value is 10")
    if int(number[9]) != expected:
        raise IdentifierError(f"{kind} number fails the modulus 11 check (last digit should be {expected})")
    return number


def validate_nhs(text: str) -> str:
    """The normalised number, or IdentifierError naming the defect."""
    return _digits(text, "NHS")


def chi_birth_date(number: str) -> dt.date | None:
    """The DDMMYY date a CHI number starts with, if it is a real date (century unknown: 19xx/20xx)."""
    for century in (2000, 1900):
        try:
            return dt.date(century + int(number[4:6]), int(number[2:4]), int(number[0:2]))
        except ValueError:
            continue
    return None


def validate_chi(text: str) -> str:
    """A Scottish CHI number as 10 digits, spaces and dashes removed.

    Raises IdentifierError naming the reason: not 10 digits, a failed modulus 11 check, or no valid DDMMYY
    date of birth at the start.
    """
    number = _digits(text, "CHI")
    if chi_birth_date(number) is None:
        raise IdentifierError("CHI number does not start with a valid date of birth (DDMMYY)")
    return number


def validate_patient_number(text: str, kind: Literal["nhs", "chi", "any"] = "any") -> str:
    """NHS or CHI number; with 'any', a number valid under either rule is accepted."""
    if kind == "nhs":
        return validate_nhs(text)
    if kind == "chi":
        return validate_chi(text)
    return validate_nhs(text)  # every valid CHI number is also a valid modulus 11 number
