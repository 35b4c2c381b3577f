"""Bounded summaries of a column seen chunk by chunk (the streaming vocabulary fit).

- :class:`ValueCounter`: exact counts of distinct values. Its memory grows with the number of
  distinct values (which the fitted vocabulary keeps anyway), not with the row count.
- :class:`Reservoir`: a uniform random sample of at most ``capacity`` finite values (Vitter's
  algorithm R, vectorised per chunk). While fewer values than ``capacity`` were seen it holds all
  of them, so quantiles of it are exact; beyond that they are approximate, with a rank error of
  about ``1 / sqrt(capacity)`` (0.1% at the default million values).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Merge pending per-chunk counts once they outgrow the merged ones: amortised linear time.
_MIN_MERGE_ROWS = 1_000_000


class ValueCounter:
    """Running exact counts of the distinct values of one column (nulls included, as ``None``)."""

    def __init__(self, merge_rows: int = _MIN_MERGE_ROWS) -> None:
        self.merge_rows = merge_rows
        self._values: pa.Array | None = None
        self._counts: pa.Array | None = None
        self._pending: list[pa.StructArray] = []
        self._pending_rows = 0

    def add(self, values: pa.Array | pa.ChunkedArray) -> None:
        counts = pc.value_counts(values)
        self._pending.append(counts)
        self._pending_rows += len(counts)
        if self._pending_rows >= max(self.merge_rows, len(self._values) if self._values is not None else 0):
            self._merge()

    def _merge(self) -> None:
        values = [c.field("values") for c in self._pending]
        counts = [c.field("counts") for c in self._pending]
        if self._values is not None:
            values.append(self._values)
            counts.append(self._counts)
        self._pending, self._pending_rows = [], 0
        if not values:
            return
        table = pa.table({"v": pa.concat_arrays(values), "c": pa.concat_arrays(counts)})
        merged = table.group_by("v").aggregate([("c", "sum")])
        self._values, self._counts = merged.column("v").combine_chunks(), merged.column("c_sum").combine_chunks()

    def at_least(self, min_count: int) -> list:
        """Sorted distinct non-null values counted at least ``min_count`` times."""
        self._merge()
        if self._values is None:
            return []
        keep = pc.greater_equal(self._counts, min_count)
        return sorted(v for v in self._values.filter(keep).to_pylist() if v is not None)


class Reservoir:
    """A uniform sample of at most ``capacity`` of the finite values added (all of them while fewer)."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1, got {capacity}")
        self.capacity, self.rng = capacity, rng
        self._sample = np.empty(0, np.float64)
        self.seen = 0

    def add(self, values: np.ndarray) -> None:
        finite = values[np.isfinite(values)]
        room = min(self.capacity - len(self._sample), len(finite))
        if room:
            self._sample = np.concatenate([self._sample, finite[:room]])
        rest = finite[room:]
        self.seen += room
        if len(rest):
            # Value number i (0-based over everything seen) replaces a random slot with probability capacity/(i+1).
            slots = self.rng.integers(0, self.seen + np.arange(len(rest)) + 1)
            chosen = slots < self.capacity
            self._sample[slots[chosen]] = rest[chosen]  # a later value overwrites an earlier one, as in sequence
            self.seen += len(rest)

    @property
    def sample(self) -> np.ndarray:
        return self._sample

    @property
    def exact(self) -> bool:
        """True while the sample holds every finite value seen (quantiles of it are exact)."""
        return self.seen <= self.capacity
