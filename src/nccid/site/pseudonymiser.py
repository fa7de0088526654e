"""One pseudonymiser per site run: the programme key, the vault's issuer, and a per-person memo.

Every route that turns a person into a pseudonym (`site deid`, the site DICOM node, `site clinical`, the demo)
uses this one object instead of a lambda built by hand: NHS/CHI numbers are encrypted with the key (AES-SIV),
the ciphertexts go to the vault's issuer (the local vault, or later its service), and each person's pseudonym is
remembered so that a batch of thousands of images makes one vault round trip per person. Thread-safe: the node's
associations share one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from nccid.site.vault import PseudonymKey, Vault

Issuer = Callable[[list[str]], list[str]]  # ciphertexts -> pseudonyms, in the same order


class Pseudonymiser:
    """Pseudonyms for NHS/CHI numbers or their ciphertexts, issued once per person.

    `issue` takes ciphertexts and returns their pseudonyms in the same order (`Vault.issue`, bound to an actor);
    `with_vault` builds one that opens the vault file per call, safe from any thread.
    """

    def __init__(self, key: PseudonymKey, issue: Issuer) -> None:
        self.key = key
        self._issue = issue
        self._memo: dict[str, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def with_vault(cls, key: PseudonymKey, vault: str | os.PathLike[str], actor: str) -> Pseudonymiser:
        """Pseudonyms from the vault database at `vault`, every issue audited as `actor`. The vault is opened
        per call (a connection may not cross threads); the memo keeps calls to one per person."""
        path = Path(vault)

        def issue(ciphertexts: list[str]) -> list[str]:
            with Vault(path) as opened:
                return opened.issue(ciphertexts, actor=actor)

        return cls(key, issue)

    def encrypt(self, number: str) -> str:
        """The NHS/CHI number's ciphertext (the person, as the site sends it)."""
        return self.key.encrypt(number)

    def of_ciphertexts(self, ciphertexts: Sequence[str]) -> list[str]:
        """The pseudonym of each ciphertext, in order; people not seen before go to the vault in one call.
        Raises what the issuer raises (VaultError) and remembers nothing from a failed call."""
        with self._lock:
            missing = list(dict.fromkeys(c for c in ciphertexts if c not in self._memo))
            if missing:
                issued = self._issue(missing)
                self._memo.update(zip(missing, issued, strict=True))
            return [self._memo[c] for c in ciphertexts]

    def __call__(self, ciphertexts: list[str]) -> list[str]:
        """Same as `of_ciphertexts`: a Pseudonymiser is also the plain issuer callable older code expects."""
        return self.of_ciphertexts(ciphertexts)

    def of_numbers(self, numbers: Sequence[str]) -> list[str]:
        """The pseudonym of each valid NHS/CHI number, in order (encrypted here, issued by the vault)."""
        return self.of_ciphertexts([self.encrypt(n) for n in numbers])

    def pseudonym(self, ciphertext: str) -> str:
        """The pseudonym of one ciphertext."""
        return self.of_ciphertexts([ciphertext])[0]
