"""Test MAE against minutes of training, at the course's settings: what more phantoms, more epochs, a bigger image or a
learning-rate schedule buy per minute on this machine.

    python bench/time_to_accuracy.py --n-images 2000 --size 96 --epochs 14 --schedule cosine

Draws the course's phantom set (512², seed 42, the course's split), builds the uint8 cache, then trains with
`boneage.train.train` and the course's settings from random weights. After every epoch a callback predicts the test
split; its time is excluded from the training minutes. Prints one row per epoch (minutes of training, validation
and test MAE, test R²) and one JSON line. Several `--config` strings (`n_images,size,epochs,schedule`) run one after
another in the same process, e.g. `--config 2000,96,14,cosine 2000,96,14,constant`.
"""
import argparse, json, os, platform, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_one(n_images, size, epochs, schedule, batch, work, precision, workers, print_fn=print):
    import keras, numpy as np
    from boneage.data import PHANTOM_SPLIT_FRACTIONS, load_dataset, split_dataset
    from boneage.evaluate import regression_metrics
    from boneage.phantom_dataset import drawn_bone_age, make_phantom_dataset
    from boneage.preprocess import build_cache, preprocessing_spec
    from boneage.train import course_config, predict_split, train
    data = make_phantom_dataset(Path(work) / f"phantom-{n_images}", n=n_images, size=512, seed=42, progress=False)
    df = split_dataset(load_dataset(data, verbose=False), PHANTOM_SPLIT_FRACTIONS, seed=42)
    spec = preprocessing_spec(size)
    cache = build_cache(df.path, spec, Path(work) / "cache", progress=False)
    test_idx = np.flatnonzero(df.split == "test")
    y = df.bone_age_months.to_numpy(float)[test_idx]
    floor = float(np.mean(np.abs(drawn_bone_age(data, df.id.to_numpy()[test_idx]) - y)))
    rows = []

    class TestEachEpoch(keras.callbacks.Callback):
        def on_train_begin(self, logs=None): self.training_s, self.t = 0.0, time.time()
        def on_epoch_end(self, epoch, logs=None):
            self.training_s += time.time() - self.t
            _, pred = predict_split(self.model, df, "test", cache[0])
            m = regression_metrics(y, pred)
            rows.append({"epoch": epoch + 1, "minutes": round(self.training_s / 60, 2), "val_mae": round(float(logs["val_mae"]), 2),
                         "test_mae": round(float(m["mae"]), 2), "test_r2": round(float(m["r2"]), 3)})
            print_fn(f"{n_images:>6} {size:>4} {schedule:>8} {rows[-1]['epoch']:>5} {rows[-1]['minutes']:>8.2f} "
                     f"{rows[-1]['val_mae']:>8.2f} {rows[-1]['test_mae']:>8.2f} {rows[-1]['test_r2']:>7.3f}", flush=True)
            self.t = time.time()

    cfg = course_config(batch_size=batch, epochs=epochs, lr_schedule=schedule, precision=precision, workers=workers, seed=42)
    train(df, Path(work) / f"run-{n_images}-{size}-{epochs}-{schedule}", spec, cfg, resume=False, cache=cache,
          callbacks=[TestEachEpoch()], verbose=False)
    counts = {k: int(v) for k, v in df.split.value_counts().items()}
    return {"n_images": n_images, "split": counts, "size": size, "epochs": epochs, "schedule": schedule, "batch": batch,
            "floor_mae": round(floor, 2), "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--schedule", default="cosine", choices=["constant", "cosine"])
    ap.add_argument("--config", nargs="*", default=[], help="n_images,size,epochs,schedule (several run in turn)")
    ap.add_argument("--batch", type=int, default=8, help="the course's batch size")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "boneage-time-to-accuracy"))
    ap.add_argument("--json", help="also append each result as a JSON line to this file")
    args = ap.parse_args()
    configs = [c.split(",") for c in args.config] or [[args.n_images, args.size, args.epochs, args.schedule]]
    print(f"{'images':>6} {'size':>4} {'schedule':>8} {'epoch':>5} {'minutes':>8} {'val MAE':>8} {'test MAE':>8} {'test R²':>7}")
    for n, size, epochs, schedule in configs:
        t0 = time.time()
        r = run_one(int(n), int(size), int(epochs), schedule, args.batch, args.work, args.precision, args.workers)
        import keras
        r.update(wall_s=round(time.time() - t0, 1), machine=f"{platform.machine()}, {os.cpu_count()} cores",
                 backend=keras.backend.backend())
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "a") as f: f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
