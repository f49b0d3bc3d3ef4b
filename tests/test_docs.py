"""The documentation site in headless Chromium: front page and module pages render, with plots and API docs.

The site is built by `docs/build.py` (what `make docs` runs) from a few notebooks into a temporary folder, served
on loopback by a plain HTTP server, and opened by Debian's Chromium through Playwright. Every request that is not
to the loopback server is aborted and recorded: the pages must work offline (no CDN scripts, fonts, MathJax).
Screenshots of the front page and a module page go to artifacts/screenshots/.
"""
from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from chromium import chromium_page

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "artifacts" / "screenshots"
# module pages: notebook, an exported function whose show_doc must appear, a plot the page must show
MODULE_PAGES = {"01_simulate": "resolve_scale", "60b_app_charts": "reasons_chart", "60c_app_queries": "decision_volume"}
TUTORIAL = "tutorials/01_explore_data"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    "The site built by docs/build.py from the front page, three module pages and a tutorial."
    work = tmp_path_factory.mktemp("docs")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "build.py"), "site", "--work", str(work), "--out",
                        str(work / "site"), "--only", *MODULE_PAGES, TUTORIAL], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "remote asset" not in r.stdout, r.stdout
    return work / "site"


@pytest.fixture(scope="module")
def base(site: Path) -> Iterator[str]:
    "The site served on loopback."
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def browser_page(base: str, chromium_path: str):
    "A Chromium page that may only talk to the loopback server; `page.remote` lists what it tried elsewhere."
    SHOTS.mkdir(parents=True, exist_ok=True)
    with chromium_page(chromium_path, 1280, 900, timeout_ms=30_000) as pg:
        remote: list[str] = []

        def gate(route):
            if route.request.url.startswith(base):
                route.continue_()
            else:
                remote.append(route.request.url)
                route.abort()
        pg.route("**/*", gate)
        pg.remote = remote
        yield pg


def loaded_images(pg) -> int:
    "Images in the article that finished loading with real pixels."
    return pg.evaluate("() => [...document.querySelectorAll('article img')]"
                       ".filter(i => i.complete && i.naturalWidth > 10 && i.naturalHeight > 10).length")


def open_page(pg, url: str) -> None:
    resp = pg.goto(url)
    assert resp is not None and resp.status == 200, url
    pg.wait_for_load_state("load")
    assert pg.locator("article h1").count() == 1, f"{url}: no page title"


def test_front_page(base, browser_page):
    pg = browser_page
    open_page(pg, f"{base}/index.html")
    assert "fraud-detection-service" in pg.locator("article h1").inner_text()
    text = pg.locator("article").inner_text()
    for section in ["Quick start", "How it fits together", "Notebooks → modules", "Benchmarks"]:
        assert section in text, section
    nav = pg.locator(".sidebar-tree a").all_inner_texts()  # every built page is in the navigation
    assert len(nav) >= len(MODULE_PAGES) + 1, nav
    pg.screenshot(path=str(SHOTS / "docs_front.png"), full_page=True)
    assert not pg.remote, pg.remote


@pytest.mark.parametrize("name", list(MODULE_PAGES))
def test_module_page(base, browser_page, name):
    pg = browser_page
    open_page(pg, f"{base}/{name}.html")
    assert loaded_images(pg) >= 1, f"{name}: no plot rendered"
    fn = MODULE_PAGES[name]
    # show_doc: the function's heading (a rubric: headings inside an output) and its signature, as nbdev writes them
    assert pg.locator(f"article :is(h3, p.rubric):has-text('{fn}')").count() >= 1, f"{name}: no API docs for {fn}"
    assert pg.locator(f"article pre:has-text('def {fn}(')").count() >= 1, f"{name}: no signature of {fn}"
    assert pg.locator("article .cell_output").count() >= 3, f"{name}: outputs missing"
    if name == "60b_app_charts":
        pg.screenshot(path=str(SHOTS / "docs_module.png"), full_page=True)
    assert not pg.remote, pg.remote


def test_tutorial_page(base, browser_page):
    pg = browser_page
    open_page(pg, f"{base}/{TUTORIAL}.html")
    assert loaded_images(pg) >= 2, "tutorial plots missing"
    pg.screenshot(path=str(SHOTS / "docs_tutorial.png"), full_page=True)
    assert not pg.remote, pg.remote


def test_readme_is_generated_from_index():
    "README.md is what nbs/index.ipynb generates (`make readme`): edit the notebook, not the README."
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "build.py"), "readme", "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
