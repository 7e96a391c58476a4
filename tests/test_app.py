"""The web page and its API: the same results as `boneage predict`, safe by default, and in a real browser."""
import base64, json, os, re, shutil, socket, subprocess, sys, tempfile, time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the app extra is not installed (pip install -e '.[app]')")
from fastapi.testclient import TestClient

from boneage.app import create_app, provenance, render_page
from boneage.inference import Predictor
from boneage.dicom_files import write_dicom

from conftest import CHROMIUM, CHROMIUM_FLAGS as FLAGS, ROOT, need


@pytest.fixture(scope="module")
def client(bundle_dir):
    return TestClient(create_app(bundle_dir))


@pytest.fixture(scope="module")
def images(trained_phantom, tmp_path_factory):
    _, df, _, _ = trained_phantom
    test = df[df.split == "test"].reset_index(drop=True)
    d = tmp_path_factory.mktemp("uploads")
    write_dicom(d / "hand.dcm", np.asarray(Image.open(test.path[1])).astype(np.uint16) * 16, sex="F", Modality="DX",
                PatientBirthDate="20150310", StudyDate="20251010")
    (d / "broken.png").write_bytes(b"this is not an image")
    return test, d


def test_api_rows_equal_the_command_line(client, bundle_dir, images):
    test, d = images
    files = [("files", ("a.png", test.path[0].read_bytes(), "image/png")), ("files", ("broken.png", b"junk", "image/png")),
             ("files", ("hand.dcm", (d / "hand.dcm").read_bytes(), "application/dicom"))]
    r = client.post("/api/predict", files=files, data={"sex": "auto"})
    assert r.status_code == 200
    rows = r.json()["results"]
    assert [x["source"] for x in rows] == ["a.png", "broken.png", "hand.dcm"]
    assert rows[0]["status"] == "error" and "sex unknown" in rows[0]["reasons"]  # a PNG needs the sex
    assert rows[1]["status"] == "error" and rows[1]["reasons"] == "broken.png: not a PNG, JPEG, TIFF or DICOM image"
    assert rows[2]["sex"] == "F" and rows[2]["chronological_age_months"] == 127.0 and rows[2]["overlay"] is None
    (direct,) = Predictor(bundle_dir).predict_many([(d / "hand.dcm", None)])
    assert rows[2]["bone_age_months"] == round(direct.bone_age_months, 1)
    r = client.post("/api/predict", files=files[:1], data={"sex": "M", "chronological_age": "10", "age_unit": "years", "overlay": "true"})
    row = r.json()["results"][0]
    assert row["chronological_age_months"] == 120.0 and base64.b64decode(row["overlay"])[:4] == b"\x89PNG"
    assert r.json()["model"]["phantom_warning"] and r.json()["model"]["image_size"] == 72


def test_the_page_escapes_what_users_send_and_loads_nothing_from_elsewhere(client, images):
    test, _ = images
    page = client.post("/", files=[("files", ("<script>alert(1)</script>.png", test.path[0].read_bytes(), "image/png"))],
                       data={"sex": "F"}).text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert not re.findall(r"""(?:src|href)=['"](?:https?:)?//""", page)  # no CDN fonts, scripts or styles
    assert "id='banner'" in page and "data:text/csv;base64," in page
    csv_text = base64.b64decode(re.search(r"data:text/csv;base64,([A-Za-z0-9+/=]+)", page).group(1)).decode()
    assert csv_text.splitlines()[0].startswith("source,row,status,reasons,sex,bone_age_months")
    assert "/api/predict" in client.get("/openapi.json").json()["paths"] and client.get("/docs").status_code == 404


def test_uploads_are_limited_and_leave_nothing_behind(bundle_dir, images, tmp_path, monkeypatch):
    test, _ = images
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    small = TestClient(create_app(bundle_dir, max_upload_mb=1))
    r = small.post("/api/predict", files=[("files", ("a.png", test.path[0].read_bytes(), "image/png"))], data={"sex": "F"})
    assert r.status_code == 200 and not list(tmp_path.glob("boneage-upload-*"))  # the folder went with the response
    big = small.post("/api/predict", files=[("files", ("big.png", b"0" * (2 * 2**20), "image/png"))])
    assert big.status_code == 413 and "larger than 1 MB" in big.json()["detail"]


def test_provenance_of_a_model_trained_on_radiographs(bundle_dir, tmp_path):
    from boneage.bundle import load_bundle, write_bundle_info
    shutil.copytree(bundle_dir, tmp_path / "m")
    info = json.loads((tmp_path / "m" / "bundle.json").read_text())
    write_bundle_info(tmp_path / "m", dataset={**info["dataset"], "kind": "radiographs"})
    prov = provenance(load_bundle(tmp_path / "m"))
    assert prov["phantom_warning"] is None and "id='banner'" not in render_page(prov)


def test_serve_without_the_extra_says_what_to_install():
    code = "import sys; sys.modules['fastapi'] = None; from boneage.cli import main; sys.exit(main(['serve']))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == 'boneage: this command needs fastapi: pip install "boneage[app]"'


def _free_port():
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def test_the_page_in_a_browser(bundle_dir, images, tmp_path):
    need(CHROMIUM, "Chromium not found (Debian package `chromium`)")
    playwright = pytest.importorskip("playwright.sync_api")
    test, d = images
    shutil.copy(test.path[0], tmp_path / "phantom.png")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "boneage", "serve",
                               "--model", str(bundle_dir), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request
        deadline = time.time() + 120
        while time.time() < deadline:
            try: urllib.request.urlopen(url, timeout=1); break
            except OSError: time.sleep(0.2)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests, problems = [], []
            page.on("request", lambda r: requests.append(r.url))
            page.on("requestfailed", lambda r: problems.append(r.url))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(url)
            assert page.locator("#banner").is_visible() and "synthetic phantom" in page.locator("#banner").inner_text()
            page.set_input_files("input[name=files]", [str(tmp_path / "phantom.png"), str(d / "broken.png")])
            page.select_option("select[name=sex]", "F")
            page.fill("input[name=chronological_age]", "9")
            page.select_option("select[name=age_unit]", "years")
            page.click("button[type=submit]")
            page.wait_for_selector("#results", timeout=120_000)
            rows = page.locator("#results tr")
            assert rows.count() == 3
            first, broken = rows.nth(1).inner_text(), rows.nth(2).inner_text()
            assert re.search(r"\d+\.\d months \(\d+\.\d y\)", first) and "108" in first and ("ok" in first or "warning" in first)
            assert "error" in broken and "not a PNG, JPEG, TIFF or DICOM image" in broken
            assert page.eval_on_selector("img.cam", "e => e.naturalWidth") > 100
            assert "where the model looked, not proof of what it read" in page.inner_text("p.caveat")
            (ROOT / "docs" / "_build" / "artifacts").mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ROOT / "docs" / "_build" / "artifacts" / "app.png"), full_page=True)
            browser.close()
        assert not problems, problems
        assert all(u.startswith(url) or u.startswith("data:") for u in requests), [u for u in requests if not u.startswith(url)]
    finally:
        server.terminate(); out = server.communicate(timeout=30)[0]
    assert "phantom.png" not in out and "broken.png" not in out  # nothing about the uploads in the server's log
