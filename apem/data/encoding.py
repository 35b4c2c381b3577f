"""Feature encoding (paper 3.1): every field becomes one integer index per row.

- Categorical columns: a vocabulary fitted on the training data keeps values seen at least
  ``min_frequency`` times; everything else (unseen at serving time, rare, null) maps to index 0,
  the out-of-vocabulary (OOV) bucket.
- Numerical columns: a discrete code per value, and a vocabulary over those codes (fitted the same
  way) turns codes into indices. NaN has its own code, so missing values get their own embedding
  when they occur in training. The ``numerical_encoding`` option chooses the codes:

  - ``log_round`` (the paper's, 3.1; the default): :func:`log_round` codes.
  - ``dense_log``: the same ``log_round`` index, plus the value itself as
    :func:`signed_log` so a model adds ``signed_log(x) * v_f`` (a learnt per-field vector) to the
    field's embedding (:class:`apem.nn.layers.FieldEmbedding`). Buckets then only have to learn
    what the log-linear term misses; measured in issue 10 as the best use of balance and income.
  - ``quantile:N``: N equal-frequency bins whose edges are fitted on the training data.

  Dense values travel in the same int64 matrix as the indices, as extra columns after the F index
  columns in fixed point (``round(signed_log(x) * DENSE_SCALE)``), so every consumer of the
  (rows, width) matrix (trainer, predict, serving, TorchScript export) keeps one integer input.

Encoding is vectorized with pyarrow/numpy; no Python runs per row. The fitted state is JSON-able
(:meth:`FeatureEncoder.to_dict`) and saved next to the model weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from apem.data.sketches import Reservoir, ValueCounter
from apem.data.spec import Dataset, DatasetError, DatasetSpec

OOV_INDEX = 0
# 2: adds numerical_encoding and quantile_edges; version 1 states are log_round and still load.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
NUMERICAL_ENCODINGS = ("log_round", "dense_log", "quantile:N")
DEFAULT_NUMERICAL_ENCODING = "log_round"
# Fixed point of the dense columns: 2^-16 resolution on the log scale, far below any useful signal.
DENSE_SCALE = 2**16
# |signed_log| is capped so that inf and absurd magnitudes stay finite (log1p(1e19) ~ 43.7).
MAX_SIGNED_LOG = 50.0
# Codes of log_round. Magnitude buckets are capped so that inf and absurdly large values share the
# last bucket instead of creating unbounded codes; ln(1 + 1e19)^2 ~ 1900.
MAX_LOG_BUCKET = 2000
# Values per numerical field sampled for the quantile edges of a streaming fit (8 MB a field);
# below this many rows the edges equal those of :meth:`FeatureEncoder.fit`.
DEFAULT_RESERVOIR_ROWS = 1_000_000
NAN_CODE = np.int64(-(2**62))


@dataclass(frozen=True)
class FieldSpec:
    """One encoded input field: its name and how many distinct indices it can take (OOV included)."""

    name: str
    cardinality: int
    dense: bool = False  # a dense_log numerical: the input carries signed_log(x) in an extra column


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


def signed_log(values: np.ndarray) -> np.ndarray:
    """``sign(x) * log(1 + |x|)`` of the ``dense_log`` encoding; NaN -> 0 (missing is the index's job,
    since NaN keeps its own log_round bucket), +-inf and huge magnitudes -> +-:data:`MAX_SIGNED_LOG`."""
    x = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=np.inf, neginf=-np.inf)
    with np.errstate(over="ignore"):
        return np.clip(np.sign(x) * np.log1p(np.abs(x)), -MAX_SIGNED_LOG, MAX_SIGNED_LOG)


def parse_numerical_encoding(text: str) -> tuple[str, int]:
    """``log_round`` | ``dense_log`` | ``quantile:N`` (N >= 2) -> (kind, bins); ValueError naming the text."""
    kind, _, bins = str(text).partition(":")
    if kind in ("log_round", "dense_log") and not bins:
        return kind, 0
    if kind == "quantile" and bins.isdigit() and int(bins) >= 2:
        return kind, int(bins)
    raise ValueError(f"numerical encoding {text!r} is not one of log_round, dense_log, quantile:N (N >= 2)")


def quantile_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """The inner edges of ``bins`` equal-frequency bins over the finite values (ties merge bins)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(0, np.float64)
    return np.unique(np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)[1:-1]))


def quantile_codes(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin number 0..len(edges) of each value (+-inf land in the outer bins); NaN -> :data:`NAN_CODE`."""
    x = np.asarray(values, dtype=np.float64)
    codes = np.searchsorted(edges, x, side="right").astype(np.int64)
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

    def __init__(self, spec: DatasetSpec, min_frequency: int = 2,
                 numerical_encoding: str = DEFAULT_NUMERICAL_ENCODING) -> None:
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
        self.spec = spec
        self.min_frequency = min_frequency
        self.numerical_encoding = numerical_encoding
        self._kind, self._bins = parse_numerical_encoding(numerical_encoding)
        self.quantile_edges: dict[str, np.ndarray] = {}
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
            values = _numeric(table.column(name), name)
            if self._kind == "quantile":
                self.quantile_edges[name] = quantile_edges(values, self._bins)
            codes = self._codes(name, values)
            self.numerical_vocab[name] = np.asarray(_frequent(codes, self.min_frequency), dtype=np.int64)
        return self

    def fit_chunks(self, chunks: Callable[[list[str]], Iterable[pa.Table]],
                   reservoir_rows: int = DEFAULT_RESERVOIR_ROWS) -> int:
        """Fit in a streaming pass: ``chunks(columns)`` yields the training rows as tables, a fresh
        pass per call; nothing holds more than one chunk. Returns the number of rows seen.

        Vocabularies equal :meth:`fit`'s exactly (exact counts, :class:`apem.data.sketches.ValueCounter`).
        ``quantile:N`` edges come from a uniform sample of ``reservoir_rows`` values per field
        (:class:`apem.data.sketches.Reservoir`: exact up to that many rows, approximate beyond), and
        take a second pass over the numerical columns to count the bins' codes."""
        quantile = self._kind == "quantile"
        counters = {name: ValueCounter() for name in self.spec.features}
        reservoirs = {name: Reservoir(reservoir_rows, np.random.default_rng(j))
                      for j, name in enumerate(self.spec.numerical)} if quantile else {}
        kinds: dict[str, str] = {}
        rows = 0
        for table in chunks(list(self.spec.features)):
            self._check_columns(table, "fit")
            rows += table.num_rows
            for name in self.spec.categorical:
                column = table.column(name)
                kind = kinds.setdefault(name, _kind_of(column.type))
                counters[name].add(_as_kind(_plain(column), kind, name))
            for name in self.spec.numerical:
                values = _numeric(table.column(name), name)
                if quantile:
                    reservoirs[name].add(values)
                else:
                    counters[name].add(pa.array(self._codes(name, values)))
        for name, reservoir in reservoirs.items():
            self.quantile_edges[name] = quantile_edges(reservoir.sample, self._bins)
        for table in chunks(list(self.spec.numerical)) if quantile else ():
            for name in self.spec.numerical:
                counters[name].add(pa.array(self._codes(name, _numeric(table.column(name), name))))
        for name in self.spec.categorical:
            self.categorical_vocab[name] = (kinds.get(name, "string"), counters[name].at_least(self.min_frequency))
        for name in self.spec.numerical:
            self.numerical_vocab[name] = np.asarray(counters[name].at_least(self.min_frequency), dtype=np.int64)
        return rows

    def _codes(self, name: str, values: np.ndarray) -> np.ndarray:
        if self._kind == "quantile":
            return quantile_codes(values, self.quantile_edges[name])
        return log_round(values)

    @property
    def dense_fields(self) -> list[str]:
        """Numerical fields whose signed-log value rides along as an extra input column (dense_log)."""
        return list(self.spec.numerical) if self._kind == "dense_log" else []

    @property
    def input_width(self) -> int:
        """Columns of :meth:`transform`: one index per field, then one fixed-point value per dense field."""
        return len(self.spec.features) + len(self.dense_fields)

    def _check_columns(self, table: pa.Table, what: str) -> None:
        missing = [c for c in self.spec.features if c not in table.column_names]
        if missing:
            raise DatasetError(f"{what}: missing feature column(s) {missing} expected by the feature encoder")

    @property
    def fields(self) -> list[FieldSpec]:
        if not self.fitted:
            raise RuntimeError("FeatureEncoder is not fitted")
        cat = [FieldSpec(n, len(self.categorical_vocab[n][1]) + 1) for n in self.spec.categorical]
        dense = set(self.dense_fields)
        num = [FieldSpec(n, len(self.numerical_vocab[n]) + 1, dense=n in dense) for n in self.spec.numerical]
        return cat + num

    def transform(self, table: pa.Table) -> np.ndarray:
        """(rows, :attr:`input_width`) int64: F indices (unseen, rare and null values map to OOV,
        index 0), then the fixed-point ``signed_log`` value of each dense field."""
        if not self.fitted:
            raise RuntimeError("FeatureEncoder is not fitted")
        self._check_columns(table, "transform")
        out = np.empty((table.num_rows, self.input_width), dtype=np.int64)
        for j, name in enumerate(self.spec.categorical):
            out[:, j] = self._encode_categorical(table.column(name), name)
        offset = len(self.spec.categorical)
        for j, name in enumerate(self.spec.numerical):
            out[:, offset + j] = self._encode_numerical(table.column(name), name)
        offset = len(self.spec.features)
        for j, name in enumerate(self.dense_fields):
            out[:, offset + j] = np.round(signed_log(_numeric(table.column(name), name)) * DENSE_SCALE)
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
        codes = self._codes(name, _numeric(column, name))
        if len(vocab) == 0:
            return np.zeros(len(codes), np.int64)
        pos = np.minimum(np.searchsorted(vocab, codes), len(vocab) - 1)
        return np.where(vocab[pos] == codes, pos + 1, OOV_INDEX)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "spec": self.spec.to_dict(),
            "min_frequency": self.min_frequency,
            "numerical_encoding": self.numerical_encoding,
            "quantile_edges": {n: v.tolist() for n, v in self.quantile_edges.items()},
            "categorical": {n: {"kind": k, "vocab": v} for n, (k, v) in self.categorical_vocab.items()},
            "numerical": {n: v.tolist() for n, v in self.numerical_vocab.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureEncoder":
        if d.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"feature state has format version {d.get('format_version')!r}, "
                             f"this build reads {', '.join(map(str, READABLE_FORMAT_VERSIONS))}")
        enc = cls(DatasetSpec.from_dict(d["spec"], source="feature state"), min_frequency=d["min_frequency"],
                  numerical_encoding=d.get("numerical_encoding", "log_round"))
        enc.quantile_edges = {n: np.asarray(v, dtype=np.float64) for n, v in d.get("quantile_edges", {}).items()}
        enc.categorical_vocab = {n: (v["kind"], list(v["vocab"])) for n, v in d["categorical"].items()}
        enc.numerical_vocab = {n: np.asarray(v, dtype=np.int64) for n, v in d["numerical"].items()}
        if not enc.fitted:
            raise ValueError("feature state does not cover every feature of its spec")
        if enc._kind == "quantile" and set(enc.quantile_edges) != set(enc.spec.numerical):
            raise ValueError("feature state lacks the quantile edges of some numerical field")
        return enc
