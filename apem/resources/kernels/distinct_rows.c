/* The distinct table rows of a batch of embedding lookups, for apem.nn.layers.FieldEmbedding.distinct_rows (its torch
 * path is the reference, tests/nn/test_layers.py keeps the two equal): through torch, the flags, their running count
 * and the two gathers took ~0.25 ms a batch of 2048 rows of 16 fields, ~1.5% of APEM's predict. Built and loaded
 * by apem/nn/native.py and called by apem/nn/native_pools.py. */
#include <stdint.h>

#include "common.h"

/* For the lookups x[r, f] + offsets[f] (the first F columns of the n_rows rows of x, at row stride x_stride):
 * distinct (U) <- the table rows looked up, ascending, and index (n_rows, F) <- where each lookup's row is in distinct;
 * rank (table_rows) is scratch. Returns U, or -1 where a lookup falls outside [0, table_rows) (then
 * distinct and index are unspecified). */
i64 distinct_rows(i64 n_rows, i64 F, const i64 *x, i64 x_stride, const i64 *offsets, i64 table_rows, i64 *rank,
                  i64 *distinct, i64 *index) {
    for (i64 t = 0; t < table_rows; ++t) rank[t] = 0;
    for (i64 r = 0; r < n_rows; ++r)
        for (i64 f = 0; f < F; ++f) {
            const i64 id = x[r * x_stride + f] + offsets[f];
            if (id < 0 || id >= table_rows) return -1;
            rank[id] = 1;
        }
    i64 count = 0;
    for (i64 t = 0; t < table_rows; ++t)
        if (rank[t]) {
            distinct[count] = t;
            rank[t] = count++;
        }
    for (i64 r = 0; r < n_rows; ++r)
        for (i64 f = 0; f < F; ++f) index[r * F + f] = rank[x[r * x_stride + f] + offsets[f]];
    return count;
}
