"""Prediction speed end to end (decode included): cold start and warm images/s, ONNX Runtime (float32, int8) vs Keras.

    python bench/predict.py                      # the 40 real radiographs beside the repository, 256², batch 1 and 8
    python bench/predict.py --backends onnx onnx-int8 --batch 8 --repeats 1
    python bench/predict.py --images DIR --bundle Bone_age_prediction/model
    python bench/predict.py --bundle Bone_age_prediction/model_real --backends keras --resize-check --batch 8 --repeats 1

Cold start is a fresh `boneage predict IMAGE` process, from launch to its exit after printing the one result.
Warm is a loaded `Predictor` running `predict_many` over the images (read, letterbox, scale, model) after one
warm-up pass. Beside it, a plain ONNX Runtime session on the same ONNX file (OpenCV decode, one resize, no checks,
no gate, reading on one thread) and the ratio of the two. Without --bundle, an untrained Xception bundle at --size is built and exported to ONNX in a temporary
folder: speed does not depend on the weights. For `onnx-int8` on a bundle without an int8 copy, one is made in a
temporary copy of the bundle, calibrated on the first 16 benchmark images (speed, not accuracy: the inference
notebook measures what int8 costs in accuracy on the test split).
"""
import argparse, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def make_bundle(folder, size):
    "An untrained `size`² Xception saved as a bundle with an ONNX copy."
    import keras
    from boneage.bundle import MODEL_FILE, load_bundle, start_bundle
    from boneage.inference import export_onnx
    from boneage.model import build_model
    from boneage.preprocess import preprocessing_spec
    folder.mkdir(parents=True, exist_ok=True)
    build_model(size, weights=None).save(folder / MODEL_FILE)
    start_bundle(folder, preprocessing_spec(size), {"kind": "none", "n_images": 0}, {"backbone": "Xception"}, "bench", keras.__version__)
    export_onnx(load_bundle(folder))
    return folder


def with_int8(bundle, images, folder):
    "A copy of `bundle` with an int8 ONNX copy calibrated on `images`."
    import shutil
    import numpy as np
    from boneage.bundle import load_bundle
    from boneage.inference import quantize_onnx
    from boneage.preprocess import xception_scale
    from boneage.reading import read_image
    copy = folder / "bundle-int8"
    shutil.copytree(bundle, copy)
    b = load_bundle(copy)
    calib = xception_scale(np.stack([b.prepare(read_image(p).pixels) for p in images[:16]]))
    quantize_onnx(b, calib, np.ones(len(calib), np.float32))
    return copy


def cold_start(image, bundle, backend, repeats):
    cmd = [sys.executable, "-m", "boneage", "predict", str(image),
           "--sex", "M", "--model", str(bundle), "--backend", backend, "--format", "csv", "--no-progress"]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        assert r.returncode in (0, 1) and r.stdout.count("\n") == 2, r.stderr[-2000:]  # one row (1: the gate warned about it)
    return statistics.median(times)


def benchmark_images(images_arg):
    "The folder to measure on (`--images`, else the shared RSNA sample's images) and its radiographs, as `boneage predict` finds them."
    from boneage.batch import find_images
    if images_arg: folder = Path(images_arg)
    else:
        from boneage.data import find_rsna_sample
        if (sample := find_rsna_sample()) is None: sys.exit("no --images and no shared RSNA sample beside the repository")
        folder = sample / "images"
    return folder, find_images(folder)


def warm(images, bundle, backend, batch, passes):
    from boneage.inference import Predictor
    p = Predictor(bundle, backend, batch_size=batch)
    items = [(str(i), True) for i in images]
    list(p.predict_many(items))  # warm-up: first-call allocations, file cache
    t0 = time.perf_counter()
    for _ in range(passes): n = sum(1 for _ in p.predict_many(items))
    return passes * n / (time.perf_counter() - t0)


def reading_ms(images):
    "Milliseconds to read one radiograph (decode and convert to 8-bit grey), on one thread: the part no batch shares."
    from boneage.reading import read_image
    read_image(images[0])
    t0 = time.perf_counter()
    for p in images: read_image(p)
    return 1000 * (time.perf_counter() - t0) / len(images)


def network_only(bundle, backend, batch, steps=5):
    "Images/s of the network alone on a prepared random batch: what decoding and resizing cost is the difference."
    from boneage.bundle import load_bundle
    from boneage.inference import KerasRunner, OnnxRunner, _check_batch
    b = load_bundle(bundle)
    run = KerasRunner(b) if backend == "keras" else OnnxRunner(b.onnx_file("onnx_int8" if backend == "onnx-int8" else "onnx"))
    image, male = _check_batch(b.image_size, batch)
    run(image, male)
    t0 = time.perf_counter()
    for _ in range(steps): run(image, male)
    return steps * batch / (time.perf_counter() - t0)


def plain_onnx(images, onnx_file, size, batch, passes):
    "Images/s of a plain pipeline on the same ONNX file: OpenCV decode, one area resize, scale, an ONNX Runtime session; no checks, no gate."
    import cv2, numpy as np, onnxruntime as ort
    opts = ort.SessionOptions(); opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
    def prepare(path):
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        h, w = img.shape
        nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
        out = np.zeros((size, size), np.uint8)
        out[(size - nh) // 2:(size - nh) // 2 + nh, (size - nw) // 2:(size - nw) // 2 + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        return out
    def one_pass():
        for i in range(0, len(images), batch):
            x = np.stack([prepare(p) for p in images[i:i + batch]]).astype(np.float32) / 127.5 - 1
            session.run(None, {"image": np.repeat(x[..., None], 3, -1), "male": np.ones((len(x), 1), np.float32)})
    one_pass()  # warm-up, as for the predictor
    t0 = time.perf_counter()
    for _ in range(passes): one_pass()
    return passes * len(images) / (time.perf_counter() - t0)


def resize_check(images, bundle, backend):
    """A cheaper shrink against the letterbox's one area resize: whole blocks first (OpenCV's fast integer-factor area
    path) while the image stays at least 4× the model size, then area. Prints each one's time per image, the grey levels
    the two give apart, and how far the bundle's bone ages move on these images when predicted through each."""
    import cv2, numpy as np
    import boneage.preprocess as pp
    from boneage.bundle import load_bundle
    from boneage.inference import Predictor
    from boneage.reading import read_image
    size, one_step = load_bundle(bundle).image_size, pp.letterbox
    def two_steps(img, size=256, interpolation=None):
        k = int(max(img.shape[:2]) / (4 * size)) if interpolation is None else 1
        if k >= 2: img = cv2.resize(img, (img.shape[1] // k, img.shape[0] // k), interpolation=cv2.INTER_AREA)
        return one_step(img, size, interpolation)
    pixels = [read_image(p).pixels for p in images]
    ms, ages = {}, {}
    for name, shrink in (("one area resize", one_step), ("two steps", two_steps)):
        t0 = time.perf_counter()
        for img in pixels: shrink(img, size)
        ms[name] = 1000 * (time.perf_counter() - t0) / len(pixels)
        pp.letterbox = shrink  # the bundle's own preparation, with this shrink
        try: ages[name] = np.array([r.bone_age_months for r in Predictor(bundle, backend, gate=False).predict_many([(str(i), True) for i in images])], float)
        finally: pp.letterbox = one_step
    diff = np.concatenate([np.abs(one_step(i, size).astype(int) - two_steps(i, size)).ravel() for i in pixels])
    moved = np.abs(ages["one area resize"] - ages["two steps"])
    print(f"resize to {size}²: one area resize {ms['one area resize']:.1f} ms, two steps {ms['two steps']:.1f} ms per image; "
          f"pixels apart by {diff.mean():.2f} grey levels on average (largest {diff.max()}); {backend} bone ages moved by "
          f"{moved.mean():.2f} months on average (largest {moved.max():.2f}) over {len(images)} images")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", help="folder of radiographs (default: the shared RSNA sample)")
    ap.add_argument("--bundle", help="a model bundle with an ONNX copy (default: an untrained one at --size)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="cold starts per backend (median reported)")
    ap.add_argument("--backends", nargs="+", default=["onnx", "onnx-int8", "keras"], choices=["onnx", "onnx-int8", "keras"])
    ap.add_argument("--resize-check", action="store_true", help="also compare a cheaper two-step shrink: time, pixels, bone ages")
    args = ap.parse_args()
    folder, images = benchmark_images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else make_bundle(Path(tmp) / "bundle", args.size)
        print(f"{len(images)} images from {folder}; bundle {bundle}; {os.cpu_count()} CPUs")
        print(f"reading one image (decode to 8-bit grey, one thread): {reading_ms(images):.1f} ms")
        if args.resize_check: resize_check(images, bundle, args.backends[0])
        from boneage.bundle import load_bundle
        int8_bundle = bundle
        if "onnx-int8" in args.backends and load_bundle(bundle).onnx_file("onnx_int8") is None:
            int8_bundle = with_int8(bundle, images, Path(tmp))
        for backend in args.backends:
            bundle_here = int8_bundle if backend == "onnx-int8" else bundle
            print(f"{backend:9s} cold start (process start → first result): "
                  f"{cold_start(images[0], bundle_here, backend, args.repeats):.2f} s", flush=True)
            for b in args.batch:
                rate = warm(images, bundle_here, backend, b, args.passes)
                line = (f"{backend:9s} warm, batch {b}: {rate:.1f} images/s (decode included); network alone "
                        f"{network_only(bundle_here, backend, b):.1f} images/s")
                if backend != "keras":
                    here = load_bundle(bundle_here)
                    base = plain_onnx(images, here.onnx_file("onnx_int8" if backend == "onnx-int8" else "onnx"), here.image_size, b, args.passes)
                    line += f"; a plain ONNX Runtime session on the same file {base:.1f} images/s, ratio {rate / base:.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
