"""Execute the course headless, as `boneage run` does, and check what each notebook wrote."""
import json, os, subprocess, sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from boneage.cli import main, pipeline_notebooks, render_readme

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-images", "24", "--phantom-size", "128", "--image-size", "72", "--seed", "3", "--epochs", "2"]


def boneage_run(out, *args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", "import sys; from boneage.cli import main; sys.exit(main())", "run", "--out", str(out), "--no-progress", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = boneage_run(out, *TINY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


def test_every_pipeline_notebook_ran(phantom_run):
    out, r = phantom_run
    names = [p.name for p in pipeline_notebooks()]
    assert names == ["00_data.ipynb", "01_phantom.ipynb", "02_preprocessing.ipynb", "03_model.ipynb",
                     "04_training.ipynb", "05_evaluation.ipynb", "06_bias.ipynb", "07_gradcam.ipynb",
                     "08_inference.ipynb"]
    for name in names:
        nb = nbformat.read(out / "notebooks" / name, as_version=4)
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
        assert (out / (Path(name).stem + ".json")).exists()
    assert f"{len(names)} notebooks in" in r.stdout


def test_data_notebook(phantom_run):
    out, _ = phantom_run
    w = json.loads((out / "00_data.json").read_text())
    assert w["data"] == "phantom" and w["n_rows"] == 24 and w["n_problems"] == 0
    assert sum(w["split_counts"].values()) == 24 and w["split_counts"]["train"] == 16
    assert (out / "age_distribution.png").stat().st_size > 10_000
    split = pd.read_csv(out / "split.csv")
    assert list(split.columns) == ["id", "bone_age_months", "male", "split"] and len(split) == 24
    assert (out / "phantom" / "labels.csv").exists() and len(list((out / "phantom" / "images").glob("*.png"))) == 24
    assert json.loads((out / "phantom" / "phantom.json").read_text())["recipe"]["size"] == 128


def test_phantom_notebook(phantom_run):
    out, _ = phantom_run
    w = json.loads((out / "01_phantom.json").read_text())
    assert w["figures"] == ["phantom_vs_real.png"] and w["phantom_size"] == 128
    assert (out / "phantom_vs_real.png").stat().st_size > 50_000


def test_preprocessing_notebook(phantom_run):
    out, _ = phantom_run
    w = json.loads((out / "02_preprocessing.json").read_text())
    assert w["image_size"] == 72 and w["n_cached"] == 24
    assert w["cache_mib"] == round(24 * 72 * 72 / 2**20, 2)
    assert len(list((out / "cache").glob("radiographs-72-*.npy"))) == 1


def test_model_notebook(phantom_run):
    out, _ = phantom_run
    w = json.loads((out / "03_model.json").read_text())
    assert w["backbone"] == "Xception" and w["image_size"] == 72 and w["parameters"] > 20_000_000
    table = pd.read_csv(out / "model_parameters.csv")
    assert table.parameters.sum() == w["parameters"]


def test_training_notebook(phantom_run):
    out, r = phantom_run
    w = json.loads((out / "04_training.json").read_text())
    assert w["backend"] == "tensorflow" and w["precision"] == "float32" and w["epochs_run"] == 2
    assert set(w["test"]) == {"r2", "mae", "rmse"} and w["n_test"] == 4
    assert (out / "model" / "best.keras").exists() and (out / "training_history.png").stat().st_size > 10_000
    assert len(pd.read_csv(out / "model" / "history.csv")) == 2
    assert "epoch 2/2" in r.stdout  # per-epoch progress reaches the terminal


def test_evaluation_notebook(phantom_run):
    out, _ = phantom_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"] == "phantom, 4 test images" and m["regression"]["n"] == 4
    assert {"r2", "mae", "rmse", "median_ae", "within_6", "within_12", "within_24"} <= set(m["regression"])
    assert set(m["stages"]) >= {"accuracy", "qwk", "recall", "precision", "confusion"}
    preds = pd.read_csv(out / "predictions.csv")
    test = preds[preds.split == "test"]
    assert m["regression"]["mae"] == pytest.approx((test.predicted - test.bone_age_months).abs().mean())
    conformal = json.loads((out / "model" / "conformal.json").read_text())
    assert conformal["coverage"] == 0.9 and conformal["n_valid"] == 4
    for f in ["prediction_scatter.png", "residuals.png", "error_by_age_band.png", "confusion_matrix.png"]:
        assert (out / f).stat().st_size > 5_000, f
    results = (out / "results.md").read_text()
    assert "this run (phantom, 4 test images)" in results and "reference (RSNA test set, published)" in results


def test_bias_notebook(phantom_run):
    out, _ = phantom_run
    w = json.loads((out / "06_bias.json").read_text())
    assert w["verdict"].startswith(("No sex bias", "Sex bias")) and (out / "sex_bias.png").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["sex_bias"]["verdict"] == w["verdict"] and w["verdict"] in (out / "results.md").read_text()


def test_gradcam_notebook(phantom_run):
    out, _ = phantom_run
    w = json.loads((out / "07_gradcam.json").read_text())
    assert w["layer"] == "block14_sepconv2_act" and len(w["figures"]) == 4
    assert all((out / f).exists() for f in w["figures"])
    loc = w["localisation"]
    assert loc["n_images"] == 4 and loc["maximum"] > 1 and loc["trained"] >= 0 and loc["untrained"] >= 0


def test_inference_notebook(phantom_run):
    out, _ = phantom_run
    w = json.loads((out / "08_inference.json").read_text())
    assert w["n_test"] == 4 and (out / "inference_inputs.png").stat().st_size > 10_000
    info = json.loads((out / "model" / "bundle.json").read_text())
    assert info["format"] == "boneage-bundle/1" and info["dataset"]["kind"] == "phantom"
    assert info["preprocessing"]["image_size"] == 72 and info["stages"]["edges_years"] == [10, 18]
    assert info["onnx"]["max_abs_diff_months"] < 0.01 and (out / "model" / "model.onnx").stat().st_size > 1e6
    assert "conformal" in info and info["test_metrics"]["n"] == 4


def test_rerun_reuses_phantom_and_cache(phantom_run, tmp_path):
    out, _ = phantom_run
    before = {p: p.stat().st_mtime_ns for p in [out / "phantom" / "images" / "1.png", *(out / "cache").glob("*.npy")]}
    r = boneage_run(out, *TINY, "--only", "02")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_run_on_real_radiographs(rsna_sample, tmp_path):
    r = boneage_run(tmp_path, "--data-dir", str(rsna_sample), "--image-size", "72", "--epochs", "1",
                    "--only", "00", "01", "02", "04", "05", "06", "07", "08")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    w = json.loads((tmp_path / "00_data.json").read_text())
    assert w["data"] == "rsna-sample" and w["n_rows"] == 40
    assert json.loads((tmp_path / "02_preprocessing.json").read_text())["n_cached"] == 40
    assert json.loads((tmp_path / "01_phantom.json").read_text())["real_images_shown"] is True
    assert not (tmp_path / "phantom").exists()  # real data: no phantom generated
    w = json.loads((tmp_path / "04_training.json").read_text())  # the real-image path end to end (no accuracy claim)
    assert w["epochs_run"] == 1 and (tmp_path / "model" / "best.keras").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["data"] == "rsna-sample, 6 test images"
    info = json.loads((tmp_path / "model" / "bundle.json").read_text())
    assert info["dataset"]["kind"] == "radiographs" and info["dataset"]["n_images"] == 40
    assert json.loads((tmp_path / "08_inference.json").read_text())["n_test"] == 6
    g = json.loads((tmp_path / "07_gradcam.json").read_text())
    assert g["localisation"] == {} and len(g["figures"]) == 4  # real images: overlays only, no masks to score


def test_bad_data_dir_is_one_line(tmp_path, capsys):
    assert main(["run", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data folder not found" in err
    (tmp_path / "d").mkdir(); (tmp_path / "d" / "labels.csv").write_text("id,age\n1,2\n")
    assert main(["run", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path)]) == 1
    assert "no png/jpg images" in capsys.readouterr().err
    (tmp_path / "d" / "1.png").write_bytes(b"")  # an image file is there; the CSV is wrong
    assert main(["run", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path)]) == 1
    assert "no column for" in capsys.readouterr().err


def test_failing_notebook_stops_with_one_line_and_keeps_earlier_results(tmp_path, capsys):
    nbs = tmp_path / "nbs"; nbs.mkdir()
    good = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("out_dir = ''", metadata={"tags": ["parameters"]}),
                                           nbformat.v4.new_code_cell("open(out_dir + '/a.txt', 'w').write('x')")])
    bad = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("out_dir = ''", metadata={"tags": ["parameters"]}),
                                          nbformat.v4.new_code_cell("raise ValueError('boom')")])
    for nb in (good, bad): nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(good, nbs / "00_good.ipynb"); nbformat.write(bad, nbs / "01_bad.ipynb")
    assert main(["run", "--nbs-dir", str(nbs), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("boneage: 01_bad.ipynb failed in cell") and "ValueError: boom" in err and "\n" not in err
    assert (tmp_path / "o" / "a.txt").read_text() == "x"
    assert (tmp_path / "o" / "notebooks" / "01_bad.ipynb").exists()


def test_readme_is_rendered_from_index(tmp_path):
    dest = render_readme(dest=tmp_path / "README.md")
    assert dest.read_text() == (ROOT / "README.md").read_text(), "README.md is stale: run `boneage readme`"
    text = dest.read_text()
    assert text.count("```sh") >= 2 and "boneage run" in text and "pytest" in text and "Halabi" in text
