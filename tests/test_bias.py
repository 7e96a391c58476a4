import numpy as np
import pytest

from boneage.bias import bias_verdict, errors_by_band_and_sex, errors_by_sex, sex_gaps


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
    assert bias_verdict(g).startswith("No sex bias detected")


def test_planted_bias_is_found(patients):
    y, male, p = patients
    late_for_girls = p - np.where(male, 0, 9.0)  # girls' bone age under-estimated by 9 months
    g = sex_gaps(y, late_for_girls, male, n_boot=500, seed=0)
    assert g.loc["mean_signed_error"].male_minus_female == pytest.approx(9.0, abs=1.5)
    assert g.loc["mean_signed_error"].ci_low > 0  # boys' errors are higher than girls' (girls' negative)
    v = bias_verdict(g)
    assert v.startswith("Sex bias") and "worse for girls" in v


def test_threshold_is_a_parameter(patients):
    y, male, p = patients
    worse_for_boys = p + np.where(male, 3.0, 0) * np.sign(p - y)  # boys' errors 3 months larger
    g = sex_gaps(y, worse_for_boys, male, n_boot=500, seed=0)
    assert bias_verdict(g, max_gap_months=2).startswith("Sex bias")
    assert "larger than 5" not in bias_verdict(g, max_gap_months=5)


def test_seeded_bootstrap_repeats(patients):
    y, male, p = patients
    a, b = sex_gaps(y, p, male, 200, seed=5), sex_gaps(y, p, male, 200, seed=5)
    assert a.equals(b)


def test_one_sex_only():
    g = sex_gaps([10, 20], [12, 18], [True, True], n_boot=10)
    assert bias_verdict(g).startswith("Sex bias not assessed")


def test_by_band_and_sex(patients):
    y, male, p = patients
    t = errors_by_band_and_sex(y, p, male)
    assert len(t) == 10 and t.n.sum() == len(y)
