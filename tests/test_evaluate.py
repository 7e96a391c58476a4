import numpy as np
import pytest

from boneage.evaluate import (age_band, conformal_quantile, fit_conformal, mae_by_age_band, predict_interval,
                              regression_metrics, results_table, stage, stage_metrics)


def test_regression_metrics_against_hand_computation():
    y = np.array([12.0, 60, 100, 150, 200])
    p = np.array([20.0, 55, 100, 170, 190])
    e = p - y  # 8, -5, 0, 20, -10
    m = regression_metrics(y, p)
    assert m["n"] == 5
    assert m["mae"] == pytest.approx(np.mean(np.abs(e)))
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean(e ** 2)))
    assert m["median_ae"] == pytest.approx(8.0)
    assert m["r2"] == pytest.approx(1 - np.sum(e ** 2) / np.sum((y - y.mean()) ** 2))
    assert (m["within_6"], m["within_12"], m["within_24"]) == (0.4, 0.8, 1.0)


def test_age_bands():
    assert list(age_band([0, 23, 24, 71, 72, 119, 120, 167, 168, 228, 300])) == \
        ["0–2 y", "0–2 y", "2–6 y", "2–6 y", "6–10 y", "6–10 y", "10–14 y", "10–14 y", "14–19 y", "14–19 y", "14–19 y"]
    t = mae_by_age_band([12, 12, 130], [14, 8, 130])
    assert t.set_index("band").loc["0–2 y", "mae"] == 3 and t.set_index("band").loc["10–14 y", "n"] == 1
    assert t.set_index("band").loc["0–2 y", "mean_error"] == -1


def test_stages():
    assert list(stage([0, 119.9, 120, 215.9, 216])) == ["Child", "Child", "Adolescent", "Adolescent", "Adult"]
    s = stage_metrics([50, 60, 130, 140, 220], [55, 130, 135, 230, 225])
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["confusion"] == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert s["recall"]["Child"] == 0.5 and s["precision"]["Adult"] == 0.5
    from sklearn.metrics import cohen_kappa_score
    assert s["qwk"] == pytest.approx(cohen_kappa_score([0, 0, 1, 1, 2], [0, 1, 1, 2, 2], weights="quadratic"))
    assert stage_metrics([10, 20], [30, 40])["accuracy"] == 1.0  # one class: accuracy, no kappa
    assert np.isnan(stage_metrics([10, 20], [30, 40])["qwk"])


def test_conformal_quantile_is_finite_sample_corrected():
    r = np.arange(1, 11, dtype=float)  # 10 residuals
    assert conformal_quantile(r, 0.8) == 9.0  # ceil(11 * 0.8) = 9th smallest
    assert conformal_quantile(r, 0.95) == np.inf  # not enough residuals for 95%


@pytest.mark.parametrize("coverage", [0.8, 0.9])
def test_conformal_coverage_on_a_seeded_run(coverage):
    rng = np.random.default_rng(7)
    y = rng.uniform(0, 228, 6000)
    pred = y + rng.normal(0, 6, 6000) * (1 + y / 100)  # errors grow with age
    conf = fit_conformal(y[:3000], pred[:3000], coverage)
    for by_band in (False, True):
        lo, hi = predict_interval(pred[3000:], conf, by_band=by_band)
        covered = ((y[3000:] >= lo) & (y[3000:] <= hi)).mean()
        assert abs(covered - coverage) < 0.03, (by_band, covered)
    assert conf["band_half_width"]["0–2 y"] < conf["band_half_width"]["14–19 y"]  # narrower where errors are small


def test_results_table_labels_the_data():
    metrics = {"regression": {"r2": 0.8, "mae": 14.2, "rmse": 17.7, "within_12": 0.48},
               "stages": {"accuracy": 0.88, "qwk": 0.73}}
    t = results_table(metrics, "phantom, 60 test images", sex_gap=1.5)
    assert "this run (phantom, 60 test images)" in t and "reference (RSNA test set, published)" in t
    assert "| MAE (months) | 14.20 | 9.04 |" in t and "| sex MAE gap (months) | +1.50 | < 2 |" in t
