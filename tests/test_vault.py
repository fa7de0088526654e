"""NHS/CHI numbers, pseudonyms and the linkage vault: one pseudonym per person, reveal allowed and denied,
and an audit log that never holds a number."""

from __future__ import annotations

import os

import pytest
from helpers import run_cli

from nccid.site.identifiers import IdentifierError, check_digit, validate_chi, validate_nhs
from nccid.site.vault import KEY_ENV, PseudonymKey, Vault, VaultError, encrypt_batch


@pytest.mark.parametrize("number", ["9434765919", "943 476 5919", "943-476-5919", " 9434765919 "])
def test_valid_nhs_numbers_in_the_ways_people_write_them(number):
    assert validate_nhs(number) == "9434765919"


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        ("9434765918", "fails the modulus 11 check (last digit should be 9)"),
        ("1000000010", "check value is 10"),  # 100000001 has check value 10: no valid number starts so
        ("943476591", "has 9 digits, not 10"),
        ("94347659190", "has 11 digits"),
        ("94347X5919", "characters other than digits"),
        ("", "empty"),
    ],
)
def test_invalid_nhs_numbers_say_why(number, reason):
    with pytest.raises(IdentifierError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        validate_nhs(number)


def test_check_digit_vectors():
    assert check_digit("943476591") == 9
    assert check_digit("100000001") is None
    assert check_digit("000000000") == 0  # 11 becomes 0


def test_chi_numbers_start_with_a_birth_date():
    valid = next(f"{p}{check_digit(p)}" for p in (f"010190{n:03d}" for n in range(1000)) if check_digit(p) is not None)
    assert validate_chi(valid) == valid
    bad_date = next(
        f"{p}{check_digit(p)}" for p in (f"320190{n:03d}" for n in range(1000)) if check_digit(p) is not None
    )
    with pytest.raises(IdentifierError, match="valid date of birth") as refused:
        validate_chi(bad_date)
    assert bad_date[:6] not in str(refused.value)  # the message never quotes the number, not even its date part


@pytest.fixture
def key():
    return PseudonymKey.generate()


@pytest.fixture
def vault(tmp_path):
    v = Vault(tmp_path / "vault.sqlite")
    yield v
    v.close()


def test_same_person_at_two_sites_gets_one_pseudonym(key, vault):
    site_a = encrypt_batch(key, ["943 476 5919", "4010232137"])
    site_b = encrypt_batch(key, ["9434765919"])  # written differently at another hospital
    assert site_a[0] == site_b[0] and "9434765919" not in site_a[0]
    first = vault.issue(site_a, actor="site-a")
    again = vault.issue(site_b, actor="site-b")
    assert again == first[:1]
    assert all(p.startswith("Covid") and p[5:].isdigit() for p in first) and first[0] != first[1]
    with pytest.raises(IdentifierError):
        key.encrypt("9434765918")  # an invalid number never gets a ciphertext


def test_vault_stores_only_ciphertext(key, vault):
    vault.issue(encrypt_batch(key, ["9434765919"]), actor="site-a")
    raw = vault.path.read_bytes()
    assert b"9434765919" not in raw
    assert oct(vault.path.stat().st_mode & 0o777) == "0o600"


def test_reveal_allowed_for_a_data_manager_with_the_key_and_denied_otherwise(key, vault):
    (pseudonym,) = vault.issue(encrypt_batch(key, ["9434765919"]), actor="site-a")
    vault.add_manager("dm.alice")
    assert vault.reveal(pseudonym, key=key, actor="dm.alice") == "9434765919"
    with pytest.raises(VaultError, match="not a named data manager"):
        vault.reveal(pseudonym, key=key, actor="researcher.bob")
    with pytest.raises(VaultError, match="wrong key"):
        vault.reveal(pseudonym, key=PseudonymKey.generate(), actor="dm.alice")
    with pytest.raises(VaultError, match="not issued"):
        vault.reveal("Covid1", key=key, actor="dm.alice")
    log = vault.audit_log()
    assert [(e["actor"], e["action"], e["outcome"]) for e in log] == [
        ("site-a", "issue", "issued"),
        ("dm.alice", "reveal", "revealed"),
        ("researcher.bob", "reveal", "denied: not a data manager"),
        ("dm.alice", "reveal", "denied: wrong key"),
        ("dm.alice", "reveal", "denied: unknown pseudonym"),
    ]
    assert all(e["pseudonym"] in (pseudonym, "Covid1") for e in log)
    assert "9434765919" not in vault.export_audit()


def test_key_rotation_keeps_pseudonyms(key, vault):
    pseudonyms = vault.issue(encrypt_batch(key, ["9434765919", "4010232137"]), actor="site-a")
    vault.add_manager("dm.alice")
    new = PseudonymKey.generate()
    assert vault.rekey(key, new, actor="dm.alice") == 2
    assert vault.issue(encrypt_batch(new, ["9434765919"]), actor="site-a") == pseudonyms[:1]
    assert vault.reveal(pseudonyms[1], key=new, actor="dm.alice") == "4010232137"
    with pytest.raises(VaultError):
        vault.reveal(pseudonyms[1], key=key, actor="dm.alice")


def test_key_files_must_be_owner_only_and_the_environment_works(key, tmp_path, monkeypatch):
    path = key.save(tmp_path / "pseudonym.key")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert PseudonymKey.load(path) == key
    with pytest.raises(FileExistsError):
        key.save(path)  # never overwritten
    os.chmod(path, 0o644)
    with pytest.raises(VaultError, match="owner only"):
        PseudonymKey.load(path)
    monkeypatch.setenv(KEY_ENV, key.encode())
    assert PseudonymKey.load() == key
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(VaultError, match=KEY_ENV):
        PseudonymKey.load()


def test_reveal_from_the_command_line(key, vault, tmp_path):
    (pseudonym,) = vault.issue(encrypt_batch(key, ["9434765919"]), actor="site-a")
    vault.add_manager("dm.alice")
    key_file = key.save(tmp_path / "k.key")
    base = [
        "vault",
        "reveal",
        pseudonym,
        "--vault",
        str(vault.path),
        "--key-file",
        str(key_file),
    ]
    ok = run_cli(*base, "--as", "dm.alice")
    assert ok.returncode == 0 and ok.stdout.strip() == "9434765919"
    refused = run_cli(*base, "--as", "mallory")
    assert refused.returncode == 1 and "not a named data manager" in refused.stderr
    assert "9434765919" not in refused.stdout + refused.stderr
