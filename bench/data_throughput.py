"""Throughput of the data path: phantom generation, uint8 cache build, and the Keras input pipeline.

    python bench/data_throughput.py [--data-dir RSNA_FOLDER] [--n-phantom 500] [--phantom-size 512] [--image-size 256]

Prints a table and one JSON line. The cache is built from scratch (a fresh temporary folder) so the figure is a
cold build: decode + letterbox + write, with the file system's page cache as it happens to be.
"""
import argparse, json, os, platform, tempfile, time
from pathlib import Path

import numpy as np

from boneage.data import find_rsna_sample, load_dataset
from boneage.phantom_dataset import make_phantom_dataset
from boneage.preprocess import build_cache
from boneage.train import BoneAgeBatches


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="RSNA-layout folder for the cache figure (default: the RSNA sample when present)")
    ap.add_argument("--n-phantom", type=int, default=500)
    ap.add_argument("--phantom-size", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=256)
    args = ap.parse_args()
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "phantom_size": args.phantom_size,
           "image_size": args.image_size}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ph = make_phantom_dataset(Path(tmp) / "ph", n=args.n_phantom, size=args.phantom_size, seed=0, progress=False)
        res["phantom_images_per_s"] = args.n_phantom / (time.perf_counter() - t)
        data_dir = args.data_dir or find_rsna_sample()
        for name, folder in [("phantom", ph)] + ([("real", Path(data_dir))] if data_dir else []):
            df = load_dataset(folder, verbose=False)
            t = time.perf_counter()
            cache, failed = build_cache(df.path, args.image_size, Path(tmp) / f"cache-{name}", progress=False)
            res[f"cache_build_{name}_images_per_s"] = len(df) / (time.perf_counter() - t)
            res[f"cache_build_{name}_n"] = len(df)
        batches = BoneAgeBatches(cache, df.male, df.bone_age_months, batch_size=64, shuffle=True, augment=True)
        t, n = time.perf_counter(), 0
        for b in range(len(batches)): n += len(batches[b][1])
        res["pipeline_augmented_images_per_s"] = n / (time.perf_counter() - t)
    for k, v in res.items(): print(f"{k:38s} {v:.1f}" if isinstance(v, float) else f"{k:38s} {v}")
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
