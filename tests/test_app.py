"""Every page of the analyst app with Streamlit's AppTest: empty state, rendering with data, labelling."""
from __future__ import annotations

from pathlib import Path

import pytest
import streamlit as st
from app_data import make_scored_home
from streamlit.testing.v1 import AppTest

import fraud_detection
from fraud_detection import results_store
from fraud_detection.broker import free_port
from fraud_detection.core import get_settings

PAGES = ["alerts", "case", "performance", "drift", "system"]
TIMEOUT = 90  # seconds; the first run imports polars, altair, sklearn on a busy 2-core machine


def _page_script(name: str) -> None:
    import fraud_detection.streamlit_app as streamlit_app
    getattr(streamlit_app, f"{name}_page")()


def run_page(name: str, **query) -> AppTest:
    at = AppTest.from_function(_page_script, args=(name,), default_timeout=TIMEOUT)
    at.query_params.update(query)
    return at.run()


@pytest.fixture
def empty_home(fraud_home: Path):
    st.cache_data.clear()
    yield fraud_home
    st.cache_data.clear()


@pytest.fixture
def scored(fraud_home: Path, monkeypatch: pytest.MonkeyPatch):
    "A data dir holding ~200 scored transactions, worker stats, a reference, a run and a report; no broker."
    monkeypatch.setenv("FRAUD_BROKER_PORT", str(free_port()))  # nothing listens there, whatever else runs here
    get_settings.cache_clear()
    st.cache_data.clear()
    info = make_scored_home(fraud_home)
    yield info
    st.cache_data.clear()
    results_store.get_engine(info["url"]).dispose()


def texts(at: AppTest, kind: str) -> str:
    return "\n".join(e.value for e in getattr(at, kind))


@pytest.mark.parametrize("page", PAGES)
def test_empty_state(empty_home, page):
    at = run_page(page)
    assert not at.exception, at.exception
    assert "No scored transactions yet" in texts(at, "info")


def test_alerts_with_data(scored):
    at = run_page("alerts")
    assert not at.exception, at.exception
    assert [m.label for m in at.metric] == ["Alerts", "In review", "Declined", "Amount at stake", "Unlabelled"]
    preds = scored["predictions"]
    eng = results_store.get_engine(scored["url"])
    summ = results_store.alert_summary(eng, since=results_store.event_clock(eng) - __import__("datetime").timedelta(days=7))
    assert int(at.metric[0].value.replace(",", "")) == summ["n"] > 0
    table = at.dataframe[0].value
    assert len(table) == summ["n"] and set(table["decision"]) <= {"review", "decline"}
    assert not {"first", "last", "street", "cc_num"} & set(table.columns)
    # filter: declines only
    at.multiselect(key="al_dec").set_value(["decline"]).run()
    n_decl = int(at.metric[0].value.replace(",", ""))
    assert n_decl == summ["n_decline"] and set(at.dataframe[0].value["decision"]) == {"decline"}
    # filter: nothing matches
    at.number_input(key="al_min").set_value(1e7).run()
    assert "No alerts match these filters." in texts(at, "info")
    assert len(preds) == 200


def test_case_with_data_and_labelling(scored):
    at = run_page("case")
    assert not at.exception, at.exception
    tn = at.selectbox(key="case_pick").value
    eng = results_store.get_engine(scored["url"])
    tx = results_store.read_prediction(eng, tn)
    assert at.metric[0].label == "Fraud score" and at.metric[0].value == f"{tx['fraud_probability']:.3f}"
    assert len(at.get("vega_lite_chart")) == 2  # SHAP reasons, location
    assert "Why this score" in [h.value for h in at.subheader]
    # label it fraud with a note and an analyst id
    at.text_area[0].set_value("card testing burst")
    at.text_input[0].set_value("analyst-7")
    next(b for b in at.button if b.label == "Fraud").click().run()
    assert not at.exception, at.exception
    lab = results_store.read_prediction(eng, tn)["label"]
    assert (lab["label"], lab["note"], lab["analyst"], lab["source"]) == (1, "card testing burst", "analyst-7", "analyst")
    assert "Label stored: **fraud**" in texts(at, "success")
    assert "No broker at" in texts(at, "warning")  # nothing listens on the broker port: stored, not published
    assert results_store.pending_labels(eng) == 1
    # the analyst changes their mind: latest label wins, and the page shows it
    next(b for b in at.button if b.label == "Legitimate").click().run()
    assert results_store.read_prediction(eng, tn)["label"]["label"] == 0
    assert "Labelled **legitimate**" in texts(at, "info")


@pytest.mark.kafka
def test_label_is_published_when_the_broker_runs(scored, monkeypatch):
    import json

    from fraud_detection.broker import TOPIC_LABELS, EmbeddedBroker, ensure_topics, read_topic
    with EmbeddedBroker() as b:
        ensure_topics(b.bootstrap, [TOPIC_LABELS], partitions=1)
        monkeypatch.setenv("FRAUD_BROKER_PORT", str(b.port))
        get_settings.cache_clear()
        at = run_page("case")
        tn = at.selectbox(key="case_pick").value
        next(x for x in at.button if x.label == "Fraud").click().run()
        assert not at.exception, at.exception
        assert "Published to topic 'labels'" in texts(at, "caption")
        eng = results_store.get_engine(scored["url"])
        assert results_store.pending_labels(eng) == 0
        msgs = read_topic(b.bootstrap, TOPIC_LABELS, 1, timeout=10)
        assert msgs[0].key().decode() == tn and json.loads(msgs[0].value())["label"] == 1


def test_case_deep_link_and_unknown(scored):
    tn = scored["predictions"].filter(scored["predictions"]["decision"] == "approve")["trans_num"][0]
    at = run_page("case", tx=tn)  # an approved transaction is not in the alerts list but can be opened by id
    assert not at.exception and at.selectbox(key="case_pick").value == tn
    at = run_page("case", tx="no-such-transaction")
    assert not at.exception and "No scored transaction" in texts(at, "warning")


def test_performance_with_data(scored):
    at = run_page("performance")
    assert not at.exception, at.exception
    assert [m.label for m in at.metric] == ["Precision", "Recall", "F1", "PR-AUC", "Labelled"]
    assert int(at.metric[4].value.replace(",", "")) > 0
    cmp = at.dataframe[0].value
    assert list(cmp["model"]) == ["champion", "challenger (shadow)"]
    assert list(cmp["version"]) == ["v0001", "v0002"]
    assert len(at.get("vega_lite_chart")) == 2  # metrics over time, alert volume
    assert len(at.get("image")) == 4  # the report's headline bars, PR curve, calibration and SHAP summary
    summary = at.dataframe[1].value  # the training report's headline table (evaluate.summary_table)
    assert list(summary["model"]) == ["full"] and 0 < summary["pr_auc"].iloc[0] <= 1
    assert "Promotion gate" in texts(at, "caption")
    # a delay longer than the data: only analyst labels would count, and there are none
    at.number_input(key="pf_delay").set_value(90).run()
    assert "No labelled transactions yet" in texts(at, "info")


def test_drift_with_data(scored):
    at = run_page("drift")
    assert not at.exception, at.exception
    status = texts(at, "error") + texts(at, "warning") + texts(at, "success")
    assert "Amount" in status  # amounts were shifted in the reference
    report = at.dataframe[0].value.set_index("name")
    assert report.loc["Amount", "psi"] > 0.25 and report.loc["Amount", "triggered"]
    assert report.loc["Hour of day", "monitored"]  # a calendar field over 14 days of traffic: compared
    assert not report.loc["Customer's prior transactions", "monitored"]  # not stored by these fake rows: shown, and why
    assert "missing from the" in report.loc["Customer's prior transactions", "reason"]
    assert list(at.dataframe[1].value["status"]) == ["ok"]  # the recorded retraining run
    assert at.get("download_button")
    # 200 recent rows < drift_min_rows (500): drift shown, trigger not fired
    assert "the trigger needs 500" in texts(at, "warning")


def test_drift_without_reference(scored):
    (Path(scored["db"]).parent / "registry" / "v0001" / "drift_reference.parquet").unlink()
    at = run_page("drift")  # and no clean data to build it from
    assert not at.exception and "No validation reference for champion v0001" in texts(at, "warning")


def test_system_with_data(scored):
    at = run_page("system")
    assert not at.exception, at.exception
    m = {x.label: x.value for x in at.metric}
    assert m["Processed (24 h)"] == f"{sum(400 + 10 * i for i in range(6)) * 2:,}" and m["Dead-lettered (24 h)"] == "6"
    assert m["Throughput"] == "90 msg/s" and m["Consumer lag"] == "40 msgs"
    assert (m["Duplicates (24 h)"], m["Retries (24 h)"], m["Outage time (24 h)"]) == ("30", "4", "25 s")
    assert "The API is not reachable" in texts(at, "warning")
    assert "Every analyst label has been published" in texts(at, "caption")


def test_full_app_runs_main():
    "The generated script itself: navigation + sidebar + default page (alerts)."
    at = AppTest.from_file(str(Path(fraud_detection.__file__).parent / "streamlit_app.py"), default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Alerts queue"
    assert "Store:" in texts(at.sidebar, "caption")
