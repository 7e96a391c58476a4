"""The built docs site in a real browser: every page loads cleanly, links resolve, images load; API entries exist."""
import functools, http.server, importlib, os, re, shutil, threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "docs" / "_site"
ARTIFACTS = ROOT / "docs" / "_build" / "artifacts"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CI = os.environ.get("CI") == "true"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _need(condition, reason):
    if not condition:
        if CI: pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def site():
    _need((SITE / "index.html").exists(), "docs site not built (run `boneage docs`)")
    return SITE


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def browser():
    _need(CHROMIUM, "Chromium not found (Debian package `chromium`)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def pages(site):
    return sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html") if "_static" not in p.parts)


def test_site_has_every_page(site):
    got = set(pages(site))
    expected = {"index.html", "results.html", "data.html", "gpu.html", "contributing.html", "api/index.html"}
    expected |= {f"{p.stem}.html" for p in (ROOT / "nbs").glob("[0-9][0-9]_*.ipynb")}
    assert expected <= got, expected - got


def test_api_reference_documents_every_export(site):
    for mod_file in sorted((ROOT / "boneage").glob("[a-z]*.py")):
        mod = importlib.import_module(f"boneage.{mod_file.stem}")
        html = (site / "api" / f"{mod_file.stem}.html").read_text()
        missing = [n for n in getattr(mod, "__all__", []) if f'id="boneage.{mod_file.stem}.{n}"' not in html]
        assert not missing, (mod_file.stem, missing)
    assert 'id="boneage.inference.predict"' in (site / "api" / "inference.html").read_text()


def test_pages_show_executed_outputs(site):
    training = (site / "04_training.html").read_text()
    assert "<img" in training and "epoch" in training  # the learning curves and the epoch lines of a real run
    results = (site / "results.html").read_text()
    assert "reference (RSNA test set, published)" in results and "this run (" in results
    for page in pages(site):  # no machine paths or start-up noise leak into the pages
        text = (site / page).read_text()
        assert str(ROOT) not in text and "oneDNN custom operations are on" not in text, page


def test_every_page_in_chromium(site, server, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ids = {p: set(re.findall(r'id="([^"]+)"', (site / p).read_text())) for p in pages(site)}
    problems = []
    for page in pages(site):
        tab = browser.new_page()
        errors = []
        tab.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        tab.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        tab.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        response = tab.goto(f"{server}/{page}", wait_until="load")
        assert response.ok, page
        for href in tab.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
            url = urlparse(href)
            if url.scheme not in ("http", "https") or url.netloc != urlparse(server).netloc: continue
            target = unquote(url.path).lstrip("/") or "index.html"
            if target.endswith("/"): target += "index.html"
            if not (site / target).is_file(): problems.append(f"{page}: link to missing {target}")
            elif url.fragment and target in ids and unquote(url.fragment) not in ids[target]:
                problems.append(f"{page}: link to missing anchor {target}#{url.fragment}")
        for src, width in tab.eval_on_selector_all("img", "els => els.map(e => [e.src, e.naturalWidth])"):
            if not width: problems.append(f"{page}: image did not load: {src}")
        if page == "index.html": tab.screenshot(path=str(ARTIFACTS / "home.png"), full_page=False)
        if page == "05_evaluation.html": tab.screenshot(path=str(ARTIFACTS / "evaluation.png"), full_page=False)
        problems += [f"{page}: {e}" for e in errors]
        tab.close()
    assert not problems, "\n".join(problems[:40])
    assert (ARTIFACTS / "home.png").stat().st_size > 20_000


@pytest.fixture(scope="module")
def executed_course(tmp_path_factory):
    "A copy of the executed course (notebooks and results) that a test may break."
    out = ROOT / "Bone_age_prediction"
    _need((out / "notebooks" / "00_data.ipynb").exists(), "course not executed (run `boneage run` or `boneage docs`)")
    dest = tmp_path_factory.mktemp("course")
    for f in out.iterdir():
        if f.is_file(): shutil.copy(f, dest / f.name)
    shutil.copytree(out / "notebooks", dest / "notebooks", copy_function=shutil.copy)  # fresh times: not stale
    return dest


def test_build_fails_on_a_broken_cross_reference(executed_course, tmp_path):
    from boneage.docs import DocsError, build_site
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, ignore=shutil.ignore_patterns("_build", "_site"))
    (docs / "contributing.md").write_text((docs / "contributing.md").read_text() + "\nSee {doc}`a-page-that-does-not-exist`.\n")
    with pytest.raises(DocsError, match="Sphinx reported problems"):
        build_site(executed_course, tmp_path / "site", docs_dir=docs, progress=False)


def test_build_fails_on_a_failed_cell(executed_course, tmp_path):
    import nbformat
    from boneage.docs import DocsError, build_site
    course = tmp_path / "course"; shutil.copytree(executed_course, course, copy_function=shutil.copy)
    nb = nbformat.read(course / "notebooks" / "06_bias.ipynb", as_version=4)
    nb.cells[-1].outputs = [nbformat.v4.new_output("error", ename="KeyError", evalue="'male'", traceback=[])]
    nbformat.write(nb, course / "notebooks" / "06_bias.ipynb")
    with pytest.raises(DocsError, match=r"06_bias.ipynb: cell \d+ failed \(KeyError"):
        build_site(course, tmp_path / "site", progress=False)
