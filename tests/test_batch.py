"""`boneage predict` over archives: one row per input, no batch killers, safe output, manifests as spreadsheets save them."""
import csv, json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boneage.batch import find_images
from boneage.dicom_files import write_dicom

from conftest import ROOT


def cli(*args, cwd=ROOT, **kw):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "boneage", "predict",
                           "--no-progress", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, **kw)


@pytest.fixture(scope="module")
def archive(trained_phantom, tmp_path_factory):
    "Good phantoms and DICOMs in a PACS-style tree, beside one file of each kind of trouble."
    import pydicom
    _, df, _, _ = trained_phantom
    d = tmp_path_factory.mktemp("archive")
    test = df[df.split == "test"].reset_index(drop=True)
    hand = np.asarray(Image.open(test.path[0]))
    (d / "study" / "series").mkdir(parents=True)
    for i in range(3): shutil.copy(test.path[i], d / f"good{i}.png")
    write_dicom(d / "study" / "series" / "6154", hand.astype(np.uint16) * 16, sex="F")  # no extension, as PACS exports
    (d / "empty.png").write_bytes(b"")
    good = (d / "good0.png").read_bytes(); (d / "truncated.png").write_bytes(good[:len(good) // 2])
    Image.fromarray(hand).save(d / "cut.jpg", quality=90); (d / "cut.jpg").write_bytes((d / "cut.jpg").read_bytes()[:900])
    (d / "text.png").write_text("this is not an image")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(d / "photo.jpg")
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(d / "icon.png")
    shutil.copy(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm", d / "study" / "ct.dcm")
    path = write_dicom(d / "w0.dcm", hand.astype(np.uint16) * 16, WindowCenter=100, WindowWidth=0)  # a broken window
    raw = os.fsencode(d) + b"/r\xf6ntgen.png"; shutil.copy(test.path[1], raw)  # a Latin-1 name from an old archive
    return d, test


def rows(path):
    return list(csv.DictReader(open(path, encoding="utf-8", errors="surrogateescape")))  # file names as their own bytes


def test_folders_are_searched_to_any_depth_and_dicom_found_by_content(archive):
    d, _ = archive
    names = [p.name for p in find_images(d)]
    assert "6154" in names and "ct.dcm" in names and len(names) == 13


def test_a_mixed_folder_gives_one_row_per_file_and_no_traceback(bundle_dir, archive, tmp_path):
    d, test = archive
    out = tmp_path / "res.csv"
    r = cli(d, "--sex", "M", "--model", bundle_dir, "--format", "csv", "--out", out)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    got = {Path(x["source"]).name: x for x in rows(out)}
    assert len(got) == 13
    status = {k: v["status"] for k, v in got.items()}
    for name in ("empty.png", "truncated.png", "cut.jpg", "text.png"): assert status[name] == "error", name
    for name in ("photo.jpg", "icon.png", "ct.dcm"): assert status[name] == "rejected", (name, got[name]["reasons"])
    for name in ("good0.png", "good1.png", "good2.png", "6154", os.fsdecode(b"r\xf6ntgen.png")): assert got[name]["bone_age_months"], name
    assert status["w0.dcm"] in ("warning", "ok") and got["w0.dcm"]["bone_age_months"]
    assert "window unusable" in got["w0.dcm"]["reasons"]
    assert "13 rows:" in r.stderr.splitlines()[-1]
    # the good files' ages are those of a run on them alone
    alone = cli(d / "good0.png", d / "good1.png", "--sex", "M", "--model", bundle_dir, "--format", "json")
    ages = {Path(x["source"]).name: x["bone_age_months"] for x in json.loads(alone.stdout)}
    assert ages == {k: float(got[k]["bone_age_months"]) for k in ages}


def test_exit_codes_and_statuses(bundle_dir, ungated_bundle_dir, archive):
    d, _ = archive
    ok = cli(d / "good0.png", d / "good1.png", "--sex", "F", "--model", ungated_bundle_dir, "--format", "jsonl")
    assert ok.returncode == 0 and [json.loads(l)["status"] for l in ok.stdout.splitlines()] == ["ok", "ok"]
    assert cli(d / "good0.png", d / "text.png", "--sex", "F", "--model", bundle_dir).returncode == 1
    assert cli(d / "good0.png", "--sex", "F", "--model", d / "nowhere").returncode == 2


@pytest.mark.parametrize("args,message", [
    (["--sex", "X"], "unknown sex 'X'"),
    (["--sex", "F", "--chronological-age", "-5"], "chronological age '-5' months is outside 0–240"),
    (["--sex", "F", "--batch-size", "0"], "must be at least 1"),
    (["--sex", "F", "--format", "xml"], "invalid choice"),
])
def test_bad_options_are_usage_errors(bundle_dir, archive, args, message):
    d, _ = archive
    r = cli(d / "good0.png", "--model", bundle_dir, *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_output_never_overwrites_an_input(bundle_dir, archive, tmp_path):
    d, _ = archive
    before = (d / "good1.png").read_bytes()
    r = cli(d / "good0.png", "--sex", "M", "--model", bundle_dir, "--out", d / "good1.png")  # `--out *.png`, name forgotten
    assert r.returncode == 2 and "looks like an image; refusing" in r.stderr and (d / "good1.png").read_bytes() == before
    m = tmp_path / "m.csv"; m.write_text(f"path,sex\n{d / 'good0.png'},F\n")
    r = cli("--manifest", m, "--model", bundle_dir, "--out", m)
    assert r.returncode == 2 and "is one of the inputs" in r.stderr and m.read_text().startswith("path,sex")
    for out, says in ((tmp_path, "is a folder"), (tmp_path / "no" / "r.csv", "does not exist")):
        r = cli(d / "good0.png", "--sex", "M", "--model", bundle_dir, "--out", out)
        assert r.returncode == 2 and says in r.stderr
    (tmp_path / "file").write_text("x")
    r = cli(d / "good0.png", "--sex", "M", "--model", bundle_dir, "--explain", tmp_path / "file")
    assert r.returncode == 2 and "is a file; name a folder" in r.stderr


def test_manifests_from_spreadsheets(ungated_bundle_dir, archive, tmp_path):
    bundle_dir = ungated_bundle_dir
    d, test = archive
    body = [("good0.png", "True", "100"), ("good1.png", "F", "-1"), ("good1.png", "M", "130"), ("study/series/6154", "", ""),
            ("missing.png", "F", ""), ("café.png", "F", "")]  # a name that is not ASCII: Latin-1 and UTF-8 differ
    for name, encoding, delim in (("excel.csv", "utf-8-sig", ";"), ("tabs.tsv", "utf-16", "\t"), ("latin.csv", "cp1252", ",")):
        text = delim.join(["Path", "Sex", "age", "Chronological_Age"]) + "\n" + "".join(
            delim.join([p, s, "9", a]) + "\n" for p, s, a in body)
        (d / name).write_bytes(text.encode(encoding))
        out = tmp_path / f"{name}.jsonl"
        r = cli("--manifest", d / name, "--model", bundle_dir, "--format", "jsonl", "--out", out)
        assert r.returncode == 1, r.stderr
        got = [json.loads(l) for l in out.read_text().splitlines()]
        assert [(g["row"], g["status"]) for g in got][:2] == [(1, "ok"), (2, "error")]
        assert got[0]["sex"] == "M" and "(row 2): chronological age '-1'" in got[1]["reasons"]
        assert got[2]["status"] == "warning" and "the same file as manifest row 2" in got[2]["reasons"]
        assert got[3]["sex"] == "F" and got[4]["status"] == "error" and "file not found" in got[4]["reasons"]
        assert got[5]["source"].endswith("café.png") and len(got) == 6
        assert "column(s) ['age'] ignored" in r.stderr
    r = cli("--manifest", d / "latin.csv", "--model", bundle_dir, "--format", "csv")
    assert "not UTF-8; read as Windows-1252" in r.stderr
    (tmp_path / "wrong.csv").write_text("file_id,sex\na.png,F\n")
    r = cli("--manifest", tmp_path / "wrong.csv", "--model", bundle_dir)
    assert r.returncode == 2 and "wrong.csv: needs a 'path' column" in r.stderr


def test_rows_written_before_a_kill_survive_as_valid_jsonl(bundle_dir, archive, tmp_path):
    d, test = archive
    many = tmp_path / "many"; many.mkdir()
    for i in range(60): shutil.copy(test.path[i % len(test)], many / f"{i:03d}.png")
    out = tmp_path / "r.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "boneage", "predict",
                          "--no-progress", many, "--sex", "F", "--model", bundle_dir, "--format", "jsonl", "--out", out,
                          "--batch-size", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3): time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    lines = out.read_text().splitlines()
    assert 3 <= len(lines) < 60 and all(json.loads(l)["status"] in ("ok", "warning") for l in lines if l.endswith("}"))  # whole rows


def test_a_closed_pipe_is_quiet(bundle_dir, archive):
    d, _ = archive
    cmd = (f"{sys.executable} -m boneage predict --no-progress "
           f"{d}/good0.png {d}/good1.png {d}/good2.png --sex F --model {bundle_dir} --batch-size 1 | head -n 1")
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    assert r.stdout.startswith("image") and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr


def test_explanations_never_overwrite_each_other(bundle_dir, archive, tmp_path):
    d, test = archive
    other = tmp_path / "other"; other.mkdir(); shutil.copy(test.path[2], other / "good0.png")  # the same name, another image
    r = cli(d / "good0.png", other / "good0.png", "--sex", "F", "--model", bundle_dir, "--explain", tmp_path / "cams")
    assert r.returncode in (0, 1) and "0 rejected, 0 error" in r.stderr, r.stderr  # the tiny model's gate may warn; both explained
    made = sorted(p.name for p in (tmp_path / "cams").iterdir())
    assert made == ["good0_gradcam-2.png", "good0_gradcam.png"] and all(p.stat().st_size > 5_000 for p in (tmp_path / "cams").iterdir())


def test_json_is_closed_and_table_shows_status(ungated_bundle_dir, archive):
    d, _, bundle_dir = *archive, ungated_bundle_dir
    r = cli(d / "good0.png", d / "text.png", "--sex", "M", "--model", bundle_dir, "--format", "json")
    got = json.loads(r.stdout)
    assert [g["status"] for g in got] == ["ok", "error"]
    t = cli(d / "good0.png", d / "text.png", "--sex", "M", "--chronological-age", "120", "--model", bundle_dir)
    lines = t.stdout.splitlines()
    assert lines[0].split()[-1] == "status" and lines[1].split()[-1] == "ok" and lines[2].split()[-1] == "error"
    assert "WARNING" in t.stderr and "synthetic phantom" in t.stderr  # loud: not a clinical estimate


def test_real_radiographs_through_the_command(bundle_dir, rsna_sample, tmp_path):
    labels = list(csv.DictReader(open(rsna_sample / "labels.csv")))
    m = tmp_path / "manifest.csv"
    m.write_text("path,sex,chronological_age\n" + "".join(
        f"{rsna_sample / 'images' / (row['id'] + '.png')},{row['male']},{row['boneage']}\n" for row in labels))
    out = tmp_path / "real.jsonl"
    r = cli("--manifest", m, "--model", bundle_dir, "--format", "jsonl", "--out", out)
    res = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(res) == 40 and all(x["status"] in ("ok", "warning") for x in res)  # rules pass; the learned score may flag
    assert all(x["stage"] in ("Child", "Adolescent", "Adult") for x in res) and not any("inverted" in x["reasons"] for x in res)
    assert all(x["difference_months"] == pytest.approx(x["bone_age_months"] - x["chronological_age_months"], abs=0.11) for x in res)
    assert "WARNING" in r.stderr and "not a clinical bone age" in r.stderr  # phantom model on real images


def compressed_copies(hand, folder):
    "A real hand radiograph as DICOM in every transfer syntax a clinic sends: {file name: lossless?}."
    from boneage.dicom_files import COMPRESSED_SYNTAXES, compress_dicom
    folder.mkdir(parents=True, exist_ok=True)
    plain = {8: write_dicom(folder / "u8.dcm", hand, bits=8), 12: write_dicom(folder / "u12.dcm", hand.astype(np.uint16) * 16, bits=12)}
    files = {p.name: True for p in plain.values()}
    for label, s in COMPRESSED_SYNTAXES.items():
        files[compress_dicom(plain[s.bits], folder / f"{label}.dcm", s.uid, **s.options).name] = s.lossless
    return files


def test_compressed_hand_dicoms_give_the_bone_age_of_their_original(bundle_dir, rsna_sample, tmp_path):
    "Each transfer syntax of one real radiograph: the uncompressed file's bone age exactly (lossless), within 1 month (lossy)."
    import pydicom
    hand = np.asarray(Image.open(sorted((rsna_sample / "images").glob("*.png"))[0]))
    files = compressed_copies(hand, tmp_path / "dicom")
    syntaxes = {pydicom.dcmread(tmp_path / "dicom" / f, stop_before_pixels=True).file_meta.TransferSyntaxUID.name for f in files}
    assert len(syntaxes) == 10, syntaxes  # explicit VR (8 and 12 bit) and nine compressed syntaxes
    out = tmp_path / "ages.csv"
    r = cli(tmp_path / "dicom", "--sex", "F", "--model", bundle_dir, "--format", "csv", "--out", out, "--no-gate")
    got = {Path(x["source"]).name: x for x in rows(out)}
    assert r.returncode in (0, 1) and len(got) == len(files), r.stderr[-2000:]
    assert all(x["bone_age_months"] for x in got.values()), {k: x["reasons"] for k, x in got.items() if not x["bone_age_months"]}
    age = {k: float(x["bone_age_months"]) for k, x in got.items()}
    for name, lossless in files.items():
        original = age["u8.dcm" if name in ("JPEG baseline (8-bit).dcm", "u8.dcm") else "u12.dcm"]
        if lossless: assert age[name] == original, (name, age[name], original)
        else: assert abs(age[name] - original) <= 1.0, (name, age[name], original)


def test_special_files_and_bad_paths_get_a_row_each(bundle_dir, archive, tmp_path):
    "A FIFO, devices behind image names and a link loop: one error row each, quickly, with or without --out."
    d, _ = archive
    folder = tmp_path / "odd"; folder.mkdir()
    shutil.copy(d / "good0.png", folder / "good.png")
    os.mkfifo(folder / "pipe.png")
    os.symlink("/dev/zero", folder / "zero.png"); os.symlink("/dev/urandom", folder / "noise.jpg")
    os.symlink(folder / "loop.png", folder / "loop.png")
    for out in (tmp_path / "res.csv", None):
        r = cli(folder, "--sex", "M", "--model", bundle_dir, "--format", "csv", *(["--out", out] if out else []), timeout=300)
        table = rows(out) if out else list(csv.DictReader(r.stdout.splitlines()))
        got = {Path(x["source"]).name: x for x in table}
        assert r.returncode == 1 and "Traceback" not in r.stderr and len(got) == 5, r.stderr[-2000:]
        assert got["good.png"]["bone_age_months"]
        assert "a named pipe (FIFO), not a regular file" in got["pipe.png"]["reasons"]
        assert "a character device, not a regular file" in got["zero.png"]["reasons"]
        assert "a character device, not a regular file" in got["noise.jpg"]["reasons"]
        assert "cannot read it" in got["loop.png"]["reasons"]


def test_a_hard_link_to_an_input_is_never_overwritten(bundle_dir, archive, tmp_path):
    d, _ = archive
    shutil.copy(d / "good0.png", tmp_path / "in.png")
    before = (tmp_path / "in.png").read_bytes()
    os.link(tmp_path / "in.png", tmp_path / "hl.csv")  # another name for the radiograph's own bytes
    r = cli(tmp_path / "in.png", "--sex", "M", "--model", bundle_dir, "--out", tmp_path / "hl.csv")
    assert r.returncode == 2 and "is one of the inputs" in r.stderr and (tmp_path / "in.png").read_bytes() == before


def test_a_manifest_that_csv_cannot_parse_is_one_line(bundle_dir, archive, tmp_path):
    d, _ = archive
    m = tmp_path / "m.csv"
    m.write_text(f"path,sex\n{d / 'good0.png'},F\n\"{'x' * 140_000}\",M\n")
    r = cli("--manifest", m, "--model", bundle_dir)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "not a usable manifest: line 3: field larger than field limit" in r.stderr
