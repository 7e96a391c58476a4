"""Archive prediction on Ray vs plain `boneage predict`: images/s of each command, and their ratios, in one run.

    python bench/archive.py                     # the 40 real radiographs beside the repository, linked 10 times
    python bench/archive.py --images DIR --copies 5 --bundle Bone_age_prediction/model

Each command is timed as a user runs it, from process start to exit, twice: on one copy of the images and on all
`--copies`. The difference is what the extra images cost, so "marginal images/s" leaves out the fixed start-up
(Python, the model, and for the archive command a local Ray and its actors); "whole run" keeps it in. The copies are
symbolic links in separate folders, so each is its own input (its own path, its own row). Without --bundle, an
untrained Xception bundle at --size is built (speed does not depend on the weights).
"""
import argparse, os, subprocess, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parent))
from predict import benchmark_images, make_bundle  # noqa: E402

CLI = [sys.executable, "-m", "boneage"]


def linked_archive(images, folder, copies):
    "`copies` folders of symbolic links to `images`."
    for c in range(copies):
        (folder / f"copy{c:02d}").mkdir(parents=True)
        for p in images: (folder / f"copy{c:02d}" / p.name).symlink_to(p.resolve())
    return folder


def timed(cmd):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if r.returncode not in (0, 1): sys.exit(f"{' '.join(map(str, cmd[3:]))} failed:\n{r.stderr[-3000:]}")
    return seconds


def commands(how, src, out, bundle, backend):
    if how == "plain":
        out.mkdir(parents=True, exist_ok=True)  # `boneage predict --out` writes into an existing folder
        return CLI + ["predict", src, "--sex", "M", "--model", bundle, "--backend", backend, "--format", "jsonl",
                      "--out", out / "rows.jsonl", "--no-progress"]
    return CLI + ["predict-archive", src, "--sex", "M", "--model", bundle, "--backend", backend, "--out",
                  out / "rows.parquet", "--actors", str(how), "--no-progress"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", help="folder of radiographs (default: the shared RSNA sample)")
    ap.add_argument("--bundle", help="a model bundle with an ONNX copy (default: an untrained one at --size)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--backend", default="onnx", choices=["onnx", "onnx-int8"])
    args = ap.parse_args()
    folder, images = benchmark_images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = Path(args.bundle) if args.bundle else make_bundle(tmp / "bundle", args.size)
        one, many = linked_archive(images, tmp / "one", 1), linked_archive(images, tmp / "many", args.copies)
        n1, nn = len(images), len(images) * args.copies
        print(f"{n1} images from {folder}, ×{args.copies} = {nn}; bundle {bundle}; backend {args.backend}; {os.cpu_count()} CPUs")
        rows = {}
        for how in ["plain", *args.actors]:
            t = [timed(commands(how, src, tmp / f"out-{how}-{i}", bundle, args.backend)) for i, src in enumerate((one, many))]
            # with few images the start-up's own variation can exceed what the extra images cost: no marginal rate then
            rows[how] = {"whole": nn / t[1], "marginal": (nn - n1) / (t[1] - t[0]) if t[1] > t[0] else float("nan"), "seconds": t}
        name = lambda how: "boneage predict" if how == "plain" else f"predict-archive, {how} actor{'s' * (how != 1)}"
        print(f"\n| command | {n1} images (s) | {nn} images (s) | whole run img/s | marginal img/s | ratio to plain (marginal) |")
        print("|---|---:|---:|---:|---:|---:|")
        for how, r in rows.items():
            print(f"| {name(how)} | {r['seconds'][0]:.1f} | {r['seconds'][1]:.1f} | {r['whole']:.1f} | {r['marginal']:.1f} | "
                  f"{r['marginal'] / rows['plain']['marginal']:.2f}× |")


if __name__ == "__main__":
    main()
