"""RSNA-scale rehearsal: the whole course on N synthetic radiographs in the RSNA layout, timed and measured.

    python bench/scale.py --n 12611 --out /tmp/boneage-scale

Writes N phantom radiographs (512², as many as RSNA has, with the official labels' ages and sexes when the RSNA label
file is at hand) into an RSNA-layout folder — `boneage-training-dataset.csv` with the Kaggle header `id,boneage,male`
and the images in `boneage-training-dataset/` — then runs `boneage run --data-dir` on it at the course's image size
for one epoch. Reports, per notebook: wall time, the peak resident memory of the whole process tree (the command and
its kernel), and how many source images the notebook opened (counted with a Python audit hook in the kernels: once
the cache exists, the answer should be 0). Prints a table and one JSON line.
"""
import argparse, json, os, re, shutil, subprocess, sys, tempfile, textwrap, threading, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

AUDIT = textwrap.dedent("""
    # Loaded by every Python process of the run (sitecustomize): log each file opened under the images folder.
    import os, sys, time
    _images, _log = os.environ["SCALE_IMAGES"], os.environ["SCALE_LOG"]
    def _hook(event, args):
        if event != "open": return
        p = os.fspath(args[0]) if hasattr(args[0], "__fspath__") else args[0]
        if isinstance(p, str) and p.startswith(_images):
            with open(_log, "a") as f: f.write(f"{time.time():.3f}\\n")
    sys.addaudithook(_hook)
""")


def make_data(root, n, size, seed=0):
    "An RSNA-layout folder of `n` phantoms: the Kaggle file names, the official ages and sexes when available."
    import numpy as np
    from boneage.data import find_shared_data, read_labels
    from boneage.phantom_dataset import make_phantom_dataset, sample_rsna_like
    from boneage.clinical import parse_sex
    shared = find_shared_data()
    if shared is not None and (shared / "boneage-training-dataset.csv").is_file() and n <= 12611:
        labels = read_labels(shared / "boneage-training-dataset.csv").head(n)
        ages, male = labels.bone_age_months.astype(float).round().astype(int).clip(1, 239), labels.male.map(parse_sex).astype(bool)
        ids, source = labels.id.astype(int).to_numpy(), "the official RSNA labels"
    else:
        (ages, male), ids, source = sample_rsna_like(n, seed), np.arange(1, n + 1), "RSNA-like sampled labels"
    tmp = make_phantom_dataset(root / "drawn", size=size, seed=seed, bone_age_months=ages, male=male)
    images = root / "boneage-training-dataset"; images.mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(ids, 1): os.replace(tmp / "images" / f"{k}.png", images / f"{i}.png")
    (root / "boneage-training-dataset.csv").write_text("id,boneage,male\n" + "".join(
        f"{i},{a},{'True' if m else 'False'}\n" for i, a, m in zip(ids, np.asarray(ages), np.asarray(male))))
    shutil.rmtree(tmp)  # no masks, no phantom.json: to the course this is a folder of radiographs
    return images, source


def tree_rss(pid):
    import psutil
    try:
        p = psutil.Process(pid)
        return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
    except psutil.Error: return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12611)
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "boneage-scale"))
    ap.add_argument("--phantom-size", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="reuse the data folder of an earlier run")
    ap.add_argument("--only", nargs="+", help="run only these notebooks (a smoke test)")
    args = ap.parse_args()
    root = Path(args.out); data, run = root / "data", root / "run"
    t0 = time.time()
    if not (args.keep and (data / "boneage-training-dataset.csv").is_file()):
        shutil.rmtree(data, ignore_errors=True)
        images, source = make_data(data, args.n, args.phantom_size)
    else: images, source = data / "boneage-training-dataset", "an earlier run's folder"
    made_s = time.time() - t0
    shutil.rmtree(run, ignore_errors=True)
    hook = root / "audit"; hook.mkdir(exist_ok=True); (hook / "sitecustomize.py").write_text(AUDIT)
    log = root / "opened.log"; log.write_text("")
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "SCALE_IMAGES": str(images),
           "SCALE_LOG": str(log), "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "boneage", "run", "--data-dir", str(data),
           "--out", str(run), "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--no-progress"]
    if args.only: cmd += ["--only", *args.only]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    rows, current, peak = [], None, {"rss": 0}

    def sample():
        while proc.poll() is None:
            peak["rss"] = max(peak["rss"], tree_rss(proc.pid)); time.sleep(0.25)
    threading.Thread(target=sample, daemon=True).start()
    for line in proc.stdout:
        print(line, end="", flush=True)
        m = re.match(r"\[\d+/\d+\] (\S+)\.ipynb", line)
        if m:
            current = {"notebook": m.group(1), "start": time.time()}; peak["rss"] = 0
        elif current and re.match(r"\s+done in", line):
            current.update(seconds=round(time.time() - current["start"], 1), peak_rss_gib=round(peak["rss"] / 2**30, 2))
            rows.append(current); current = None
    proc.wait()
    opened = [float(t) for t in log.read_text().split()]
    for r in rows:
        r["images_opened"] = sum(r["start"] <= t <= r["start"] + r["seconds"] for t in opened); del r["start"]
    print(f"\nN = {args.n} ({source}), {args.phantom_size}² phantoms drawn in {made_s:.0f} s; course at "
          f"{args.image_size}², {args.epochs} epoch(s); exit code {proc.returncode}\n")
    print(f"{'notebook':18s} {'seconds':>8s} {'peak RSS GiB':>13s} {'source images opened':>21s}")
    for r in rows: print(f"{r['notebook']:18s} {r['seconds']:8.1f} {r['peak_rss_gib']:13.2f} {r['images_opened']:21d}")
    print(json.dumps({"n": args.n, "labels": source, "machine": f"{os.uname().machine}, {os.cpu_count()} cores",
                      "image_size": args.image_size, "epochs": args.epochs, "data_seconds": round(made_s), "rows": rows,
                      "exit_code": proc.returncode}))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
