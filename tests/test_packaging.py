"""Packaging: an sdist and a wheel that carry the course, install without a clone, and run `boneage` from any folder."""
import json, os, subprocess, sys, tarfile, zipfile
from configparser import ConfigParser
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    "The wheel and the sdist: the ones CI built for this run (`$BONEAGE_DIST`, so they are built once), else built here."
    out = Path(os.environ["BONEAGE_DIST"]) if os.environ.get("BONEAGE_DIST") else tmp_path_factory.mktemp("dist")
    if not os.environ.get("BONEAGE_DIST"):
        r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,), (sdist,) = list(out.glob("boneage-*.whl")), list(out.glob("boneage-*.tar.gz"))
    return wheel, sdist


def test_the_wheel_carries_the_course_and_the_licence(dists):
    names = zipfile.ZipFile(dists[0]).namelist()
    nbs = {Path(n).name for n in names if n.startswith("boneage/_course/nbs/")}
    assert nbs == {p.name for p in (ROOT / "nbs").glob("*.ipynb")}
    assert "boneage/_course/docs/conf.py" in names and "boneage/_course/Bone_age_prediction/phantom_vs_real.png" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    meta = zipfile.ZipFile(dists[0]).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License: Apache-2.0" in meta or "License-Expression: Apache-2.0" in meta
    assert "Provides-Extra: course" in meta and "Provides-Extra: gpu" in meta
    entry = zipfile.ZipFile(dists[0]).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "boneage = boneage.cli:main" in entry  # the console script
    assert 'tensorflow-cpu>=2.17; ((sys_platform == "linux" and platform_machine == "x86_64") or sys_platform == "win32") and extra == "course"' in meta.replace("'", '"')


def test_the_sdist_has_what_a_build_needs(dists):
    names = {n.split("/", 1)[1] for n in tarfile.open(dists[1]).getnames() if "/" in n}
    assert {"settings.ini", "setup.py", "LICENSE", "README.md", "nbs/00_data.ipynb", "docs/conf.py",
            "Bone_age_prediction/phantom_vs_real.png"} <= names


def test_licence_file_matches_the_settings():
    cfg = ConfigParser(delimiters=["="]); cfg.read(ROOT / "settings.ini")
    assert cfg["DEFAULT"]["license"] == "apache2"
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()


def test_an_installed_wheel_runs_the_course_from_another_folder(dists, tmp_path):
    "The wheel installed on its own (its dependencies from this environment), used from a folder with no clone in sight."
    site, work = tmp_path / "site", tmp_path / "somewhere"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(dists[0])],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(site), "TF_CPP_MIN_LOG_LEVEL": "3", "BONEAGE_SHARED_DATA": "/nonexistent"}
    env.pop("BONEAGE_NBS", None); env.pop("BONEAGE_MODEL", None)
    run = lambda *a: subprocess.run([sys.executable, "-m", "boneage", *a],
                                    capture_output=True, text=True, env=env, cwd=work)
    where = subprocess.run([sys.executable, "-c", "import boneage, boneage.course as c; print(boneage.__file__); print(c.find_nbs_dir())"],
                           capture_output=True, text=True, env=env, cwd=work).stdout.split()
    assert where[0].startswith(str(site)) and where[1] == str(site / "boneage" / "_course" / "nbs")
    r = run("run", "--only", "00", "--n-images", "20", "--phantom-size", "96", "--no-progress")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads((work / "Bone_age_prediction" / "00_data.json").read_text())["n_rows"] == 20
    r = run("predict", "x.png", "--sex", "F")  # no model in this folder: the rule and where it looked, in one line
    assert r.returncode == 2 and "no trained model found (looked in" in r.stderr and str(work) in r.stderr
