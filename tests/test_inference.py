"""Prediction: the bundle, both runners, results with statuses, the Python API."""
import json, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boneage.bundle import BundleError, load_bundle, write_bundle_info
from boneage.inference import (PHANTOM_WARNING, BoneAgePrediction, Predictor, Request, predict)
from boneage.dicom_files import write_dicom
from boneage.reading import ImageError


@pytest.fixture(scope="module")
def hand(trained_phantom):
    _, df, _, _ = trained_phantom
    test = df[df.split == "test"].reset_index(drop=True)
    return np.asarray(Image.open(test.path[0])), test


def test_bundle_describes_training(bundle_dir):
    b = load_bundle(bundle_dir)
    assert b.info["format"] == "boneage-bundle/2" and b.image_size == 72 and b.trained_on_phantom
    assert b.info["preprocessing"]["scaling"] == "xception" and b.info["dataset"]["n_images"] == 480
    assert b.info["dataset"]["folder"] == "ph" and "/" not in b.info["dataset"]["folder"]  # no machine path
    assert b.info["training"]["best_epoch"] >= 1 and b.info["package_version"] and b.info["model_dtype"] == "float32"
    assert b.onnx_file().is_file() and b.info["onnx"]["max_abs_diff_months"] < 0.01
    assert b.info["onnx"]["outputs"] == ["bone_age_months", "features"] and b.info["gate"]["threshold"] > 0


def test_bundle_errors(bundle_dir, tmp_path):
    with pytest.raises(BundleError, match="model not found"): load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="not a boneage model bundle"): load_bundle(tmp_path)
    other = tmp_path / "other"; shutil.copytree(bundle_dir, other)
    info = json.loads((other / "bundle.json").read_text())
    (other / "bundle.json").write_text(json.dumps({**info, "preprocessing": {**info["preprocessing"], "scaling": "imagenet"}}))
    with pytest.raises(BundleError, match="trained with preprocessing scaling='imagenet'"): load_bundle(other)
    (other / "bundle.json").write_text(json.dumps({**info, "format": "boneage-bundle/1"}))
    with pytest.raises(BundleError, match="format 'boneage-bundle/1', this version reads 'boneage-bundle/2'"): load_bundle(other)
    (other / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="bundle.json: not valid JSON"): load_bundle(other)
    (other / "bundle.json").write_text(json.dumps({**info, "preprocessing": {**info["preprocessing"], "image_size": 96}}))
    with pytest.raises(BundleError, match="the ONNX model takes 72² images but the bundle says 96²"): Predictor(other, "onnx")
    with pytest.raises(BundleError, match="takes 72×72 images but its description says 96×96"): Predictor(other, "keras")
    (other / "bundle.json").write_text(json.dumps(info))
    (other / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(BundleError, match="model.onnx: not a usable ONNX model"): Predictor(other, "onnx")
    (other / "best.keras").write_bytes((bundle_dir / "best.keras").read_bytes()[:1000])  # truncated
    with pytest.raises(BundleError, match="best.keras: not a loadable Keras model"): Predictor(other, "keras")
    with pytest.raises(BundleError, match="no onnx-int8 copy in this bundle"): Predictor(bundle_dir, "onnx-int8")


def test_default_bundle_search(bundle_dir, tmp_path, monkeypatch):
    from boneage.bundle import default_model_dir
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BONEAGE_MODEL", str(bundle_dir))
    assert default_model_dir() == bundle_dir
    monkeypatch.delenv("BONEAGE_MODEL")
    shutil.copytree(bundle_dir, tmp_path / "Bone_age_prediction" / "model")
    assert default_model_dir() == tmp_path / "Bone_age_prediction" / "model"


def test_onnx_matches_keras_and_the_evaluation(bundle_dir, trained_phantom):
    _, df, _, _ = trained_phantom
    items = list(zip(df.path[:24], df.male[:24]))
    onnx = [r for r in Predictor(bundle_dir, "onnx").predict_many(items)]
    keras_ = [r for r in Predictor(bundle_dir, "keras").predict_many(items)]
    a, b = (np.array([r.bone_age_months for r in rs]) for rs in (onnx, keras_))
    assert a.std() > 1 and np.abs(a - b).max() < 0.01  # a trained model; the stated tolerance, in months
    np.testing.assert_allclose([r.gate_score for r in onnx], [r.gate_score for r in keras_], rtol=1e-3)


def test_onnx_path_does_not_import_tensorflow(bundle_dir, hand, tmp_path):
    code = ("import sys; from boneage import predict; r = predict(sys.argv[1], male=True, model=sys.argv[2]); "
            "print(r.bone_age_months, 'tensorflow' in sys.modules, 'keras' in sys.modules, 'sklearn' in sys.modules)")
    Image.fromarray(hand[0]).save(tmp_path / "hand.png")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hand.png"), str(bundle_dir)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    months, tf, keras_, sklearn_ = out.stdout.split()
    assert float(months) > 0 and (tf, keras_, sklearn_) == ("False", "False", "False")


def test_predict_array_interval_stage_and_tta(bundle_dir, hand):
    img = hand[0]
    r = predict(img, male=False, chronological_age=100, model=bundle_dir)
    assert r.source == "<array>" and r.coverage == 0.9 and r.stage in ("Child", "Adolescent", "Adult")
    width = 15.0 if 120 <= r.bone_age_months < 168 else 20.0
    assert r.interval_high - r.bone_age_months == pytest.approx(width)
    assert r.interval_low == pytest.approx(max(0.0, r.bone_age_months - width))
    assert r.difference_months == pytest.approx(r.bone_age_months - 100)
    assert PHANTOM_WARNING in r.notes  # an array may be anything: say what the model is
    t = predict(img, male=False, model=bundle_dir, tta=True)
    assert abs(t.bone_age_months - r.bone_age_months) < 24 and t.bone_age_months != r.bone_age_months


def test_phantom_files_get_no_phantom_note(bundle_dir, hand):
    r = predict(hand[1].path[0], male=True, model=bundle_dir)
    assert PHANTOM_WARNING not in r.notes


def test_inverted_image_flagged_and_fixed(bundle_dir, hand):
    img = hand[0]
    plain = predict(img, male=True, model=bundle_dir)
    flagged = predict(255 - img, male=True, model=bundle_dir)
    assert flagged.status == "warning" and any("looks inverted" in w for w in flagged.reasons)
    fixed = predict(255 - img, male=True, model=bundle_dir, fix_inverted=True)
    assert fixed.bone_age_months == pytest.approx(plain.bone_age_months, abs=1e-3)
    assert any("inverted before predicting" in n for n in fixed.notes)


def test_every_request_gets_one_result_with_a_status(ungated_bundle_dir, hand, tmp_path):
    bundle_dir = ungated_bundle_dir
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    (tmp_path / "text.png").write_text("hello")
    ct = Path(__import__("pydicom").__file__).parent / "data" / "test_files" / "CT_small.dcm"
    reqs = [Request(hand[1].path[0], "F"), Request(tmp_path / "photo.jpg", "F"), Request(tmp_path / "text.png", "M"),
            Request(ct, "M"), Request(hand[1].path[1], "X", row=7), Request(hand[1].path[1]), Request(np.zeros((2, 2, 2, 2)), "M"),
            Request(hand[1].path[2], "M", 400)]
    got = list(Predictor(bundle_dir).predict_many(reqs))
    assert [r.status for r in got] == ["ok", "rejected", "error", "rejected", "error", "error", "error", "error"]
    assert got[0].bone_age_months > 0 and all(r.bone_age_months is None for r in got[1:])
    assert "a colour image" in got[1].reasons[0] and "not a PNG, JPEG, TIFF or DICOM" in got[2].reasons[0]
    assert "DICOM modality CT" in got[3].reasons[0] and "(row 7): unknown sex 'X'" in got[4].reasons[0]
    assert "sex unknown" in got[5].reasons[0] and "is not an image" in got[6].reasons[0] and "outside 0–240" in got[7].reasons[0]
    research = list(Predictor(bundle_dir, gate=False).predict_many(reqs[1:2]))[0]  # --no-gate: predicted, reason kept
    assert research.status == "warning" and research.bone_age_months is not None and "a colour image" in research.reasons[0]


def test_unusual_images_are_flagged_by_the_learned_score(bundle_dir, hand):
    noise = np.random.default_rng(1).integers(0, 255, (256, 256)).astype(np.uint8)
    r = predict(noise, male=True, model=bundle_dir)
    assert r.status == "warning" and any("unusual for this model" in w for w in r.reasons)
    assert r.gate_score > load_bundle(bundle_dir).info["gate"]["threshold"]


def test_dicom_sex_from_the_header(bundle_dir, hand, tmp_path):
    path = write_dicom(tmp_path / "hand.dcm", hand[0].astype(np.uint16) * 16, sex="F")
    r = predict(path, model=bundle_dir)
    assert r.male is False
    clash = predict(path, male="M", model=bundle_dir)
    assert clash.male is True and any("PatientSex in the file is F; used the given M" in n for n in clash.notes)


def test_python_api_errors(bundle_dir, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png: empty file"): predict(tmp_path / "empty.png", male=True, model=bundle_dir)
    with pytest.raises(BundleError, match="model not found"): predict(np.zeros((80, 80), np.uint8), male=True, model=tmp_path / "x")
    for bad in (np.zeros((0, 0)), np.zeros((2, 64, 64, 3)), np.full((64, 64), np.nan), np.ones((64, 64), bool)):
        with pytest.raises(ImageError):
            predict(bad, male=True, model=bundle_dir)
    with pytest.raises(ImageError, match="blank or nearly constant"):
        predict(np.zeros((256, 256), np.uint8), male=True, model=bundle_dir)


def test_result_text_and_row():
    r = BoneAgePrediction("x.png", True, 150.0, interval_low=135.0, interval_high=165.0, coverage=0.9, stage="Adolescent",
                          chronological_age_months=120.0)
    assert r.difference_months == 30 and r.assessment == "beyond the model's uncertainty" and r.bone_age_years == 12.5
    assert "30.0 months ahead of chronological age 120 (beyond the model's uncertainty)" in str(r)
    d = r.as_dict()
    assert d["sex"] == "M" and d["difference_months"] == 30.0 and d["assessment"] == "beyond the model's uncertainty" and d["status"] == "ok"
    none = BoneAgePrediction("y.png", status="error", reasons=["y.png: file not found"]).as_dict()
    assert none["bone_age_months"] is None and none["assessment"] is None and none["reasons"] == "y.png: file not found"


def test_the_paragraph_the_table_and_the_page_show_a_row_alike(tmp_path):
    "One result as `describe`, the terminal table and the web page write it: each value as `readable` gives it."
    pytest.importorskip("fastapi")
    from boneage.app import render_results
    from boneage.batch import Output
    from boneage.inference import readable
    r = BoneAgePrediction("x.png", False, 150.04, interval_low=135.2, interval_high=164.6, coverage=0.9, stage="Adolescent",
                          chronological_age_months=119.6)
    t = readable(r.as_dict())
    assert t == {"sex": "F", "bone_age_months": "150.0", "bone_age_years": "12.5", "interval": "135–165", "coverage": "90%",
                 "stage": "Adolescent", "chronological_age_months": "120", "difference_months": "+30.4",
                 "assessment": "beyond the model's uncertainty"}
    out = Output("table", tmp_path / "t.txt"); out.add(r); out.close()
    table = (tmp_path / "t.txt").read_text().splitlines()[1].split()
    page = render_results([{**r.as_dict(), "overlay": None}])
    for key in ("sex", "bone_age_months", "bone_age_years", "interval", "chronological_age_months", "difference_months"):
        assert t[key] in table and t[key] in page, key
    assert all(t[k] in str(r) for k in ("sex", "bone_age_months", "bone_age_years", "interval", "coverage", "chronological_age_months"))
    assert readable(BoneAgePrediction("y.png", status="error", reasons=["y.png: not found"]).as_dict())["bone_age_months"] == "—"


def test_retrained_bundle_is_not_served_from_the_cache(bundle_dir, hand, tmp_path):
    copy = tmp_path / "m"; shutil.copytree(bundle_dir, copy)
    a = predict(hand[0], male=True, model=copy)
    info = json.loads((copy / "bundle.json").read_text())
    write_bundle_info(copy, conformal={**info["conformal"], "half_width": 5.0, "band_half_width": {}})
    b = predict(hand[0], male=True, model=copy)
    assert b.interval_high - b.bone_age_months == pytest.approx(5.0) and a.interval_high != b.interval_high


def test_int8_copy_predicts_close_to_float32(bundle_dir, trained_phantom, tmp_path):
    from boneage.inference import quantize_onnx
    from boneage.preprocess import xception_scale
    _, df, _, _ = trained_phantom
    copy = tmp_path / "model"; shutil.copytree(bundle_dir, copy)
    bundle = load_bundle(copy)
    valid = df[df.split == "valid"]
    images = xception_scale(np.stack([bundle.prepare(np.asarray(Image.open(p))) for p in valid.path]))
    dest = quantize_onnx(bundle, images, valid.male.to_numpy())
    assert dest.is_file() and load_bundle(copy).info["onnx_int8"]["calibration_images"] == len(valid)
    assert not list(copy.glob("*.tmp.onnx"))  # the quantizer's intermediate copy is gone
    items = list(zip(df.path[:24], df.male[:24]))
    f32, i8 = ([r.bone_age_months for r in Predictor(copy, b).predict_many(items)] for b in ("onnx", "onnx-int8"))
    diff = np.abs(np.subtract(f32, i8))
    assert np.std(i8) > 1 and 0 < np.median(diff) < 0.1 * np.std(f32)  # a different model, close on a typical image
    out = subprocess.run([sys.executable, "-m", "boneage", "predict",
                          str(df.path[0]), "--sex", "F", "--model", str(copy), "--backend", "onnx-int8", "--format", "json"],
                         capture_output=True, text=True)
    # the gate's threshold was fitted on float32 features, so an int8 score near it may tip into a warning
    row = json.loads(out.stdout)[0]
    assert out.returncode in (0, 1) and row["status"] in ("ok", "warning") and row["bone_age_months"] > 0, out.stderr[-2000:]


def test_the_prediction_path_loads_neither_pandas_nor_tensorflow(bundle_dir, hand):
    "The default install predicts with ONNX Runtime alone: importing and running `boneage predict` loads no table or training library."
    _, test = hand
    heavy = "sorted(m for m in ('pandas', 'tensorflow', 'keras', 'jax', 'sklearn', 'matplotlib') if m in sys.modules)"
    code = (f"import sys, boneage.inference, boneage.batch; print({heavy}); from boneage.cli import main; "
            f"code = main(['predict', sys.argv[1], '--sex', 'F', '--model', sys.argv[2], '--no-progress', '--format', 'csv']); "
            f"print(code, {heavy})")
    r = subprocess.run([sys.executable, "-c", code, str(test.path[0]), str(bundle_dir)], capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "[]" and lines[-1] in ("0 []", "1 []"), r.stdout[-2000:] + r.stderr[-2000:]
    assert "bone_age_months" in lines[1]  # it did predict


def test_keras_without_its_extra_is_one_line(bundle_dir, hand, tmp_path):
    "On the prediction-only install (no Keras), the Keras backend and Grad-CAM each say in one line what to install."
    _, test = hand
    code = "import sys; sys.modules['keras'] = None; from boneage.cli import main; sys.exit(main(sys.argv[1:]))"
    for option, needs in ((["--backend", "keras"], "--backend keras"), (["--explain", str(tmp_path / "cams")], "--explain (Grad-CAM)")):
        r = subprocess.run([sys.executable, "-c", code, "predict", str(test.path[0]), "--sex", "F", "--model", str(bundle_dir), *option],
                           capture_output=True, text=True)
        assert r.returncode == 2 and r.stdout == "", r.stderr[-2000:]
        assert r.stderr.strip() == f'boneage predict: {needs} needs Keras, which this install lacks: pip install "boneage[train]"'


def test_an_age_outside_the_valid_range_is_clipped_and_says_so():
    from types import SimpleNamespace
    from boneage.inference import BoneAgePrediction, _finish, as_dict
    predictor = SimpleNamespace(bundle=SimpleNamespace(info={}), features=None)
    young = _finish(predictor, BoneAgePrediction("a.png", True), np.array([-2.4]), None)
    assert young.bone_age_months == 0 and "answered -2.4 months, outside 0–240: clipped to 0" in as_dict(young)["notes"]
    fine = _finish(predictor, BoneAgePrediction("b.png", True), np.array([100.0, 102.0]), None)
    assert fine.bone_age_months == 101 and fine.notes == []
