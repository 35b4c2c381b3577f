"""The data contract: a dataset is a directory of Parquet files plus ``spec.yaml``.

```yaml
time_column: event_time
labels: [click, authorize, convert]   # funnel order, 2 or more steps, values 0/1
categorical: [user_id, product_id]
numerical: [credit_score, balance]
id_column: impression_id              # optional: row key (hash-based downsampling, oracle joins)
funnel_policy: reject                 # optional: reject | drop (rows where a later step is 1 after a 0)
```

Loading validates the spec against every file and raises :class:`DatasetError` naming the file
and the column. A key the contract does not know is an error, so typos never pass silently.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from apem.data.atomic import SUCCESS_MARKER, staged_dir

SPEC_FILE = "spec.yaml"
FUNNEL_POLICIES = ("reject", "drop")
_LOG = logging.getLogger(__name__)
REQUIRED_KEYS = ("time_column", "labels", "categorical", "numerical")
OPTIONAL_KEYS = ("id_column", "funnel_policy")


class DatasetError(ValueError):
    """Bad dataset or spec; the message names the file and the column."""


@dataclass(frozen=True)
class DatasetSpec:
    time_column: str
    labels: tuple[str, ...]
    categorical: tuple[str, ...]
    numerical: tuple[str, ...]
    id_column: str | None = None
    funnel_policy: str = "reject"

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "categorical", tuple(self.categorical))
        object.__setattr__(self, "numerical", tuple(self.numerical))
        if len(self.labels) < 2:
            raise DatasetError(f"spec: 'labels' needs 2 or more funnel steps, got {list(self.labels)}")
        if self.funnel_policy not in FUNNEL_POLICIES:
            raise DatasetError(
                f"spec: 'funnel_policy' must be one of {FUNNEL_POLICIES}, got {self.funnel_policy!r}"
            )
        if not self.categorical and not self.numerical:
            raise DatasetError("spec: needs at least one categorical or numerical feature")
        seen: dict[str, str] = {}
        for role, names in self._roles():
            for name in names:
                if name in seen:
                    raise DatasetError(f"spec: column '{name}' is listed as both {seen[name]} and {role}")
                seen[name] = role

    def _roles(self) -> Iterable[tuple[str, tuple[str, ...]]]:
        yield "time_column", (self.time_column,)
        yield "labels", self.labels
        yield "categorical", self.categorical
        yield "numerical", self.numerical
        if self.id_column:
            yield "id_column", (self.id_column,)

    @property
    def features(self) -> tuple[str, ...]:
        return self.categorical + self.numerical

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(c for _, names in self._roles() for c in names)

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("labels", "categorical", "numerical"):
            out[key] = list(out[key])
        if out["id_column"] is None:
            del out["id_column"]
        return out

    @classmethod
    def from_dict(cls, raw: dict, source: str = "spec") -> "DatasetSpec":
        if not isinstance(raw, dict):
            raise DatasetError(f"{source}: expected a mapping, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
        if unknown:
            raise DatasetError(
                f"{source}: unknown key(s) {unknown}; known keys are {list(REQUIRED_KEYS + OPTIONAL_KEYS)}"
            )
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise DatasetError(f"{source}: missing required key(s) {missing}")
        for key in ("labels", "categorical", "numerical"):
            if not isinstance(raw[key], (list, tuple)) or not all(isinstance(c, str) for c in raw[key]):
                raise DatasetError(f"{source}: '{key}' must be a list of column names")
        for key in ("time_column", "id_column", "funnel_policy"):
            if key in raw and not isinstance(raw[key], str) and not (key == "id_column" and raw[key] is None):
                raise DatasetError(f"{source}: '{key}' must be one column name (a string), got {raw[key]!r}")
        try:
            return cls(**raw)
        except DatasetError as err:
            raise DatasetError(f"{source}: {err}".replace("spec: ", "")) from None

    @classmethod
    def read(cls, path: str) -> "DatasetSpec":
        spec_path = path if path.endswith(".yaml") else os.path.join(path, SPEC_FILE)
        if not os.path.exists(spec_path):
            raise DatasetError(f"{spec_path}: spec file not found (a dataset is Parquet files plus {SPEC_FILE})")
        with open(spec_path, "rb") as fh:
            return cls.parse(fh.read(), source=spec_path)

    @classmethod
    def parse(cls, text: bytes | str, source: str) -> "DatasetSpec":
        """The spec in YAML ``text`` (safe loader: tags such as ``!!python/object`` are refused)."""
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise DatasetError(f"{source}: not valid YAML: {' '.join(str(err).split())}") from None
        return cls.from_dict(raw, source=source)

    def write(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, SPEC_FILE)
        with open(path, "w") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False)
        return path


@dataclass
class FunnelReport:
    """Rows where a later step is 1 while an earlier step is 0, per offending step pair."""

    rows: int
    violations: int
    by_step: dict[str, int] = field(default_factory=dict)
    dropped: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Dataset:
    spec: DatasetSpec
    table: pa.Table
    path: str = ""
    funnel: FunnelReport | None = None
    labelled: bool = True  # False: loaded without require_labels and the label columns are absent
    funnel_violation: np.ndarray | None = None  # per-row mask, loaded with funnel_policy="flag"

    def __len__(self) -> int:
        return self.table.num_rows

    def labels(self) -> np.ndarray:
        """(rows, steps) float32 label matrix in funnel order."""
        return np.stack(
            [self.table.column(c).to_numpy() for c in self.spec.labels], axis=1
        ).astype(np.float32)


def _type_ok(role: str, dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if role == "labels":
        return pa.types.is_integer(dtype) or pa.types.is_boolean(dtype)
    if role == "numerical":
        return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)
    if role in ("categorical", "id_column"):
        return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_integer(dtype)
    if role == "time_column":
        return pa.types.is_timestamp(dtype) or pa.types.is_date(dtype)
    raise AssertionError(role)


_EXPECTED = {
    "labels": "integer or bool 0/1",
    "numerical": "integer or float",
    "categorical": "string or integer",
    "id_column": "string or integer",
    "time_column": "timestamp or date",
}


def parquet_files(path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(path, "*.parquet")))
    if not files:
        raise DatasetError(f"{path}: no Parquet files in dataset directory")
    return files


def validate_schema(spec: DatasetSpec, schema: pa.Schema, source: str, skip_roles: tuple[str, ...] = ()) -> None:
    """Raise a DatasetError naming ``source`` and the column for missing columns and wrong dtypes."""
    for role, names in spec._roles():
        if role in skip_roles:
            continue
        for name in names:
            idx = schema.get_field_index(name)
            if idx < 0:
                raise DatasetError(f"{source}: missing column '{name}' ({role} in spec)")
            dtype = schema.field(idx).type
            if not _type_ok(role, dtype):
                raise DatasetError(
                    f"{source}: column '{name}' has dtype {dtype}, expected {_EXPECTED[role]} ({role})"
                )


def validate_labels(spec: DatasetSpec, table: pa.Table, source: str) -> None:
    for name in spec.labels:
        col = table.column(name)
        if col.null_count:
            raise DatasetError(f"{source}: label column '{name}' has {col.null_count} null value(s)")
        values = pc.cast(col, pa.int64())
        bad = pc.invert(pc.is_in(values, value_set=pa.array([0, 1], pa.int64())))
        n_bad = pc.sum(bad).as_py() or 0
        if n_bad:
            first = pc.index(bad, True).as_py()
            raise DatasetError(
                f"{source}: label column '{name}' must be 0/1; {n_bad} row(s) are not "
                f"(first at row {first}: {values[first].as_py()})"
            )


def funnel_violations(spec: DatasetSpec, labels: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Mask of rows where a step is 1 while its predecessor is 0, plus counts per step pair."""
    bad_pairs = (labels[:, 1:] > labels[:, :-1])
    by_step = {
        f"{spec.labels[i]}>{spec.labels[i + 1]}": int(bad_pairs[:, i].sum()) for i in range(bad_pairs.shape[1])
    }
    return bad_pairs.any(axis=1), by_step


def read_checked_file(file, spec: DatasetSpec, columns_only: bool = True, require_labels: bool = True,
                      name: str | None = None) -> pa.Table:
    """One validated Parquet file (a path or an open binary file, ``name`` naming it); corrupt footers
    and data pages alike become a DatasetError naming it."""
    name = name or str(file)
    try:
        schema = pq.read_schema(file)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DatasetError(f"{name}: not a readable Parquet file ({_first_line(err)})") from None
    unlabelled = not require_labels and any(schema.get_field_index(c) < 0 for c in spec.labels)
    validate_schema(spec, schema, name, skip_roles=("labels",) if unlabelled else ())
    columns = [c for c in spec.columns if not (unlabelled and c in spec.labels)]
    try:
        table = pq.read_table(
            file, columns=columns if columns_only else None,
            read_dictionary=[c for c in spec.categorical if pa.types.is_string(schema.field(c).type)],
        )
    except Exception as err:  # a good footer over corrupt pages fails only here (OSError, ArrowInvalid)
        raise DatasetError(f"{name}: corrupt Parquet data ({_first_line(err)})") from None
    if not unlabelled:
        validate_labels(spec, table, name)
    return table


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_dataset(path: str, funnel_policy: str | None = None, columns_only: bool = True,
                 require_labels: bool = True) -> Dataset:
    """Load and validate a dataset directory.

    ``funnel_policy`` overrides the spec's: ``reject`` raises on any funnel violation, ``drop``
    removes those rows and logs how many per step pair (a warning on stderr, never silent), ``flag``
    keeps every row and marks the violating ones in ``Dataset.funnel_violation`` (what scoring uses).
    Without ``require_labels`` a dataset lacking label columns loads (``Dataset.labelled`` is False).
    """
    spec = DatasetSpec.read(path)
    policy = funnel_policy or spec.funnel_policy
    if policy not in FUNNEL_POLICIES + ("flag",):
        raise DatasetError(f"funnel policy must be one of {FUNNEL_POLICIES + ('flag',)}, got {policy!r}")
    tables = [read_checked_file(file, spec, columns_only, require_labels) for file in parquet_files(path)]
    table = pa.concat_tables(tables, promote=True) if len(tables) > 1 else tables[0]
    if table.num_rows == 0:
        raise DatasetError(f"{path}: dataset has no rows")
    ds = Dataset(spec=spec, table=table, path=path)
    if not all(c in table.column_names for c in spec.labels):
        ds.labelled = False
        return ds
    mask, by_step = funnel_violations(spec, ds.labels())
    report = FunnelReport(rows=table.num_rows, violations=int(mask.sum()), by_step=by_step)
    if report.violations and policy == "reject":
        raise DatasetError(
            f"{path}: {report.violations} row(s) violate the funnel order {list(spec.labels)} "
            f"({by_step}); fix the data or load with funnel_policy='drop'"
        )
    if report.violations and policy == "drop":
        ds.table = table.filter(pa.array(~mask))
        report.dropped = report.violations
        _LOG.warning("%s: dropped %d of %d row(s) violating the funnel order (per step pair: %s)",
                     path, report.dropped, report.rows, {k: v for k, v in by_step.items() if v})
    ds.funnel, ds.funnel_violation = report, (mask if policy == "flag" else None)
    return ds


def write_dataset(table: pa.Table, spec: DatasetSpec, path: str, rows_per_file: int = 1_000_000) -> str:
    """Write ``table`` as a dataset atomically: into a temporary sibling, then one rename. Callers
    decide first whether ``path`` may be replaced (:func:`apem.data.ownership.claim_output`)."""
    validate_schema(spec, table.schema, "table to write")
    with staged_dir(path) as tmp:
        n_parts = max(1, -(-table.num_rows // rows_per_file))
        for part in range(n_parts):
            chunk = table.slice(part * rows_per_file, rows_per_file)
            pq.write_table(chunk, os.path.join(tmp, f"part-{part:05d}.parquet"))
        spec.write(tmp)
        open(os.path.join(tmp, SUCCESS_MARKER), "wb").close()  # marks it as a dataset apem wrote (replaceable)
    return path


def check_same_spec(expected: DatasetSpec, actual: DatasetSpec, what: str) -> None:
    """Raise a DatasetError naming the differing spec fields (labels, features, their order)."""
    diffs = [key for key in ("labels", "categorical", "numerical")
             if tuple(getattr(expected, key)) != tuple(getattr(actual, key))]
    if diffs:
        detail = "; ".join(f"{k}: expected {list(getattr(expected, k))}, got {list(getattr(actual, k))}" for k in diffs)
        raise DatasetError(f"{what}: spec does not match ({detail})")
