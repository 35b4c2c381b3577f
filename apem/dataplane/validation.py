"""Data validation with TensorFlow Data Validation (TFDV) against the curated, committed schema.

``validate_dataset`` computes statistics of a dataset, validates them against the schema
(domains, presence, value ranges) and, given the previous window's statistics, checks drift:
Jensen-Shannon divergence for numericals and L-infinity distance for categoricals, with the
thresholds written in the schema's ``drift_comparator`` entries. TFDV costs ~10 s to import, so it
is imported inside the functions, quietly (``apem.dataplane.quiet_tensorflow``).

The schema (``apem/resources/schema.pbtxt``) was produced by :func:`infer_schema` (TFDV's
inference plus the review rules in :func:`curate_schema`) and then read by a person; see
``apem/resources/README.md``.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Callable

from apem.data import features, storage
from apem.data.ownership import VALIDATION_DIR, claim_output
from apem.dataplane.quiet_tensorflow import import_tfdv

DEFAULT_SCHEMA = str(resources.files("apem") / "resources" / "schema.pbtxt")
STATS_FILE = "stats.pb"
REPORT_FILE = "anomalies.md"
ANOMALIES_FILE = "anomalies.json"
DEFAULT_REPORT_DIR = "validation"

# Review rules applied on top of TFDV's inference (the reasons are in apem/resources/README.md).
DRIFT_THRESHOLD_JS = 0.1
DRIFT_THRESHOLD_LINF = 0.1
# Scale drift: a numerical whose mean moved by more than half its baseline value AND by more than
# half a baseline standard deviation (a unit change such as cents for euros, x10 or x100). The
# Jensen-Shannon check bins values and can miss a rescaling at a few thousand rows; this one does not
# depend on the row count. The second condition keeps a feature centred near 0 from flagging noise.
SCALE_DRIFT_RELATIVE = 0.5
SCALE_DRIFT_STDS = 0.5


class ValidationFailed(Exception):
    """The dataset has anomalies; the message is a one-line summary."""


def tfdv_columns(table, spec):
    """The columns TFDV reads of a dataset's table (or any batch of its rows): plain strings, the
    time as epoch seconds, no row id (a unique string per row says nothing about the data and costs
    memory). Row by row, so the Beam statistics apply it batch by batch."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = {}
    for name in table.column_names:
        if name == spec.id_column:
            continue
        column = table.column(name)
        if pa.types.is_dictionary(column.type):
            column = pc.cast(column, column.type.value_type)
        if name == spec.time_column:
            column = pc.divide(pc.cast(pc.cast(column, pa.timestamp("us")), pa.int64()), 1_000_000)
        columns[name] = column
    return pa.table(columns)


def _frame(data_dir: str):
    """The dataset as a pandas DataFrame TFDV can read (:func:`tfdv_columns`)."""
    ds = storage.read_dataset_at(data_dir)
    return ds.spec, tfdv_columns(ds.table, ds.spec).to_pandas()


def compute_statistics(data_dir: str, stats_uri: str | None = None):
    """TFDV statistics (DatasetFeatureStatisticsList) of the dataset at ``data_dir`` (local or gs://),
    in memory. (``stats_uri``: where the caller will keep them; the Beam engine writes there.)"""
    tfdv = import_tfdv()

    _, frame = _frame(data_dir)
    return tfdv.generate_statistics_from_dataframe(frame, n_jobs=1)


def load_statistics(uri: str):
    from tensorflow_metadata.proto.v0 import statistics_pb2

    return statistics_pb2.DatasetFeatureStatisticsList.FromString(storage.read_bytes(uri))


def load_schema(path: str = DEFAULT_SCHEMA):
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    return text_format.Parse(storage.read_bytes(path).decode(), schema_pb2.Schema())


def curate_schema(schema, spec) -> None:
    """Apply the review rules to an inferred schema in place: domains, ranges, presence, drift."""
    from tensorflow_metadata.proto.v0 import schema_pb2

    features = {f.name: f for f in schema.feature}
    for name in spec.labels:
        f = features[name]
        f.int_domain.min, f.int_domain.max = 0, 1
    for name, (lo, hi) in features.INT_RANGES.items():
        if name in features:
            features[name].int_domain.min, features[name].int_domain.max = lo, hi
    for name in features.NON_NEGATIVE_INTS:
        if name in features:
            features[name].int_domain.min = 0
    for name, (lo, hi) in features.FLOAT_RANGES.items():
        if name in features:
            features[name].float_domain.min = lo
            if hi is not None:
                features[name].float_domain.max = hi
    for name in features.OPEN_VOCABULARIES:
        if name in features and features[name].HasField("domain"):
            domain = features[name].domain
            features[name].ClearField("domain")
            for index in reversed(range(len(schema.string_domain))):
                if schema.string_domain[index].name == domain:
                    del schema.string_domain[index]
    for f in schema.feature:
        f.presence.min_fraction = features.MIN_PRESENCE.get(f.name, 1.0)
        f.presence.min_count = 1
        if f.name in features.NO_DRIFT or f.name == spec.time_column or f.name in spec.labels:
            continue
        if f.name in spec.numerical or f.type == schema_pb2.INT:
            # integer-coded categoricals too: TFDV has no top-value counts for them, so L-infinity would read 0
            f.drift_comparator.jensen_shannon_divergence.threshold = features.DRIFT_THRESHOLD_JS_OVERRIDES.get(
                f.name, DRIFT_THRESHOLD_JS)
        elif f.name in spec.categorical and f.name not in features.OPEN_VOCABULARIES:
            f.drift_comparator.infinity_norm.threshold = DRIFT_THRESHOLD_LINF


def infer_schema(data_dir: str, out_path: str) -> str:
    """Infer a schema from a (synthetic) dataset, apply :func:`curate_schema`, write it as text."""
    tfdv = import_tfdv()

    spec, frame = _frame(data_dir)
    stats = tfdv.generate_statistics_from_dataframe(frame, n_jobs=1)
    schema = tfdv.infer_schema(stats, infer_feature_shape=True)
    for name in spec.categorical:  # integer-coded categoricals (position, hour, weekday) stay categorical
        feature = tfdv.get_feature(schema, name)
        if feature.HasField("int_domain") or feature.type == 2:  # 2 = INT
            feature.int_domain.is_categorical = True
    curate_schema(schema, spec)
    from google.protobuf import text_format

    storage.write_bytes(out_path, text_format.MessageToString(schema).encode())
    return out_path


def _drift(anomalies) -> dict:
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    names = anomalies_pb2.DriftSkewInfo.Measurement.Type.Name
    out = {}
    for info in anomalies.drift_skew_info:
        name = ".".join(info.path.step)
        for m in info.drift_measurements:
            out[name] = {"type": names(m.type), "value": round(m.value, 6), "threshold": m.threshold,
                         "drifted": m.value > m.threshold}
    return out


def _anomaly_list(anomalies) -> list[dict]:
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    severity = anomalies_pb2.AnomalyInfo.Severity.Name
    kind = anomalies_pb2.AnomalyInfo.Type.Name
    out = []
    for feature, info in sorted(anomalies.anomaly_info.items()):
        out.append({"feature": feature, "severity": severity(info.severity),
                    "short": info.short_description, "description": info.description,
                    "types": [kind(r.type) for r in info.reason]})
    if anomalies.HasField("dataset_anomaly_info"):
        info = anomalies.dataset_anomaly_info
        out.append({"feature": "<dataset>", "severity": severity(info.severity),
                    "short": info.short_description, "description": info.description,
                    "types": [kind(r.type) for r in info.reason]})
    return out


def scale_drift(stats, previous) -> list[dict]:
    """Anomalies for numerical features whose mean moved beyond the bounds above (see there)."""
    def numeric(statistics) -> dict:
        return {".".join(f.path.step) or f.name: f.num_stats for f in statistics.datasets[0].features
                if f.HasField("num_stats")}

    before, now = numeric(previous), numeric(stats)
    found = []
    for name in sorted(set(features.default_spec().numerical) & set(before) & set(now)):
        base, mean = before[name].mean, now[name].mean
        shift = abs(mean - base)
        if shift > SCALE_DRIFT_RELATIVE * abs(base) and shift > SCALE_DRIFT_STDS * before[name].std_dev:
            found.append({"feature": name, "severity": "ERROR", "types": ["SCALE_DRIFT"],
                          "short": f"mean moved from {base:.4g} to {mean:.4g} (a change of scale or unit?)",
                          "description": f"mean {mean:.6g} vs baseline {base:.6g} (std {before[name].std_dev:.6g})"})
    return found


def _summary_line(found: list[dict]) -> str:
    return f"{len(found)} anomal{'y' if len(found) == 1 else 'ies'}: " + "; ".join(
        f"{a['feature']}: {a['short']}" for a in found)


def _report(data_dir: str, schema_path: str, baseline: str | None, found: list[dict], drift: dict,
            stats) -> str:
    lines = [f"# Data validation of `{data_dir}`", "",
             f"- schema: `{schema_path}`", f"- baseline statistics: `{baseline or 'none (no drift check)'}`",
             f"- examples: {stats.datasets[0].num_examples}",
             f"- result: **{'FAILED: ' + _summary_line(found) if found else 'no anomalies'}**", ""]
    if found:
        lines += ["## Anomalies", "", "| feature | severity | anomaly | description |", "|---|---|---|---|"]
        lines += [f"| {a['feature']} | {a['severity']} | {a['short']} | {a['description']} |" for a in found]
        lines.append("")
    if drift:
        lines += ["## Drift against the baseline", "", "| feature | measure | value | threshold | drifted |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['type']} | {v['value']:.4f} | {v['threshold']} | {'yes' if v['drifted'] else 'no'} |"
                  for k, v in sorted(drift.items())]
        lines.append("")
    lines += ["## Feature statistics", "", "| feature | missing | mean / unique | min | max |", "|---|---|---|---|---|"]
    for feature in stats.datasets[0].features:
        name = ".".join(feature.path.step) or feature.name
        if feature.HasField("num_stats"):
            s = feature.num_stats
            missing = s.common_stats.num_missing
            lines.append(f"| {name} | {missing} | {s.mean:.4g} | {s.min:.4g} | {s.max:.4g} |")
        elif feature.HasField("string_stats"):
            s = feature.string_stats
            lines.append(f"| {name} | {s.common_stats.num_missing} | {s.unique} unique | | |")
    return "\n".join(lines) + "\n"


def validate_dataset(data_dir: str, schema_path: str = DEFAULT_SCHEMA, out_dir: str = DEFAULT_REPORT_DIR,
                     baseline_stats: str | None = None, warn_only: bool = False, overwrite: bool = False,
                     statistics: Callable | None = None) -> dict:
    """Validate the dataset at ``data_dir`` and write ``out_dir/{stats.pb, anomalies.md, anomalies.json}``.

    ``statistics(data_dir, stats_uri)`` computes the statistics: :func:`compute_statistics` (in
    memory) by default; the engines of :func:`apem.dataplane.validation_beam.statistics_for` (``local``:
    in this process, batch by batch from 2M rows; ``beam``: an Apache Beam job); the checks below are
    the same for all.

    ``baseline_stats`` is a previous run's ``stats.pb``; with it, drift is checked. Raises
    :class:`ValidationFailed` (one-line summary) when there are anomalies, unless ``warn_only``.
    All paths may be local or gs://. Only an earlier report (or anything, with ``overwrite``) is replaced.
    """
    tfdv = import_tfdv()

    claim_output(out_dir, VALIDATION_DIR, inputs=(data_dir,), overwrite=overwrite)
    if not storage.exists(schema_path):
        raise FileNotFoundError(f"{schema_path}: schema file not found")
    schema = load_schema(schema_path)
    stats = (statistics or compute_statistics)(data_dir, storage.join(out_dir, STATS_FILE))
    previous = load_statistics(baseline_stats) if baseline_stats else None
    anomalies = tfdv.validate_statistics(stats, schema, previous_statistics=previous)
    found = _anomaly_list(anomalies) + (scale_drift(stats, previous) if previous is not None else [])
    drift = _drift(anomalies)
    result = {
        "data": data_dir,
        "schema": schema_path,
        "baseline_stats": baseline_stats,
        "examples": int(stats.datasets[0].num_examples),
        "anomalies": found,
        "drift": drift,
        "summary": _summary_line(found) if found else "no anomalies",
        "stats_path": storage.join(out_dir, STATS_FILE),
        "report_path": storage.join(out_dir, REPORT_FILE),
        "anomalies_path": storage.join(out_dir, ANOMALIES_FILE),
    }
    storage.write_bytes(result["stats_path"], stats.SerializeToString())
    storage.write_bytes(result["report_path"],
                        _report(data_dir, schema_path, baseline_stats, found, drift, stats).encode())
    storage.write_bytes(result["anomalies_path"], json.dumps(result, indent=2).encode())
    if found and not warn_only:
        raise ValidationFailed(f"{data_dir}: {result['summary']} (report: {result['report_path']})")
    return result


def download_baseline(output_root: str, scratch: str) -> tuple[str, str | None]:
    """The drift baseline kept at ``<output_root>/validation/baseline`` (the statistics of the last
    window that passed), downloaded into ``scratch``: (baseline URI or "", local stats path or None)."""
    baseline_uri = storage.join(output_root, "validation", "baseline") if output_root else ""
    if not (baseline_uri and storage.is_complete(baseline_uri)):
        return baseline_uri, None
    local = storage.download_dir(baseline_uri, os.path.join(scratch, "baseline"))
    stats = os.path.join(local, STATS_FILE)
    return baseline_uri, stats if os.path.exists(stats) else None


def statistics_html(stats_path: str, baseline_stats: str | None = None) -> str:
    """TFDV's Facets view of the window's statistics, side by side with the baseline's when given
    (a standalone HTML page: the KFP UI shows it as the ``HTML`` artifact of validate)."""
    tfdv = import_tfdv()

    current = load_statistics(stats_path)
    if baseline_stats is None:
        return tfdv.get_statistics_html(current, lhs_name="current window")
    return tfdv.get_statistics_html(current, load_statistics(baseline_stats), lhs_name="current window",
                                    rhs_name="baseline (last window that passed)")


def _main() -> None:  # python -m apem.dataplane.validation DATASET SCHEMA_OUT: regenerate the curated schema
    import sys

    print(infer_schema(sys.argv[1], sys.argv[2]))


if __name__ == "__main__":
    _main()


__all__ = ["DEFAULT_SCHEMA", "ValidationFailed", "validate_dataset", "compute_statistics", "infer_schema",
           "curate_schema", "load_schema", "load_statistics"]
