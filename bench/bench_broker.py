"""Broker benchmark: produce rate, raw consume rate and decode rate of `transactions` messages.

Starts the embedded broker (or uses --bootstrap), produces N real transaction messages (≈400 bytes of JSON,
key customer_id, idempotent producer) to a fresh topic per run, then reads them back with one consumer doing
nothing else (`fraud_detection.broker.measure_consume_rate`). Prints the median of --runs runs. The stream
worker benchmark compares its throughput with the raw consume rate measured the same way
(`from bench.bench_broker import produce_messages` + `measure_consume_rate`).

    .venv/bin/python bench/bench_broker.py [--n 200000] [--runs 3] [--bootstrap HOST:PORT]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext

from fraud_detection.broker import EmbeddedBroker, ensure_topics, measure_consume_rate, producer_config
from fraud_detection.schema import decode_transaction, frame_to_messages, message_headers
from fraud_detection.testing import sample_transactions


def transaction_messages(n: int, customers: int = 1000) -> list[tuple[bytes, bytes]]:
    "n (key, value) pairs of valid `transactions/v1` messages."
    return frame_to_messages(sample_transactions(n, customers=customers), validate=False)


def produce_messages(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    "Produce all messages with the system's producer config; messages per second until all are acknowledged."
    from confluent_kafka import Producer
    p, failed = Producer(producer_config(bootstrap)), []
    headers = message_headers()
    def on_delivery(err, _msg):
        if err is not None:
            failed.append(err)
    t0 = time.perf_counter()
    for key, value in messages:
        while True:
            try:
                p.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain
                p.poll(0.05)
        p.poll(0)
    left = p.flush(120)
    seconds = time.perf_counter() - t0
    if left or failed:
        raise RuntimeError(f"{left} undelivered, {len(failed)} failed (first: {failed[:1]})")
    return len(messages) / seconds


def decode_rate(messages: list[tuple[bytes, bytes]]) -> float:
    "Messages per second decode_transaction validates (in process, no broker)."
    headers = message_headers()
    t0 = time.perf_counter()
    for _, value in messages:
        decode_transaction(value, headers)
    return len(messages) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="messages per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--bootstrap", help="use this broker instead of starting the embedded one")
    a = ap.parse_args(argv)
    messages = transaction_messages(a.n)
    size = statistics.mean(len(v) for _, v in messages[:1000])
    produce, consume, decode = [], [], []
    with (nullcontext() if a.bootstrap else EmbeddedBroker()) as broker:
        bootstrap = a.bootstrap or broker.bootstrap
        for run in range(a.runs):
            topic = f"bench-{time.time_ns()}-{run}"
            ensure_topics(bootstrap, [topic], partitions=a.partitions)
            produce.append(produce_messages(bootstrap, topic, messages))
            consume.append(measure_consume_rate(bootstrap, topic, a.n))
            decode.append(decode_rate(messages))
            print(f"run {run + 1}: produce {produce[-1]:,.0f}/s  consume {consume[-1]:,.0f}/s  decode {decode[-1]:,.0f}/s",
                  file=sys.stderr)
    res = {"produce_per_s": statistics.median(produce), "consume_per_s": statistics.median(consume),
           "decode_per_s": statistics.median(decode)}
    print(f"broker: {'embedded tansu' if not a.bootstrap else a.bootstrap}, {a.n:,} messages of ≈{size:.0f} B, "
          f"{a.partitions} partitions, median of {a.runs}")
    print(f"  produce (idempotent, acks=all):  {res['produce_per_s']:>10,.0f} msg/s")
    print(f"  raw consume (1 consumer):        {res['consume_per_s']:>10,.0f} msg/s")
    print(f"  decode_transaction (in process): {res['decode_per_s']:>10,.0f} msg/s  "
          f"= {res['decode_per_s'] / res['consume_per_s']:.1f}x the raw consume rate")
    return res


if __name__ == "__main__":
    main()
