"""The reference recipe at the reference size on a GPU: Xception at 256² in mixed float16 on ≥ 10,000 phantoms, then
its test metrics beside the phantom's floor, and heat maps at 256² (8×8 to 32×32 maps, Grad-CAM and HiResCAM) scored against the masks.

    KERAS_BACKEND=jax python bench/gpu_reference.py --n-images 12000 --batch 32 --minutes 5.5 --out /tmp/ref

What the course does on a CPU at 96², done at the reference's 256² where a device allows: phantoms drawn in RSNA's
age and sex mix (`make_phantom_dataset`), the reference's 70/10/5/15 split, the uint8 cache, `boneage.train.train`
(the float32 twin, early stopping with patience 7, the best epoch kept) with the settings the course uses from random
weights (`course_config`: ImageNet weights cannot be had offline). Training stops at early stopping, at `--epochs`,
or when `--minutes` of training have passed, whichever comes first (the JSON says which). Writes into `--out`:
`gpu_reference.json` (metrics, floor, localisation, timings), `training_history.png` and Grad-CAM overlays.
"""
import argparse, json, os, platform, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=12000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--minutes", type=float, default=5.5, help="stop training after this many minutes (after an epoch)")
    ap.add_argument("--precision", default="mixed_float16")
    ap.add_argument("--n-scored", type=int, default=96, help="test images whose Grad-CAM maps are scored")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--work", default="/tmp/boneage-reference", help="phantoms, cache and model (large)")
    ap.add_argument("--out", default="reference-256", help="results and figures (small)")
    args = ap.parse_args()
    import keras, numpy as np
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from boneage.bundle import _jsonable
    from boneage.data import SPLIT_FRACTIONS, load_dataset, split_dataset
    from boneage.evaluate import regression_metrics, mae_by_age_band
    from boneage.gradcam import feature_layer, heat_maps, localisation_table, maps_and_gradients, phantom_masks, plot_gradcam
    from boneage.model import build_model
    from boneage.phantom_dataset import drawn_bone_age, make_phantom_dataset
    from boneage.preprocess import build_cache, preprocessing_spec, xception_scale
    from boneage.train import course_config, plot_history, predict_split, train
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    times, t0 = {}, time.time()
    data = make_phantom_dataset(work / "phantom", n=args.n_images, size=512, seed=0, n_jobs=os.cpu_count(), progress=False)
    times["draw_s"] = round(time.time() - t0, 1); t0 = time.time()
    df = split_dataset(load_dataset(data, verbose=False), SPLIT_FRACTIONS, seed=42)
    spec = preprocessing_spec(args.size)
    cache = build_cache(df.path, spec, work / "cache", progress=False)
    times["cache_s"] = round(time.time() - t0, 1)

    class Deadline(keras.callbacks.Callback):
        "Stop after the epoch during which the time budget ran out."
        def on_train_begin(self, logs=None): self.t0, self.hit = time.time(), False
        def on_epoch_end(self, epoch, logs=None):
            if time.time() - self.t0 > args.minutes * 60: self.model.stop_training, self.hit = True, True

    deadline = Deadline()
    cfg = course_config(batch_size=args.batch, epochs=args.epochs, patience=7, precision=args.precision,
                        workers=args.workers, seed=42)
    t0 = time.time()
    r = train(df, work, spec, cfg, resume=False, cache=cache, callbacks=[deadline])
    times["train_s"] = round(time.time() - t0, 1)
    h = r.history
    stopped = "deadline" if deadline.hit else ("early stopping" if len(h) < args.epochs else "epochs")
    plt.close(plot_history(h, out / "training_history.png"))

    t0 = time.time()
    idx, pred = predict_split(r.model, df, "test", cache[0], batch_size=64)
    y = df.bone_age_months.to_numpy(float)[idx]
    drawn = drawn_bone_age(data, df.id.to_numpy()[idx])
    metrics = {k: round(float(v), 3) for k, v in regression_metrics(y, pred).items()}
    metrics["within_12_months"] = round(float(np.mean(np.abs(pred - y) <= 12)), 4)
    metrics["predicted_range"] = [round(float(pred.min()), 1), round(float(pred.max()), 1)]
    floor = {"oracle_mae": round(float(np.mean(np.abs(drawn - y))), 3), "baseline_mae_mean_age":
             round(float(np.mean(np.abs(y - df.bone_age_months[df.split == "train"].mean()))), 3)}
    bands = _jsonable(mae_by_age_band(y, pred).round(2).to_dict(orient="records"))  # JSON has no NaN: an empty band is null
    times["predict_s"] = round(time.time() - t0, 1); t0 = time.time()

    # Grad-CAM: the best model (float32) against the same network with random weights, at 1/32 and 1/16
    test = df[df.split == "test"].sort_values("bone_age_months")
    rows = df.index.get_indexer(test.index)
    sel = np.linspace(0, len(test) - 1, min(args.n_scored, len(test))).astype(int)
    age_m, hand_m = phantom_masks(data, test.id.to_numpy()[sel], args.size)
    x, male = xception_scale(np.asarray(cache[0][rows[sel]])), test.male.to_numpy()[sel]
    keras.utils.set_random_seed(42)
    untrained = build_model(args.size, cfg.backbone, None, cfg.head_width, cfg.pooling, use_sex=cfg.use_sex)
    localisation = {"maximum": round(float(np.mean([1 / ((a & m).sum() / m.sum()) for a, m in zip(age_m, hand_m)])), 3),
                    "n_images": int(len(sel)),
                    "by_layer": localisation_table({"trained": r.model, "untrained": untrained}, x, male, age_m, hand_m, (32, 16, 8))}
    figures = []
    for k, i in enumerate(np.linspace(0, len(test) - 1, 4).astype(int)[1:3]):
        row, img = test.iloc[i], np.asarray(cache[0][rows[i]])
        regions = phantom_masks(data, [row.id], args.size)[0][0]
        for stride in (32, 8):
            a, g, pred1 = maps_and_gradients(r.model, xception_scale(img[None]), [row.male], stride=stride)
            signed, standard = heat_maps(a, g, "hirescam"), heat_maps(a, g, "hirescam", signed=False)
            name = f"gradcam_256_{row.id}_stride{stride}.png"
            plt.close(plot_gradcam(img, signed[0], f"phantom {row.id}, {'male' if row.male else 'female'}, label "
                                   f"{row.bone_age_months:.0f} months, predicted {pred1[0]:.0f}", out / name,
                                   regions=regions, standard=standard[0]))
            figures.append(name)
    times["gradcam_s"] = round(time.time() - t0, 1)
    result = {"recipe": {"backbone": cfg.backbone, "weights": "random (no ImageNet offline)", "image_size": args.size,
                         "precision": r.stats["precision"], "batch_size": args.batch, "learning_rate": cfg.learning_rate,
                         "pooling": cfg.pooling, "head_width": cfg.head_width, "patience": cfg.patience,
                         "max_epochs": args.epochs, "minutes_budget": args.minutes},
              "data": {"n_images": args.n_images, "phantom_size": 512, "split": {k: int(v) for k, v in df.split.value_counts().items()}},
              "training": {"epochs_run": int(len(h)), "best_epoch": int(h.val_loss.idxmin() + 1), "stopped_by": stopped,
                           "val_mae": [round(float(v), 2) for v in h.val_mae]},
              "test": metrics, "floor": floor, "mae_by_age_band": bands, "localisation": localisation,
              "figures": ["training_history.png", *figures], "seconds": times,
              "machine": {"backend": keras.backend.backend(), "keras": keras.__version__, "cpu": f"{platform.machine()}, {os.cpu_count()} cores",
                          "device": _device()}}
    (out / "gpu_reference.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def _device():
    try:
        import jax
        return str(jax.devices()[0].device_kind)
    except Exception:
        return "unknown"


if __name__ == "__main__":
    main()
