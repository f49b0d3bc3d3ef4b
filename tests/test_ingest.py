"""Ingest on real files: bad files fail clearly, bad rows are rejected with reasons, counts add up,
ids are stable and keyed, and no card number, name or street reaches any written file."""
from __future__ import annotations

import csv
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from rich.console import Console

from fraud_detection.core import PII_COLUMNS, RAW_COLUMNS, clean_schema
from fraud_detection.ingest import (
    IngestError,
    clean_frame,
    customer_ids,
    ingest_files,
    raw_inputs,
    rejects_schema,
)

KEY = "test-key"
CARD, FIRST, LAST, STREET = "4000123412341234", "Zebedee", "Quuxley", "1 Secret Lane"


def row(i: int, **over: str) -> dict[str, str]:
    "One valid raw row (Kaggle strings); customer alternates between two invented people."
    a = i % 2 == 0
    r = {"trans_date_trans_time": f"2019-01-{1 + i // 24:02d} {i % 24:02d}:15:00",
         "cc_num": CARD if a else "30000000000004", "merchant": "fraud_Kub, Rippin and Mann",
         "category": "grocery_pos" if a else "travel", "amt": f"{10 + i}.25", "first": FIRST if a else "Ann",
         "last": LAST if a else "Other", "gender": "F" if a else "M", "street": STREET if a else "2 Road",
         "city": "Springfield", "state": "IL", "zip": "62701", "lat": "39.78", "long": "-89.65",
         "city_pop": "116250", "job": "Teacher", "dob": "1980-02-29" if a else "1999-12-31",
         "trans_num": f"tx{i:04d}", "unix_time": str(1325376000 + 3600 * i), "merch_lat": "39.9",
         "merch_long": "-89.5", "is_fraud": "1" if i == 3 else "0"}
    return r | over


def write_csv(path: Path, rows: list[dict], index: str | None = "", columns: list[str] = RAW_COLUMNS) -> Path:
    "Write `rows` as a Kaggle-style CSV; `index` names a leading row-index column (None: no index column)."
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(([index] if index is not None else []) + columns)
        for k, r in enumerate(rows):
            w.writerow(([str(k)] if index is not None else []) + [r[c] for c in columns])
    return path


def ingest_one(path: Path, out: Path, key: str = KEY):
    rep = ingest_files([path], out, key=key, progress=False)
    return rep, rep.files[0]


def test_valid_file_clean_schema_sorted_counts(tmp_path):
    rows = [row(i) for i in range(10)][::-1]  # reversed: output must still be sorted
    rep, f = ingest_one(write_csv(tmp_path / "fraudTrain.csv", rows), tmp_path / "clean")
    assert not rep.failed and (f.rows_in, f.rows_ok, f.rows_rejected) == (10, 10, 0)
    assert f.output == tmp_path / "clean" / "train.parquet"
    df = pl.read_parquet(f.output)
    assert df.schema == pl.Schema(clean_schema())
    assert_frame_equal(df, df.sort("ts", "trans_num"))
    assert df["trans_num"].to_list() == [f"tx{i:04d}" for i in range(10)]
    assert df["customer_id"].n_unique() == 2 and df["customer_id"].str.len_chars().eq(16).all()
    assert df.filter(pl.col("trans_num") == "tx0003")["is_fraud"].item() == 1
    assert pl.read_parquet(f.rejects).height == 0 and pl.read_parquet(f.rejects).schema == pl.Schema(rejects_schema())


def test_missing_columns_fail_naming_them(tmp_path):
    cols = [c for c in RAW_COLUMNS if c not in ("amt", "dob")]
    rep, f = ingest_one(write_csv(tmp_path / "fraudTest.csv", [row(0)], columns=cols), tmp_path / "clean")
    assert rep.failed and f.failed and "amt" in f.error and "dob" in f.error and "missing" in f.error
    assert not (tmp_path / "clean" / "test.parquet").exists()
    with pytest.raises(IngestError, match="missing required columns: amt, dob"):
        clean_frame(pl.DataFrame([row(0)]).drop("amt", "dob"), KEY)


def test_empty_and_header_only_files_fail(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    header_only = write_csv(tmp_path / "header.csv", [])
    good = write_csv(tmp_path / "good.csv", [row(0)])
    rep = ingest_files([tmp_path / "empty.csv", header_only, good], tmp_path / "clean", key=KEY, progress=False)
    assert rep.failed
    assert "empty" in rep.files[0].error and "no rows" in rep.files[1].error
    assert not rep.files[2].failed and rep.files[2].rows_ok == 1  # a bad file does not stop the others
    assert "FAILED" in str(rep)


def test_malformed_csv_fails_as_a_whole(tmp_path):
    "A line with more fields than the header cannot be attributed to columns: the file fails, nothing is written."
    src = write_csv(tmp_path / "fraudTrain.csv", [row(0), row(1)])
    src.write_text(src.read_text() + "2," + ",".join(row(2).values()) + ",extra\n")
    rep, f = ingest_one(src, tmp_path / "clean")
    assert f.failed and "cannot read" in f.error and not (tmp_path / "clean").exists()


def test_unknown_file_type_and_missing_file(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    rep = ingest_files([tmp_path / "x.json", tmp_path / "nope.csv"], tmp_path / "clean", key=KEY, progress=False)
    assert "unsupported file type" in rep.files[0].error and "no such file" in rep.files[1].error


@pytest.mark.parametrize("index", [None, "", "Unnamed: 0"])
def test_with_and_without_index_column(tmp_path, index):
    rows = [row(i) for i in range(5)]
    ref = clean_frame(pl.DataFrame(rows).select(RAW_COLUMNS), KEY)[0]
    rep, f = ingest_one(write_csv(tmp_path / "fraudTrain.csv", rows, index=index), tmp_path / "clean")
    assert not rep.failed and f.ignored_columns == []
    assert_frame_equal(pl.read_parquet(f.output), ref)


BAD = [  # (column, raw value, reason)
    ("amt", "abc", "amt: unparseable"),
    ("amt", "-3.50", "amt: not in [0.01, 100000]"),
    ("amt", "0", "amt: not in [0.01, 100000]"),
    ("amt", "1e9", "amt: not in [0.01, 100000]"),
    ("amt", "nan", "amt: not in [0.01, 100000]"),
    ("trans_date_trans_time", "2019-02-30 10:00:00", "trans_date_trans_time: unparseable"),
    ("trans_date_trans_time", "01/02/2019 10:00", "trans_date_trans_time: unparseable"),
    ("dob", "yesterday", "dob: unparseable"),
    ("dob", "2030-01-01", "dob: out of range"),
    ("lat", "91.5", "lat: out of range"),
    ("merch_long", "-181", "merch_long: out of range"),
    ("zip", "62701.5", "zip: unparseable"),
    ("city_pop", "-1", "city_pop: negative"),
    ("gender", "X", "gender: not F/M"),
    ("category", "crypto", "category: unknown category"),
    ("is_fraud", "2", "is_fraud: not 0/1"),
    ("is_fraud", "yes", "is_fraud: unparseable"),
    ("trans_num", "", "trans_num: missing"),
    ("trans_num", "tx 1", "trans_num: contains whitespace"),
    ("unix_time", "12.5", "unix_time: unparseable"),
    ("cc_num", "4000-1234", "cc_num: not a card number"),
    ("first", "", "first: missing"),
    ("merchant", "", "merchant: missing"),
]


@pytest.mark.parametrize(("col", "value", "reason"), BAD)
def test_bad_value_rejected_with_reason(tmp_path, col, value, reason):
    rows = [row(i) for i in range(4)]
    rows[1][col] = value
    rep, f = ingest_one(write_csv(tmp_path / "fraudTrain.csv", rows), tmp_path / "clean")
    assert not rep.failed and (f.rows_in, f.rows_ok, f.rows_rejected) == (4, 3, 1)
    assert f.reasons == {reason: 1}
    rej = pl.read_parquet(f.rejects)
    assert rej["row"].to_list() == [1] and rej["reason"].to_list() == [reason]
    if col not in PII_COLUMNS:  # the offending raw value is kept, as written
        assert rej[col].to_list() == [value or None]
    csv_rej = pl.read_csv(f.rejects.with_suffix(".csv"), infer_schema=False)
    assert csv_rej["reason"].to_list() == [reason]
    assert "tx0001" not in pl.read_parquet(f.output)["trans_num"].to_list()


def test_duplicate_trans_num_keeps_first(tmp_path):
    rows = [row(i) for i in range(4)] + [row(9, trans_num="tx0001")]
    rep, f = ingest_one(write_csv(tmp_path / "fraudTrain.csv", rows), tmp_path / "clean")
    assert (f.rows_in, f.rows_ok, f.rows_rejected) == (5, 4, 1)
    rej = pl.read_parquet(f.rejects)
    assert rej["row"].to_list() == [4] and rej["reason"].to_list() == ["trans_num: duplicate"]
    clean = pl.read_parquet(f.output)
    assert clean["trans_num"].is_unique().all()
    assert clean.filter(pl.col("trans_num") == "tx0001")["amt"].item() == 11.25  # the first one


def test_nothing_silently_dropped(tmp_path):
    "Many rows with mixed problems: every input trans_num is in exactly one of clean and rejects."
    rows = [row(i) for i in range(200)]
    for i in range(0, 200, 7):
        rows[i]["amt"] = "-1"
    for i in range(3, 200, 11):
        rows[i]["lat"] = "x"
        rows[i]["gender"] = ""
    rows[50]["trans_num"] = "tx0049"
    rep, f = ingest_one(write_csv(tmp_path / "fraudTrain.csv", rows), tmp_path / "clean")
    clean, rej = pl.read_parquet(f.output), pl.read_parquet(f.rejects)
    assert f.rows_in == 200 == f.rows_ok + f.rows_rejected == clean.height + rej.height
    assert sorted(clean["trans_num"].to_list() + rej["trans_num"].to_list()) == sorted(r["trans_num"] for r in rows)
    assert rej.filter(pl.col("row") == 3)["reason"].item() == "gender: missing; lat: unparseable"
    assert sum(f.reasons.values()) >= f.rows_rejected and f.reasons["amt: not in [0.01, 100000]"] == 29


def test_privacy_no_pii_in_any_written_file(tmp_path):
    rows = [row(i) for i in range(6)]
    rows[2]["amt"] = "-5"  # a rejected row of the person whose PII we look for
    rows[4]["cc_num"] = CARD + "x"  # a rejected row with an invalid card number
    src = write_csv(tmp_path / "fraudTrain.csv", rows)
    assert CARD.encode() in src.read_bytes()  # the search below can find what it looks for
    out = tmp_path / "clean"
    rep, f = ingest_one(src, out)
    assert f.rows_rejected == 2 and f.rows_ok == 4
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert {str(p.relative_to(out)) for p in files} == {"train.parquet", "rejects/train.parquet", "rejects/train.csv"}
    needles = [CARD, FIRST, LAST, STREET, "Ann", "Other", "30000000000004", "2 Road"]
    for p in files:
        data = p.read_bytes()
        for n in needles:
            assert n.encode() not in data, f"{n!r} in {p}"
        frame = pl.read_parquet(p) if p.suffix == ".parquet" else pl.read_csv(p, infer_schema=False)
        assert not set(PII_COLUMNS) & set(frame.columns)
        text = frame.select(pl.all().cast(pl.String)).write_csv()  # every decoded cell
        for n in needles:
            assert n not in text, f"{n!r} decoded from {p}"


def test_customer_id_stable_keyed_and_typed_parquet(tmp_path):
    rows = [row(i) for i in range(6)]
    a = ingest_one(write_csv(tmp_path / "fraudTrain.csv", rows[:3]), tmp_path / "a")[1]
    b = ingest_one(write_csv(tmp_path / "fraudTest.csv", rows[3:]), tmp_path / "a")[1]
    ids_a, ids_b = (pl.read_parquet(x.output).select("trans_num", "customer_id") for x in (a, b))
    both = pl.concat([ids_a, ids_b]).sort("trans_num")["customer_id"].to_list()
    assert both[0::2] == [both[0]] * 3 and both[1::2] == [both[1]] * 3 and both[0] != both[1]  # across files
    again = ingest_one(write_csv(tmp_path / "again.csv", rows), tmp_path / "b")[1]
    assert pl.read_parquet(again.output).sort("trans_num")["customer_id"].to_list() == both  # across runs
    other = ingest_one(write_csv(tmp_path / "other.csv", rows), tmp_path / "c", key="another-key")[1]
    assert not set(pl.read_parquet(other.output)["customer_id"]) & set(both)  # another key, other ids
    # simulator parquet, typed or as strings, gives the same clean rows as the CSV
    raw = pl.DataFrame(rows).select(RAW_COLUMNS)
    typed = raw.with_columns(pl.col("trans_date_trans_time").str.to_datetime("%Y-%m-%d %H:%M:%S"),
                             pl.col("dob").str.to_date(), pl.col("cc_num", "zip", "unix_time", "city_pop").cast(pl.Int64),
                             pl.col("amt", "lat", "long", "merch_lat", "merch_long").cast(pl.Float64),
                             pl.col("is_fraud").cast(pl.Int8))
    raw.write_parquet(tmp_path / "train.parquet")
    typed.write_parquet(tmp_path / "test.parquet")
    rep = ingest_files([tmp_path / "train.parquet", tmp_path / "test.parquet"], tmp_path / "d", key=KEY, progress=False)
    assert not rep.failed
    ref = pl.read_parquet(again.output)
    for x in rep.outputs:
        assert_frame_equal(pl.read_parquet(x), ref)
    assert customer_ids(typed, KEY).to_list() == customer_ids(raw, KEY).to_list()


def test_output_names_and_collision(tmp_path):
    r = [row(0)]
    files = [write_csv(tmp_path / "fraudTrain.csv", r), write_csv(tmp_path / "fraudTest.csv", r),
             write_csv(tmp_path / "may_2020.csv", r), write_csv(tmp_path / "train_copy.csv", r)]
    rep = ingest_files(files, tmp_path / "out", key=KEY, progress=False)
    assert [f.output.name if f.output else None for f in rep.files] == ["train.parquet", "test.parquet",
                                                                        "may_2020.parquet", None]
    assert rep.failed and "would overwrite train.parquet" in rep.files[3].error


def test_simulator_files_ingest_cleanly_and_agree(tmp_path):
    "The simulator's parquet and its Kaggle-layout CSVs give no rejects and identical clean data."
    from fraud_detection.simulate import simulate_to_files
    simulate_to_files("small", tmp_path / "raw", csv=True, progress=False)
    pq = raw_inputs(tmp_path / "raw")
    assert [p.name for p in pq] == ["test.parquet", "train.parquet"]
    a = ingest_files(pq, tmp_path / "a", key=KEY, progress=False)
    b = ingest_files(sorted((tmp_path / "raw").glob("*.csv")), tmp_path / "b", key=KEY, progress=False)
    assert not a.failed and not b.failed and a.rows_rejected == b.rows_rejected == 0 and a.rows_ok > 1000
    for name in ("train.parquet", "test.parquet"):
        assert_frame_equal(pl.read_parquet(tmp_path / "a" / name), pl.read_parquet(tmp_path / "b" / name))


def test_default_key_from_settings(tmp_path, fraud_home, monkeypatch):
    from fraud_detection.core import get_settings
    src = write_csv(tmp_path / "fraudTrain.csv", [row(0)])
    monkeypatch.setenv("FRAUD_CUSTOMER_KEY", "from-env")
    get_settings.cache_clear()
    f = ingest_files([src], tmp_path / "a", progress=False).files[0]
    assert pl.read_parquet(f.output)["customer_id"].to_list() == customer_ids(pl.DataFrame([row(0)]), "from-env").to_list()


def test_report_renders(tmp_path):
    rows = [row(i) for i in range(3)]
    rows[0]["amt"] = "-1"
    rep = ingest_files([write_csv(tmp_path / "fraudTrain.csv", rows), tmp_path / "missing.csv"], tmp_path / "o",
                       key=KEY, progress=False)
    console = Console(record=True, width=400)  # the whole temp path on one line, however deep
    console.print(rep)
    out = console.export_text()
    assert "fraudTrain.csv" in out and "amt: not in [0.01, 100000]" in out and "FAILED" in out and "no such file" in out
    assert "3 rows in, 2 ok, 1 rejected" in str(rep)


def test_cli_ingest(tmp_path, fraud_home):
    from typer.testing import CliRunner

    from fraud_detection.cli import app
    src = write_csv(tmp_path / "fraudTrain.csv", [row(i) for i in range(3)])
    r = CliRunner().invoke(app, ["data", "ingest", str(src), "--out", str(tmp_path / "clean")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "clean" / "train.parquet").is_file()
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    r = CliRunner().invoke(app, ["data", "ingest", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "clean")])
    assert r.exit_code == 1
