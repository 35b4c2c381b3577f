"""Feature encoding (paper 3.1): every field becomes one integer index per row.

- Categorical columns: a vocabulary fitted on the training data keeps values seen at least
  ``min_frequency`` times; everything else (unseen at serving time, rare, null) maps to index 0,
  the out-of-vocabulary (OOV) bucket.
- Numerical columns: :func:`log_round` turns each value into a discrete code, and a vocabulary over
  those codes (fitted the same way) turns codes into indices. NaN has its own code, so missing
  values get their own embedding when they occur in training.

Encoding is vectorized with pyarrow/numpy; no Python runs per row. The fitted state is JSON-able
(:meth:`FeatureEncoder.to_dict`) and saved next to the model weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from apem.data.spec import Dataset, DatasetError, DatasetSpec

OOV_INDEX = 0
FORMAT_VERSION = 1
# Codes of log_round. Magnitude buckets are capped so that inf and absurdly large values share the
# last bucket instead of creating unbounded codes; ln(1 + 1e19)^2 ~ 1900.
MAX_LOG_BUCKET = 2000
NAN_CODE = np.int64(-(2**62))


@dataclass(frozen=True)
class FieldSpec:
    """One encoded input field: its name and how many distinct indices it can take (OOV included)."""

    name: str
    cardinality: int


def log_round(values: np.ndarray) -> np.ndarray:
    """Paper 3.1 "Log-round" discretization of a numerical column into int64 codes.

    The paper does not spell the operation out; we use the common signed reading
    ``code = sign(x) * (1 + floor(ln(1 + |x|)^2))`` which gives fine buckets for small values and
    logarithmic ones for heavy tails (balances, incomes). Explicit cases:

    - ``0`` -> code 0, its own bucket (zero balances are meaningful, not "small positive");
    - negatives mirror positives with negative codes (overdrafts differ from deposits);
    - ``NaN`` (and nulls converted to NaN) -> :data:`NAN_CODE`;
    - ``+-inf`` and huge magnitudes -> ``+-(1 + MAX_LOG_BUCKET)``.
    """
    x = np.asarray(values, dtype=np.float64)
    magnitude = np.abs(x)
    with np.errstate(invalid="ignore", over="ignore"):
        bucket = np.floor(np.square(np.log1p(magnitude)))
    bucket = np.minimum(np.nan_to_num(bucket, nan=0.0, posinf=MAX_LOG_BUCKET), MAX_LOG_BUCKET)
    codes = (np.sign(np.nan_to_num(x)) * (1.0 + bucket)).astype(np.int64)
    codes[x == 0] = 0
    codes[np.isnan(x)] = NAN_CODE
    return codes


def _plain(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Decode dictionary chunks to their value type (fitting only; transform keeps dictionaries)."""
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def _as_kind(array: pa.Array | pa.ChunkedArray, kind: str, name: str):
    target = pa.int64() if kind == "int" else pa.string()
    if array.type == target:
        return array
    try:
        return pc.cast(array, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DatasetError(
            f"column '{name}' has dtype {array.type}; the encoder was fitted on {kind} values"
        ) from None


def _kind_of(dtype: pa.DataType) -> str:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return "int" if pa.types.is_integer(dtype) else "string"


def _numeric(column: pa.ChunkedArray, name: str) -> np.ndarray:
    try:
        return pc.cast(column, pa.float64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DatasetError(f"numerical column '{name}' has dtype {column.type}, expected a number") from None


def _frequent(values: pa.ChunkedArray | np.ndarray, min_frequency: int) -> list:
    """Sorted distinct non-null values occurring at least ``min_frequency`` times."""
    if isinstance(values, np.ndarray):
        uniq, counts = np.unique(values, return_counts=True)
        return uniq[counts >= min_frequency].tolist()
    counts = pc.value_counts(values.drop_null() if hasattr(values, "drop_null") else values)
    keep = pc.greater_equal(counts.field("counts"), min_frequency)
    return sorted(v for v in counts.field("values").filter(keep).to_pylist() if v is not None)


class FeatureEncoder:
    """Fits per-field vocabularies on training data and maps tables to (rows, F) int64 indices.

    Field order (and so column order of :meth:`transform`) is the spec's categorical columns, then
    its numerical columns. Index 0 of every field is the OOV bucket, so cardinality = vocab + 1.
    """

    def __init__(self, spec: DatasetSpec, min_frequency: int = 2) -> None:
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
        self.spec = spec
        self.min_frequency = min_frequency
        # categorical: name -> (kind, sorted vocab list); numerical: name -> sorted np.int64 codes
        self.categorical_vocab: dict[str, tuple[str, list]] = {}
        self.numerical_vocab: dict[str, np.ndarray] = {}

    @property
    def fitted(self) -> bool:
        return len(self.categorical_vocab) + len(self.numerical_vocab) == len(self.spec.features)

    def fit(self, dataset: Dataset) -> "FeatureEncoder":
        """Fit vocabularies on ``dataset`` (the training split only, never validation or test)."""
        table = dataset.table
        self._check_columns(table, "fit")
        for name in self.spec.categorical:
            column = table.column(name)
            kind = _kind_of(column.type)
            self.categorical_vocab[name] = (kind, _frequent(_as_kind(_plain(column), kind, name), self.min_frequency))
        for name in self.spec.numerical:
            codes = log_round(_numeric(table.column(name), name))
            self.numerical_vocab[name] = np.asarray(_frequent(codes, self.min_frequency), dtype=np.int64)
        return self

    def _check_columns(self, table: pa.Table, what: str) -> None:
        missing = [c for c in self.spec.features if c not in table.column_names]
        if missing:
            raise DatasetError(f"{what}: missing feature column(s) {missing} expected by the feature encoder")

    @property
    def fields(self) -> list[FieldSpec]:
        if not self.fitted:
            raise RuntimeError("FeatureEncoder is not fitted")
        cat = [FieldSpec(n, len(self.categorical_vocab[n][1]) + 1) for n in self.spec.categorical]
        num = [FieldSpec(n, len(self.numerical_vocab[n]) + 1) for n in self.spec.numerical]
        return cat + num

    def transform(self, table: pa.Table) -> np.ndarray:
        """(rows, F) int64 indices; unseen, rare and null values map to OOV (index 0)."""
        if not self.fitted:
            raise RuntimeError("FeatureEncoder is not fitted")
        self._check_columns(table, "transform")
        out = np.empty((table.num_rows, len(self.spec.features)), dtype=np.int64)
        for j, name in enumerate(self.spec.categorical):
            out[:, j] = self._encode_categorical(table.column(name), name)
        offset = len(self.spec.categorical)
        for j, name in enumerate(self.spec.numerical):
            out[:, offset + j] = self._encode_numerical(table.column(name), name)
        return out

    def _encode_categorical(self, column: pa.ChunkedArray, name: str) -> np.ndarray:
        kind, vocab = self.categorical_vocab[name]
        value_set = pa.array(vocab, type=pa.int64() if kind == "int" else pa.string())
        parts = []
        for chunk in column.chunks:
            if isinstance(chunk, pa.DictionaryArray):
                # Look up the (small) dictionary once, then gather by the row indices.
                per_entry = pc.index_in(_as_kind(chunk.dictionary, kind, name), value_set=value_set)
                per_entry = per_entry.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1
                indices = chunk.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
                encoded = per_entry[indices] if len(per_entry) else np.zeros(len(chunk), np.int64)
                if chunk.null_count:
                    encoded[chunk.is_null().to_numpy(zero_copy_only=False)] = OOV_INDEX
                parts.append(encoded)
            else:
                found = pc.index_in(_as_kind(chunk, kind, name), value_set=value_set)
                parts.append(found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1)
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _encode_numerical(self, column: pa.ChunkedArray, name: str) -> np.ndarray:
        vocab = self.numerical_vocab[name]
        codes = log_round(_numeric(column, name))
        if len(vocab) == 0:
            return np.zeros(len(codes), np.int64)
        pos = np.minimum(np.searchsorted(vocab, codes), len(vocab) - 1)
        return np.where(vocab[pos] == codes, pos + 1, OOV_INDEX)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "spec": self.spec.to_dict(),
            "min_frequency": self.min_frequency,
            "categorical": {n: {"kind": k, "vocab": v} for n, (k, v) in self.categorical_vocab.items()},
            "numerical": {n: v.tolist() for n, v in self.numerical_vocab.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureEncoder":
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"feature state has format version {d.get('format_version')!r}, this build reads {FORMAT_VERSION}"
            )
        enc = cls(DatasetSpec.from_dict(d["spec"], source="feature state"), min_frequency=d["min_frequency"])
        enc.categorical_vocab = {n: (v["kind"], list(v["vocab"])) for n, v in d["categorical"].items()}
        enc.numerical_vocab = {n: np.asarray(v, dtype=np.int64) for n, v in d["numerical"].items()}
        if not enc.fitted:
            raise ValueError("feature state does not cover every feature of its spec")
        return enc
