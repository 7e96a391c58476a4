import numpy as np
import pytest

from boneage.bias import age_adjusted_gap, bias_outcome, bias_verdict, errors_by_band_and_sex, errors_by_sex, sex_gaps


@pytest.fixture
def patients():
    rng = np.random.default_rng(3)
    n = 800
    y, male = rng.uniform(12, 216, n), rng.random(n) < 0.5
    return y, male, y + rng.normal(0, 8, n)


def test_per_sex_table(patients):
    y, male, p = patients
    t = errors_by_sex(y, p, male)
    assert list(t.index) == ["female", "male"] and t.loc["male", "n"] == male.sum()
    assert t.loc["female", "mae"] == pytest.approx(np.abs(p - y)[~male].mean())


def test_unbiased_predictions_pass(patients):
    y, male, p = patients
    g = sex_gaps(y, p, male, n_boot=500, seed=0)
    assert g.loc["mae"].ci_low <= 0 <= g.loc["mae"].ci_high
    outcome, text = bias_verdict(g)
    assert outcome == "no bias" and text.startswith("No sex bias: ") and "within the ±2-month margin" in text


def test_planted_bias_is_found(patients):
    y, male, p = patients
    late_for_girls = p - np.where(male, 0, 9.0)  # girls' bone age under-estimated by 9 months
    g = sex_gaps(y, late_for_girls, male, n_boot=500, seed=0)
    assert g.loc["mean_signed_error"].male_minus_female == pytest.approx(9.0, abs=1.5)
    assert g.loc["mean_signed_error"].ci_low > 0  # boys' errors are higher than girls' (girls' negative)
    outcome, text = bias_verdict(g)
    assert outcome == "bias" and "worse for girls" in text


def test_the_margin_is_a_parameter(patients):
    y, male, p = patients
    worse_for_boys = p + np.where(male, 3.0, 0) * np.sign(p - y)  # boys' errors 3 months larger
    g = sex_gaps(y, worse_for_boys, male, n_boot=500, seed=0)
    assert g.loc["mae"].male_minus_female == pytest.approx(2.69, abs=0.01)  # 3 months, less the sample's own gap
    assert bias_verdict(g, margin=2)[0] == "bias"
    assert bias_verdict(g, margin=5)[0] == "no bias"  # the whole interval inside ±5 months
    assert bias_verdict(g, margin=3.2)[0] == "inconclusive"  # a real gap, but its interval reaches past the margin


def test_too_few_patients_is_inconclusive_not_fair():
    rng = np.random.default_rng(0)
    e = rng.normal(0, 8, 20)
    y = rng.uniform(12, 216, 40)
    p = y + np.concatenate([e, rng.permutation(e)])  # girls and boys with exactly the same errors: a gap of 0
    g = sex_gaps(y, p, np.arange(40) >= 20, n_boot=500, seed=0)
    assert g.loc["mae"].male_minus_female == pytest.approx(0)
    assert bias_verdict(g)[0] == "inconclusive" and g.loc["mae"].ci_high - g.loc["mae"].ci_low > 4


@pytest.mark.parametrize("gap,lo,hi,outcome", [(0.3, -1.9, 1.9, "no bias"), (0.3, -2.1, 2.5, "inconclusive"),
                                               (2.5, 0.5, 4.5, "bias"), (1.5, 0.2, 2.8, "inconclusive"),
                                               (-3.0, -5.0, -1.0, "bias"), (3.3, -1.7, 8.8, "inconclusive")])
def test_three_outcomes(gap, lo, hi, outcome):
    assert bias_outcome(gap, lo, hi, margin=2.0) == outcome


def test_r2_gap_with_its_interval(patients):
    y, male, p = patients
    g = sex_gaps(y, p, male, n_boot=300, seed=0)
    t = errors_by_sex(y, p, male)
    assert g.loc["r2"].male_minus_female == pytest.approx(t.loc["male", "r2"] - t.loc["female", "r2"])
    assert g.loc["r2"].ci_low < g.loc["r2"].male_minus_female < g.loc["r2"].ci_high


def test_seeded_bootstrap_repeats(patients):
    y, male, p = patients
    a, b = sex_gaps(y, p, male, 200, seed=5), sex_gaps(y, p, male, 200, seed=5)
    assert a.equals(b)


def test_one_sex_only():
    g = sex_gaps([10, 20], [12, 18], [True, True], n_boot=10)
    assert bias_verdict(g) == ("not assessed", "Sex bias not assessed: the test split lacks patients of one sex.")


def test_by_band_and_sex(patients):
    y, male, p = patients
    t = errors_by_band_and_sex(y, p, male)
    assert len(t) == 10 and t.n.sum() == len(y)


def test_the_age_adjusted_gap_takes_the_age_mix_out():
    "Errors that depend on age only, boys older than girls: the raw MAE gap is large, the age-adjusted gap near 0."
    rng = np.random.default_rng(0)
    male = rng.random(2000) < 0.5
    y = np.where(male, rng.uniform(60, 228, 2000), rng.uniform(12, 180, 2000))  # boys older
    pred = y + rng.normal(0, 1, 2000) * np.where(y > 168, 25, 8)  # the oldest are hardest, for both sexes
    raw = errors_by_sex(y, pred, male).mae
    adjusted = age_adjusted_gap(y, pred, male, n_boot=300, seed=1)
    assert raw.male - raw.female > 3 and adjusted["ci_low"] < 0 < adjusted["ci_high"] and abs(adjusted["male_minus_female"]) < 1.5
    assert adjusted["share"] > 0.9  # bands with one sex only are left out, and say how much they hold
    assert np.isnan(age_adjusted_gap(y[male], pred[male], male[male])["male_minus_female"])  # one sex: nothing to compare
