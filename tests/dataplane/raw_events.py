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
