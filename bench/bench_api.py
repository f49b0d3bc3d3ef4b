"""API latency and throughput: `/v1/predict` over HTTP against a running `serve()`, vs the in-process floor.

Measured in one run, on a tiny real system (simulated data, a registered champion, Feast SQLite online store
holding the customers' state and merchant risk; fraud_detection.testing.build_system):

- floor: the online-store read (`feature_store.read_online_rows`: state + merchant risk, one Feast call) plus
  the model's predict of a prepared feature row (`Scorer.margin`): what no implementation can avoid;
- in-process scoring: `Predictor.predict` (store read + the shared feature code + model + SHAP reasons), and
  its parts alone (`read_online_rows`, `request_row`, `Scorer.score_row`);
- HTTP at a fixed rate: an open-loop generator (asyncio, raw HTTP/1.1 keep-alive connections) sends POST
  /v1/predict at `--rate` req/s on a fixed schedule for `--seconds`; latency is counted from each request's
  *scheduled* time, so a stalled server cannot hide its queue (no coordinated omission);
- max throughput: `wrk` (closed loop, Lua script cycling the request bodies) against the same server,
  or a closed-loop asyncio generator if `wrk` is not installed.

Prints p50/p99 in ms (median over `--runs` runs), the ratios to the floor and the targets (DESIGN.md: p99 <=
10 ms at 200 req/s over HTTP, in-process p99 <= 2 ms, <= 3x the floor).
The model: by default a tiny one trained on the tiny system's history (a few trees); `--model DIR` serves a
registered model directory instead (e.g. `data/registry/v0001` after `fraud train` at full scale), which is
what sets the SHAP cost.
Usage: python bench/bench_api.py [--rate 200] [--seconds 10] [--runs 3] [--workers 2] [--wrk-seconds 10]
                                 [--model DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from fraud_detection.api import ApiConfig, Champion, OnlineFeatures, Predictor  # noqa: E402
from fraud_detection.broker import free_port  # noqa: E402
from fraud_detection.feature_store import get_store, read_online_rows  # noqa: E402
from fraud_detection.features import batch_features, request_row  # noqa: E402
from fraud_detection.model import Scorer  # noqa: E402
from fraud_detection.schema import Transaction  # noqa: E402
from fraud_detection.testing import build_system, start_server, stop_server  # noqa: E402


def pct(xs: list[float]) -> tuple[float, float]:
    "p50 and p99 in ms of durations in seconds."
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return q[49] * 1e3, q[98] * 1e3


def timed(fn, items: list, n: int) -> tuple[float, float]:
    "p50/p99 (ms) of n calls of fn(item), cycling the items, after a warm-up."
    for it in items[:20]:
        fn(it)
    ts = []
    for i in range(n):
        it = items[i % len(items)]
        t = time.perf_counter()
        fn(it)
        ts.append(time.perf_counter() - t)
    return pct(ts)


# ---- a minimal HTTP/1.1 client (keep-alive, one request in flight per connection) ------------------------

class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def post(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        m = re.search(rb"(?i)content-length:\s*(\d+)", head)
        await self.reader.readexactly(int(m.group(1)) if m else 0)
        return status


def request_bytes(port: int, path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def open_loop(port: int, raws: list[bytes], rate: float, seconds: float) -> dict:
    "Send at `rate` req/s on a fixed schedule; latency from the scheduled send time."
    idle: list[Conn] = []
    lat, errors = [], Counter()

    async def one(i: int, at: float):
        reused = bool(idle)
        conn = idle.pop() if idle else Conn(*await asyncio.open_connection("127.0.0.1", port))
        try:
            try:
                status = await conn.post(raws[i % len(raws)])
            except (OSError, asyncio.IncompleteReadError):
                if not reused:
                    raise
                # the server closed this idle keep-alive connection (uvicorn: after 5 s): retry on a new one,
                # as any HTTP client does; the time lost counts in this request's latency
                conn = Conn(*await asyncio.open_connection("127.0.0.1", port))
                status = await conn.post(raws[i % len(raws)])
        except (OSError, asyncio.IncompleteReadError) as e:
            errors[type(e).__name__] += 1
            return
        lat.append(time.perf_counter() - at)
        if status != 200:
            errors[f"HTTP {status}"] += 1
        idle.append(conn)

    n = int(rate * seconds)
    t0 = time.perf_counter() + 0.05
    tasks = []
    for i in range(n):
        at = t0 + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, at)))
    await asyncio.gather(*tasks)
    took = time.perf_counter() - t0
    for c in idle:
        c.writer.close()
    p50, p99 = pct(lat)
    return {"p50": p50, "p99": p99, "sent": n, "errors": errors, "rate": n / took}


async def closed_loop(port: int, raws: list[bytes], conns: int, seconds: float) -> float:
    "Requests/s with `conns` connections each sending back to back (fallback when wrk is missing)."
    done, stop = [0], time.perf_counter() + seconds

    async def worker(k: int):
        c = Conn(*await asyncio.open_connection("127.0.0.1", port))
        i = k
        while time.perf_counter() < stop:
            await c.post(raws[i % len(raws)])
            done[0] += 1
            i += conns
        c.writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(conns)))
    return done[0] / (time.perf_counter() - t0)


def wrk_throughput(port: int, bodies: list[dict], seconds: int, conns: int, tmp: Path) -> float | None:
    "Requests/s measured by wrk (None if wrk is not installed)."
    exe = shutil.which("wrk")
    if exe is None:
        return None
    lua = tmp / "post.lua"
    items = ",\n".join("[==[" + json.dumps(b) + "]==]" for b in bodies)
    lua.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                   f"local bodies = {{\n{items}\n}}\nlocal i = 0\n"
                   "request = function()\n  i = i % #bodies + 1\n"
                   "  return wrk.format(nil, \"/v1/predict\", nil, bodies[i])\nend\n"
                   "done = function(summary, latency, requests)\n"
                   "  io.write(string.format(\"NON2XX %d\\n\", summary.errors.status))\nend\n")
    out = subprocess.run([exe, "-t2", f"-c{conns}", f"-d{seconds}s", "-s", str(lua), f"http://127.0.0.1:{port}"],
                         capture_output=True, text=True, check=True).stdout
    bad = int(re.search(r"NON2XX (\d+)", out).group(1))
    if bad:
        print(f"  wrk: {bad} non-2xx responses")
    return float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=200.0, help="req/s of the open-loop run")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of one open-loop run")
    ap.add_argument("--runs", type=int, default=3, help="runs (the median is reported)")
    ap.add_argument("--workers", type=int, default=2, help="uvicorn workers of the server under test (2 cores)")
    ap.add_argument("--wrk-seconds", type=int, default=10, help="duration of the throughput run")
    ap.add_argument("--conns", type=int, default=16, help="connections of the throughput run")
    ap.add_argument("--calls", type=int, default=2000, help="in-process calls per run")
    ap.add_argument("--model", type=Path, default=None, help="registered model directory to serve (default: tiny)")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_api_"))
    t = time.perf_counter()
    system = build_system(tmp, n_incoming=30, scorer=Scorer.from_dir(a.model) if a.model else None)
    depth = system.scorer.meta.get("params", {}).get("max_depth", "?")
    print(f"system: {system.clean.height} clean tx, {system.incoming.height} to score, model {system.version} "
          f"({system.scorer.booster.num_boosted_rounds()} trees, max_depth {depth}, "
          f"{'from ' + str(a.model) if a.model else 'tiny'}), SQLite online store ({time.perf_counter() - t:.1f} s)")
    bodies = system.bodies()
    txs = [Transaction.model_validate(b) for b in bodies]

    # in-process: the floor and the full scoring path, same store, same model
    store = get_store(system.settings)
    scorer = system.scorer
    feats = batch_features(system.clean, system.risk).tail(len(txs))
    rows = [(t.customer_id, t.merchant, scorer.matrix(feats[i:i + 1])) for i, t in enumerate(txs)]
    predictor = Predictor(Champion(scorer=scorer), OnlineFeatures(store))
    floor = lambda r: (read_online_rows(store, [r[0]], [r[1]]), scorer.margin(r[2]))  # noqa: E731
    online = {t.trans_num: read_online_rows(store, [t.customer_id], [t.merchant]) for t in txs}

    def features_of(tx: Transaction) -> dict:
        states, risk = online[tx.trans_num]
        return request_row(tx.model_dump(), states[0] if states else None, risk)
    feats_of = {t.trans_num: features_of(t) for t in txs}
    parts = {  # where the in-process time goes (same calls as the Predictor makes)
        "  of which read_online_rows": lambda tx: read_online_rows(store, [tx.customer_id], [tx.merchant]),
        "  of which request_row": features_of,
        "  of which Scorer.score_row (+SHAP)": lambda tx: scorer.score_row(feats_of[tx.trans_num], True, ApiConfig.top_k),
        "  of which Scorer.score_row (no SHAP)": lambda tx: scorer.score_row(feats_of[tx.trans_num], False)}
    gc.collect()
    gc.freeze()  # as the server does after its warm-up (api.served_app, the factory serve() runs)
    runs: dict[str, list] = {"floor": [], "inproc": [], **{k: [] for k in parts}}
    for _ in range(a.runs):
        runs["floor"].append(timed(floor, rows, a.calls))
        runs["inproc"].append(timed(lambda tx: predictor.predict([tx], True, ApiConfig.top_k), txs, a.calls))
        for k, fn in parts.items():
            runs[k].append(timed(fn, txs, a.calls))
    med = {k: tuple(statistics.median(r[i] for r in v) for i in (0, 1)) for k, v in runs.items()}
    (f50, f99), (i50, i99) = med["floor"], med["inproc"]

    # over HTTP, a real server process
    port = free_port()
    proc = start_server(system.settings, port, workers=a.workers)
    try:
        raws = [request_bytes(port, "/v1/predict", b) for b in bodies]
        asyncio.run(open_loop(port, raws, a.rate, 2.0))  # warm-up
        http = [asyncio.run(open_loop(port, raws, a.rate, a.seconds)) for _ in range(a.runs)]
        tput = wrk_throughput(port, bodies, a.wrk_seconds, a.conns, tmp)
        tool = "wrk"
        if tput is None:
            tput, tool = asyncio.run(closed_loop(port, raws, a.conns, a.wrk_seconds)), "asyncio closed loop"
    finally:
        stop_server(proc)
    h50, h99 = (statistics.median(r[k] for r in http) for k in ("p50", "p99"))
    errors = sum((r["errors"] for r in http), Counter())
    achieved = statistics.median(r["rate"] for r in http)

    print(f"\nfloor (online read + model predict, in-process): p50 {f50:.2f} ms  p99 {f99:.2f} ms")
    print(f"in-process scoring (read + features + model + SHAP): p50 {i50:.2f} ms  p99 {i99:.2f} ms  "
          f"ratio p99/floor p99 {i99 / f99:.2f}x")
    for k in parts:
        print(f"{k}: p50 {med[k][0]:.2f} ms  p99 {med[k][1]:.2f} ms")
    print(f"HTTP /v1/predict at {a.rate:g} req/s ({a.workers} worker(s), achieved {achieved:.0f} req/s, "
          f"errors {dict(errors) or 0}): p50 {h50:.2f} ms  p99 {h99:.2f} ms  ratio p99/floor p99 {h99 / f99:.2f}x")
    print(f"max throughput ({tool}, {a.conns} connections, {a.workers} worker(s)): {tput:.0f} req/s")
    def met(ok: bool) -> str: return "met" if ok else "NOT met"
    print(f"\ntargets: HTTP p99 <= 10 ms: {met(h99 <= 10)} | in-process p99 <= 2 ms: {met(i99 <= 2)} | "
          f"HTTP p99 <= 3x floor p99: {met(h99 <= 3 * f99)}")
    shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
