"""The real `train()` on phantoms at the reference size, in mixed precision: what the course's training does on a GPU.

    KERAS_BACKEND=jax python bench/gpu_train.py --size 256 --batch 64 --epochs 2 --precision mixed_float16

Draws phantoms (512²), splits them so that the training and validation parts are whole batches (one XLA compile per
shape), prepares the uint8 cache at `--size`, and trains with `boneage.train.train` — the float32 twin, the
checkpoints, the worker threads, everything the course does. Prints the epoch lines and one JSON line with the
images per second of the last epoch (the first one includes compilation) and where the bundle landed.
"""
import argparse, json, os, platform, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-batches", type=int, default=20, help="training images = this × batch")
    ap.add_argument("--precision", default="mixed_float16")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "boneage-gpu-train"))
    args = ap.parse_args()
    import keras
    from boneage.data import load_dataset, split_dataset
    from boneage.phantom_dataset import make_phantom_dataset
    from boneage.preprocess import build_cache, preprocessing_spec
    from boneage.runs import gpu_available
    from boneage.train import TrainConfig, train
    n_train = args.train_batches * args.batch
    n = n_train * 5 // 4  # 80% train, 16% valid (whole batches when batch divides train_batches × 0.2), 2% calib, 2% test
    fractions = {"train": 0.80, "valid": 0.16, "calib": 0.02, "test": 0.02}
    t0 = time.time()
    data = make_phantom_dataset(Path(args.out) / "phantom", n=n, size=512, seed=0, progress=False)
    df = split_dataset(load_dataset(data, verbose=False), fractions, seed=0)
    spec = preprocessing_spec(args.size)
    cache = build_cache(df.path, spec, Path(args.out) / "cache", progress=False)
    prep_s = time.time() - t0
    lines = []
    cfg = TrainConfig(batch_size=args.batch, epochs=args.epochs, learning_rate=3e-4, pooling="avg", head_width=64,
                      batchnorm_momentum=0.9, precision=args.precision, workers=args.workers, seed=0)
    t0 = time.time()
    r = train(df, args.out, spec, cfg, resume=False, cache=cache)
    train_s = time.time() - t0
    h = r.history
    print(json.dumps({"backend": keras.backend.backend(), "gpu": gpu_available(), "precision": r.stats["precision"],
                      "size": args.size, "batch": args.batch, "workers": args.workers, "n_train": r.stats["n_train"],
                      "n_valid": r.stats["n_valid"], "epochs": int(len(h)), "prepare_s": round(prep_s, 1),
                      "train_s": round(train_s, 1), "val_mae": [round(v, 2) for v in h.val_mae],
                      "bundle_dtype": json.loads((Path(args.out) / "model" / "bundle.json").read_text())["model_dtype"],
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores"}))


if __name__ == "__main__":
    main()
