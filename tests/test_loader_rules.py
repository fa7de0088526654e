"""The loader's decisions on plain values, no store and no catalog (nccid.warehouse.rules)."""

from __future__ import annotations

from nccid.warehouse import rules
from nccid.warehouse.catalog import ClinicalRow, Instance, RawRow, StagedRecord, catalog_verdict
from nccid.warehouse.rules import Outcome


def staged(key, pseudonym="Covid1", proposed="training", centre="A", date="2020-04-01", note="", checksum="c1"):
    return StagedRecord(key, 10, checksum, pseudonym, "data", date, centre, proposed, note)


def instance(sop="1.2.3", source="raw-a/2020-04-01/images/a.dcm", checksum="c1", dest="training/xray/P/S/E/1.2.3.dcm"):
    return Instance(sop, dest, checksum, 10, 5, "Covid1", "training", "xray", "CR", "S", "E", source=source)


IMAGE = RawRow("raw-a/2020-04-02/images/b.dcm", 10, "c1", "image", Outcome.QUARANTINED, patient="Covid1")


def test_outcome_values_are_what_the_catalog_and_reports_record():
    assert [o.value for o in Outcome] == [
        "filed",
        "duplicate",
        "pending",
        "conflict",
        "quarantined",
        "held",
        "unfiled",
    ]
    assert Outcome.FILED == "filed"  # a plain string wherever the report or the catalog holds it


def test_the_first_record_decides_a_new_patients_group():
    records = [staged("raw-a/2020-04-01/data/Covid1_data.json"), staged("raw-b/2020-04-03/data/Covid1_status.json")]
    decision = rules.decide_group("Covid1", records)
    assert (decision.group, decision.centre, decision.decided_by) == ("training", "A", records[0].key)
    assert decision.disagreement == ""


def test_records_that_disagree_decide_nothing_and_name_the_records():
    records = [
        staged("raw-a/2020-04-01/data/Covid1_data.json", centre="A", proposed="training"),
        staged("raw-b/2020-04-01/data/Covid1_status.json", centre="B", proposed="validation"),
    ]
    decision = rules.decide_group("Covid1", records)
    assert decision.group == ""
    assert "records disagree on Covid1's group" in decision.disagreement
    assert "raw-b/2020-04-01/data/Covid1_status.json (SubmittingCentre 'B') -> validation" in decision.disagreement


def test_clinical_outcomes():
    key = "raw-a/2020-04-01/data/Covid1_data.json"
    dest = "training/data/Covid1/data_2020-04-01.json"
    held, _ = rules.clinical_decision(staged(key, proposed=""), None, None, "")
    assert held.outcome == Outcome.HELD and "SubmittingCentre 'A' is not configured" in held.reason
    disagree, _ = rules.clinical_decision(staged(key, proposed="disagree", note="why"), None, None, "")
    assert (disagree.outcome, disagree.reason) == (Outcome.HELD, "why")
    to_file, warning = rules.clinical_decision(staged(key), "training", None, dest)
    assert to_file == ClinicalRow(dest, "Covid1", "training", "data", "2020-04-01", "A", "c1", 10, key)
    assert warning == ""
    other = ClinicalRow(dest, "Covid1", "training", "data", "2020-04-01", "A", "c1", 10, "raw-b/x")
    dup, _ = rules.clinical_decision(staged(key), "training", other, dest)
    assert (dup.outcome, dup.dest) == (Outcome.DUPLICATE, dest) and "raw-b/x" in dup.reason
    conflict, _ = rules.clinical_decision(staged(key, checksum="c2"), "training", other, dest)
    assert conflict.outcome == Outcome.CONFLICT and "send a correction under a new upload date" in conflict.reason
    same_source = ClinicalRow(dest, "Covid1", "training", "data", "2020-04-01", "A", "c1", 10, key)
    assert isinstance(rules.clinical_decision(staged(key), "training", same_source, dest)[0], ClinicalRow)


def test_a_patient_in_another_group_stays_there_with_a_warning():
    key = "raw-a/2020-04-01/data/Covid1_data.json"
    row, warning = rules.clinical_decision(staged(key, proposed="validation"), "training", None, "d")
    assert isinstance(row, ClinicalRow) and row.grp == "training"
    assert "would put Covid1 in validation, but the patient is in training already and stays there" in warning


def test_image_outcomes_before_filing():
    assert rules.image_decision(IMAGE, "training", None, None) is None  # to be filed
    pending = rules.image_decision(IMAGE, None, None, None)
    assert (pending.outcome, pending.reason) == (Outcome.PENDING, "no clinical record for Covid1 yet")
    held = rules.image_decision(IMAGE, None, None, "invalid JSON at line 1 column 1")
    assert held.reason == "clinical record of Covid1 is held: invalid JSON at line 1 column 1"
    dup = rules.image_decision(IMAGE, "training", instance(), None)
    assert (dup.outcome, dup.dest) == (Outcome.DUPLICATE, instance().dest)
    conflict = rules.image_decision(IMAGE, "training", instance(checksum="c2"), None)
    assert conflict.outcome == Outcome.CONFLICT
    assert (
        conflict.reason
        == "SOP Instance UID 1.2.3 is already filed from raw-a/2020-04-01/images/a.dcm with different content"
    )
    assert rules.image_decision(IMAGE, "training", instance(source=IMAGE.key), None) is None  # its own earlier run
    assert rules.image_decision(IMAGE, "training", instance(source=""), None) is None  # a rebuilt row, source unknown


def test_placing_decides_filed_conflict_or_not_recorded():
    assert rules.placed(IMAGE, "new", "d", False).outcome == Outcome.FILED
    assert rules.placed(IMAGE, "present", "d", False) == RawRow(
        IMAGE.key, 10, "c1", "image", Outcome.FILED, "", "Covid1", "d"
    )
    conflict = rules.placed(IMAGE, "different", "d", False)
    assert (conflict.outcome, conflict.reason) == (Outcome.CONFLICT, "d exists with different content")
    assert rules.placed(IMAGE, "absent", "d", True).outcome == Outcome.UNFILED
    assert rules.placed(IMAGE, "absent", "d", False).outcome == Outcome.FILED  # dry run: it would be filed


def test_what_is_looked_at_again():
    seen = RawRow("k", 10, "c1", "image", Outcome.FILED)
    assert rules.image_needs_examining(None, 10, "c1", set())
    assert not rules.image_needs_examining(seen, 10, "c1", set())
    assert rules.image_needs_examining(seen, 10, "c2", set())  # changed bytes
    pending = RawRow("k", 10, "c1", "image", Outcome.PENDING, patient="Covid1")
    assert not rules.image_needs_examining(pending, 10, "c1", set())
    assert rules.image_needs_examining(pending, 10, "c1", {"Covid1"})  # its patient now has a group
    # the re-run's fast path on (size, checksum, outcome) agrees with the whole-row rule wherever it says "nothing"
    for row in (seen, pending, replace_outcome(seen, Outcome.UNFILED), replace_outcome(seen, Outcome.HELD), None):
        for size, checksum in ((10, "c1"), (11, "c1"), (10, "c2"), (10, "")):
            state = (row.size, row.checksum, str(row.outcome)) if row else None
            if rules.settled_and_unchanged(state, size, checksum):
                assert not rules.image_needs_examining(row, size, checksum, {"Covid1"}), (row, size, checksum)
    assert rules.settled_and_unchanged((10, "c1", "filed"), 10, "c1")
    assert not rules.settled_and_unchanged((10, "c1", "pending"), 10, "c1")  # its patient may have a group now
    assert not rules.settled_and_unchanged((10, "c1", "filed"), 10, "c2")
    assert not rules.settled_and_unchanged(None, 10, "c1")
    held = RawRow("k", 10, "c1", "clinical", Outcome.HELD)
    assert rules.clinical_needs_checking(held, 10, "c1")  # the configuration may have changed
    assert not rules.clinical_needs_checking(replace_outcome(held, Outcome.FILED), 10, "c1")
    assert rules.clinical_needs_checking(None, 10, "c1")


def replace_outcome(row: RawRow, outcome: Outcome) -> RawRow:
    from dataclasses import replace

    return replace(row, outcome=outcome)


def test_an_unforeseen_failure_becomes_a_one_line_reason_that_quotes_no_value():
    try:
        raise ValueError("PatientName SMITH^JOHN is not valid")  # a message may quote a value of the object
    except ValueError as exc:
        reason = rules.unexpected(exc)
    assert reason.startswith("could not be read: unexpected ValueError in test_loader_rules.py:")
    assert "SMITH" not in reason and "\n" not in reason
    assert rules.unexpected(KeyError()) == "could not be read: unexpected KeyError"


def test_a_catalog_is_believed_only_about_its_own_store():
    def verdict(**kw):
        args = dict(catalog_id="A", store_id="A", catalog_empty=False, claims_hold=True, store_has_processed=True)
        args.update(kw)
        return catalog_verdict(**args)[0]

    assert verdict() == "use"
    assert verdict(store_id="B") == "refuse"  # another store
    assert verdict(store_id=None) == "refuse"  # a new or restored store with the same name
    assert verdict(claims_hold=False) == "refuse"  # it lists objects the store does not hold
    assert verdict(catalog_id=None, catalog_empty=True) == "refuse"  # would publish zeros
    assert verdict(catalog_id=None, catalog_empty=True, store_has_processed=False) == "adopt"  # a first load
    assert verdict(catalog_id=None, store_id=None) == "adopt"  # made before catalogs were bound, and true
    assert verdict(catalog_id=None, store_id=None, claims_hold=False) == "refuse"
    assert verdict(catalog_empty=True, claims_hold=True) == "use"  # bound by a load killed before it recorded


def test_each_centre_shows_its_rule_and_counts():
    from nccid.warehouse.config import CentreRow, WarehouseConfig, centre_rows

    config = WarehouseConfig(("raw-a/",), 50, frozenset({"S"}), frozenset({"T"}), frozenset({"V"}))
    assert centre_rows(config, [("S", 3, 2), ("X", 1, 0)]) == [
        CentreRow("S", "split", 3, 2),
        CentreRow("T", "training", 0, 0),
        CentreRow("V", "validation", 0, 0),
        CentreRow("X", "", 1, 0),
    ]


def test_only_two_plain_md5s_that_differ_say_the_copied_bytes_changed():
    md5a, md5b = "0cc175b9c0f1b6a831c399e269772661", "92eb5ffee6ae2fec3ad71c777531578f"
    assert rules.copied_other_bytes(md5a, md5b)
    assert not rules.copied_other_bytes(md5a, md5a)
    assert not rules.copied_other_bytes(md5a, md5a.upper())  # the same digest, however a store spells it
    assert not rules.copied_other_bytes(md5a, "")  # the store gave no checksum
    assert not rules.copied_other_bytes(f"{md5a}-3", md5b)  # a multipart ETag depends on the upload, not the bytes
    assert not rules.copied_other_bytes(md5a, f"{md5b}-2")


def test_an_object_that_changed_while_being_filed_is_not_recorded_and_says_why():
    base = RawRow("raw-a/2020-04-01/images/x.dcm", 10, "c", "image", Outcome.QUARANTINED, patient="Covid1")
    row = rules.placed(base, "changed", "training/xray/Covid1/s/se/i.dcm", rebuilding=False)
    assert row.outcome == Outcome.UNFILED and row.dest == ""
    assert "changed while it was being filed" in row.reason and "next load" in row.reason
