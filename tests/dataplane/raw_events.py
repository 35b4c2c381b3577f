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
