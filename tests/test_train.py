"""Training: the recipe's files, resuming after a hard kill, both backends, and that it learns."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from boneage.train import TrainConfig, choose_precision, regression_summary

TRAIN_SCRIPT = textwrap.dedent("""
    import sys
    from boneage.data import load_dataset, split_dataset
    from boneage.phantom import make_phantom_dataset
    from boneage.train import TrainConfig, train
    out, data, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    df = split_dataset(load_dataset(data), seed=0)
    cfg = TrainConfig(image_size=72, epochs=epochs, batch_size=8, patience=50, learning_rate=1e-4, seed=0)
    r = train(df, out, cfg, resume=True)
    print("finished", r.stats["epochs_run"], r.stats["backend"])
""")


def run_train(out, data, epochs, backend="tensorflow", **kw):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(out), str(data), str(epochs)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def tiny_phantom(tmp_path_factory):
    from boneage.phantom import make_phantom_dataset
    return make_phantom_dataset(tmp_path_factory.mktemp("ph") / "ph", n=40, size=96, seed=5, progress=False)


def test_precision_choice_on_cpu():
    assert choose_precision() == "float32"  # no GPU here: float16 would be emulated, slowly
    assert choose_precision("mixed_bfloat16") == "mixed_bfloat16"


def test_regression_summary_matches_hand_computation():
    y, p = np.array([10.0, 20, 30, 40]), np.array([12.0, 18, 33, 40])
    s = regression_summary(y, p)
    assert s["mae"] == pytest.approx((2 + 2 + 3 + 0) / 4)
    assert s["rmse"] == pytest.approx(np.sqrt((4 + 4 + 9 + 0) / 4))
    assert s["r2"] == pytest.approx(1 - 17 / 500)


def test_resume_after_sigkill_loses_no_finished_epoch(tiny_phantom, tmp_path):
    out = tmp_path / "run"
    hist = out / "model" / "history.csv"
    p = run_train(out, tiny_phantom, 6)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if hist.exists() and len(pd.read_csv(hist)) >= 2: break
        time.sleep(0.2)
    assert p.poll() is None, "training ended before it could be killed: " + p.stdout.read()[-2000:]
    time.sleep(0.5)  # somewhere inside the next epoch
    p.send_signal(signal.SIGKILL); p.wait()
    before = pd.read_csv(hist)
    k = len(before)
    assert 2 <= k < 6 and (out / "model" / "best.keras").exists()
    assert not (out / "model" / "training.json").exists()

    q = run_train(out, tiny_phantom, 6)
    log = q.communicate(timeout=600)[0]
    assert q.returncode == 0, log[-3000:]
    assert f"epoch {k + 1}/6" in log and "epoch 1/6" not in log  # continued, not restarted
    after = pd.read_csv(hist)
    assert after.epoch.tolist() == [1, 2, 3, 4, 5, 6]  # every epoch once
    pd.testing.assert_frame_equal(after.iloc[:k], before)  # finished epochs kept as they were
    stats = json.loads((out / "model" / "training.json").read_text())
    assert stats["epochs_run"] == 6 and 1 <= stats["best_epoch"] <= 6
    assert stats["best_val_loss"] == pytest.approx(after.val_loss.min())
    assert not (out / "model" / "backup").exists()
    assert not [f for f in (out / "model").rglob("*") if ".tmp" in f.name or "partial" in f.name]

    r = run_train(out, tiny_phantom, 6)  # a finished run is loaded, not retrained
    log = r.communicate(timeout=300)[0]
    assert r.returncode == 0 and "already finished" in log and "epoch 1/6" not in log


def test_trains_on_jax_backend(tiny_phantom, tmp_path):
    pytest.importorskip("jax")
    p = run_train(tmp_path, tiny_phantom, 2, backend="jax")
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 0, log[-3000:]
    assert "finished 2 jax" in log
    stats = json.loads((tmp_path / "model" / "training.json").read_text())
    assert stats["backend"] == "jax" and stats["precision"] == "float32"


def test_learns_better_than_the_mean_age(trained_phantom):
    from boneage.train import predict_split
    result, df, data, out = trained_phantom
    idx, pred = predict_split(result.model, df, "test", 72, out / "cache")
    y = df.bone_age_months.to_numpy()[idx]
    baseline = np.full_like(y, df.bone_age_months[df.split == "train"].mean())
    model_mae, baseline_mae = regression_summary(y, pred)["mae"], regression_summary(y, baseline)["mae"]
    assert model_mae < 0.9 * baseline_mae, (model_mae, baseline_mae)
    assert np.std(pred) > 5  # not a constant prediction


def test_resume_with_other_settings_starts_over(tiny_phantom, tmp_path, capsys):
    from boneage.data import load_dataset, split_dataset
    from boneage.train import train
    model_dir = tmp_path / "model"; (model_dir / "backup").mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({"image_size": 128, "precision_used": "float32"}))
    (model_dir / "backup" / "latest.weights.h5").write_bytes(b"weights of another model")
    (model_dir / "backup" / "training_metadata.json").write_text('{"epoch": 3, "batch": 0}')
    df = split_dataset(load_dataset(tiny_phantom), seed=0)
    r = train(df, tmp_path, TrainConfig(image_size=72, epochs=1, batch_size=8, seed=0), resume=True)
    assert "settings differ from the interrupted run; starting over" in capsys.readouterr().out
    assert r.stats["epochs_run"] == 1 and r.history.epoch.tolist() == [1]
