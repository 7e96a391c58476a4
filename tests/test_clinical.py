"""The clinical rules: defined once, and everything else uses that one definition."""
import numpy as np
import pytest

from boneage import clinical
from boneage.clinical import (InputError, age_band_index, assessment, band_labels, parse_age, parse_sex,
                              prediction_interval, stage_index, stage_name)


@pytest.mark.parametrize("value,male", [("M", True), ("f", False), (" Male ", True), ("FEMALE", False), ("True", True),
                                        ("false", False), ("1", True), ("0", False), ("boy", True), ("girl", False),
                                        (True, True), (np.bool_(False), False), (1, True), (0.0, False)])
def test_sex_spellings(value, male):
    assert parse_sex(value) is male


@pytest.mark.parametrize("value", ["X", "", "unknown", "2", None])
def test_unknown_sex_names_the_item(value):
    with pytest.raises(InputError, match=r"^row 7: unknown sex"):
        parse_sex(value, "row 7")


@pytest.mark.parametrize("value,why", [(-0.1, "outside 0–240"), (240.5, "outside 0–240"), ("nan", "outside"),
                                       ("inf", "outside"), ("ten", "is not a number"), (None, "is not a number")])
def test_ages_outside_the_range(value, why):
    with pytest.raises(InputError, match=why):
        parse_age(value, "x.png")
    assert parse_age("0") == 0.0 and parse_age(240) == 240.0


def test_bands_and_stages_at_their_edges():
    assert band_labels() == ["0–2 y", "2–6 y", "6–10 y", "10–14 y", "14–19 y"]
    assert age_band_index([-5, 0, 23.99, 24, 167.99, 168, 1000]).tolist() == [0, 0, 0, 1, 3, 4, 4]
    assert stage_index([0, 119.99, 120, 215.99, 216, 400]).tolist() == [0, 0, 1, 1, 2, 2]
    assert stage_name(216, (10, 18)) == "Adult" and stage_name(150, (10, 12)) == "Adult"


def test_interval_uses_the_band_of_the_prediction_and_clamps_at_zero():
    conformal = {"coverage": 0.9, "half_width": 20.0, "bands_years": [0, 2, 6, 10, 14, 19],
                 "band_half_width": {"0–2 y": 8.0, "10–14 y": 15.0}}
    lo, hi = prediction_interval([-3.0, 5.0, 100.0, 130.0], conformal)
    assert lo.tolist() == [0.0, 0.0, 80.0, 115.0] and hi.tolist() == [5.0, 13.0, 120.0, 145.0]
    lo, hi = prediction_interval([100.0], {"coverage": 0.9, "half_width": None, "band_half_width": {}})
    assert np.isnan(lo[0]) and np.isnan(hi[0])


def test_assessment():
    beyond, within = "beyond the model's uncertainty", "within the model's uncertainty"  # not a clinical verdict
    assert [assessment(130, c, 115, 145) for c in (114.9, 115, 145, 145.1)] == [beyond, within, within, beyond]
    assert [assessment(130, c) for c in (117.9, 118, 142, 142.1)] == [beyond, within, within, beyond]
    assert assessment(130, 100, float("nan"), float("nan")) == beyond  # no usable interval: ±12 months


def test_one_definition_used_everywhere():
    from boneage import data, evaluate, inference, bias
    assert data.parse_sex is clinical.parse_sex and data.MAX_BONE_AGE_MONTHS is clinical.MAX_BONE_AGE_MONTHS
    assert inference.parse_sex is clinical.parse_sex and inference.parse_age is clinical.parse_age
    assert evaluate.STAGES is clinical.STAGES and evaluate.AGE_BANDS_YEARS is clinical.AGE_BANDS_YEARS
    assert bias.AGE_BANDS_YEARS is clinical.AGE_BANDS_YEARS
    assert list(evaluate.age_band([23, 24]).astype(str)) == [band_labels()[i] for i in age_band_index([23, 24])]
