"""Hand-written raw events for the ingest tests (the single-process and the Beam ingest)."""

import json

from apem.data import storage

FEATURES = {
    "user_id": "u1", "product_id": "p1", "product_type": "loan", "channel": "app", "position": 1, "hour": 9,
    "weekday": 3, "region": "r01", "age_band": "26-35", "segment": "mass", "credit_score": 700.0,
    "balance": 10.5, "income": None, "tenure_months": 12.0, "products_held": 1, "days_since_login": 2.0,
}


def event(imp, kind, time, event_id=None, **fields):
    """One JSON event line; an impression carries every feature (``fields`` override them)."""
    out = {"event_id": event_id or f"{imp}-{kind}", "event_type": kind, "event_time": time, "impression_id": imp}
    if kind == "impression":
        out.update(FEATURES)
    out.update(fields)
    return json.dumps(out)


def write_day(root, day, lines, name="events.jsonl"):
    storage.write_bytes(storage.join(root, f"dt={day.isoformat()}", name), "\n".join(lines).encode() + b"\n")


def write_files_lacking_a_feature(root, day):
    """One day whose files differ in their columns: ``a.jsonl`` has every feature, ``b.jsonl``,
    ``c.csv`` and ``d.parquet`` lack the ``channel`` column (not null: absent), and ``b.jsonl``'s
    ``noincome`` lacks the numerical ``income`` and ``balance`` keys. Each impression has a click."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def lacking(imp, *names):
        fields = {"event_id": f"{imp}-impression", "event_type": "impression",
                  "event_time": f"{day.isoformat()}T10:00:00", "impression_id": imp, **FEATURES}
        return {k: v for k, v in fields.items() if k not in names}

    def click(imp):
        return event(imp, "click", f"{day.isoformat()}T10:05:00")

    write_day(root, day, [event("full", "impression", f"{day.isoformat()}T09:00:00"), click("full")], "a.jsonl")
    write_day(root, day, [json.dumps(lacking("jsonnochan", "channel")), click("jsonnochan"),
                          json.dumps(lacking("noincome", "income", "balance")), click("noincome")], "b.jsonl")
    csv_row = lacking("csvnochan", "channel")
    write_day(root, day, [",".join(csv_row), ",".join("" if v is None else str(v) for v in csv_row.values()),
                          "csvnochan-click,click," + f"{day.isoformat()}T10:05:00,csvnochan" + "," * (len(csv_row) - 4)],
              "c.csv")
    parquet_row = lacking("pqnochan", "channel")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({k: [v] for k, v in parquet_row.items()}), sink)
    storage.write_bytes(storage.join(root, f"dt={day.isoformat()}", "d.parquet"), sink.getvalue().to_pybytes())


def write_files_with_nested_values(root, day):
    """One day with values that are not plain text: ``a.parquet``'s ``channel`` is a list column and it
    has an extra struct column ``meta``; ``b.parquet``'s ``balance`` is a list of numbers;
    ``c.jsonl``'s lines carry a JSON object ``meta`` (one Arrow struct type for the whole file);
    ``d.parquet``'s ``region`` is a binary column whose bytes are not UTF-8. Each impression has a click."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def impression(imp, **columns):
        fields = {"event_id": f"{imp}-impression", "event_type": "impression",
                  "event_time": f"{day.isoformat()}T10:00:00", "impression_id": imp, **FEATURES}
        table = pa.table({k: [v] for k, v in fields.items() if k not in columns})
        for name, array in columns.items():
            table = table.append_column(name, array)
        return table

    def write_parquet(name, table):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(storage.join(root, f"dt={day.isoformat()}", name), sink.getvalue().to_pybytes())

    def click(imp):
        return event(imp, "click", f"{day.isoformat()}T10:05:00")

    write_parquet("a.parquet", impression("pqlist", channel=pa.array([["app"]]), meta=pa.array([{"a": 1}])))
    write_parquet("b.parquet", impression("pqlistnum", balance=pa.array([[10.5]])))
    write_day(root, day, [event("jsonmeta", "impression", f"{day.isoformat()}T09:00:00", meta={"a": 1}),
                          event("pqlist", "click", f"{day.isoformat()}T10:05:00", meta={"a": 2}),
                          event("pqlistnum", "click", f"{day.isoformat()}T10:05:00", meta={"a": 3}),
                          event("badutf", "click", f"{day.isoformat()}T10:05:00", meta={"a": 4}),
                          click("jsonmeta").replace("}", ', "meta": {"a": 5}}')], "c.jsonl")
    write_parquet("d.parquet", impression("badutf", region=pa.array([b"r\xff1"], pa.binary())))
