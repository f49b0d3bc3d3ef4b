"""API tests with real pieces: TestClient and real HTTP (uvicorn subprocess), batch/online parity, degraded mode
with a real Redis that is stopped or never there, 422/401/413, batch limit, hot reload."""
from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time

import httpx
import polars as pl
import pytest
from fastapi.testclient import TestClient

from fraud_detection.api import ApiConfig, create_app
from fraud_detection.broker import free_port, port_open
from fraud_detection.core import Settings
from fraud_detection.feature_store import apply, get_store, push_state
from fraud_detection.features import batch_features, state_from_history
from fraud_detection.registry import register, set_alias
from fraud_detection.testing import ApiSystem, build_system, require, start_server, stop_server, train_tiny

TOL = 1e-6  # float tolerance between the online and the batch path


@pytest.fixture(scope="module")
def system(tmp_path_factory) -> ApiSystem:
    return build_system(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def client(system) -> TestClient:
    with TestClient(create_app(system.settings, config=PARITY)) as c:
        yield c


# parity tests are about equal answers, not latency: a loaded CI machine must not turn a slow online read
# into a (correct but different) degraded cold-start answer
PARITY = ApiConfig(store_timeout_s=5.0)


def _same(got: dict, want: dict) -> None:
    "An API prediction equals the batch path's scored row."
    assert got["trans_num"] == want["trans_num"]
    assert abs(got["fraud_probability"] - want["fraud_probability"]) < TOL, (got, want)
    assert got["decision"] == want["decision"]
    # same top reasons, rank by rank; SHAP of one row and of a batch differ in the last float bits, so two
    # features whose contributions tie within TOL may trade places (or places at the top-k boundary)
    assert len(got["reasons"]) == len(want["reasons"])
    for g, w in zip(got["reasons"], want["reasons"], strict=True):
        assert abs(abs(g["contribution"]) - abs(w["contribution"])) < TOL, (got["reasons"], want["reasons"])
        if g["feature"] == w["feature"]:
            assert abs(g["contribution"] - w["contribution"]) < TOL
            assert (g["value"] is None and w["value"] is None) or abs(g["value"] - w["value"]) < TOL


def test_predict_equals_batch_path(tmp_path):
    "Replay the held-out transactions one by one, pushing each one's new state as the stream worker would."
    sys_ = build_system(tmp_path)  # its own store: this test writes state
    ref = {r["trans_num"]: r for r in sys_.reference().iter_rows(named=True)}
    store = get_store(sys_.settings)
    with TestClient(create_app(sys_.settings, config=PARITY)) as c:
        done = sys_.history
        for body, row in zip(sys_.bodies(), sys_.incoming.iter_rows(named=True), strict=True):
            r = c.post("/v1/predict", json=body)
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["degraded"] is False, "the online read missed its deadline: cold-start features"
            _same(got, ref[body["trans_num"]])
            assert got["model_version"] == sys_.version
            done = pl.concat([done, pl.DataFrame([row], schema=done.schema)])
            cust = done.filter(pl.col("customer_id") == row["customer_id"])
            push_state(store, state_from_history(cust), to="online")


def test_batch_endpoint_equals_batch_path(system, client):
    "The held-out transactions in one batch (state = history): each sees the earlier ones of its customer."
    ref = {r["trans_num"]: r for r in system.reference().iter_rows(named=True)}
    bodies = system.bodies()
    r = client.post("/v1/predict/batch", json={"transactions": bodies[::-1]})  # order of the answer = request order
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["trans_num"] for p in preds] == [b["trans_num"] for b in bodies[::-1]]
    for p in preds:
        _same(p, ref[p["trans_num"]])


def test_unknown_customer_is_cold_start(system, client):
    body = {**system.bodies()[0], "customer_id": "never-seen-before", "trans_num": "cold"}
    r = client.post("/v1/predict", json=body)
    assert r.status_code == 200
    p = r.json()
    assert p["degraded"] is False and p["feature_freshness"] is None
    ref = system.scorer.score(batch_features(pl.DataFrame([{**system.incoming.row(0, named=True), "customer_id":
                                                              "never-seen-before", "trans_num": "cold"}],
                                                            schema=system.clean.schema), system.risk))
    assert abs(p["fraud_probability"] - ref["fraud_probability"][0]) < TOL


def test_explain_false_and_top_k(system, client):
    body = system.bodies()[0]
    assert client.post("/v1/predict?explain=false", json=body).json()["reasons"] == []
    assert len(client.post("/v1/predict?top_k=5", json=body).json()["reasons"]) == 5
    assert client.post("/v1/predict?top_k=0", json=body).status_code == 422


@pytest.mark.parametrize("change, field, rule", [
    ({"amt": -1.0}, "amt", "greater_than_equal"),
    ({"amt": "12.5"}, "amt", "float_type"),
    ({"category": "casino"}, "category", "literal_error"),
    ({"state": "ny"}, "state", "string_pattern_mismatch"),
    ({"ts": "yesterday"}, "ts", "datetime_from_date_parsing"),
    ({"cc_num": "4111111111111111"}, "cc_num", "extra_forbidden"),
    ({"customer_id": None}, "customer_id", "string_type"),
])
def test_422_names_field_and_rule(system, client, change, field, rule):
    r = client.post("/v1/predict", json={**system.bodies()[0], **change})
    assert r.status_code == 422
    errs = r.json()["detail"]
    assert (field, rule) in [(e["field"], e["type"]) for e in errs], errs
    assert "4111111111111111" not in r.text  # the input is not echoed


@pytest.mark.parametrize("field", ["unix_time", "city_pop"])
def test_beyond_int64_is_422_not_500(system, client, field):
    "The clean schema's integers are Int64: a bigger one must be refused at validation, not crash the features."
    r = client.post("/v1/predict", json={**system.bodies()[0], field: 10**20})
    assert r.status_code == 422, r.text
    assert field in [e["field"] for e in r.json()["detail"]]


def test_422_missing_field_and_bad_json(system, client):
    body = dict(system.bodies()[0])
    del body["merchant"]
    errs = client.post("/v1/predict", json=body).json()["detail"]
    assert [(e["field"], e["type"]) for e in errs] == [("merchant", "missing")]
    r = client.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


def test_api_key(system):
    settings = Settings(data_dir=system.settings.data, api_key="k3y")
    body = system.bodies()[0]
    with TestClient(create_app(settings)) as c:
        assert c.post("/v1/predict", json=body).status_code == 401
        assert c.post("/v1/predict", json=body, headers={"X-API-Key": "nope"}).status_code == 401
        assert c.post("/v1/predict/batch", json={"transactions": [body]}).status_code == 401
        assert c.get("/v1/model").status_code == 401
        assert c.post("/v1/predict", json=body, headers={"X-API-Key": "k3y"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_batch_limit_and_body_size(system):
    bodies = system.bodies()
    with TestClient(create_app(system.settings, config=ApiConfig(max_batch=3, max_body_bytes=5000))) as c:
        assert c.post("/v1/predict/batch", json={"transactions": bodies[:3]}).status_code == 200
        r = c.post("/v1/predict/batch", json={"transactions": bodies[:4]})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "transactions"
        assert r.json()["detail"][0]["type"] == "too_long"
        assert c.post("/v1/predict/batch", json={"transactions": []}).status_code == 422
        dup = c.post("/v1/predict/batch", json={"transactions": [bodies[0], bodies[0]]})
        assert dup.status_code == 422 and "unique" in dup.json()["detail"][0]["msg"]
        big = c.post("/v1/predict", json={**bodies[0], "job": "x" * 6000})
        assert big.status_code == 413
        def chunks():  # no Content-Length: the limit applies while reading
            yield b'{"trans_num": "'
            for _ in range(10): yield b"y" * 1000
        assert c.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"}).status_code == 413


def test_model_info_metrics_docs(system, client):
    m = client.get("/v1/model").json()
    assert m["version"] == system.version and m["features"] == system.scorer.features
    assert set(m["thresholds"]) >= {"review", "decline"} and m["metrics"]
    client.post("/v1/predict", json=system.bodies()[0])
    text = client.get("/metrics").text
    assert f'fraud_api_model_info{{version="{system.version}"}} 1.0' in text
    assert 'fraud_api_request_duration_seconds_count{decision="' in text and 'endpoint="/v1/predict"' in text
    assert "fraud_api_predictions_total" in text and "fraud_api_degraded_total" in text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert spec["components"]["schemas"]["Transaction"]["examples"]
    assert client.get("/nope").status_code == 404 and 'endpoint="other"' in client.get("/metrics").text


def test_no_model_yet_then_champion_appears(system, tmp_path):
    "The app starts without a model (readyz 503, predict 503) and picks the champion up when it is set."
    settings = Settings(data_dir=tmp_path / "data")
    shutil.copytree(system.settings.data, settings.data, ignore=shutil.ignore_patterns("registry"))
    with TestClient(create_app(settings, config=ApiConfig(reload_interval_s=0.1))) as c:
        assert c.get("/readyz").status_code == 503
        assert c.post("/v1/predict", json=system.bodies()[0]).status_code == 503
        reg = settings.data / "registry"
        set_alias("champion", register(system.scorer, root=reg), root=reg)
        deadline = time.monotonic() + 5
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.post("/v1/predict", json=system.bodies()[0]).status_code == 200


def test_hot_reload_without_dropping_requests(system, tmp_path):
    "Promote a new champion while requests flow: every request succeeds, the version switches."
    settings = Settings(data_dir=tmp_path / "data")
    shutil.copytree(system.settings.data, settings.data)
    reg = settings.data / "registry"
    body = system.bodies()[0]
    with TestClient(create_app(settings, config=ApiConfig(reload_interval_s=0.05))) as c:
        seen, errors, stop = [], [], threading.Event()
        def load():
            while not stop.is_set():
                r = c.post("/v1/predict", json=body)
                (seen if r.status_code == 200 else errors).append(r.json().get("model_version", r.text))
        t = threading.Thread(target=load, daemon=True)
        t.start()
        try:
            time.sleep(0.3)
            v2 = register(train_tiny(batch_features(system.history, system.risk), rounds=8, seed=1), root=reg)
            set_alias("champion", v2, root=reg)
            deadline = time.monotonic() + 10
            while (not seen or seen[-1] != v2) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
        finally:
            stop.set()
            t.join(10)
        assert not errors, errors[:3]
        assert seen[0] == system.version and seen[-1] == v2
        assert seen.index(v2) > 0 and set(seen[seen.index(v2):]) == {v2}  # switched once, for good
        assert 'fraud_api_model_reloads 1.0' in c.get("/metrics").text


# ---- degraded mode: a real Redis online store that is stopped, or never there -------------------------

@pytest.fixture
def own_redis():
    "A private redis-server on a free port (no persistence), so the test can stop and restart it."
    exe = shutil.which("redis-server")
    require(exe is not None, "redis-server binary")
    port = free_port()
    def start():
        p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.02)
        return p
    procs = [start()]
    yield port, procs, start
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(10)


BUDGET_S = 0.25  # a degraded answer: the 50 ms store deadline + scoring, with room for a loaded machine


@pytest.mark.redis
def test_degraded_when_redis_stops_and_recovers(tmp_path, own_redis):
    port, procs, start = own_redis
    sys_ = build_system(tmp_path, online_store="redis", redis_url=f"redis://127.0.0.1:{port}/0", n_incoming=5)
    body = sys_.bodies()[0]
    with TestClient(create_app(sys_.settings, config=ApiConfig(store_retry_s=0.3))) as c:
        ok = c.post("/v1/predict", json=body).json()
        assert ok["degraded"] is False and ok["feature_freshness"] is not None
        procs[0].terminate(); procs[0].wait(10)
        for _ in range(5):  # the first waits for the store's deadline at most, the next skip it
            t0 = time.perf_counter()
            r = c.post("/v1/predict", json=body)
            took = time.perf_counter() - t0
            assert r.status_code == 200 and r.json()["degraded"] is True and took < BUDGET_S, (r.text, took)
        assert r.json()["feature_freshness"] is None
        assert c.get("/readyz").status_code == 503
        assert "fraud_api_degraded_total 5.0" in c.get("/metrics").text
        procs.append(start())  # back (empty: no persistence) -> not degraded once the back-off has passed
        time.sleep(0.35)
        assert c.post("/v1/predict", json=body).json()["degraded"] is False
        assert c.get("/readyz").status_code == 200


@pytest.mark.redis
def test_degraded_when_redis_hangs(tmp_path, own_redis):
    "A Redis that accepts connections but never answers (SIGSTOP): degraded within budget, back after SIGCONT."
    port, procs, _ = own_redis
    sys_ = build_system(tmp_path, online_store="redis", redis_url=f"redis://127.0.0.1:{port}/0", n_incoming=5)
    body = sys_.bodies()[0]
    with TestClient(create_app(sys_.settings, config=ApiConfig(store_retry_s=0.3))) as c:
        assert c.post("/v1/predict", json=body).json()["degraded"] is False
        procs[0].send_signal(signal.SIGSTOP)
        try:
            for _ in range(5):
                t0 = time.perf_counter()
                r = c.post("/v1/predict", json=body)
                took = time.perf_counter() - t0
                assert r.status_code == 200 and r.json()["degraded"] is True and took < BUDGET_S, (r.text, took)
            assert c.get("/readyz").status_code == 503
        finally:
            procs[0].send_signal(signal.SIGCONT)
        time.sleep(0.35)
        assert c.post("/v1/predict", json=body).json()["degraded"] is False


@pytest.mark.redis
def test_degraded_when_redis_is_not_there(tmp_path, redis_url):
    "Registry applied with a live Redis, then the API pointed at a closed port: starts, answers degraded fast."
    sys_ = build_system(tmp_path, n_incoming=5)
    settings = Settings(data_dir=sys_.settings.data, online_store="redis", redis_url=redis_url)
    apply(get_store(settings))  # the Redis deployment's registry, so reads fail for the right reason
    dead = Settings(data_dir=sys_.settings.data, online_store="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(dead)) as c:
        for body in sys_.bodies():
            t0 = time.perf_counter()
            r = c.post("/v1/predict", json=body)
            assert r.status_code == 200 and r.json()["degraded"] is True, r.text
            assert time.perf_counter() - t0 < BUDGET_S
        assert c.post("/v1/predict/batch", json={"transactions": sys_.bodies()}).json()["predictions"][0]["degraded"]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["online_store"] != "ok"
        assert c.get("/healthz").status_code == 200


# ---- over real HTTP: `serve()` in a subprocess ------------------------------------------------------

def test_over_real_http(system):
    port = free_port()
    proc = start_server(system.settings, port)
    try:
        ref = {r["trans_num"]: r for r in system.reference().iter_rows(named=True)}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as h:
            body = system.bodies()[0]
            r = h.post("/v1/predict", json=body)
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            _same(r.json(), ref[body["trans_num"]])
            r = h.post("/v1/predict/batch", json={"transactions": system.bodies()})
            for p in r.json()["predictions"]:
                _same(p, ref[p["trans_num"]])
            assert h.post("/v1/predict", json={**body, "amt": 0}).status_code == 422
            assert h.get("/healthz").json() == {"status": "ok"}
            assert h.get("/docs").status_code == 200
            assert "fraud_api_request_duration_seconds_bucket" in h.get("/metrics").text
    finally:
        stop_server(proc)
    assert proc.returncode is not None
