"""Execute the course: headless as `boneage run` does, and from nbs/ with the notebooks' own defaults, as a student does."""
import json, os, shutil, signal, subprocess, sys, time

import nbformat
import numpy as np
import pandas as pd
import pytest

from boneage.cli import main
from boneage.course import pipeline_notebooks, render_readme

from conftest import ROOT, TINY_RUN as TINY, boneage_run, course_copy

PIPELINE = ["00_data", "01_phantom", "02_preprocessing", "03_model", "04_training", "05_evaluation", "06_bias",
            "07_gradcam", "07a_gate", "07b_transfer", "08_inference", "08a_batch", "10_app", "11_archive"]


def errors(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]


@pytest.fixture(scope="module")
def phantom_run(tiny_course):
    return tiny_course


def test_every_pipeline_notebook_ran(phantom_run):
    out, r = phantom_run
    assert [p.stem for p in pipeline_notebooks()] == PIPELINE
    for name in PIPELINE:
        nb = nbformat.read(out / "notebooks" / f"{name}.ipynb", as_version=4)
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells) and not errors(out / "notebooks" / f"{name}.ipynb")
        if name not in ("08a_batch", "10_app", "11_archive"): assert (out / f"{name}.json").exists(), name  # these write none
    assert f"{len(PIPELINE)} notebooks in" in r.stdout


def test_data_notebook(phantom_run):
    from boneage.data import PHANTOM_SPLIT_FRACTIONS, part_sizes
    out, _ = phantom_run
    w = json.loads((out / "00_data.json").read_text())
    assert w["data"] == "phantom" and w["n_rows"] == 60 and w["n_problems"] == 0
    assert w["split_counts"] == part_sizes(60, PHANTOM_SPLIT_FRACTIONS)
    split = pd.read_csv(out / "split.csv")
    assert list(split.columns) == ["id", "bone_age_months", "male", "split", "path"] and len(split) == 60
    assert split.path.str.startswith("phantom/images/").all()  # relative: the folder can move
    assert (out / "phantom" / "labels.csv").exists() and len(list((out / "phantom" / "images").glob("*.png"))) == 60
    assert json.loads((out / "phantom" / "phantom.json").read_text())["recipe"]["size"] == 128


def test_preprocessing_record_is_the_one_training_used(phantom_run):
    out, _ = phantom_run
    w = json.loads((out / "02_preprocessing.json").read_text())
    assert w["image_size"] == 72 and w["n_cached"] == 60 and w["cache_mib"] == round(60 * 72 * 72 / 2**20, 2)
    record = json.loads((out / "preprocessing.json").read_text())
    assert json.loads((out / "model" / "bundle.json").read_text())["preprocessing"] == record
    assert w["crop_check_phantoms"]["min_hand_kept"] > 0.995
    assert len(list((out / "cache").glob("radiographs-72-*.npy"))) == 1


def test_training_notebook(phantom_run):
    out, r = phantom_run
    w = json.loads((out / "04_training.json").read_text())
    assert w["backend"] == "tensorflow" and w["precision"] == "float32" and w["epochs_run"] == 2 and w["image_size"] == 72
    assert set(w["valid"]) == {"r2", "mae", "rmse"} and w["n_valid"] == 6  # "did it learn" asks the validation split, not the test split
    assert (out / "model" / "best.keras").exists() and (out / "training_history.png").stat().st_size > 10_000
    assert len(pd.read_csv(out / "model" / "history.csv")) == 2
    assert "epoch 2/2" in r.stdout  # the epoch lines of the run; the resume demonstration is the appendix's (04b, test_docs)


def test_evaluation_and_bias_notebooks(phantom_run):
    out, _ = phantom_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"] == "phantom, 12 test images" and m["regression"]["n"] == 12 and m["data_kind"] == "phantom"
    assert set(m["regression_ci"]) == {"r2", "mae", "rmse", "within_12"}
    assert m["regression_ci"]["mae"][0] <= m["regression"]["mae"] <= m["regression_ci"]["mae"][1]
    assert set(m["stages"]) >= {"accuracy", "qwk", "recall", "precision", "confusion", "ci"}
    preds = pd.read_csv(out / "predictions.csv")
    assert preds.split.value_counts().to_dict() == {"test": 12, "calib": 6, "valid": 6}
    test = preds[preds.split == "test"]
    assert m["regression"]["mae"] == pytest.approx((test.predicted - test.bone_age_months).abs().mean())
    assert m["conformal"]["calibrated_on"] == "calib" and m["conformal"]["n_calibration"] == 6
    assert m["sex_bias"]["outcome"] in ("bias", "no bias", "inconclusive")
    assert m["sex_bias"]["predictions"] == m["predictions"]  # the bias section belongs to these predictions
    results = (out / "results.md").read_text()
    assert "this run (phantom, 12 test images)" in results and "reference README (RSNA; split not stated)" in results
    assert m["sex_bias"]["verdict"] in results and "Child recall" in results and "R² ≥ 0.92" in results
    for f in ["prediction_scatter.png", "residuals.png", "error_by_age_band.png", "confusion_matrix.png", "sex_bias.png"]:
        assert (out / f).stat().st_size > 5_000, f


def test_gradcam_gate_and_inference_notebooks(phantom_run):
    out, _ = phantom_run
    g = json.loads((out / "07_gradcam.json").read_text())
    assert g["stride"] == 8 and g["map_size"] == 9 and g["layer"].startswith("add") and g["method"] == "hirescam"  # 72 / 8: the end of the entry flow
    assert len(g["figures"]) == 4 and all((out / f).exists() for f in g["figures"])
    assert g["localisation"]["n_images"] == 12 and g["localisation"]["maximum"] > 1
    assert {(r["stride"], r["method"], r["map"]) for r in g["localisation"]["by_layer"]} == {
        (s, m, v) for s in (32, 16, 8) for m in ("hirescam", "gradcam") for v in ("signed", "standard")}
    gate = json.loads((out / "07a_gate.json").read_text())
    assert gate["quantile"] == 0.99 and gate["threshold"] > 0
    info = json.loads((out / "model" / "bundle.json").read_text())
    assert info["gate"]["n_threshold"] == 6 and info["gate"]["n_fit"] == 36 and (out / "model" / "gate.npz").exists()
    w = json.loads((out / "08_inference.json").read_text())
    assert w["n_test"] == 12 and info["dataset"]["kind"] == "phantom" and info["stages"]["edges_years"] == [10, 18]
    assert info["onnx"]["max_abs_diff_months"] < 0.01 and (out / "model" / "model.onnx").stat().st_size > 1e6


def test_rerun_reuses_phantom_cache_and_model(phantom_run, tmp_path):
    out = course_copy(phantom_run, tmp_path / "course")  # the same images (linked), cache and model
    before = {p: p.stat().st_mtime_ns for p in [out / "phantom" / "images" / "1.png", *(out / "cache").glob("*.npy"),
                                                out / "model" / "best.keras"]}
    r = boneage_run(out, *TINY, "--only", "02", "04")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "training already finished" in r.stdout and {p: p.stat().st_mtime_ns for p in before} == before


def run_from_nbs(nbs, name, timeout=900):
    "Execute nbs/name.ipynb in its own folder with its own defaults (no injected parameters), as JupyterLab's Run All does."
    from nbclient import NotebookClient
    nb = nbformat.read(nbs / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(nbs)}})
    try: client.execute(); return nb, None
    except Exception as e: return nb, e


def test_a_notebook_opened_too_early_says_which_to_run_first(tiny_course, tmp_path):
    shutil.copytree(ROOT / "nbs", tmp_path / "nbs")
    for name, first in (("05_evaluation", "00_data"), ("02_preprocessing", "00_data")):
        nb, e = run_from_nbs(tmp_path / "nbs", name)
        (err,) = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
        assert err.ename == "MissingStepError" and len(err.traceback) == 1  # one line, no traceback from deep inside
        assert err.traceback[0].endswith(f"split.csv: not found; run the data notebook ({first}) first")
    shutil.rmtree(course_copy(tiny_course, tmp_path / "Bone_age_prediction") / "model")  # the split and the cache, no model
    nb, e = run_from_nbs(tmp_path / "nbs", "05_evaluation")
    (err,) = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert err.traceback == [f"MissingStepError: {tmp_path}/Bone_age_prediction/model: no trained model yet; "
                             "run the training notebook (04_training) first"]


@pytest.mark.long
def test_an_interrupted_course_run_resumes_training(tiny_course, tmp_path):
    "Killed mid-training (kernel and all), the same command continues from the last finished epoch. From a local weights file."
    import keras
    out = course_copy(tiny_course, tmp_path / "run")
    weights = tmp_path / "xception_notop.weights.h5"  # what an offline user passes instead of "imagenet"
    keras.applications.Xception(include_top=False, weights=None, input_shape=(72, 72, 3)).save_weights(weights)
    args = [*TINY[:-2], "--epochs", "4", "--only", "04", "--weights", str(weights), "--batch-size", "4", "--learning-rate", "1e-4"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    p = subprocess.Popen([sys.executable, "-m", "boneage", "run", "--out", str(out), "--no-progress", *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    state = out / "model" / "checkpoint" / "state.json"
    deadline = time.time() + 600
    while time.time() < deadline and not (state.exists() and json.loads(state.read_text())["epoch"] >= 2): time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL); p.wait()  # the whole run, kernel included
    done = json.loads(state.read_text())["epoch"]
    assert 2 <= done < 4
    r = boneage_run(out, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"epoch {done + 1}/4" in r.stdout and "epoch 1/4" not in r.stdout
    assert pd.read_csv(out / "model" / "history.csv").epoch.tolist() == [1, 2, 3, 4]
    config = json.loads((out / "model" / "training.json").read_text())["config"]
    assert config["weights"] == str(weights) and config["batch_size"] == 4 and config["learning_rate"] == 1e-4
    assert config["pooling"] == "max" and config["head_width"] == 10  # pretrained weights: the reference's head


@pytest.mark.long
def test_the_course_on_jax(tiny_course, tmp_path):
    "The one JAX training of a test run: mixed float16, data parallel on two (emulated) devices, through the ONNX export."
    pytest.importorskip("jax")
    out = course_copy(tiny_course, tmp_path / "jax")
    r = boneage_run(out, *TINY[:-2], "--epochs", "1", "--precision", "mixed_float16", "--devices", "2", "--batch-size", "4",
                    "--fresh", "--only", "04", "05", "07a", "08", backend="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "starting over" in r.stdout  # the tiny course's TensorFlow model is not resumed
    w = json.loads((out / "04_training.json").read_text())
    assert w["backend"] == "jax" and w["precision"] == "mixed_float16" and w["epochs_run"] == 1
    info = json.loads((out / "model" / "bundle.json").read_text())
    assert info["training"]["precision"] == "mixed_float16"
    assert json.loads((out / "model" / "training.json").read_text())["devices"] == 2
    assert info["onnx"]["max_abs_diff_months"] < 0.01 and "gate" in info and "conformal" in info  # the bundle serves float32


@pytest.mark.long
def test_run_on_real_radiographs(rsna_sample, tmp_path):
    r = boneage_run(tmp_path, "--data-dir", str(rsna_sample), "--image-size", "72", "--epochs", "1", "--freeze-backbone",
                    "--no-sex", "--only", "00", "01", "02", "04", "05", "06", "07", "07a")  # 08 runs the same code on any bundle: the tiny course runs it
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Kernel is running over TCP" not in r.stderr  # the kernels' start-up warning, 8 times a run before
    w = json.loads((tmp_path / "00_data.json").read_text())
    assert w["data"] == "rsna-sample" and w["n_rows"] == 40
    assert json.loads((tmp_path / "02_preprocessing.json").read_text())["crop_check_rsna"]["n"] == 40
    assert json.loads((tmp_path / "01_phantom.json").read_text())["real_images_shown"] is True
    assert not (tmp_path / "phantom").exists()  # real data: no phantom generated
    assert json.loads((tmp_path / "04_training.json").read_text())["epochs_run"] == 1
    config = json.loads((tmp_path / "model" / "training.json").read_text())["config"]
    assert config["trainable_backbone"] is False and config["use_sex"] is False
    assert json.loads((tmp_path / "metrics.json").read_text())["data"] == "rsna-sample, 6 test images"
    info = json.loads((tmp_path / "model" / "bundle.json").read_text())
    assert info["dataset"]["kind"] == "radiographs" and info["dataset"]["n_images"] == 40 and info["dataset"]["folder"] == "rsna-sample"
    g = json.loads((tmp_path / "07_gradcam.json").read_text())
    assert g["localisation"] == {} and len(g["figures"]) == 4  # real images: overlays only, no masks to score


def test_bad_data_dir_is_one_line(tmp_path, capsys):
    assert main(["run", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data folder not found" in err
    (tmp_path / "d").mkdir(); (tmp_path / "d" / "labels.csv").write_text("id,age\n1,2\n")
    assert main(["run", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path)]) == 1
    assert "no radiographs" in capsys.readouterr().err
    (tmp_path / "d" / "1.png").write_bytes(b"")  # an image file is there; the CSV is wrong
    assert main(["run", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path)]) == 1
    assert "no column for" in capsys.readouterr().err
    assert main(["run", "--only", "99", "--out", str(tmp_path)]) == 1
    assert "--only 99: no such course notebook" in capsys.readouterr().err


def test_failing_notebook_stops_with_one_line_and_keeps_earlier_results(tmp_path, capsys):
    nbs = tmp_path / "nbs"; nbs.mkdir()
    good = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("out_dir = ''", metadata={"tags": ["parameters"]}),
                                           nbformat.v4.new_code_cell("open(out_dir + '/a.txt', 'w').write('x')")])
    bad = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("out_dir = ''", metadata={"tags": ["parameters"]}),
                                          nbformat.v4.new_code_cell("raise ValueError('boom')")])
    for nb in (good, bad): nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(good, nbs / "00_data.ipynb"); nbformat.write(bad, nbs / "01_bad.ipynb")
    assert main(["run", "--nbs-dir", str(nbs), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("boneage: 01_bad.ipynb failed in cell") and "ValueError: boom" in err and "\n" not in err
    assert (tmp_path / "o" / "a.txt").read_text() == "x" and (tmp_path / "o" / "notebooks" / "01_bad.ipynb").exists()


def test_readme_is_rendered_from_index(tmp_path):
    dest = render_readme(dest=tmp_path / "README.md")
    assert dest.read_text() == (ROOT / "README.md").read_text(), "README.md is stale: run `boneage readme`"
    blocks = [b.split("```")[0].strip() for b in dest.read_text().split("```sh\n")[1:]]
    assert blocks[0] == 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[course]" && boneage run'
    assert blocks[1] == 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && pytest'
    assert "Halabi" in dest.read_text()


def test_every_notebook_links_its_rendered_page():
    for nb_path in sorted((ROOT / "nbs").glob("*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        links = [c for c in nb.cells if "source-only" in c.metadata.get("tags", [])]
        assert len(links) == 1 and f"/{nb_path.stem}.html" in links[0].source, nb_path.name


@pytest.mark.long
def test_another_backbone_and_the_recorded_preprocessing_end_to_end(tiny_course, tmp_path):
    "EfficientNet with the crop and CLAHE: through the model, Grad-CAM and the gate; `boneage predict` repeats the record exactly."
    import csv
    tmp_path = course_copy(tiny_course, tmp_path / "course")
    r = boneage_run(tmp_path, *TINY, "--backbone", "EfficientNetB0", "--crop", "--clahe", "--epochs", "2", "--unfreeze-after", "1",
                    "--lr-schedule", "constant", "--workers", "1", "--only", "00", "01", "02", "03", "04", "05", "06", "07", "07a", "08")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / "03_model.json").read_text())["backbone"] == "EfficientNetB0"
    config = json.loads((tmp_path / "model" / "training.json").read_text())["config"]
    assert config["unfreeze_after"] == 1 and config["lr_schedule"] == "constant"
    info = json.loads((tmp_path / "model" / "bundle.json").read_text())
    assert info["training"]["backbone"] == "EfficientNetB0" and info["preprocessing"]["crop"] and info["preprocessing"]["clahe"]
    g = json.loads((tmp_path / "07_gradcam.json").read_text())
    assert g["stride"] == 8 and 8 <= g["map_size"] <= 10 and g["layer"].startswith("block")  # EfficientNet's cut near 1/8, found, not named
    assert not g["layer"].endswith("_pad")  # a padding layer's maps are framed in zeros
    test = pd.read_csv(tmp_path / "predictions.csv").query("split == 'test'").head(6)
    split = pd.read_csv(tmp_path / "split.csv").set_index("id")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,sex\n" + "".join(f"{tmp_path / split.path[i]},{'M' if m else 'F'}\n" for i, m in zip(test.id, test.male)))
    p = subprocess.run([sys.executable, "-m", "boneage", "predict", "--no-progress",
                        "--manifest", manifest, "--model", tmp_path / "model", "--format", "csv", "--out", tmp_path / "p.csv",
                        "--explain", tmp_path / "cams", "--no-gate"], capture_output=True, text=True)
    assert p.returncode in (0, 1), p.stderr[-2000:]
    got = [float(row["bone_age_months"]) for row in csv.DictReader(open(tmp_path / "p.csv"))]
    np.testing.assert_allclose(got, test.predicted, atol=0.06)  # from files, cropped and equalised as in training
    assert len(list((tmp_path / "cams").glob("*_gradcam.png"))) == 6


@pytest.mark.long
def test_the_approach_comparison_runs_by_name(tiny_course, tmp_path):
    course = course_copy(tiny_course, tmp_path / "course")
    r = boneage_run(course, *TINY, "--only", "approaches")  # the course's recipe: its model is the final recipe's first seed
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("training already finished on this data and recipe") == 1  # loaded, not trained again
    from boneage.approaches import VARIANTS
    results = json.loads((course / "approaches.json").read_text())["results"]
    assert [x["approach"] for x in results] == list(VARIANTS) and all(x["epochs_run"] == 2 for x in results)
    assert len(results[0]["train_seeds"]) == 3 and results[0]["mae_seed_sd"] is not None  # the final recipe: the yardstick
    assert all(x["train_seeds"] == [results[0]["train_seeds"][0]] for x in results[1:])  # the rest: one seed, the recipe's
    md = (course / "approaches.md").read_text()
    assert "| Xception + ROI crop | " in md and "| EfficientNet-B4, frozen backbone ¹ |" in md and "random weights, 2 epochs each" in md


def test_every_run_option_is_tried_by_a_course_run():
    "Each option `boneage run --help` lists is passed by at least one of the course runs above (or the tiny run they share)."
    from boneage.cli import _parser
    run = _parser()._subparsers._group_actions[0].choices["run"]
    options = [o for a in run._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    tests = (ROOT / "tests" / "test_notebooks.py").read_text() + (ROOT / "tests" / "conftest.py").read_text()
    assert len(options) > 15 and [o for o in options if f'"{o}"' not in tests] == []


def test_transfer_notebook_on_the_rsna_sample(phantom_run, rsna_sample):
    "The tiny course's transfer notebook: the domain gap, 4-fold cross-validation of three starts, a usable fine-tuned bundle."
    out, _ = phantom_run
    t = json.loads((out / "07b_transfer.json").read_text())
    assert t["skipped"] is None and t["n_real"] == 40 and t["n_folds"] == 2
    assert set(t["domain_gap"]) == {"phantom model, no fine-tuning", "always the mean age"}
    kfold = pd.read_csv(out / "transfer_kfold.csv")
    assert kfold.start.tolist() == ["phantom-pretrained", "random", "mean"] and (kfold.n == 40).all()
    oof = pd.read_csv(out / "transfer_predictions.csv")
    assert len(oof) == 40 and sorted(oof.fold.value_counts()) == [20, 20] and oof[["phantom-pretrained", "random"]].notna().all().all()
    for arm in ("phantom-pretrained", "random", "mean"):  # each MAE is the mean over the 40 held-out predictions
        assert kfold.set_index("start").MAE[arm] == pytest.approx((oof[arm] - oof.bone_age_months).abs().mean(), abs=0.01)
    info = json.loads((out / "model_real" / "bundle.json").read_text())
    assert info["dataset"] == {**info["dataset"], "kind": "radiographs", "folder": "rsna-sample", "n_images": 40}
    assert info["training"]["pretrained"] and info["transfer"]["pretrained_on"].startswith("phantom")
    assert (out / "transfer_curves.png").stat().st_size > 10_000 and not (out / "transfer").exists()


def test_transfer_without_real_data_is_one_line(phantom_run, tmp_path):
    "No real radiographs: one line says what the notebook needs, and it writes what it could."
    out = course_copy(phantom_run, tmp_path / "course")
    r = boneage_run(out, *TINY, "--only", "transfer", BONEAGE_SHARED_DATA=str(tmp_path / "none"))
    assert r.returncode == 0, r.stderr[-2000:]
    t = json.loads((out / "07b_transfer.json").read_text())
    assert t["skipped"].startswith("no real radiographs: pass an RSNA-layout folder") and t["kfold"] is None
    assert t["skipped"] in r.stdout
