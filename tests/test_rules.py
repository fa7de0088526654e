"""Pure rules: the reference split, site rules, config validation, and the raw-layout parser."""

import pytest

from nccid.contracts.layout import LayoutError, metadata_key, parse_processed_key, parse_raw_key
from nccid.warehouse.config import ConfigError, WarehouseConfig, group_for, hash_split_is_training

CONFIG = WarehouseConfig(
    raw_prefixes=("raw-a/",),
    training_percentage=50,
    split_sites=frozenset({"S"}),
    training_sites=frozenset({"T"}),
    validation_sites=frozenset({"V"}),
)


@pytest.mark.parametrize(
    ("pseudonym", "training"), [("Covid1", True), ("Covid20", True), ("Covid14", False), ("Covid149", False)]
)
def test_reference_split_vectors_at_50_percent(pseudonym, training):
    assert hash_split_is_training(pseudonym, 50) is training
    assert group_for("S", pseudonym, CONFIG) == ("training" if training else "validation")


def test_split_normalises_case_and_spaces_and_respects_the_extremes():
    assert hash_split_is_training(" covid14 ", 50) is hash_split_is_training("Covid14", 50)
    assert all(hash_split_is_training(f"Covid{n}", 100) for n in range(50))
    assert not any(hash_split_is_training(f"Covid{n}", 0) for n in range(50))


def test_site_rules_override_the_split_and_unknown_sites_get_no_group():
    assert group_for("T", "Covid14", CONFIG) == "training"
    assert group_for("V", "Covid1", CONFIG) == "validation"
    assert group_for("Nowhere", "Covid1", CONFIG) is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"raw_prefixes": "raw-a", "training_percentage": 50}, "raw_prefixes"),
        ({"raw_prefixes": ["a/"], "training_percentage": 50}, "raw-<uploader>"),
        ({"raw_prefixes": [], "training_percentage": 101}, "training_percentage"),
        ({"raw_prefixes": [], "training_percentage": True}, "training_percentage"),
        (
            {"raw_prefixes": [], "training_percentage": 5, "sites": {"split": ["A"], "training": ["A"]}},
            "both",
        ),
        ({"raw_prefixes": [], "training_percentage": 5, "sites": {"spilt": []}}, "spilt"),
    ],
)
def test_config_errors_name_the_field(doc, message):
    with pytest.raises(ConfigError, match=message):
        WarehouseConfig.from_json(doc)


def test_raw_keys_parse_and_misplaced_files_say_why():
    raw = parse_raw_key("raw-a/2020-04-01/images/sub/dir/x.dcm")
    assert (raw.prefix, raw.date, raw.area, raw.rest) == ("raw-a/", "2020-04-01", "images", "sub/dir/x.dcm")
    with pytest.raises(LayoutError, match="upload date"):
        parse_raw_key("raw-a/2020-13-01/images/x.dcm")
    with pytest.raises(LayoutError, match="neither 'data' nor 'images'"):
        parse_raw_key("raw-a/2020-04-01/misc/x.dcm")
    with pytest.raises(LayoutError, match="sub-folders"):
        parse_raw_key("raw-a/2020-04-01/data/x/Covid1_data.json")


def test_processed_keys_round_trip():
    key = "training/xray/Covid1/1.2/1.2.3/1.2.3.4.dcm"
    assert metadata_key(key) == "training/xray-metadata/Covid1/1.2/1.2.3/1.2.3.4.json"
    parsed = parse_processed_key(key)
    assert (parsed.group, parsed.kind, parsed.patient, parsed.folder, parsed.sop) == (
        "training",
        "image",
        "Covid1",
        "xray",
        "1.2.3.4",
    )
    clin = parse_processed_key("validation/data/Covid7/status_2020-04-01.json")
    assert (clin.kind, clin.clinical_kind, clin.date) == ("clinical", "status", "2020-04-01")
    with pytest.raises(LayoutError):
        parse_processed_key("training/xray/NHS123/1.2/1.2.3/1.2.3.4.dcm")
