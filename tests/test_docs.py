"""The docs site, built here from a tiny course run into a temporary folder, opened page by page in a real browser."""
import functools, http.server, importlib, re, shutil, subprocess, sys, threading
from urllib.parse import unquote, urlparse

import pytest

from conftest import CHROMIUM, CHROMIUM_FLAGS as FLAGS, ROOT, make_site, need, run_root

ARTIFACTS = ROOT / "docs" / "_build" / "artifacts"


@pytest.fixture(scope="module")
def site(tiny_course, tmp_path_factory):
    "`boneage docs` as a user runs it, on the tiny course; built once a run."
    return make_site(run_root(tmp_path_factory))


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(QuietHandler, directory=str(site[0]))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def browser():
    need(CHROMIUM, "Chromium not found (Debian package `chromium`)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def pages(site):
    return sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html") if "_static" not in p.parts)


def test_site_has_every_page(site):
    got = set(pages(site[0]))
    expected = {"index.html", "results.html", "data.html", "inputs.html", "gpu.html", "contributing.html", "api/index.html"}
    expected |= {f"{p.stem}.html" for p in (ROOT / "nbs").glob("[0-9][0-9]*_*.ipynb")}  # optional ones too, run or not
    assert expected <= got, expected - got
    home = (site[0] / "index.html").read_text()
    assert home.index(">The course<") < home.index(">Appendices<") < home.index(">Project<")  # the core path, then the rest
    approaches = (site[0] / "09_approaches.html").read_text()  # the tiny course did not run it: its source, and how to run it
    assert "this course run did not execute it" in approaches


def test_the_course_table_puts_the_core_path_before_the_appendices():
    from boneage.docs import CORE_LESSONS
    readme = (ROOT / "README.md").read_text()
    core, appendices = readme.split("### The core path")[1].split("### Appendices")
    listed = lambda text: re.findall(r"^\| `(\d\d\w*?)` \|", text, re.M)
    assert listed(core) == CORE_LESSONS
    assert sorted(listed(core) + listed(appendices.split("\n## ")[0])) == sorted(p.stem for p in (ROOT / "nbs").glob("[0-9][0-9]*_*.ipynb"))


def test_api_reference_documents_every_export(site):
    for mod_file in sorted((ROOT / "boneage").glob("[a-z]*.py")):
        mod = importlib.import_module(f"boneage.{mod_file.stem}")
        html = (site[0] / "api" / f"{mod_file.stem}.html").read_text()
        missing = [n for n in getattr(mod, "__all__", []) if f'id="boneage.{mod_file.stem}.{n}"' not in html]
        assert not missing, (mod_file.stem, missing)
    assert 'id="boneage.inference.predict"' in (site[0] / "api" / "inference.html").read_text()


def test_pages_show_executed_outputs_and_no_machine_paths(site):
    s, out = site
    training = (s / "04_training.html").read_text()
    assert "<img" in training and "epoch 2/2" in training  # the learning curves and the epoch lines of the run
    runs = (s / "04b_training_runs.html").read_text()  # the training appendix, executed by the build: the resume demonstration
    assert "interrupted in epoch 2" in runs and "epoch 3/3" in runs and "starting over" in runs
    results = (s / "results.html").read_text()
    assert "reference README (RSNA; split not stated)" in results and "this run (phantom, 12 test images)" in results
    assert "95% CI" in results and "one run on one machine" in results
    assert all(f"_images/{f}.png" in results for f in ("training_history", "bland_altman", "best_and_worst", "sex_bias"))  # the lesson's figures
    for page in pages(s):
        text = (s / page).read_text()
        assert str(ROOT) not in text and str(out) not in text and "oneDNN custom operations are on" not in text, page
        assert "boneage.github.io/boneage/" not in text, page  # the notebooks' own link to their page


def test_every_page_in_chromium(site, server, browser):
    s = site[0]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ids = {p: set(re.findall(r'id="([^"]+)"', (s / p).read_text())) for p in pages(s)}
    problems = []
    for page in pages(s):
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
            if not (s / target).is_file(): problems.append(f"{page}: link to missing {target}")
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


@pytest.fixture
def executed_course(tiny_course, tmp_path):
    "A copy of the executed course (notebooks and results) that a test may break."
    out, _ = tiny_course
    dest = tmp_path / "course"
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("cache", "phantom"))
    return dest


def test_build_skips_execution_when_the_executed_copies_are_current(executed_course, tmp_path, capsys):
    from boneage.docs import build_site
    build_site(executed_course, tmp_path / "site", progress=False)
    assert "executing the course" not in capsys.readouterr().out and (tmp_path / "site" / "index.html").exists()


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
    nb = nbformat.read(executed_course / "notebooks" / "06_bias.ipynb", as_version=4)
    last_code = [c for c in nb.cells if c.cell_type == "code"][-1]  # the notebook ends with its recap, in markdown
    last_code.outputs = [nbformat.v4.new_output("error", ename="KeyError", evalue="'male'", traceback=[])]
    nbformat.write(nb, executed_course / "notebooks" / "06_bias.ipynb")
    with pytest.raises(DocsError, match=r"06_bias.ipynb: cell \d+ failed \(KeyError"):
        build_site(executed_course, tmp_path / "site", progress=False)


def test_dest_that_is_not_a_site_is_never_deleted(executed_course, tmp_path):
    from boneage.docs import DocsError, build_site
    (tmp_path / "work").mkdir(); (tmp_path / "work" / "thesis.tex").write_text("months of work")
    with pytest.raises(DocsError, match="exists and is not a site built by `boneage docs`; refusing to replace it"):
        build_site(executed_course, tmp_path / "work", progress=False)
    assert (tmp_path / "work" / "thesis.tex").read_text() == "months of work"
