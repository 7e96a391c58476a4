"""The input gate against what an archive holds: real radiographs in every form, damaged files, things that are not radiographs.

    python bench/input_gate.py --model Bone_age_prediction/model [--out /tmp/boneage-gate] [--n-real N]

Builds the files (from the 40 RSNA radiographs when `../shared/data` is at hand, from phantoms otherwise, plus
pydicom's own test files), runs `boneage predict` once over the whole folder as a user would, and counts per class of
input: files, rows written, predicted (ok or warning), rejected by a rule, flagged by the learned score, errors,
tracebacks and batch aborts. Also the learned score's flag rate on the course's test split. Prints a markdown table and
one JSON line.
"""
import argparse, collections, io, json, os, resource, shutil, struct, subprocess, sys, tempfile, time, zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(root, real):
    "Write the inputs, grouped by class, and return {class: [paths]}."
    import cv2
    from PIL import Image
    import pydicom
    from boneage.dicom_files import COMPRESSED_SYNTAXES, compress_dicom, write_dicom
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
    for k, img in enumerate(real[:10]):  # every compressed syntax a CR/DX machine exports, from the same hands
        plain = root.parent / "sources" / f"{k}.dcm"; plain.parent.mkdir(parents=True, exist_ok=True)  # outside the folder predicted
        write_dicom(plain, img.astype(np.uint16) * 16, Modality="CR", BodyPartExamined="HAND")
        write_dicom(plain.with_suffix(".8.dcm"), img, bits=8, Modality="CR", BodyPartExamined="HAND")
        for label, syntax in COMPRESSED_SYNTAXES.items():
            src = plain.with_suffix(".8.dcm") if syntax.bits == 8 else plain
            put(f"radiograph, compressed DICOM: {label}", f"{k}.dcm", lambda p: compress_dicom(src, p, syntax.uid, **syntax.options))
        put("radiograph, DICOM window centre without a width", f"{k}.dcm", lambda p: write_dicom(p, img.astype(np.uint16) * 16, WindowCenter=2000))
        put("radiograph, DICOM with an empty window width", f"{k}.dcm", lambda p: write_dicom(p, img.astype(np.uint16) * 16, WindowCenter=2000, WindowWidth=""))
        put("radiograph, PNG named .dcm", f"{k}.dcm", lambda p: Image.fromarray(img).save(p, "PNG"))
        put("radiograph, name not UTF-8", f"r\udcf6ntgen{k}.png", lambda p: Image.fromarray(img).save(p, "PNG"))
        dicom = plain.read_bytes()
        put("damaged: uncompressed DICOM cut short", f"{k}.dcm", lambda p: p.write_bytes(dicom[:len(dicom) * 3 // 4]))
    if hasattr(os, "mkfifo"):
        put("special: a named pipe (FIFO) named .png", "pipe.png", os.mkfifo)
        put("special: a .png link to the zero device", "zero.png", lambda p: os.symlink("/dev/zero", p))
        put("special: a .jpg link to the random device", "noise.jpg", lambda p: os.symlink("/dev/urandom", p))
        put("special: a symbolic link loop named .png", "loop.png", lambda p: os.symlink(p, p))
    from pydicom import uid
    def deflated_frames(p):  # 500 frames of 1024²: about a megabyte deflated, 1 GB inflated
        ds = pydicom.dcmread(write_dicom(p, np.zeros((1024, 1024), np.uint16)))
        ds.NumberOfFrames, ds.PixelData = 500, bytes(500 * 1024 * 1024 * 2)
        ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian; ds.save_as(p, enforce_file_format=True)
    put("damaged: deflated multi-frame DICOM, 1 GB inflated", "frames.dcm", deflated_frames)
    def ztxt_bomb(p):  # a valid tiny PNG with a zTXt chunk that inflates to 64 MB
        buf = io.BytesIO(); Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "PNG"); png = buf.getvalue()
        body = b"Comment\0\0" + zlib.compress(bytes(64 * 2**20), 9)
        chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
        p.write_bytes(png[:33] + chunk + png[33:])
    put("damaged: PNG with a zTXt decompression bomb", "bomb.png", ztxt_bomb)
    for f in sorted((Path(pydicom.__file__).parent / "data" / "test_files").rglob("*.dcm")):
        put("pydicom's test files (CT, MR, US, RT, …)", f.name, lambda p: shutil.copy(f, p))
    return classes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="Bone_age_prediction/model")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "boneage-gate"))
    ap.add_argument("--n-real", type=int, help="use the first N real radiographs (default: all); every class is still built")
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
    classes = build(root / "in", real[:args.n_real])
    out = root / "rows.jsonl"
    predict = lambda *a: subprocess.run([sys.executable, "-m", "boneage", "predict", *map(str, a), "--model", args.model, "--no-progress"],
                                        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=3600)
    t0 = time.time()
    r = predict(root / "in", "--sex", "M", "--format", "jsonl", "--out", out)
    seconds, peak_mib = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rows = {os.path.abspath(x["source"]): x for x in map(json.loads, out.read_text().splitlines())}  # abspath: no link is followed
    table = []
    for cls, paths in classes.items():
        got = [rows.get(os.path.abspath(p)) for p in paths]
        c = collections.Counter(x["status"] if x else "no row" for x in got)
        learned = sum(1 for x in got if x and "unusual for this model" in x["reasons"])
        rule = sum(1 for x in got if x and x["status"] == "rejected")
        table.append({"class": cls, "files": len(paths), "rows": sum(x is not None for x in got),
                      "predicted": c["ok"] + c["warning"], "rejected by a rule": rule, "flagged by the learned score": learned,
                      "errors": c["error"], "no row": c["no row"]})
    # Each input that could take a machine down, alone in its own predict process: seconds and peak memory
    def alone(path):
        # Through a small Python in between: Linux carries a process's peak RSS across fork and exec, so a predict forked
        # straight from this process (gigabytes of test images held) would report this process's peak, not its own.
        code = ("import resource, subprocess, sys, time; t = time.time(); subprocess.run(sys.argv[1:], capture_output=True); "
                "print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
        cmd = [sys.executable, "-m", "boneage", "predict", str(path), "--sex", "M", "--model", args.model, "--no-progress"]
        secs, mib = map(float, subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True,
                                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}).stdout.split())
        return {"seconds": round(secs, 1), "peak MiB": round(mib)}
    dangerous = {cls: alone(paths[0]) for cls, paths in classes.items() if cls.startswith("special:") or "bomb" in cls or "inflated" in cls}
    # Two refusals that are one line, not rows: a manifest csv cannot parse, and --out that is a hard link to an input
    manifest = root / "long-field.csv"
    manifest.write_text(f"path,sex\n{classes['radiograph, 8-bit PNG'][0]},F\n\"{'x' * 140_000}\",M\n")
    m = predict("--manifest", manifest)
    link = root / "hard-link.csv"; os.link(classes["radiograph, 8-bit PNG"][0], link); before = link.read_bytes()
    h = predict(classes["radiograph, 8-bit PNG"][0], "--sex", "M", "--out", link)
    refusals = {"manifest with a 140,000-character field": f"exit {m.returncode}: {m.stderr.strip()[-140:]}",
                "--out a hard link to an input": f"exit {h.returncode}, input unchanged: {link.read_bytes() == before}"}
    bundle = load_bundle(args.model)
    summary = {"files": sum(t["files"] for t in table), "rows": len(rows), "tracebacks": r.stderr.count("Traceback"),
               "batch aborts": int(r.returncode not in (0, 1)), "exit code": r.returncode, "seconds": round(seconds),
               "peak RSS of the whole run (MiB)": round(peak_mib), "each dangerous input alone": dangerous,
               "worst dangerous input": {"seconds": max(d["seconds"] for d in dangerous.values()), "peak MiB": max(d["peak MiB"] for d in dangerous.values())},
               "refusals": refusals, "real images": source,
               "model": f"trained on the {bundle.info['dataset']['kind']}", "test split flagged": bundle.info.get("gate", {}).get("test_flag_rate")}
    cols = list(table[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for t in table: print("| " + " | ".join(str(t[c]) for c in cols) + " |")
    print(f"\n{summary}")
    print(json.dumps({"table": table, "summary": summary}))


if __name__ == "__main__":
    main()
