"""Prediction on real-world files: DICOM and deep PNGs, bad input, the bundle, ONNX Runtime, the command line."""
import csv, json, os, shutil, struct, subprocess, sys, zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from boneage.inference import (BoneAgePrediction, BundleError, InputError, Predictor, export_onnx, load_bundle,
                               looks_inverted, parse_age, parse_sex, predict, read_image, run_predictions, write_dicom)
from boneage.preprocess import ImageError, to_uint8_gray
from boneage.train import write_bundle_info

ROOT = Path(__file__).resolve().parents[1]
CONFORMAL = {"coverage": 0.9, "half_width": 20.0, "bands_years": [0, 2, 6, 10, 14, 19],
             "band_half_width": {"10–14 y": 15.0}, "n_valid": 100}


@pytest.fixture(scope="module")
def bundle_dir(trained_phantom, tmp_path_factory):
    "A copy of the tiny trained model as a full bundle: intervals, stages and an ONNX copy."
    _, _, _, out = trained_phantom
    dest = tmp_path_factory.mktemp("bundle") / "model"
    shutil.copytree(out / "model", dest)
    write_bundle_info(dest, conformal=CONFORMAL, stages={"names": ["Child", "Adolescent", "Adult"], "edges_years": [10, 18]})
    export_onnx(load_bundle(dest))
    return dest


@pytest.fixture(scope="module")
def hand(trained_phantom):
    _, df, _, _ = trained_phantom
    return cv2.imread(str(df.path[df.split == "test"].iloc[0]), cv2.IMREAD_GRAYSCALE), df


def cli(*args, cwd=ROOT):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", "import sys; from boneage.cli import main; sys.exit(main())", "predict",
                           "--no-progress", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)


# --- reading ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize("rescale", [False, True])
def test_dicom_variants_read_as_the_image(tmp_path, hand, photometric, bits, rescale):
    img = hand[0]
    scale = (2 ** bits - 1) // 255
    stored = img.astype(np.uint32) * scale
    if photometric == "MONOCHROME1": stored = (2 ** bits - 1) - stored  # bright bone stored low
    tags = {"RescaleSlope": 3, "RescaleIntercept": -1024} if rescale else {}
    path = write_dicom(tmp_path / "x.dcm", stored, photometric, bits, sex="M", **tags)
    got, sex = read_image(path)
    assert sex is True and got.dtype == np.uint8 and got.shape == img.shape
    assert np.abs(got.astype(int) - to_uint8_gray(img.astype(np.float32))).max() <= 1


def test_dicom_window_clips_to_the_window(tmp_path):
    stored = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (8, 1))  # a ramp 0..4080
    path = write_dicom(tmp_path / "w.dcm", stored, WindowCenter=2048, WindowWidth=1024, sex="F")
    got, sex = read_image(path)
    assert sex is False
    row = got[0]
    assert row[stored[0] < 1536].max() == 0 and row[stored[0] > 2560].min() == 255  # outside the window: saturated
    inside = (stored[0] > 1600) & (stored[0] < 2500)
    assert np.all(np.diff(row[inside].astype(int)) >= 0) and row[inside].min() > 0 and row[inside].max() < 255


def test_dicom_without_sex_tag_and_without_pixels(tmp_path):
    path = write_dicom(tmp_path / "nosex.dcm", np.zeros((4, 4), np.uint16), sex="")
    assert read_image(path)[1] is None
    import pydicom
    ds = pydicom.dcmread(path); del ds.PixelData; ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(ImageError, match="nopixels.dcm: DICOM without pixel data"): read_image(tmp_path / "nopixels.dcm")


def test_dicom_compressed_without_decoder(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate
    path = write_dicom(tmp_path / "j2k.dcm", np.zeros((8, 8), np.uint16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60]); ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    with pytest.raises(ImageError, match=r"j2k.dcm: cannot decode its pixel data \(JPEG 2000"): read_image(tmp_path / "j2k.dcm")


def test_not_dicom_named_dcm(tmp_path):
    (tmp_path / "fake.dcm").write_text("not dicom")
    with pytest.raises(ImageError, match="fake.dcm: not a readable DICOM file"): read_image(tmp_path / "fake.dcm")


def test_16bit_png_and_colour_jpeg(tmp_path, hand):
    img = hand[0]
    cv2.imwrite(str(tmp_path / "deep.png"), img.astype(np.uint16) * 257)
    assert np.abs(read_image(tmp_path / "deep.png")[0].astype(int) - to_uint8_gray(img.astype(np.float32))).max() <= 1
    cv2.imwrite(str(tmp_path / "colour.jpg"), cv2.cvtColor(img, cv2.COLOR_GRAY2BGR), [cv2.IMWRITE_JPEG_QUALITY, 98])
    assert np.abs(read_image(tmp_path / "colour.jpg")[0].astype(int) - img).mean() < 2


def _bomb_png(path, width, height):
    "A tiny PNG whose header claims width × height pixels (valid header checksum, nonsense data)."
    png = cv2.imencode(".png", np.zeros((1, 1), np.uint8))[1].tobytes()
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    path.write_bytes(png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:])
    return path


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    bomb = _bomb_png(tmp_path / "bomb.png", 100_000, 100_000)
    monkeypatch.setattr(cv2, "imread", lambda *a, **k: pytest.fail("decoded a decompression bomb"))
    with pytest.raises(ImageError, match="bomb.png: .*over the limit.*refused before decoding"): read_image(bomb)
    small = _bomb_png(tmp_path / "small.png", 300, 300)
    with pytest.raises(ImageError, match="small.png: 300×300 pixels is over the limit of 1,000"): read_image(small, 1000)


def test_inverted_images_are_detected(trained_phantom):
    _, df, _, _ = trained_phantom
    imgs = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in df.path[:30]]
    assert not any(map(looks_inverted, imgs)) and all(looks_inverted(255 - i) for i in imgs)


def test_inverted_real_radiographs_are_detected(rsna_sample):
    imgs = [read_image(p)[0] for p in sorted((rsna_sample / "images").glob("*.png"))]
    assert len(imgs) == 40
    assert not any(map(looks_inverted, imgs)) and all(looks_inverted(255 - i) for i in imgs)


# --- values -----------------------------------------------------------------------------------------------------

def test_sex_and_age_parsing():
    assert [parse_sex(v) for v in ("M", "f", "male", "Female", "1", 0, True)] == [True, False, True, False, True, False, True]
    with pytest.raises(InputError, match="a.png: unknown sex 'X': use F or M"): parse_sex("X", "a.png")
    assert parse_age("120") == 120.0
    for bad in ("-3", "5000", "nan", "ten"):
        with pytest.raises(InputError, match="a.png: chronological age"): parse_age(bad, "a.png")


def test_result_interval_stage_and_assessment():
    r = BoneAgePrediction("x.png", True, 150.0, 135.0, 165.0, 0.9, "Adolescent", 120.0)
    assert r.difference_months == 30 and r.assessment == "advanced" and r.bone_age_years == 12.5
    assert BoneAgePrediction("x.png", True, 150.0, 135.0, 165.0, 0.9, "Adolescent", 170.0).assessment == "delayed"
    assert BoneAgePrediction("x.png", True, 150.0, 135.0, 165.0, 0.9, "Adolescent", 140.0).assessment == "in line"
    assert BoneAgePrediction("x.png", False, 150.0, chronological_age_months=130).assessment == "advanced"  # ±12 without an interval
    assert "30.0 months ahead of chronological age 120 (advanced)" in str(r)
    d = r.as_dict()
    assert d["sex"] == "M" and d["difference_months"] == 30.0 and d["assessment"] == "advanced"


# --- the bundle -------------------------------------------------------------------------------------------------

def test_bundle_describes_training(bundle_dir):
    b = load_bundle(bundle_dir)
    assert b.info["format"] == "boneage-bundle/1" and b.image_size == 72 and b.trained_on_phantom
    assert b.info["preprocessing"]["scaling"] == "xception" and b.info["dataset"]["n_images"] == 160
    assert b.info["training"]["best_epoch"] >= 1 and b.info["package_version"]
    assert b.onnx_path.is_file() and b.info["onnx"]["max_abs_diff_months"] < 0.01


def test_bundle_errors(bundle_dir, tmp_path):
    with pytest.raises(BundleError, match="model not found"): load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="not a boneage model bundle"): load_bundle(tmp_path)
    other = tmp_path / "other"; shutil.copytree(bundle_dir, other)
    info = json.loads((other / "bundle.json").read_text())
    (other / "bundle.json").write_text(json.dumps({**info, "preprocessing": {**info["preprocessing"], "scaling": "imagenet"}}))
    with pytest.raises(BundleError, match="scaling='imagenet', which this version cannot repeat"): load_bundle(other)
    (other / "bundle.json").write_text(json.dumps(info)); (other / "best.keras").write_text("not a model")
    with pytest.raises(BundleError, match="best.keras: not a loadable Keras model"): load_bundle(other).keras_model()


def test_bundle_with_code_is_refused(bundle_dir, tmp_path):
    import keras
    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Lambda(lambda t: t * 2)(inp)).save(tmp_path / "best.keras")
    shutil.copy(bundle_dir / "bundle.json", tmp_path / "bundle.json")
    with pytest.raises(BundleError, match="refused: the model carries Python code"): load_bundle(tmp_path).keras_model()


# --- prediction -------------------------------------------------------------------------------------------------

def test_onnx_matches_keras(bundle_dir, trained_phantom):
    _, df, _, _ = trained_phantom
    items = list(zip(df.path[:24], df.male[:24], [None] * 24))
    onnx = np.array([r.bone_age_months for r in Predictor(bundle_dir, "onnx").predict_many(items)])
    keras_ = np.array([r.bone_age_months for r in Predictor(bundle_dir, "keras").predict_many(items)])
    assert onnx.std() > 1  # a trained model: the ages differ between images
    np.testing.assert_allclose(onnx, keras_, atol=0.01)  # the stated tolerance, in months


def test_onnx_path_does_not_import_tensorflow(bundle_dir, hand):
    code = ("import sys; from boneage import predict; r = predict(sys.argv[1], male=True, model=sys.argv[2]); "
            "print(r.bone_age_months, 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    path = Path(bundle_dir).parent / "hand.png"; cv2.imwrite(str(path), hand[0])
    out = subprocess.run([sys.executable, "-c", code, str(path), str(bundle_dir)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    months, tf, keras_ = out.stdout.split()
    assert float(months) > 0 and tf == "False" and keras_ == "False"


def test_predict_array_interval_stage_and_tta(bundle_dir, hand):
    img = hand[0]
    r = predict(img, male=False, chronological_age=100, model=bundle_dir)
    assert r.source == "<array>" and r.coverage == 0.9 and r.stage in ("Child", "Adolescent", "Adult")
    width = 15.0 if 120 <= r.bone_age_months < 168 else 20.0
    assert r.interval_high - r.bone_age_months == pytest.approx(width)
    assert r.difference_months == pytest.approx(r.bone_age_months - 100)
    assert any("synthetic phantom" in w for w in r.warnings)  # an array may be anything: say what the model is
    t = predict(img, male=False, model=bundle_dir, tta=True)
    assert abs(t.bone_age_months - r.bone_age_months) < 24 and t.bone_age_months != r.bone_age_months


def test_inverted_image_flagged_and_fixed(bundle_dir, hand):
    img = hand[0]
    plain = predict(img, male=True, model=bundle_dir)
    flagged = predict(255 - img, male=True, model=bundle_dir)
    assert any("looks inverted" in w for w in flagged.warnings)
    fixed = predict(255 - img, male=True, model=bundle_dir, fix_inverted=True)
    assert fixed.bone_age_months == pytest.approx(plain.bone_age_months, abs=1e-3)
    assert any("inverted before predicting" in w for w in fixed.warnings)


def test_python_api_errors(bundle_dir, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png: empty file"): predict(tmp_path / "empty.png", male=True, model=bundle_dir)
    with pytest.raises(BundleError, match="model not found"): predict(np.zeros((80, 80), np.uint8), male=True, model=tmp_path / "x")


# --- the command line -----------------------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path, hand):
    "Two good phantoms, a DICOM with PatientSex, and one of each bad file."
    img, df = hand
    d = tmp_path / "in"; d.mkdir()
    for i, p in enumerate(df.path[df.split == "test"].iloc[:2]): shutil.copy(p, d / f"good{i}.png")
    write_dicom(d / "patient.dcm", img.astype(np.uint16) * 16, sex="F")
    (d / "empty.png").write_bytes(b"")
    good = (d / "good0.png").read_bytes(); (d / "truncated.png").write_bytes(good[:len(good) // 2])
    (d / "text.png").write_text("this is not an image")
    _bomb_png(d / "bomb.png", 100_000, 100_000)
    write_dicom(d / "nopixels.dcm", np.zeros((4, 4), np.uint16))
    import pydicom
    ds = pydicom.dcmread(d / "nopixels.dcm"); del ds.PixelData; ds.save_as(d / "nopixels.dcm")
    return d


def test_cli_batch_carries_on_past_bad_files(bundle_dir, folder, tmp_path):
    out = tmp_path / "res.csv"
    r = cli(folder, "--sex", "M", "--model", bundle_dir, "--format", "csv", "--out", out)
    assert r.returncode == 1, r.stderr
    rows = list(csv.DictReader(open(out)))
    assert sorted(Path(x["source"]).name for x in rows) == ["good0.png", "good1.png", "patient.dcm"]
    dicom = {Path(x["source"]).name: x for x in rows}["patient.dcm"]
    assert dicom["sex"] == "M" and "PatientSex in the file is F" in dicom["warnings"]  # the user's value wins, flagged
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    expected = {"bomb.png": "refused before decoding", "empty.png": "empty file", "nopixels.dcm": "DICOM without pixel data",
                "text.png": "not a decodable", "truncated.png": "not a decodable"}
    assert len(errors) == len(expected)
    for name, reason in expected.items():
        assert any(name in e and reason in e for e in errors), (name, errors)
    assert "5 predicted" not in r.stderr and "3 predicted, 5 failed" in r.stderr


def test_cli_sex_required_for_pngs(bundle_dir, folder):
    r = cli(folder / "good0.png", folder / "patient.dcm", "--model", bundle_dir, "--format", "json")
    assert r.returncode == 1
    assert "good0.png: sex unknown" in r.stderr
    results = json.loads(r.stdout)
    assert [Path(x["source"]).name for x in results] == ["patient.dcm"]


def test_cli_table_with_chronological_age(bundle_dir, folder):
    r = cli(folder / "good0.png", folder / "good1.png", "--sex", "M", "--chronological-age", "120", "--model", bundle_dir)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["image", "sex", "bone"] and len(lines) == 3
    assert "good0.png" in lines[1] and "120.0" in lines[1] and lines[1].split()[-1] in ("advanced", "delayed", "line")
    assert "WARNING" in r.stderr and "synthetic phantom" in r.stderr  # loud: not a clinical estimate


@pytest.mark.parametrize("args, message", [
    (["--sex", "X"], "unknown sex 'X': use F or M"),
    (["--sex", "F", "--chronological-age", "-5"], "chronological age '-5' months is outside 0–240"),
    (["--sex", "F", "--chronological-age", "9000"], "chronological age '9000' months is outside 0–240"),
])
def test_cli_bad_values(bundle_dir, folder, args, message):
    r = cli(folder / "good0.png", "--model", bundle_dir, *args)
    assert r.returncode == 2 and message in r.stderr


def test_cli_bad_model(folder, tmp_path):
    r = cli(folder / "good0.png", "--sex", "F", "--model", tmp_path / "missing")
    assert r.returncode == 2 and "missing: model not found" in r.stderr
    (tmp_path / "notes.txt").write_text("hello")
    r = cli(folder / "good0.png", "--sex", "F", "--model", tmp_path / "notes.txt")
    assert r.returncode == 2 and "not a boneage model bundle" in r.stderr


def test_cli_manifest(bundle_dir, folder, tmp_path):
    m = tmp_path / "m.csv"
    m.write_text(f"path,sex,chronological_age\n{folder}/good0.png,F,100\n{folder}/good1.png,boy,-1\n"
                 f"{folder}/good1.png,M,130\n{folder}/patient.dcm,,\n")
    out = tmp_path / "r.csv"
    r = cli("--manifest", m, "--model", bundle_dir, "--format", "csv", "--out", out)
    assert r.returncode == 1
    assert "good1.png: chronological age '-1' months is outside 0–240" in r.stderr
    rows = list(csv.DictReader(open(out)))
    assert [(Path(x["source"]).name, x["sex"], x["chronological_age_months"]) for x in rows] == [
        ("good0.png", "F", "100.0"), ("good1.png", "M", "130.0"), ("patient.dcm", "F", "")]
    (tmp_path / "wrong.csv").write_text("file,sex\na.png,F\n")
    r = cli("--manifest", tmp_path / "wrong.csv", "--model", bundle_dir)
    assert r.returncode == 2 and "wrong.csv: needs a 'path' column" in r.stderr


def test_results_written_before_a_crash_are_kept(bundle_dir, folder, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = Predictor._run
    def crash_on_second(self, loaded):
        calls["n"] += 1
        if calls["n"] == 2: raise RuntimeError("power cut")
        yield from original(self, loaded)
    monkeypatch.setattr(Predictor, "_run", crash_on_second)
    out = tmp_path / "r.csv"
    with pytest.raises(RuntimeError, match="power cut"):
        run_predictions([folder / "good0.png", folder / "good1.png"], sex="M", model=bundle_dir, fmt="csv", out=out,
                        batch_size=1, progress=False)
    rows = list(csv.DictReader(open(out)))
    assert [Path(x["source"]).name for x in rows] == ["good0.png"]


def test_cli_explain_writes_gradcam(bundle_dir, folder, tmp_path):
    r = cli(folder / "good0.png", "--sex", "F", "--model", bundle_dir, "--explain", tmp_path / "cams")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cams" / "good0_gradcam.png").stat().st_size > 5_000


def test_cli_on_real_radiographs(bundle_dir, rsna_sample, tmp_path):
    labels = list(csv.DictReader(open(rsna_sample / "labels.csv")))
    m = tmp_path / "manifest.csv"
    m.write_text("path,sex,chronological_age\n" + "".join(
        f"{rsna_sample / 'images' / (row['id'] + '.png')},{'M' if row['male'] in ('1', 'True', 'true') else 'F'},{row['boneage']}\n"
        for row in labels))
    out = tmp_path / "real.json"
    r = cli("--manifest", m, "--model", bundle_dir, "--format", "json", "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert len(res) == 40 and all(x["stage"] in ("Child", "Adolescent", "Adult") for x in res)
    assert all(x["difference_months"] == pytest.approx(x["bone_age_months"] - x["chronological_age_months"], abs=0.11)
               for x in res)
    assert not any("inverted" in x["warnings"] for x in res)
    assert "WARNING" in r.stderr and "not a clinical bone age" in r.stderr  # phantom model on real images
    r = cli(rsna_sample / "images", "--sex", "M", "--model", bundle_dir, "--format", "csv")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 41
