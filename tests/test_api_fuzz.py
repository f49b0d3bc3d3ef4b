"""Schemathesis fuzzing of the API against its own OpenAPI spec: valid and invalid generated requests to every
operation, never a server error, every answer conforming to the spec (status code, content type, body schema).

Positive cases are generated from the spec, then *repaired* to the rules the spec cannot state, so that they
reach the scoring path instead of stopping at validation: `Transaction.ts` is a naive date-time (the spec's
`date-time` format allows an offset, which the model refuses), the card holder's age at `ts` is 0-120 and
the date of birth not in the future (cross-field rules), strict integers are sent as JSON integers (JSON
Schema's `integer` also admits 5.0), and `trans_num` is unique within a batch.
Negative cases are sent as generated.

The CI part sends 1,000 requests (about 30 s on 2 cores); the `slow` test 10,000.
"""
from __future__ import annotations

import time
from datetime import date, datetime

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from fraud_detection.api import ApiConfig, create_app
from fraud_detection.testing import build_system

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    "The app over a tiny real system, its lifespan running for the whole module."
    system = build_system(tmp_path_factory.mktemp("fuzz"), n_incoming=5)
    app = create_app(system.settings, config=ApiConfig(max_batch=10))
    with TestClient(app):  # runs the lifespan: model and store loaded once
        yield app


@pytest.fixture(scope="module")
def schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


INTS = ("unix_time", "zip", "city_pop", "is_fraud")


def repair(tx: dict, i: int = 0) -> dict:
    "A generated transaction (the `i`-th of its batch) made valid for the rules the spec cannot express."
    tx = dict(tx)
    ts = datetime.fromisoformat(tx["ts"].replace("Z", "+00:00")).replace(tzinfo=None)
    if ts.year > date.today().year:  # a dob 0-120 years before ts must not be in the future
        ts = ts.replace(year=date.today().year, day=min(ts.day, 28))
    tx["ts"] = ts.isoformat()
    dob = date.fromisoformat(tx["dob"])
    years = min(1 + (ts.year - dob.year) % 100, ts.year - 1)  # 1-100 (0 in year 1), from the generated dob
    tx["dob"] = date(ts.year - years, 1, 1).isoformat()
    for k in INTS:
        if isinstance(tx.get(k), float):
            tx[k] = int(tx[k])
    tx["trans_num"] = f"{tx['trans_num'][:60]}#{i}"  # unique within a batch
    return tx


def fuzz(schema, mode: GenerationMode, n: int) -> dict[int, int]:
    "Send `n` generated requests of `mode` (to POST operations if negative); returns the count per status."
    ops = schema.include(method="POST") if mode is GenerationMode.NEGATIVE else schema
    strategy = ops.as_strategy(generation_mode=mode)
    statuses: dict[int, int] = {}

    @given(data=st.data())
    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(data):
        case = data.draw(strategy)
        if mode is GenerationMode.POSITIVE and case.method == "POST":
            case.body = {"transactions": [repair(t, i) for i, t in enumerate(case.body["transactions"])]} \
                if "transactions" in case.body else repair(case.body)
        r = case.call_and_validate(checks=CHECKS + [negative_data_rejection] * (mode is GenerationMode.NEGATIVE))
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    run()
    return statuses


def check(schema, mode: GenerationMode, n: int) -> None:
    t0 = time.perf_counter()
    statuses = fuzz(schema, mode, n)
    print(f"{mode.value}: {sum(statuses.values())} requests in {time.perf_counter() - t0:.1f} s, by status {statuses}")
    assert sum(statuses.values()) >= n
    assert not [s for s in statuses if s >= 500]
    if mode is GenerationMode.POSITIVE:  # most valid requests are scored, not stopped at validation
        assert statuses.get(200, 0) > 0.8 * n, statuses
    else:
        assert statuses.get(200, 0) < 0.05 * n, statuses


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_no_server_errors(schema, mode):
    check(schema, mode, 500)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_no_server_errors_long(schema, mode):
    check(schema, mode, 5000)
