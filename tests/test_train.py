"""Training: resuming after a hard kill, the data fingerprint, mixed precision, two devices, and that it learns (JAX: in the course test on JAX)."""
import json, os, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_CONFIG
from boneage import runs as runs_module
from boneage.runs import choose_precision, precision_policy
from boneage.train import TrainConfig

TRAIN_SCRIPT = textwrap.dedent("""
    import os, signal, sys, keras
    from boneage.data import load_dataset, split_dataset
    from boneage.preprocess import preprocessing_spec
    from boneage.train import TrainConfig, train
    out, data, epochs, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    class PowerCut(keras.callbacks.Callback):
        "SIGKILL in the middle of epoch `kill_at`: nothing gets to clean up."
        def on_epoch_begin(self, epoch, logs=None): self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            if self.epoch + 1 == kill_at and batch == 1: os.kill(os.getpid(), signal.SIGKILL)

    df = split_dataset(load_dataset(data), seed=0)
    cfg = TrainConfig(epochs=epochs, batch_size=8, patience=50, learning_rate=1e-4, seed=0, workers=0,
                      precision=os.environ.get("PRECISION", "auto"), unfreeze_after=int(os.environ.get("UNFREEZE", 0)))
    r = train(df, out, preprocessing_spec(72), cfg, resume=True, callbacks=[PowerCut()] if kill_at else [])
    print("finished", r.stats["epochs_run"], r.stats["backend"], r.stats["precision"])
""")


def run_train(out, data, epochs, kill_at=0, backend="tensorflow", **env):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    return subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, str(out), str(data), str(epochs), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_phantom(tmp_path_factory):
    from boneage.phantom_dataset import make_phantom_dataset
    return make_phantom_dataset(tmp_path_factory.mktemp("ph") / "ph", n=40, size=96, seed=5, progress=False)


def test_precision_follows_the_device(monkeypatch):
    monkeypatch.setattr(runs_module, "gpu_available", lambda: True)
    assert choose_precision() == "mixed_float16"
    monkeypatch.setattr(runs_module, "gpu_available", lambda: False)
    assert choose_precision() == "float32" and choose_precision("mixed_bfloat16") == "mixed_bfloat16"
    with pytest.raises(ValueError, match="use one of"):
        choose_precision("fp8")


def test_policy_is_restored_when_training_fails():
    import keras
    with pytest.raises(RuntimeError, match="out of memory"):
        with precision_policy("mixed_float16"):
            assert keras.mixed_precision.dtype_policy().name == "mixed_float16"
            raise RuntimeError("out of memory")
    assert keras.mixed_precision.dtype_policy().name == "float32"


@pytest.mark.long
def test_killed_inside_an_epoch_resumes_without_losing_a_finished_one(tiny_phantom, tmp_path):
    out, hist = tmp_path / "run", tmp_path / "run" / "model" / "checkpoint" / "state.json"
    r = run_train(out, tiny_phantom, 5, kill_at=3)
    assert r.returncode == -9, r.stdout[-2000:] + r.stderr[-2000:]  # killed by the callback, inside epoch 3
    before = json.loads(hist.read_text())
    assert before["epoch"] == 2 and [h["epoch"] for h in before["history"]] == [1, 2]
    assert (out / "model" / "best.keras").exists() and not (out / "model" / "training.json").exists()

    r = run_train(out, tiny_phantom, 5)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch 3/5" in r.stdout and "epoch 1/5" not in r.stdout and "epoch 2/5" not in r.stdout  # continued
    after = pd.read_csv(out / "model" / "history.csv")
    assert after.epoch.tolist() == [1, 2, 3, 4, 5]  # every epoch once
    pd.testing.assert_frame_equal(after.iloc[:2], pd.DataFrame(before["history"]), check_dtype=False)  # kept as they were
    stats = json.loads((out / "model" / "training.json").read_text())
    assert stats["epochs_run"] == 5 and stats["best_val_loss"] == pytest.approx(after.val_loss.min())
    assert not (out / "model" / "checkpoint").exists()
    assert not [f for f in (out / "model").rglob("*") if ".tmp" in f.name or "partial" in f.name]

    bundle_time = (out / "model" / "bundle.json").stat().st_mtime_ns
    r = run_train(out, tiny_phantom, 5)  # a finished run is loaded, not retrained, and its bundle left alone
    assert r.returncode == 0 and "already finished" in r.stdout and "epoch 1/5" not in r.stdout
    assert (out / "model" / "bundle.json").stat().st_mtime_ns == bundle_time


def _predict_notes(model_dir, image):
    from boneage.inference import Predictor
    (res,) = Predictor(model_dir, backend="keras").predict_many([(image, "F")])
    return res.notes


@pytest.mark.long
def test_the_data_decides_what_is_resumed(tiny_phantom, rsna_sample, tmp_path, capsys):
    from boneage.data import load_dataset, split_dataset
    from boneage.inference import PHANTOM_WARNING
    from boneage.preprocess import preprocessing_spec
    from boneage.runs import fingerprint_parts, resume_or_start
    from boneage.train import train
    cfg = TrainConfig(**{**TINY_CONFIG, "epochs": 1})
    phantom, real = split_dataset(load_dataset(tiny_phantom), seed=0), split_dataset(load_dataset(rsna_sample), seed=0)
    real_image = real.path[0]

    train(phantom, tmp_path, preprocessing_spec(72), cfg)
    info = json.loads((tmp_path / "model" / "bundle.json").read_text())
    assert info["dataset"]["kind"] == "phantom" and PHANTOM_WARNING in _predict_notes(tmp_path / "model", real_image)

    capsys.readouterr()
    train(real, tmp_path, preprocessing_spec(72), cfg)  # the same folder, other data: retrained, and said so
    assert "trained on other data or settings (the data or split, the image files); starting over" in capsys.readouterr().out
    info = json.loads((tmp_path / "model" / "bundle.json").read_text())
    assert info["dataset"] == {"kind": "radiographs", "folder": "rsna-sample", "n_images": 40, "split": real.split.value_counts().to_dict()}
    assert info["training"]["n_train"] == (real.split == "train").sum()
    assert PHANTOM_WARNING not in _predict_notes(tmp_path / "model", real_image)

    capsys.readouterr()  # another recipe: `train` asks `resume_or_start` first, which names the change and clears the folder
    assert resume_or_start(tmp_path / "model", fingerprint_parts(real, preprocessing_spec(72), TrainConfig(**{**TINY_CONFIG, "epochs": 2}))) is None
    assert "(epochs 1 → 2); starting over" in capsys.readouterr().out and not (tmp_path / "model" / "training.json").exists()


MIXED_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, keras
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from boneage.data import load_dataset, split_dataset
    from boneage.preprocess import preprocessing_spec, build_cache
    from boneage.train import TrainConfig, train
    from boneage.evaluate import load_predictions
    from boneage.gradcam import gradcam
    from boneage.bundle import load_bundle
    from boneage.inference import Predictor, export_onnx
    out, data = Path(sys.argv[1]), sys.argv[2]
    df = split_dataset(load_dataset(data), seed=0)
    r = train(df, out, preprocessing_spec(72), TrainConfig(epochs=1, batch_size=8, seed=0, workers=0, precision="mixed_float16"))
    assert keras.mixed_precision.dtype_policy().name == "float32"  # restored
    bundle = load_bundle(out / "model")
    model = bundle.keras_model()
    dtypes = {l.compute_dtype for l in model.layers if hasattr(l, "compute_dtype")}
    cache, _ = build_cache(df.path, bundle.spec, out / "cache", progress=False)
    preds = load_predictions(model, df, cache, splits=("test",))
    cams, _ = gradcam(model, np.random.default_rng(0).uniform(-1, 1, (2, 72, 72, 3)).astype("float32"), [1, 0])
    export_onnx(load_bundle(out / "model"))  # what the comparison needs; the gate and intervals are another test's
    items = list(zip(df.path[df.split == "test"], df.male[df.split == "test"]))
    onnx = [p.bone_age_months for p in Predictor(out / "model", "onnx").predict_many(items)]
    kr = [p.bone_age_months for p in Predictor(out / "model", "keras").predict_many(items)]
    print(json.dumps({"precision": r.stats["precision"], "backend": keras.backend.backend(), "dtypes": sorted(dtypes),
                      "predictions_finite": bool(np.isfinite(preds.predicted).all()), "cams_dtype": str(cams.dtype),
                      "cams_finite": bool(np.isfinite(cams).all()), "bundle_precision": bundle.info["training"]["precision"],
                      "onnx_keras": float(np.abs(np.array(onnx) - np.array(kr)).max()), "n": len(onnx)}))
""")


@pytest.mark.long
def test_mixed_float16_end_to_end_on_a_cpu(tiny_phantom, tmp_path):
    "FP16 training forced on a CPU: the bundle serves float32, and Keras and ONNX agree (JAX: the course test on JAX trains in FP16)."
    backend = "tensorflow"
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run([sys.executable, "-c", MIXED_SCRIPT, str(tmp_path), str(tiny_phantom), str(Path(__file__).parent)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["precision"] == got["bundle_precision"] == "mixed_float16" and got["backend"] == backend
    assert got["dtypes"] == ["float32"] and got["predictions_finite"] and got["cams_dtype"] == "float32" and got["cams_finite"]
    assert got["onnx_keras"] < 0.05 and got["n"] == 6


def test_gradual_unfreezing_trains_the_head_first(tiny_phantom, tmp_path):
    r = run_train(tmp_path, tiny_phantom, 2, UNFREEZE="1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert pd.read_csv(tmp_path / "model" / "history.csv").epoch.tolist() == [1, 2]
    assert json.loads((tmp_path / "model" / "training.json").read_text())["config"]["unfreeze_after"] == 1


def test_a_frozen_backbone_keeps_its_initial_weights(tiny_phantom, tmp_path):
    import keras
    from boneage.data import load_dataset, split_dataset
    from boneage.preprocess import preprocessing_spec
    from boneage.train import train

    class Snapshot(keras.callbacks.Callback):
        layers = ("block1_conv1", "block14_sepconv2", "block14_sepconv2_bn", "head")
        def on_train_begin(self, logs=None): self.before = {n: self.model.get_layer(n).get_weights() for n in self.layers}
        def on_train_end(self, logs=None): self.after = {n: self.model.get_layer(n).get_weights() for n in self.layers}

    snap = Snapshot()
    cfg = TrainConfig(**{**TINY_CONFIG, "epochs": 1, "trainable_backbone": False})
    train(split_dataset(load_dataset(tiny_phantom), seed=0), tmp_path, preprocessing_spec(72), cfg, verbose=False, callbacks=[snap])
    for name in Snapshot.layers[:-1]:  # the backbone, batch-norm statistics included, is exactly as it started
        for a, b in zip(snap.before[name], snap.after[name]): np.testing.assert_array_equal(a, b)
    assert not np.allclose(snap.before["head"][0], snap.after["head"][0])  # the head learned


def test_learns_better_than_the_mean_age(trained_phantom):
    from boneage.evaluate import regression_metrics
    from boneage.preprocess import build_cache
    from boneage.train import predict_split
    result, df, data, out = trained_phantom
    cache, _ = build_cache(df.path, 72, out / "cache", progress=False)
    idx, pred = predict_split(result.model, df, "test", cache)
    y = df.bone_age_months.to_numpy()[idx]
    baseline = np.full_like(y, df.bone_age_months[df.split == "train"].mean())
    model_mae, baseline_mae = regression_metrics(y, pred)["mae"], regression_metrics(y, baseline)["mae"]
    assert model_mae < baseline_mae, (model_mae, baseline_mae)  # a tiny budget on a phantom without a size cue: a little better
    assert np.std(pred) > 5  # not a constant prediction


def test_workers_prepare_the_same_batches():
    from boneage.train import BoneAgeBatches
    cache = np.random.default_rng(0).integers(0, 255, (40, 16, 16), dtype=np.uint8)
    a = BoneAgeBatches(cache, np.zeros(40), np.arange(40.0), batch_size=8, shuffle=True, augment=True, seed=3)
    b = BoneAgeBatches(cache, np.zeros(40), np.arange(40.0), batch_size=8, shuffle=True, augment=True, seed=3, workers=2)
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i][0]["image"], b[i][0]["image"])
    assert b.workers == 2


DEVICES_SCRIPT = textwrap.dedent("""
    import json, os, sys
    backend = os.environ["KERAS_BACKEND"]
    if backend == "tensorflow":  # two logical CPU devices, set before TensorFlow starts using the CPU
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from boneage.data import load_dataset, split_dataset
    from boneage.preprocess import preprocessing_spec
    from boneage.runs import visible_devices
    from boneage.train import TrainConfig, train
    out, data = sys.argv[1], sys.argv[2]
    df = split_dataset(load_dataset(data, verbose=False), {"train": 0.8, "valid": 0.2}, seed=0)  # 32 and 8: whole batches
    got = {"devices_seen": len(visible_devices())}
    for devices, per_device in ((1, 8), (2, 4)):  # the same global batch of 8
        cfg = TrainConfig(epochs=1, batch_size=per_device, devices=devices, learning_rate=3e-4, pooling="avg", head_width=64,
                          batchnorm_momentum=0.9, seed=0, workers=0, augment=False)
        r = train(df, f"{out}/d{devices}", preprocessing_spec(64), cfg, verbose=False)
        got[devices] = {k: float(r.history[k].iloc[0]) for k in ("loss", "val_loss", "val_mae")} | {"used": r.stats["devices"]}
    print(json.dumps(got))
""")


@pytest.mark.long
def test_two_devices_train_like_one_on_the_same_global_batch(tiny_phantom, tmp_path):
    "TensorFlow's MirroredStrategy on two logical CPUs (JAX's data parallelism: the course test on JAX trains on two devices)."
    backend = "tensorflow"
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", DEVICES_SCRIPT, str(tmp_path), str(tiny_phantom)], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    one, two = got["1"], got["2"]
    assert got["devices_seen"] == 2 and one["used"] == 1 and two["used"] == 2
    for k in ("loss", "val_loss", "val_mae"):
        assert two[k] == pytest.approx(one[k], rel=2e-3), (k, one, two)


def test_a_padded_validation_batch_counts_every_image_once():
    from boneage.train import BoneAgeBatches
    cache = np.random.default_rng(0).integers(0, 255, (10, 8, 8), dtype=np.uint8)
    padded = BoneAgeBatches(cache, np.zeros(10), np.arange(10.0), batch_size=4, whole_batches="pad")
    dropped = BoneAgeBatches(cache, np.zeros(10), np.arange(10.0), batch_size=4, whole_batches="drop")
    assert len(padded) == 3 and len(dropped) == 2
    x, y, w = padded[2]
    assert x["image"].shape[0] == 4 and y.tolist() == [8, 9, 9, 9] and w.tolist() == [1, 1, 0, 0]
    assert sum(padded[i][2].sum() for i in range(3)) == 10  # every image weighted once


def test_cosine_schedule_decays_to_zero_over_the_epochs():
    from boneage.train import TrainConfig, scheduled_learning_rate
    assert scheduled_learning_rate(TrainConfig(learning_rate=3e-4), 10) == 3e-4  # the reference: constant
    lr = scheduled_learning_rate(TrainConfig(learning_rate=3e-4, lr_schedule="cosine", epochs=6), 10)
    assert float(lr(0)) == pytest.approx(3e-4) and float(lr(30)) == pytest.approx(1.5e-4, rel=1e-3) and float(lr(60)) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="lr_schedule 'step'"):
        scheduled_learning_rate(TrainConfig(lr_schedule="step"), 10)
