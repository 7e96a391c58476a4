"""The input gate against what an archive holds: real radiographs in every form, damaged files, things that are not radiographs.

    python bench/input_gate.py --model Bone_age_prediction/model [--out /tmp/boneage-gate]

Builds the files (from the 40 RSNA radiographs when `../shared/data` is at hand, from phantoms otherwise, plus
pydicom's own test files), runs `boneage predict` once over the whole folder as a user would, and counts per class of
input: files, rows written, predicted (ok or warning), rejected by a rule, flagged by the learned score, errors,
tracebacks and batch aborts. Also the learned score's flag rate on the course's test split. Prints a markdown table and
one JSON line.
"""
import argparse, collections, io, json, os, shutil, subprocess, sys, tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(root, real):
    "Write the inputs, grouped by class, and return {class: [paths]}."
    import cv2
    from PIL import Image
    import pydicom
    from boneage.reading import write_dicom
    classes = collections.defaultdict(list)
    rng = np.random.default_rng(0)
    def put(cls, name, writer):
        p = root / cls / name; p.parent.mkdir(parents=True, exist_ok=True); writer(p); classes[cls].append(p)
    for k, img in enumerate(real):
        put("radiograph, 8-bit PNG", f"{k}.png", lambda p: Image.fromarray(img).save(p))
        put("radiograph, JPEG", f"{k}.jpg", lambda p: Image.fromarray(img).save(p, quality=90))
        put("radiograph, 16-bit PNG", f"{k}.png", lambda p: Image.fromarray(img.astype(np.uint16) * 257).save(p))
        put("radiograph, 16-bit TIFF", f"{k}.tif", lambda p: Image.fromarray(img.astype(np.uint16) * 257).save(p))
        put("radiograph, 12-bit DICOM (CR, hand)", f"{k}", lambda p: write_dicom(p, img.astype(np.uint16) * 16, Modality="CR", BodyPartExamined="HAND"))
        put("radiograph, MONOCHROME1 DICOM", f"{k}.dcm", lambda p: write_dicom(p, 4095 - img.astype(np.uint16) * 16, "MONOCHROME1"))
        put("radiograph, RGB PNG", f"{k}.png", lambda p: Image.fromarray(np.dstack([img] * 3)).save(p))
        def rotated(p):
            im = Image.fromarray(np.rot90(img, 1).copy()); exif = im.getexif(); exif[0x0112] = 6; im.save(p, exif=exif, quality=90)
        put("radiograph, JPEG with EXIF rotation", f"{k}.jpg", rotated)
        def marked(p):
            a = img.astype(np.uint16) * 16; a[:4, :4] = 65535; Image.fromarray(a).save(p)
        put("radiograph, 12-bit in 16-bit PNG, saturated marker", f"{k}.png", marked)
        put("radiograph, DICOM with a broken window", f"{k}.dcm", lambda p: write_dicom(p, img.astype(np.uint16) * 16, WindowCenter=100, WindowWidth=0))
        put("radiograph, inverted PNG (white background)", f"{k}.png", lambda p: Image.fromarray(255 - img).save(p))
        buf = io.BytesIO(); Image.fromarray(img).save(buf, "JPEG", quality=90); data = buf.getvalue()
        put("damaged: JPEG cut at 60%", f"{k}.jpg", lambda p: p.write_bytes(data[:int(len(data) * 0.6)]))
    for k in range(20):
        put("damaged: empty file", f"{k}.png", lambda p: p.write_bytes(b""))
        put("damaged: text named .png", f"{k}.png", lambda p: p.write_text("not an image " * 20))
        put("damaged: Radiance HDR named .png", f"{k}.png", lambda p: p.write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 8000 +X 8000\n" + bytes(64)))
        h, w = rng.integers(200, 900, 2)
        put("not a radiograph: colour photograph", f"{k}.jpg", lambda p: Image.fromarray(np.dstack([
            cv2.GaussianBlur(rng.integers(0, 255, (h, w), dtype=np.uint8), (31, 31), 0) for _ in range(3)])).save(p, quality=90))
        def document(p):
            page = np.full((1100, 850), 245, np.uint8)
            for line in range(40): cv2.putText(page, "Lorem ipsum dolor sit amet " * 2, (40, 40 + 26 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 20, 1)
            Image.fromarray(page).save(p)
        put("not a radiograph: scanned document", f"{k}.png", document)
        put("not a radiograph: noise", f"{k}.png", lambda p: Image.fromarray(rng.integers(0, 255, (512, 512), dtype=np.uint8)).save(p))
        put("not a radiograph: blank", f"{k}.png", lambda p: Image.fromarray(np.full((600, 400), rng.integers(0, 255), np.uint8)).save(p))
        put("not a radiograph: 8×8 icon", f"{k}.png", lambda p: Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(p))
        put("not a radiograph: 1×10,000 strip", f"{k}.png", lambda p: Image.fromarray(rng.integers(0, 255, (1, 10000), dtype=np.uint8)).save(p))
    for f in sorted((Path(pydicom.__file__).parent / "data" / "test_files").rglob("*.dcm")):
        put("pydicom's test files (CT, MR, US, RT, …)", f.name, lambda p: shutil.copy(f, p))
    return classes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="Bone_age_prediction/model")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "boneage-gate"))
    args = ap.parse_args()
    from boneage.bundle import load_bundle
    from boneage.data import find_rsna_sample
    from boneage.reading import read_image
    root = Path(args.out); shutil.rmtree(root, ignore_errors=True); root.mkdir(parents=True)
    sample = find_rsna_sample()
    if sample is not None: real, source = [read_image(p).pixels for p in sorted((sample / "images").glob("*.png"))], "the 40 RSNA radiographs"
    else:
        from boneage.phantom import phantom_radiograph
        real, source = [phantom_radiograph(a, a % 2 == 0, 512, seed=a)[0] for a in range(12, 228, 6)], "36 phantoms (no RSNA sample at hand)"
    classes = build(root / "in", real)
    out = root / "rows.jsonl"
    r = subprocess.run([sys.executable, "-m", "boneage", "predict", str(root / "in"),
                        "--sex", "M", "--model", args.model, "--format", "jsonl", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    rows = {Path(x["source"]).resolve(): x for x in map(json.loads, out.read_text().splitlines())}
    table = []
    for cls, paths in classes.items():
        got = [rows.get(p.resolve()) for p in paths]
        c = collections.Counter(x["status"] if x else "no row" for x in got)
        learned = sum(1 for x in got if x and "unusual for this model" in x["reasons"])
        rule = sum(1 for x in got if x and x["status"] == "rejected")
        table.append({"class": cls, "files": len(paths), "rows": sum(x is not None for x in got),
                      "predicted": c["ok"] + c["warning"], "rejected by a rule": rule, "flagged by the learned score": learned,
                      "errors": c["error"], "no row": c["no row"]})
    bundle = load_bundle(args.model)
    summary = {"files": sum(t["files"] for t in table), "rows": len(rows), "tracebacks": r.stderr.count("Traceback"),
               "batch aborts": int(r.returncode not in (0, 1)), "exit code": r.returncode, "real images": source,
               "model": f"trained on the {bundle.info['dataset']['kind']}", "test split flagged": bundle.info.get("gate", {}).get("test_flag_rate")}
    cols = list(table[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for t in table: print("| " + " | ".join(str(t[c]) for c in cols) + " |")
    print(f"\n{summary}")
    print(json.dumps({"table": table, "summary": summary}))


if __name__ == "__main__":
    main()
