import os, shutil, subprocess, sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from filelock import FileLock

from boneage.data import find_shared_data

ROOT = Path(__file__).resolve().parents[1]
# Debian's Chromium, driven by Playwright (whose own browser download is not used)
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def need(condition, reason):
    "What CI must have fails the test under CI=true; elsewhere the test is skipped with the reason."
    if not condition:
        if os.environ.get("CI") == "true": pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data():
    "The shared RSNA files: required under CI=true, skipped with a reason elsewhere."
    path = find_shared_data()
    need(path is not None, "shared RSNA data not found (../shared/data beside the repository, or $BONEAGE_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def rsna_sample(shared_data):
    return shared_data / "rsna-sample"


def run_root(tmp_path_factory):
    "The folder of this test run that every test process shares (pytest-xdist's workers have their folders side by side in it)."
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def shared(root, name):
    "A folder every test process of this run shares, and the lock to hold while making it (`root`: the run's folder or its tmp_path_factory)."
    root = root if isinstance(root, Path) else run_root(root)
    return root / name, FileLock(str(root / f"{name}.lock"))


@pytest.fixture
def one_ray_at_a_time(tmp_path_factory):
    "Hold the run's Ray lock: two local Ray clusters started at once by two test processes break each other (and the kill test stops every Ray)."
    with shared(tmp_path_factory, "ray")[1]: yield


TINY_CONFIG = dict(epochs=10, batch_size=8, learning_rate=3e-4, pooling="avg", head_width=64, batchnorm_momentum=0.9,
                   seed=0, workers=0)


def make_trained(root):
    "A model trained at tiny settings on phantoms (the course's settings for random weights), made once a run; the others load it."
    from boneage.data import load_dataset, split_dataset
    from boneage.phantom_dataset import make_phantom_dataset
    from boneage.preprocess import preprocessing_spec
    from boneage.train import TrainConfig, train
    folder, lock = shared(root, "trained")
    with lock:  # the first process draws and trains; the others find both done and load them
        # 480 phantoms, 6 epochs with a cosine decay: at 72² the phantom's age is read from maturity alone (no size cue),
        # and with fewer images or a constant rate the tiny model answered one age for most images
        data = make_phantom_dataset(folder / "ph", n=480, size=96, seed=11, progress=False)
        df = split_dataset(load_dataset(data), seed=0)
        result = train(df, folder / "out", preprocessing_spec(72), TrainConfig(**{**TINY_CONFIG, "epochs": 6, "lr_schedule": "cosine"}),
                       verbose=False)
    return result, df, data, folder / "out"


@pytest.fixture(scope="session")
def trained_phantom(tmp_path_factory):
    return make_trained(run_root(tmp_path_factory))


def complete_bundle(model_dir, df, conformal=None):
    "What the evaluation, gate and inference notebooks add to a trained bundle: intervals, stages, the gate, ONNX."
    from boneage.bundle import load_bundle, write_bundle_info
    from boneage.gate import cached_features, feature_model, fit_feature_gate, save_gate
    from boneage.inference import export_onnx
    from boneage.preprocess import build_cache
    bundle = load_bundle(model_dir)
    write_bundle_info(model_dir, conformal=conformal or {"coverage": 0.9, "half_width": 20.0, "bands_years": [0, 2, 6, 10, 14, 19],
                                                         "band_half_width": {"10–14 y": 15.0}, "n_calibration": 100},
                      stages={"names": ["Child", "Adolescent", "Adult"], "edges_years": [10, 18]})
    cache, _ = build_cache(df.path, bundle.spec, model_dir.parent / "cache", progress=False)
    features = feature_model(bundle.keras_model())
    rows = lambda s: np.flatnonzero(df.split == s)
    stats, info = fit_feature_gate(cached_features(features, df, rows("train"), cache), cached_features(features, df, rows("valid"), cache))
    save_gate(model_dir, stats, info)
    export_onnx(load_bundle(model_dir))
    return model_dir


def make_bundle(root):
    "A copy of the tiny trained model as a full bundle: intervals, stages, the input gate and an ONNX copy (made once)."
    _, df, _, out = make_trained(root)
    folder, lock = shared(root, "bundle")
    with lock:
        if not (folder / "done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what an interrupted attempt left
            shutil.copytree(out / "model", folder / "model")
            complete_bundle(folder / "model", df)
            (folder / "done").touch()
    return folder / "model"


@pytest.fixture(scope="session")
def bundle_dir(trained_phantom, tmp_path_factory):
    return make_bundle(run_root(tmp_path_factory))


@pytest.fixture(scope="session")
def ungated_bundle_dir(bundle_dir, tmp_path_factory):
    "The same bundle without the learned gate score: results depend on the rules alone (no machine-dependent scores)."
    from boneage.bundle import write_bundle_info
    folder, lock = shared(tmp_path_factory, "ungated")
    with lock:
        if not (folder / "done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(bundle_dir, folder / "model")
            write_bundle_info(folder / "model", gate=None)
            (folder / "done").touch()
    return folder / "model"


# two folds in the transfer notebook (its default is 4): the k-fold code is the same, with half the trainings
TINY_RUN = ["--n-images", "60", "--phantom-size", "128", "--image-size", "72", "--seed", "3", "--folds", "2", "--epochs", "2"]


def boneage_run(out, *args, backend="tensorflow", **env):
    "`boneage run --out OUT ARGS` in a fresh process, as a user runs it (`env`: more environment variables)."
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": backend, **env}
    return subprocess.run([sys.executable, "-m", "boneage", "run", "--out",
                           str(out), "--no-progress", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def make_course(root):
    "The whole course at tiny settings, as `boneage run` executes it: the one course of a test run, shared by every test."
    out, lock = shared(root, "course")
    log = out.with_name("course.stdout")
    with lock, shared(root, "ray")[1]:  # the first process runs it (its archive notebook starts a local Ray)
        if not log.exists():
            r = boneage_run(out, *TINY_RUN)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            log.write_text(r.stdout)
    return out, SimpleNamespace(returncode=0, stdout=log.read_text())


@pytest.fixture(scope="session")
def tiny_course(tmp_path_factory):
    return make_course(run_root(tmp_path_factory))


def make_site(root):
    "`boneage docs` as a user runs it, on the tiny course (its executed notebooks are current, so it builds without rerunning)."
    out, _ = make_course(root)
    folder, lock = shared(root, "site")
    dest = folder / "site"
    with lock:
        if not (folder / "done").exists():
            r = subprocess.run([sys.executable, "-m", "boneage", "docs", "--out", str(out), "--dest", str(dest), "--no-progress"],
                               capture_output=True, text=True, cwd=ROOT)
            assert r.returncode == 0 and f"site: {dest / 'index.html'}" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
            assert "executing the course" not in r.stdout  # the tiny course's notebooks were used, not run again
            (folder / "done").touch()
    return dest, out


# What the shared things are made by, in the order the tests below need them.
MAKERS = {"trained_phantom": make_trained, "bundle_dir": make_bundle, "tiny_course": make_course, "site": make_site}


def _needs(item):
    "0: needs nothing shared; 1: the trained model; 2: the tiny course (or Ray, which the course's archive notebook holds)."
    names = set(getattr(item, "fixturenames", ()))
    return 2 if names & {"tiny_course", "one_ray_at_a_time"} else 1 if "trained_phantom" in names else 0


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Tests that need nothing shared run first, then those that need the trained model, then those that need the
    course. With test processes (pytest-xdist), the first one starts making the shared things at once, in the
    background, while the test processes run the tests that need none, rather than a test process waiting on a lock
    while another makes them."""
    # stable: each group keeps the files' order (every process sorts alike), its long tests first: a test process keeps
    # two tests queued that the other cannot take, so a long one queued last would leave the other process idle
    items.sort(key=lambda item: (_needs(item), item.get_closest_marker("long") is None))
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None: return
    needed = set().union(*(getattr(i, "fixturenames", ()) for i in items))
    names = [n for n in MAKERS if n in needed]
    if worker == "gw0" and names:
        root = run_root(config._tmp_path_factory)
        log = open(root / "shared-makers.log", "w")
        config._makers = subprocess.Popen([sys.executable, __file__, str(root), *names], stdout=log, stderr=subprocess.STDOUT,
                                          cwd=ROOT, start_new_session=True)
    # What the maker makes is on the path of every later test, so it comes first: the test processes (and the kernels
    # and commands they start) run at a lower priority than the maker, which was started before this
    if names: os.nice(5)


def pytest_sessionfinish(session, exitstatus):
    "The background maker ends with the run: waited for (another process may still need what it makes), stopped on Ctrl-C."
    p = getattr(session.config, "_makers", None)
    if p is None: return
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        import signal
        os.killpg(p.pid, signal.SIGTERM)
    p.wait()


def course_copy(tiny_course, dest):
    "A copy of the tiny course for a test to change; its phantom set is linked, not copied, so it is reused as it is."
    out = tiny_course[0]
    shutil.copytree(out, dest, symlinks=True, ignore=shutil.ignore_patterns("phantom"))
    (dest / "phantom").symlink_to(out / "phantom", target_is_directory=True)
    return dest


if __name__ == "__main__":  # `python tests/conftest.py RUN_FOLDER trained_phantom tiny_course site`: make them, under their locks
    for name in sys.argv[2:]: MAKERS[name](Path(sys.argv[1]))
