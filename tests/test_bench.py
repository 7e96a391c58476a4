"""The benchmark scripts run (on tiny settings): their figures come from `bench/`, so the scripts must work."""
import json, os, re, subprocess, sys
from pathlib import Path

import pytest

from conftest import ROOT


def bench(script, *args, **env):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_data_throughput():
    out = bench("data_throughput.py", "--n-phantom", 16, "--phantom-size", 96, "--image-size", 64)
    assert out["phantom_images_per_s"] > 0 and out["cache_build_phantom_n"] == 16


def test_train_throughput_and_the_pipeline():
    out = bench("train_throughput.py", "--size", 64, "--batch", 4, "--steps", 1, "--warmup", 1, "--pipeline")
    impls = [r["impl"] for r in out["rows"]]
    assert impls[0] == "keras-tensorflow" and any("worker threads" in i for i in impls)
    assert all(r["train_img_s"] > 0 for r in out["rows"])


def test_gpu_train_runs_the_real_training_on_a_cpu(tmp_path):
    out = bench("gpu_train.py", "--size", 64, "--batch", 4, "--train-batches", 2, "--epochs", 1, "--precision", "float32",
                "--workers", 1, "--out", tmp_path)
    assert out["n_train"] == 8 and out["epochs"] == 1 and out["bundle_dtype"] == "float32"


def test_time_to_accuracy_prints_test_mae_per_epoch(tmp_path):
    out = bench("time_to_accuracy.py", "--config", "40,64,2,cosine", "--work", tmp_path)
    assert out["split"] == {"train": 24, "valid": 4, "calib": 4, "test": 8} and out["schedule"] == "cosine"
    assert [r["epoch"] for r in out["rows"]] == [1, 2] and out["rows"][0]["minutes"] < out["rows"][1]["minutes"]
    assert 0 < out["floor_mae"] < 6 and all(r["test_mae"] > 0 for r in out["rows"])


@pytest.mark.long
def test_gpu_reference_runs_on_a_cpu(tmp_path):
    out = bench("gpu_reference.py", "--n-images", 100, "--size", 64, "--batch", 8, "--epochs", 1, "--minutes", 1,
                "--n-scored", 4, "--precision", "float32", "--workers", 1, "--work", tmp_path / "work", "--out", tmp_path / "out")
    assert out["data"]["split"] == {"train": 70, "valid": 10, "calib": 5, "test": 15} and out["training"]["epochs_run"] == 1
    assert out["test"]["predicted_range"][0] >= 0 and out["floor"]["oracle_mae"] < out["floor"]["baseline_mae_mean_age"]
    assert {(r["stride"], r["method"], r["map"]) for r in out["localisation"]["by_layer"]} >= {(8, "hirescam", "signed")}
    assert all((tmp_path / "out" / f).stat().st_size > 10_000 for f in out["figures"])


def test_predict_speed(bundle_dir, rsna_sample):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "predict.py"), "--bundle", bundle_dir, "--batch", "4",
                        "--passes", "1", "--repeats", "1", "--backends", "onnx", "onnx-int8", "--resize-check"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cold start" in r.stdout and "onnx-int8 warm, batch 4" in r.stdout  # an int8 copy made for the run
    assert re.search(r"onnx-int8 warm, batch 4: .* a plain ONNX Runtime session on the same file \d+\.\d images/s, ratio \d+\.\d\d", r.stdout)
    assert re.search(r"reading one image .*: \d+\.\d ms", r.stdout)
    assert re.search(r"resize to 72²: one area resize \d+\.\d ms, two steps \d+\.\d ms .* moved by \d+\.\d\d months on average .* over 40 images", r.stdout)
    assert not (Path(bundle_dir) / "model-int8.onnx").exists()  # in a temporary copy: the bundle is left as it was


@pytest.mark.long
def test_archive_speed(bundle_dir, trained_phantom, one_ray_at_a_time):
    pytest.importorskip("ray", reason="the archive extra is not installed (pip install -e '.[archive]')")
    _, _, data, _ = trained_phantom
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "archive.py"), "--images", data / "images", "--bundle", bundle_dir,
                        "--copies", "2", "--actors", "1"], capture_output=True, text=True, timeout=900,
                       env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert r.returncode == 0, r.stderr[-2000:]
    table = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| boneage") or line.startswith("| predict")]
    assert [t[0].strip() for t in table] == ["boneage predict", "predict-archive, 1 actor"]
    assert all(float(t[3]) > 0 for t in table)  # whole-run rates; the marginal ones need more images than a test has
    assert all(float(t[4]) > 0 or t[4].strip() == "nan" for t in table) and table[0][5].strip() in ("1.00×", "nan×")


def test_scale_rehearsal_counts_what_each_notebook_opens(tmp_path):
    out = bench("scale.py", "--n", 24, "--phantom-size", 96, "--image-size", 64, "--out", tmp_path, "--only", "00", "02")
    rows = {r["notebook"]: r for r in out["rows"]}
    assert out["exit_code"] == 0 and set(rows) == {"00_data", "02_preprocessing"}
    assert rows["02_preprocessing"]["images_opened"] >= 24 and rows["00_data"]["peak_rss_gib"] > 0  # 02 builds the cache


def test_input_gate_report(bundle_dir, tmp_path):
    out = bench("input_gate.py", "--model", bundle_dir, "--out", tmp_path, "--n-real", "4")  # every class, 4 hands each
    s = out["summary"]
    assert s["tracebacks"] == 0 and s["batch aborts"] == 0 and s["rows"] == s["files"]
    by = {t["class"]: t for t in out["table"]}
    assert by["damaged: text named .png"]["errors"] == 20 and by["not a radiograph: 8×8 icon"]["rejected by a rule"] == 20
    assert by["radiograph, 8-bit PNG"]["predicted"] == by["radiograph, 8-bit PNG"]["files"]
    compressed = [t for c, t in by.items() if c.startswith("radiograph, compressed DICOM")]
    assert len(compressed) == 9 and all(t["predicted"] == t["files"] > 0 for t in compressed)  # every syntax decoded
    for c in ("DICOM window centre without a width", "DICOM with an empty window width", "PNG named .dcm", "name not UTF-8"):
        assert by[f"radiograph, {c}"]["predicted"] == by[f"radiograph, {c}"]["files"], c  # read, never "blank" or lost
    special = [t for c, t in by.items() if c.startswith("special:") or c.startswith("damaged:")]
    assert len(special) >= 8 and all(t["errors"] == t["files"] for t in special)
    assert s["refusals"]["--out a hard link to an input"] == "exit 2, input unchanged: True"
    assert s["refusals"]["manifest with a 140,000-character field"].startswith("exit 2: ") 
    assert s["worst dangerous input"]["peak MiB"] < 1024 and s["worst dangerous input"]["seconds"] < 60
