"""Archive prediction on Ray: the same rows as `boneage predict`, and a killed run resumed without redoing a row."""
import os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the archive extra is not installed (pip install -e '.[archive]')")
import pandas as pd

pytestmark = pytest.mark.usefixtures("one_ray_at_a_time")  # one local Ray at a time, whichever test process runs them


def boneage(*args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "boneage", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=900, **kw)


def comparable(df):
    "Values as text, numbers to 6 significant digits: Parquet and JSON may print the same float differently."
    def text(v):
        if v is None or (isinstance(v, float) and pd.isna(v)): return "—"
        return f"{v:.6g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
    return df.apply(lambda col: col.map(text))


@pytest.fixture(scope="module")
def archive(trained_phantom, tmp_path_factory):
    "The tiny data set's phantoms in a nested folder, with broken files among them."
    _, df, data, _ = trained_phantom
    d = tmp_path_factory.mktemp("archive")
    for i, p in enumerate(df.path[:160]):  # 160 radiographs and 2 broken files: enough blocks to kill a run between them
        (d / f"study{i % 4}").mkdir(exist_ok=True); shutil.copy(p, d / f"study{i % 4}" / p.name)
    (d / "study0" / "broken.png").write_text("not an image")
    (d / "study1" / "empty.png").write_bytes(b"")
    return d


def test_archive_rows_equal_the_command_line(bundle_dir, archive, tmp_path):
    out = tmp_path / "rows.parquet"
    r = boneage("predict-archive", archive, "--sex", "F", "--model", bundle_dir, "--out", out, "--actors", "2", "--no-progress")
    assert r.returncode == 1 and "162 inputs: 0 already in" in r.stderr, r.stderr[-3000:]  # 1: some rows are not ok
    ray_rows = pd.read_parquet(out).set_index("source").sort_index()
    p = boneage("predict", archive, "--sex", "F", "--model", bundle_dir, "--format", "jsonl", "--out", tmp_path / "cli.jsonl", "--no-progress")
    cli_rows = pd.read_json(tmp_path / "cli.jsonl", lines=True, dtype=False).set_index("source").sort_index()
    assert len(ray_rows) == len(cli_rows) == 162
    pd.testing.assert_frame_equal(comparable(ray_rows[cli_rows.columns]), comparable(cli_rows))
    assert (ray_rows.status == "error").sum() == 2


def test_a_killed_archive_run_resumes_without_redoing_rows(bundle_dir, archive, tmp_path):
    out = tmp_path / "rows.parquet"
    cmd = [sys.executable, "-m", "boneage", "predict-archive", str(archive),
           "--sex", "M", "--model", str(bundle_dir), "--out", str(out), "--actors", "1", "--rows-per-block", "8", "--no-progress"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"TF_CPP_MIN_LOG_LEVEL": "3"})
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("*.parquet"))) < 3: time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    ray_cli = Path(sys.executable).with_name("ray")  # beside this Python: found without the environment activated
    subprocess.run([str(ray_cli), "stop", "--force"], capture_output=True)  # what the kill left of the local Ray
    files, kept = len(list(out.glob("*.parquet"))), len(pd.read_parquet(out))
    assert 3 <= files < 21 and kept < 162  # killed while predicting, some blocks already on disk
    assert max(len(pd.read_parquet(f)) for f in out.glob("*.parquet")) <= 8  # a file is one block
    (out / ".left-by-a-kill.parquet.part").write_bytes(b"PAR1 half")  # a block whose write was cut
    r = boneage("predict-archive", archive, "--sex", "M", "--model", bundle_dir, "--out", out, "--actors", "1",
                "--rows-per-block", "8", "--no-progress")
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"162 inputs: {kept} already in" in r.stderr, r.stderr[-3000:]  # every finished row kept, none redone
    rows = pd.read_parquet(out)
    assert len(rows) == 162 and rows.source.is_unique
    assert not list(out.glob(".*.part"))


def test_an_output_url_is_refused_in_one_line(bundle_dir, archive, tmp_path):
    r = boneage("predict-archive", archive, "--model", bundle_dir, "--out", "s3://bucket/bone_ages.parquet", "--no-progress")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "boneage: s3://bucket/bone_ages.parquet: the output must be a folder (on a cluster, one every node can write to), not a URL")
    assert "Traceback" not in r.stderr
