"""Images/s of this project's train step and predict, on whatever device the Keras backend sees.

    KERAS_BACKEND=jax python bench/train_throughput.py --size 256 --batch 4 64 --precision mixed_float16 [--timm]

Random images of a fixed shape (one XLA compile per batch size), the real model from `boneage.model`, Adam, MSE.
Warm-up steps (compilation) are not timed. `--timm` adds timm's `legacy_xception` (PyTorch, eager AMP,
channels_last) as a reference point on the same device; `--pipeline` adds the input pipeline's own rate from a
uint8 cache (decode excluded: the cache is what training reads). Prints a table and one JSON line.
"""
import argparse, json, os, platform, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def keras_rates(size, batch, precision, steps, warmup, backbone, lr_scale, predict=True):
    import keras, numpy as np
    from boneage.model import build_model
    keras.mixed_precision.set_dtype_policy(precision)
    keras.utils.set_random_seed(0)
    model = build_model(size, backbone)
    lr = 1e-3 * (batch / 4 if lr_scale else 1)
    model.compile(keras.optimizers.Adam(lr), loss="mse", jit_compile="auto")
    rng = np.random.default_rng(0)
    x = {"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype("float32"),
         "male": rng.integers(0, 2, (batch, 1)).astype("float32")}
    y = rng.uniform(0, 228, batch).astype("float32")
    t = time.perf_counter()
    for _ in range(warmup): model.train_on_batch(x, y)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps): loss = model.train_on_batch(x, y)
    float(np.asarray(loss).ravel()[0])  # wait for the device
    train = steps * batch / (time.perf_counter() - t)
    if not predict:
        keras.mixed_precision.set_dtype_policy("float32")
        return {"train_img_s": train, "warmup_s": compile_s}
    for _ in range(2): model.predict_on_batch(x)
    t = time.perf_counter()
    for _ in range(steps): out = model.predict_on_batch(x)
    np.asarray(out)
    predict = steps * batch / (time.perf_counter() - t)
    keras.mixed_precision.set_dtype_policy("float32")
    return {"train_img_s": train, "predict_img_s": predict, "warmup_s": compile_s}


def timm_rates(size, batch, steps, warmup):
    import torch, timm
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = timm.create_model("legacy_xception", pretrained=False, num_classes=1).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    scaler = torch.amp.GradScaler(enabled=dev == "cuda")
    x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    y = torch.rand(batch, 1, device=dev) * 228

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.float16, enabled=dev == "cuda"):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward(); scaler.step(opt); scaler.update()

    for _ in range(warmup): step()
    if dev == "cuda": torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps): step()
    if dev == "cuda": torch.cuda.synchronize()
    return {"train_img_s": steps * batch / (time.perf_counter() - t)}


def pipeline_rate(size, batch, workers=0, batches=24):
    "Images/s the training batches come out at (augmented, scaled) from a uint8 cache, made by `workers` threads."
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    from boneage.train import BoneAgeBatches
    n = batches * batch
    cache = np.random.default_rng(0).integers(0, 255, (n, size, size), dtype=np.uint8)
    data = BoneAgeBatches(cache, np.zeros(n), np.zeros(n), batch_size=batch, shuffle=True, augment=True)
    data[0]  # warm-up: first-call allocations
    t = time.perf_counter()
    if workers:  # what keras.utils.PyDataset(workers=...) does: threads fetch the batches ahead of the model
        with ThreadPoolExecutor(workers) as pool: seen = sum(len(y) for _, y in pool.map(data.__getitem__, range(len(data))))
    else: seen = sum(len(data[b][1]) for b in range(len(data)))
    return seen / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 64])
    ap.add_argument("--precision", default="auto", help="auto (mixed_float16 on a GPU), float32, mixed_float16, mixed_bfloat16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--backbone", default="Xception")
    ap.add_argument("--lr-scale", action="store_true", help="scale the learning rate with the batch (1e-3 at batch 4)")
    ap.add_argument("--timm", action="store_true", help="also time timm legacy_xception (PyTorch eager AMP)")
    ap.add_argument("--pipeline", action="store_true", help="also time the augmented input pipeline from a uint8 cache")
    ap.add_argument("--pipeline-only", action="store_true", help="time only the input pipeline (no model)")
    ap.add_argument("--no-predict", action="store_true", help="time training only (saves a compile per batch size)")
    args = ap.parse_args()
    import keras
    from boneage.runs import choose_precision
    precision = choose_precision(args.precision)
    rows = []
    args.pipeline |= args.pipeline_only
    for b in args.batch:
        if not args.pipeline_only:
            r = keras_rates(args.size, b, precision, args.steps, args.warmup, args.backbone, args.lr_scale, not args.no_predict)
            rows.append({"impl": f"keras-{keras.backend.backend()}", "precision": precision, "batch": b, **r})
            print(rows[-1], flush=True)
        if args.timm:
            rows.append({"impl": "timm legacy_xception", "precision": "amp fp16", "batch": b,
                         **timm_rates(args.size, b, args.steps, args.warmup)})
            print(rows[-1], flush=True)
        if args.pipeline:
            for w in sorted({0, 1, 2, os.cpu_count() or 1}):
                rows.append({"impl": f"input pipeline, {w} worker threads", "batch": b, "train_img_s": pipeline_rate(args.size, b, w)})
                print(rows[-1], flush=True)
    print(f"\n{'implementation':42s} {'precision':15s} {'batch':>5s} {'train img/s':>12s} {'predict img/s':>14s}")
    for r in rows:
        pred = f"{r['predict_img_s']:14.1f}" if "predict_img_s" in r else f"{'':14s}"
        print(f"{r['impl']:42s} {r.get('precision', ''):15s} {r['batch']:5d} {r['train_img_s']:12.1f} {pred}")
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "size": args.size,
                      "rows": [{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}))


if __name__ == "__main__":
    main()
