"""The running analyst app in headless Chromium: every page shows its key element, a label click reaches the DB.

`streamlit run` (the exact `fraud app` command line, `fraud_detection.app.app_command`) is started as a subprocess
on a free port over a temporary data dir holding a small scored dataset; Playwright drives Debian's Chromium
(no browser download). Screenshots go to artifacts/screenshots/ (gitignored).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import polars as pl
import pytest
from app_data import make_scored_home
from chromium import chromium_page

from fraud_detection import results_store as R
from fraud_detection.app import app_command
from fraud_detection.broker import free_port
from fraud_detection.core import stop_process_group
from fraud_detection.testing import fake_predictions

pytestmark = pytest.mark.browser

SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"


@pytest.fixture(scope="module")
def app_server(tmp_path_factory) -> Iterator[dict]:
    "The app served by `streamlit run` over a small scored dataset; stopped (whole process group) afterwards."
    root = tmp_path_factory.mktemp("app_home")
    info = make_scored_home(root)
    port = free_port()
    env = {**os.environ, "FRAUD_DATA_DIR": str(root / "data"), "FRAUD_RUNS_DIR": str(root / "runs"),
           "FRAUD_BROKER_PORT": str(free_port()), "FRAUD_API_PORT": str(free_port()),  # no broker, no API
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    env.pop("FRAUD_DB_URL", None)
    log = root / "streamlit.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(app_command(port), env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/_stcore/health", timeout=1).text == "ok":
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not become healthy in 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield {"base": base, **info}
    finally:
        stop_process_group(proc, signal.SIGTERM, timeout=10)
        R.get_engine(info["url"]).dispose()


@pytest.fixture(scope="module")
def page(app_server, chromium_path: str):
    "A Chromium page (1440×1000)."
    SHOTS.mkdir(parents=True, exist_ok=True)
    with chromium_page(chromium_path, 1440, 1000) as pg:
        yield pg


def settle(pg) -> None:
    "Wait until Streamlit has finished running the script and charts have drawn."
    pg.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')
    pg.wait_for_timeout(1500)


def shoot(pg, name: str) -> None:
    "Screenshot of the whole page: the viewport is grown to the main area's height first (it scrolls internally)."
    h = pg.evaluate("() => { const m = document.querySelector('[data-testid=\"stMain\"]');"
                    " return m ? m.scrollHeight : document.body.scrollHeight; }")
    pg.set_viewport_size({"width": 1440, "height": max(1000, min(h + 40, 6000))})
    pg.wait_for_timeout(1500)  # charts re-layout to the new size
    pg.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    pg.set_viewport_size({"width": 1440, "height": 1000})


def open_page(pg, base: str, path: str, key_text: str) -> None:
    pg.goto(f"{base}/{path}")
    pg.get_by_text(key_text, exact=False).first.wait_for()
    settle(pg)
    assert not pg.locator('[data-testid="stException"]').count(), pg.locator('[data-testid="stException"]').first.inner_text()


def test_alerts_page(page, app_server):
    open_page(page, app_server["base"], "", "Amount at stake")  # the default page lives at /
    assert page.get_by_role("heading", name="Alerts queue").is_visible()
    page.locator('[data-testid="stDataFrame"]').first.wait_for()  # the grid can draw after the metrics on a busy machine
    assert page.locator('[data-testid="stDataFrame"]').count() == 1
    assert page.get_by_text("Showing the newest").is_visible()
    body = page.inner_text("body")
    assert "Case view" in body and "Model performance" in body  # navigation
    shoot(page, "1_alerts")
    # live: a new decline written by "the stream worker" shows up without any click (fragment refresh + cache TTL)
    alerts = page.locator('[data-testid="stMetric"]').first.locator('[data-testid="stMetricValue"]')
    before = int(alerts.inner_text().replace(",", ""))
    clock = R.event_clock(R.get_engine(app_server["url"]))
    new = fake_predictions(1, seed=99, end=clock + timedelta(minutes=1), days=0.0001).with_columns(
        fraud_probability=pl.lit(0.97), decision=pl.lit("decline"))
    assert R.write_predictions(R.get_engine(app_server["url"]), new) == 1
    page.wait_for_function("n => { const el = document.querySelector('[data-testid=\"stMetricValue\"]');"
                           " return el && parseInt(el.innerText.replace(/,/g, '')) === n; }", arg=before + 1, timeout=45_000)
    # select the newest alert (the grid's row-selection cell) and open its case
    box = page.locator('[data-testid="stDataFrame"]').bounding_box()
    page.mouse.click(box["x"] + 16, box["y"] + 35 + 17)
    page.get_by_role("button", name="Open case").click()
    page.get_by_text("Why this score").wait_for()
    settle(page)
    newest = R.read_alerts(R.get_engine(app_server["url"]), since=None, limit=1)
    assert page.url.endswith(f"/case?tx={newest['trans_num'][0]}")


def test_case_page_and_labelling(page, app_server):
    eng = R.get_engine(app_server["url"])
    alerts = R.read_alerts(eng, decisions=["decline"])  # the newest decline whose customer has earlier transactions
    tn = next(a["trans_num"] for a in alerts.iter_rows(named=True)
              if R.read_customer_history(eng, a["customer_id"], before=a["ts"]).height)
    open_page(page, app_server["base"], f"case?tx={tn}", "Why this score")
    assert page.get_by_text("Customer's earlier transactions").first.is_visible()
    assert page.locator('[data-testid="stVegaLiteChart"]').count() == 2  # SHAP reasons, location
    page.get_by_label("Note (optional)").fill("velocity burst, new merchant")
    page.get_by_label("Analyst").fill("analyst-42")
    shoot(page, "2_case")
    page.get_by_role("button", name="Fraud", exact=True).click()
    page.get_by_text("Label stored").wait_for()
    settle(page)
    lab = R.read_prediction(eng, tn)["label"]
    assert (lab["label"], lab["note"], lab["analyst"]) == (1, "velocity burst, new merchant", "analyst-42")
    assert R.read_labels(eng).filter(R.read_labels(eng)["trans_num"] == tn).height == 1
    shoot(page, "2_case_labelled")


def test_performance_page(page, app_server):
    open_page(page, app_server["base"], "performance", "Champion vs challenger")
    assert page.get_by_text("PR-AUC").first.is_visible()
    assert page.locator('[data-testid="stVegaLiteChart"]').count() == 2
    assert page.locator('[data-testid="stImage"]').count() == 4  # headline, PR curve, calibration, SHAP
    shoot(page, "3_performance")


def test_drift_page(page, app_server):
    open_page(page, app_server["base"], "drift", "Recent retraining runs")
    assert page.get_by_text("Drift", exact=False).first.is_visible()
    assert page.locator('[data-testid="stVegaLiteChart"]').count() == 1
    assert page.get_by_role("button", name="Download notebook").is_visible()
    shoot(page, "4_drift")


def test_system_page(page, app_server):
    open_page(page, app_server["base"], "system", "Dead-lettered")
    assert page.get_by_text("Consumer lag").first.is_visible()
    assert page.get_by_text("The API is not reachable").is_visible()
    shoot(page, "5_system")
