"""How much the course's headline numbers move with the seed: the phantom, the split and the initial weights.

    python bench/seeds.py --seeds 1 2 --with Bone_age_prediction --write Bone_age_prediction

Runs the course's core (data, preprocessing, training, evaluation, bias) once per seed at the course defaults into a
temporary folder, adds an existing run (`--with`, e.g. the default seed-42 run), and reports each headline metric per
seed with the spread (min–max and standard deviation). `--write DIR` saves `seed_spread.md` and `seed_spread.json`
there; the docs' results page shows the table.
"""
import argparse, json, os, platform, subprocess, sys, tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METRICS = [("R²", lambda m: m["regression"]["r2"], "{:.3f}"), ("MAE (months)", lambda m: m["regression"]["mae"], "{:.2f}"),
           ("RMSE (months)", lambda m: m["regression"]["rmse"], "{:.2f}"),
           ("within ±12 months", lambda m: m["regression"]["within_12"], "{:.1%}"),
           ("stage accuracy", lambda m: m["stages"]["accuracy"], "{:.1%}"), ("stage QWK", lambda m: m["stages"]["qwk"], "{:.3f}"),
           ("MAE gap boys − girls (months)", lambda m: m["sex_bias"]["gaps"]["mae"]["male_minus_female"], "{:+.2f}")]


def run(seed, out):
    cmd = [sys.executable, "-m", "boneage", "run", "--seed", str(seed),
           "--out", str(out), "--only", "00", "02", "04", "05", "06", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, cwd=ROOT)
    if r.returncode: sys.exit(f"seed {seed} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads((out / "metrics.json").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--with", dest="existing", help="a finished course run to include (its seed is read from it)")
    ap.add_argument("--write", help="folder to write seed_spread.md and seed_spread.json into")
    args = ap.parse_args()
    runs = {}
    if args.existing:
        cfg = json.loads((Path(args.existing) / "model" / "training.json").read_text())["config"]
        runs[cfg["seed"]] = json.loads((Path(args.existing) / "metrics.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.seeds:
            print(f"seed {s}…", flush=True)
            runs[s] = run(s, Path(tmp) / f"seed{s}")
    seeds = sorted(runs)
    rows = []
    for name, get, fmt in METRICS:
        v = np.array([get(runs[s]) for s in seeds], float)
        rows.append({"metric": name, **{f"seed {s}": fmt.format(x) for s, x in zip(seeds, v)},
                     "range": f"{fmt.format(v.min())} to {fmt.format(v.max())}", "sd": fmt.format(v.std(ddof=1)).lstrip("+")})
    def verdict(m):
        outcome, gap = m["sex_bias"]["outcome"], m["sex_bias"]["gaps"]["mae"]["male_minus_female"]
        return f"{outcome} (worse for {'boys' if gap > 0 else 'girls'})" if outcome == "bias" else outcome
    verdicts = {f"seed {s}": verdict(runs[s]) for s in seeds}
    cols = list(rows[0])
    md = ["# Spread over seeds", "",
          f"The course's default run repeated with {len(seeds)} seeds ({', '.join(map(str, seeds))}): each seed draws other phantoms, "
          f"cuts another split and starts from other weights. One machine ({platform.machine()}, {os.cpu_count()} cores), "
          f"{runs[seeds[0]]['data']} per run. A difference between two runs smaller than this spread is noise.", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    md += ["", "Sex-bias verdicts: " + ", ".join(f"{k}: {v}" for k, v in verdicts.items()) + ". A verdict that changes "
           "direction with the seed is about this run's phantoms and split, not about the recipe."]
    print("\n".join(md))
    if args.write:
        Path(args.write, "seed_spread.md").write_text("\n".join(md) + "\n")
        Path(args.write, "seed_spread.json").write_text(json.dumps({"seeds": seeds, "rows": rows, "verdicts": verdicts}, indent=1))
    print(json.dumps({"seeds": seeds, "rows": rows, "verdicts": verdicts}))


if __name__ == "__main__":
    main()
