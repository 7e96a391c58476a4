import numpy as np
import pytest

from boneage.clinical import prediction_interval
from boneage.evaluate import (age_band, bootstrap_ci, conformal_quantile, fit_conformal, mae_by_age_band, regression_cis,
                              regression_metrics, results_markdown, stage, stage_metrics)


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
    assert t.set_index("band").loc["0–2 y", "mean_signed_error"] == -1


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
    assert conformal_quantile(r, 0.95) is None  # not enough residuals for 95%


@pytest.mark.parametrize("coverage", [0.8, 0.9])
def test_conformal_coverage_on_a_seeded_run(coverage):
    rng = np.random.default_rng(7)
    y = rng.uniform(0, 228, 6000)
    pred = y + rng.normal(0, 6, 6000) * (1 + y / 100)  # errors grow with age
    conf = fit_conformal(y[:3000], pred[:3000], coverage)
    for c in (conf, {**conf, "band_half_width": {}}):  # per band, and the global half-width alone
        lo, hi = prediction_interval(pred[3000:], c)
        covered = ((y[3000:] >= lo) & (y[3000:] <= hi)).mean()
        assert abs(covered - coverage) < 0.03, (c["band_half_width"], covered)
    assert conf["band_half_width"]["0–2 y"] < conf["band_half_width"]["14–19 y"]  # narrower where errors are small


def test_bootstrap_intervals_cover_known_values():
    rng = np.random.default_rng(11)
    y = rng.uniform(0, 228, 500)
    p = y + rng.normal(0, 10, 500)
    ci = regression_cis(y, p, n_boot=800, seed=1)
    assert ci["mae"][0] < 10 * np.sqrt(2 / np.pi) < ci["mae"][1] and ci["rmse"][0] < 10 < ci["rmse"][1]
    assert 0.1 < ci["mae"][1] - ci["mae"][0] < 1.5  # about 2 × 1.96 × SD/√n
    assert bootstrap_ci(np.mean, np.arange(10.0), n_boot=200, seed=3) == bootstrap_ci(np.mean, np.arange(10.0), n_boot=200, seed=3)
    s = stage_metrics(y, p, n_boot=300, seed=0)
    assert s["ci"]["accuracy"][0] <= s["accuracy"] <= s["ci"]["accuracy"][1]


def test_every_metric_reads_the_same_resamples():
    "One draw of rows serves every metric, and gives what each metric bootstrapped on its own with the same seed gives."
    from sklearn.metrics import r2_score
    rng = np.random.default_rng(5)
    y = rng.uniform(0, 228, 120); p = y + rng.normal(0, 12, 120)
    ci = regression_cis(y, p, n_boot=300, seed=4)
    assert ci["mae"] == bootstrap_ci(lambda a, b: np.abs(b - a).mean(), y, p, n_boot=300, seed=4)
    assert ci["r2"] == bootstrap_ci(r2_score, y, p, n_boot=300, seed=4)
    assert ci["mae"] != bootstrap_ci(lambda a, b: np.abs(b - a).mean(), y, p, n_boot=300, seed=5)  # the draw does matter


def test_results_markdown_carries_every_reference_number():
    metrics = {"data": "phantom, 520 test images", "data_kind": "phantom", "image_size": 96,
               "regression": {"r2": 0.8, "mae": 14.2, "rmse": 17.7, "within_12": 0.48},
               "regression_ci": {"r2": [0.77, 0.83], "mae": [13.1, 15.3], "rmse": [16.2, 19.1], "within_12": [0.44, 0.52]},
               "stages": {"accuracy": 0.88, "qwk": 0.73, "recall": {"Child": 0.95, "Adolescent": 0.8, "Adult": None},
                          "support": {"Child": 300, "Adolescent": 200, "Adult": 20}, "ci": {"accuracy": [0.85, 0.91], "qwk": [0.7, 0.76]}},
               "conformal": {"coverage": 0.9, "half_width": 25.0, "n_calibration": 140, "calibrated_on": "calib", "test_coverage": 0.91},
               "sex_bias": {"per_sex": {"female": {"r2": 0.86}, "male": {"r2": 0.76}},
                            "gaps": {"mae": {"male_minus_female": 3.29, "ci_low": -1.67, "ci_high": 8.82},
                                     "r2": {"male_minus_female": -0.1, "ci_low": -0.2, "ci_high": 0.0}},
                            "verdict": "Sex bias inconclusive: …"}}
    t = results_markdown(metrics)
    assert "| metric | this run (phantom, 520 test images) | 95% CI | reference README (RSNA; split not stated) |" in t
    assert "| MAE (months) | 14.20 | 13.10 to 15.30 | 9.04 |" in t and "| Child recall | 95.0% of 300 | — | 95% |" in t
    assert "| Adult recall | — | — | — |" in t and "| R² girls / boys | 0.860 / 0.760 | — | — |" in t
    assert "| MAE gap (months, boys − girls) | +3.29 | -1.67 to +8.82 | < 2 |" in t and "| R² gap (boys − girls) | -0.100 |" in t
    assert "- R² ≥ 0.92: fail (0.800)" in t and "- MAE ≤ 12 months: fail (14.20)" in t and "test the pipeline" in t
    assert "calibrated on 140 calib images" in t and "optimistic" not in t and t.rstrip().endswith("Sex bias inconclusive: …")
    on_valid = results_markdown({**metrics, "conformal": {**metrics["conformal"], "calibrated_on": "valid"}})
    assert "the coverage may be optimistic" in on_valid


def test_interval_width_and_coverage_by_age_band_reach_the_results(tmp_path):
    "A 90% interval from 200 calibration images: its width, and its coverage per band of true age, in results.md and a figure."
    from boneage.evaluate import coverage_by_age_band, plot_coverage, results_markdown
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 228, 600); pred = y + rng.normal(0, 1, 600) * np.where(y > 168, 25, 8)  # the oldest are hardest
    conf = fit_conformal(y[:200], pred[:200], 0.9, min_per_band=10**6)  # one global half-width, as a small calibration split gives
    lo, hi = prediction_interval(pred[200:], conf)
    table = coverage_by_age_band(y[200:], lo, hi)
    assert table.n.sum() == 400 and table.coverage.iloc[-1] < table.coverage.iloc[1]  # the 14–19 y band is covered least
    width = table.set_index(table.band.astype(str)).mean_width
    assert width["6–10 y"] == pytest.approx(2 * conf["half_width"]) and (width <= 2 * conf["half_width"] + 1e-9).all()  # clipped at 0 and 240
    plot_coverage(table, 0.9, tmp_path / "coverage.png")
    assert (tmp_path / "coverage.png").stat().st_size > 10_000
    metrics = {"data": "phantom, 400 test images", "data_kind": "phantom", "regression": {"r2": 0.9, "mae": 9.0, "rmse": 12.0, "within_12": 0.7},
               "regression_ci": {k: [0, 1] for k in ("r2", "mae", "rmse", "within_12")},
               "stages": {"accuracy": 0.9, "qwk": 0.8, "recall": {"Child": 0.9, "Adolescent": 0.8, "Adult": float("nan")},
                          "support": {"Child": 300, "Adolescent": 100, "Adult": 0}},
               "conformal": {**conf, "test_coverage": 0.9}, "coverage_by_band": table.assign(band=table.band.astype(str)).to_dict("records"),
               "limits_of_agreement": {"bias": 0.5, "low": -20.0, "high": 21.0}}
    t = results_markdown(metrics)
    assert f"an interval {2 * conf['half_width']:.0f} months wide" in t and "Coverage by band of true age: 0–2 y" in t
    assert "| Adult recall | no adults in the test split | — | — |" in t and "limits of agreement -20.0 to +21.0 months" in t
