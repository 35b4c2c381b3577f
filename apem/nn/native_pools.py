"""Calls into the C kernels of APEM's two attention poolings (``apem/resources/kernels``, built by
:mod:`apem.nn.native`); :mod:`apem.nn.attention` holds the torch reference of each.

- :func:`apem.nn.attention.gathered_pool_norm` (``gathered_pool.c``, :class:`NativeGatheredPoolNorm`):
  per sample and layer, the kernel computes the (S, M, K) softmax weights, pools the value rows,
  adds eq. 17's residual and applies its LayerNorm while the weights are in cache; the backward
  recomputes the weights (cheaper than writing 32 KB a row per layer out and reading them back).
  The score and value tables stay torch GEMMs, and so do their gradients' products with the rows.
- :func:`apem.nn.attention.row_attention_pool` (``row_attention_pool.c``): per sample, the scores,
  their softmax, the pooling and every backward product with the sample's rows, the factor's
  gradient included (summed over each thread's samples, then here).
- Training (``gathered_pool.c``, ``pattern_pool_*``): :func:`pattern_pool` runs the two in one kernel per layer,
  forward and backward, so that eq. 17's output Y stays in cache into eq. 18 and its gradient comes straight
  back (the two kernels in turn, which wrote Y out, padded and transposed it and read it back, trained 1.15-1.20x
  slower in bench_speed_table; 1.26-1.31x since eq. 18's per-query sums in the one kernel go 8 at a time).
- Inference (``fused_predict.c``): :func:`fused_predict` runs the two in one kernel per layer over the
  points some row of the batch keeps, with f_D taken per sample; :func:`pattern_chain` is eq. 19's chain, and
  :func:`pattern_chain_pooled` takes it from eq. 18's pooled rows, eq. 16's W^V W^O on the way.

A batch is split into one row range per torch thread, run on the OpenMP pool torch's own ops use;
in backward each range adds into its own gradient tables, summed here.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from apem.nn.native import load_kernels

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@functools.lru_cache(maxsize=None)
def typed_library(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` (from :func:`apem.nn.native.load_kernels`, this build or another) with its signatures set."""
    signatures = {
        "gathered_pool_work_floats": ([_PTR], _I64),
        "gathered_pool_slot_floats": ([_PTR], _I64),
        "gathered_pool_forward": ([_PTR, _I64, _I64] + [_PTR] * 4, None),
        "gathered_pool_backward": ([_PTR, _I64, _I64] + [_PTR] * 4 + [_I64] + [_PTR] * 2, None),
        "row_attention_pool_work_floats": ([_I64] * 3, _I64),
        "row_attention_pool_factor_slot_floats": ([_I64] * 2, _I64),
        "row_attention_pool_forward": ([_I64] * 5 + [_PTR] * 7, None),
        "row_attention_pool_backward": ([_I64] * 5 + [_PTR] * 9, None),
        "fused_predict_work_floats": ([_PTR], _I64),
        "fused_predict": ([_PTR, _I64, _I64, _PTR, _PTR], None),
        "fused_predict_tables": ([_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, ctypes.c_float, _PTR, _PTR,
                                  _PTR], _I64),
        "pattern_chain": ([_I64] * 4 + [_PTR] * 3 + [ctypes.c_float, _I64] + [_PTR] * 3, None),
        "pattern_chain_pooled": ([_I64] * 5 + [_PTR] * 5 + [ctypes.c_float, _I64, _PTR], None),
        "pattern_chain_slot_floats": ([_I64] * 2, _I64),
        "pattern_chain_backward": ([_I64] * 4 + [_PTR] * 4 + [_I64] + [_PTR] * 2, None),
        "pattern_pool_work_floats": ([_PTR], _I64),
        "pattern_pool_slot_floats": ([_PTR], _I64),
        "pattern_pool_forward": ([_PTR, _I64, _I64] + [_PTR] * 6, None),
        "pattern_pool_backward": ([_PTR, _I64, _I64] + [_PTR] * 6 + [_I64] + [_PTR] * 2, None),
        "dynamic_activation_forward": ([_I64, _PTR, ctypes.c_float, _I64, _PTR], None),
        "dynamic_activation_backward": ([_I64, _PTR, ctypes.c_float, _PTR, _I64, _PTR], None),
        "distinct_rows": ([_I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR], _I64),
        "kept_order": ([_I64] * 3 + [_PTR, _I64, ctypes.c_float] + [_PTR] * 4, None),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


def native_library(*tensors: torch.Tensor | None) -> ctypes.CDLL | None:
    """The compiled kernels when every tensor given is a float32 CPU tensor and the kernels are built, else None
    (also while torch.jit traces or torch.compile compiles: a tracer cannot see into C, so a traced graph keeps
    the torch ops; compiled, the kernels' raw pointers would point into tensors the graph does not keep alive,
    which measured as heap corruption under torch 2.11)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    if any(t is not None and (t.device.type != "cpu" or t.dtype != torch.float32) for t in tensors):
        return None
    lib = load_kernels()
    return None if lib is None else typed_library(lib)


def _threads(rows: int) -> int:
    """Threads for a batch of ``rows``: torch's (the kernels run on its OpenMP pool), with at least 64 rows each."""
    return max(1, min(torch.get_num_threads(), rows // 64))


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _layer_ptr(t: torch.Tensor | None, layer: int) -> int | None:
    """The address of ``t[layer]``, or None (a NULL pointer) for an absent tensor."""
    return None if t is None else t[layer].data_ptr()


class PoolLayer(ctypes.Structure):
    """One layer's inputs to ``gathered_pool.c`` (its ``PoolLayer``); holds the tensors it points into."""

    _fields_ = [("U", _I64), ("S", _I64), ("M", _I64), ("K", _I64), ("D", _I64), ("score_table", _PTR),
                ("value_table", _PTR), ("index", _PTR), ("mask", _PTR), ("mask_stride", _I64), ("queries", _PTR),
                ("norm_weight", _PTR), ("norm_bias", _PTR), ("eps", ctypes.c_float)]

    @classmethod
    def of(cls, score_table, value_table, index, mask, queries, norm_weight, norm_bias, heads, eps,
           points: int | None = None) -> "PoolLayer":
        """score_table (U, M K), value_table (U, M d) (bias / M included), index (B, S) int64, mask (B, K) (unit
        column stride), queries (K, d), norm_weight and norm_bias (d,); K = ``points`` where given (fused_predict's
        columns; its queries are every point's)."""
        mask = mask if mask.stride(1) == 1 else mask.contiguous()
        index = index.to(torch.int64)  # what the kernel reads, in forward and in backward
        tensors = [t.contiguous() for t in (score_table, value_table, index, queries, norm_weight, norm_bias)]
        score_table, value_table, index, queries, norm_weight, norm_bias = tensors
        (u, _), (_, s), (k, d) = score_table.shape, index.shape, queries.shape
        layer = cls(u, s, heads, k if points is None else points, d, _ptr(score_table), _ptr(value_table),
                    _ptr(index), _ptr(mask), mask.stride(0), _ptr(queries), _ptr(norm_weight), _ptr(norm_bias), eps)
        layer.keep_alive = (*tensors, mask)
        return layer


def value_table(rows: torch.Tensor, combined: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
    """(U, M d_v) value rows S_u C_{l, m} plus W^V W^O's folded bias / M: each head's weights sum to 1 over
    the fields, so adding bias / M to every value row adds exactly the bias to the output (as FoldedAPEM's
    tables do). With every layer's combined (L', d, M d_v) and bias (L', 1, d_v): the (L', U, M d_v) tables in one
    product, the same values (one layer at a time measured ~50 us a layer, nearly all of it per call)."""
    dv = combined.shape[-1] // heads
    bias_rows = bias.reshape(-1, 1, 1, dv).expand(-1, 1, heads, dv).reshape(-1, 1, heads * dv)
    if combined.dim() == 2:
        return torch.addmm(bias_rows[0], rows, combined, alpha=1.0, beta=1.0 / heads)
    return torch.baddbmm(bias_rows, rows.expand(combined.shape[0], *rows.shape), combined, alpha=1.0, beta=1.0 / heads)


def _check_index(index: torch.Tensor, rows: torch.Tensor) -> None:
    """IndexError unless every entry of ``index`` is a row of ``rows``: the kernels read rows[index] unchecked."""
    if not index.numel():
        return
    lowest, highest = torch.aminmax(index)  # one pass over the index
    if int(lowest) < 0 or int(highest) >= rows.shape[0]:
        raise IndexError(f"index out of range for {rows.shape[0]} rows")


def gathered_pool_norm_forward(lib, rows, index, factor, mask, combined, bias, queries, norm_weight, norm_bias,
                               heads: int, eps: float, for_backward: bool = False):
    """Y (L', B, K, d_v) of :func:`apem.nn.attention.gathered_pool_norm` through the kernel, and, ``for_backward``,
    the normalised X (L', B, d_v, K) and 1 / sigma (L', B, K) its backward reads (else None, None)."""
    n, b, k, dv = factor.shape[0], index.shape[0], mask.shape[2], queries.shape[2]
    _check_index(index, rows)
    out = rows.new_empty(n, b, k, dv)
    normalized, rstd = (rows.new_empty(n, b, dv, k), rows.new_empty(n, b, k)) if for_backward else (None, None)
    threads = _threads(b)
    values = value_table(rows, combined, bias, heads)  # (L', U, M d_v)
    for layer in range(n):
        spec = PoolLayer.of(rows @ factor[layer], values[layer], index, mask[:, layer], queries[layer],
                            norm_weight[layer], norm_bias[layer], heads, eps)
        work = torch.empty(threads, lib.gathered_pool_work_floats(ctypes.byref(spec)))
        lib.gathered_pool_forward(ctypes.byref(spec), b, threads, _ptr(out[layer]),
                                  _layer_ptr(normalized, layer), _layer_ptr(rstd, layer), _ptr(work))
    return out, normalized, rstd


class NativeGatheredPoolNorm(torch.autograd.Function):
    """Autograd for :func:`apem.nn.attention.gathered_pool_norm` through ``gathered_pool.c``: per layer, the
    score and value tables are torch GEMMs, the rest of the layer (softmax, pooling, residual, LayerNorm) is
    the kernel's; backward recomputes the tables and each row's weights, and saves only the normalised X and
    1 / sigma (as torch's LayerNorm would)."""

    @staticmethod
    def forward(ctx, lib, rows, index, factor, mask, combined, bias, queries, norm_weight, norm_bias, heads, eps):
        out, normalized, rstd = gathered_pool_norm_forward(lib, rows, index, factor, mask, combined, bias, queries,
                                                           norm_weight, norm_bias, heads, eps, for_backward=True)
        ctx.lib, ctx.heads, ctx.eps = lib, heads, eps
        ctx.save_for_backward(rows, index, factor, mask, combined, queries, norm_weight, norm_bias, normalized, rstd)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        rows, index, factor, mask, combined, queries, norm_weight, norm_bias, normalized, rstd = ctx.saved_tensors
        n, b = factor.shape[0], index.shape[0]
        u, (k, dv), mk = rows.shape[0], queries.shape[1:], factor.shape[2]
        grad_y, threads, heads = grad_y.contiguous(), _threads(b), ctx.heads
        grad_rows = torch.zeros_like(rows)
        grad_factor, grad_combined, grad_queries = (torch.empty_like(t) for t in (factor, combined, queries))
        grad_mask, grad_nw, grad_nb = torch.empty_like(mask), torch.empty_like(norm_weight), torch.empty_like(norm_bias)
        grad_bias = rows.new_empty(n, 1, dv)
        for layer in range(n):  # the value bias does not matter to the scores' gradient: the plain product
            spec = PoolLayer.of(rows @ factor[layer], rows @ combined[layer], index, mask[:, layer], queries[layer],
                                norm_weight[layer], norm_bias[layer], heads, ctx.eps)
            slots = rows.new_zeros(threads, ctx.lib.gathered_pool_slot_floats(ctypes.byref(spec)))
            work = torch.empty(threads, ctx.lib.gathered_pool_work_floats(ctypes.byref(spec)))
            grad_mask_layer = grad_mask[:, layer]
            ctx.lib.gathered_pool_backward(ctypes.byref(spec), b, threads, _ptr(grad_y[layer]), _ptr(normalized[layer]),
                                           _ptr(rstd[layer]), _ptr(grad_mask_layer), grad_mask_layer.stride(0),
                                           _ptr(slots), _ptr(work))
            grad_scores, grad_values, grad_q, grad_w, grad_b, grad_vb = (slots.sum(0) if threads > 1 else slots[0]).split(
                [u * mk, u * heads * dv, k * dv, dv, dv, dv])
            grad_scores, grad_values = grad_scores.view(u, mk), grad_values.view(u, heads * dv)
            grad_queries[layer], grad_nw[layer], grad_nb[layer], grad_bias[layer, 0] = grad_q.view(k, dv), grad_w, grad_b, grad_vb
            grad_rows.addmm_(grad_scores, factor[layer].t()).addmm_(grad_values, combined[layer].t())
            torch.mm(rows.t(), grad_scores, out=grad_factor[layer])
            torch.mm(rows.t(), grad_values, out=grad_combined[layer])
        return (None, grad_rows, None, grad_factor, grad_mask, grad_combined, grad_bias, grad_queries, grad_nw, grad_nb,
                None, None)


class PatternPoolLayer(ctypes.Structure):
    """One layer's inputs to ``gathered_pool.c``'s training kernel of eq. 14-18 (its ``PatternPoolLayer``): the ASRG
    layer, eq. 18's factor and its row weights (0: none, 1: ``counts`` for every sample, 2: z_K, the pool's mask),
    and the exps of the pool's score table (:func:`score_tables`) or None."""

    _fields_ = [("pool", PoolLayer), ("Q", _I64), ("factor", _PTR), ("weighting", _I64), ("counts", _PTR),
                ("exp_table", _PTR)]

    @classmethod
    def of(cls, pool: PoolLayer, pattern_factor: torch.Tensor, counts: torch.Tensor | None, mask_weights: bool,
           exps: torch.Tensor | None) -> "PatternPoolLayer":
        weighting = 2 if mask_weights else (0 if counts is None else 1)
        layer = cls(pool, pattern_factor.shape[1], _ptr(pattern_factor), weighting,
                    None if counts is None else _ptr(counts), None if exps is None else _ptr(exps))
        layer.keep_alive = (pool, pattern_factor, counts, exps)
        return layer


def pattern_pool(lib: ctypes.CDLL, rows: torch.Tensor, index: torch.Tensor, factor: torch.Tensor, z: torch.Tensor,
                 combined: torch.Tensor, bias: torch.Tensor, inducing: torch.Tensor, norm_weight: torch.Tensor,
                 norm_bias: torch.Tensor, pattern_factor: torch.Tensor,
                 plans: list[tuple[torch.Tensor | None, torch.Tensor | None]], mask_weights: bool, heads: int,
                 eps: float) -> torch.Tensor:
    """Training on CPU: per layer, :func:`apem.nn.attention.gathered_pool_norm` over the points ``plans`` names and
    then :func:`apem.nn.attention.row_attention_pool`, in one kernel per sample (``gathered_pool.c``,
    ``pattern_pool_*``), with gradients: Y (B, C, d) is never written out.

    rows, index, factor (L, d, M K), combined (L, d, M d), bias (L, 1, d), inducing (L, K, d), norm_weight and
    norm_bias (L, d) as :func:`gathered_pool_norm_forward`'s; pattern_factor (L, d, Q); z (B, L, K) eq. 13's z_K.
    Per layer, ``plans`` gives the C points it computes (columns (C,), repeats allowed, or None: all K in order) and
    eq. 18's row weights shared by every sample (counts (C,), or None); ``mask_weights``: eq. 18 weighs each row by
    its z instead ("contributes nothing"). -> pooled (L B, Q, d)."""
    _check_index(index, rows)
    pooled = NativePatternPool.apply(lib, (plans, mask_weights, heads, eps), rows, index, factor, combined, bias,
                                     inducing, norm_weight, norm_bias, pattern_factor, z)
    return pooled.view(-1, *pooled.shape[2:])


def _pattern_spec(setup: tuple, layer: int, tables: tuple, index: torch.Tensor, z: torch.Tensor,
                  norm_weight: torch.Tensor, norm_bias: torch.Tensor, pattern_factor: torch.Tensor) -> PatternPoolLayer:
    """Layer ``layer``'s :class:`PatternPoolLayer` from its ``tables``: (factor (d, M C), queries (C, d), scores, exps
    or None, values), as :meth:`NativePatternPool.forward` builds and saves them."""
    plans, mask_weights, heads, eps = setup
    _, queries, scores, exps, values = tables
    pool = PoolLayer.of(scores, values, index, z, queries, norm_weight[layer], norm_bias[layer], heads, eps)
    return PatternPoolLayer.of(pool, pattern_factor[layer], plans[layer][1], mask_weights, exps)


class NativePatternPool(torch.autograd.Function):
    """Autograd for :func:`pattern_pool`, every layer in one node: forward saves each layer's tables, normalised X
    and 1 / sigma (as :class:`NativeGatheredPoolNorm`), eq. 18's weights and, under z_K row weights, q; backward
    recomputes each row's ASRG weights and Y, and adds each layer's share into the stacked parameters' gradients at
    its columns."""

    @staticmethod
    def forward(ctx, lib, setup, rows, index, factor, combined, bias, inducing, norm_weight, norm_bias, pattern_factor,
                z):
        plans, mask_weights, heads, _ = setup
        (n, d, _), k, b, q = factor.shape, inducing.shape[1], index.shape[0], pattern_factor.shape[2]
        pattern_factor, threads = pattern_factor.contiguous(), _threads(b)
        pooled, saved = rows.new_empty(n, b, q, d), []
        fractional = ((z > 0) & (z < 1)).sum(dim=(0, 2)).tolist()  # per layer; the dropped points' z is 0
        values = value_table(rows, combined, bias, heads)  # (L', U, M d_v)
        for layer, (columns, _) in enumerate(plans):
            c = k if columns is None else columns.numel()
            layer_factor, queries, z_layer = factor[layer], inducing[layer], z[:, layer]  # every point: views
            if columns is not None:
                layer_factor = layer_factor.reshape(d, heads, k).index_select(2, columns).view(d, heads * c)
                queries, z_layer = queries.index_select(0, columns), z_layer.index_select(1, columns)
            # once gamma is at its floor z is binary: the samples' softmax weights then come from a table of exps
            binary = fractional[layer] * 8 <= z_layer.numel()
            scores, exps = score_tables(lib, rows, layer_factor) if binary else (rows @ layer_factor, None)
            tables = (layer_factor, queries, scores, exps, values[layer])
            spec = _pattern_spec(setup, layer, tables, index, z_layer, norm_weight, norm_bias, pattern_factor)
            normalized, rstd, weights = rows.new_empty(b, d, c), rows.new_empty(b, c), rows.new_empty(b, q, c)
            q_saved = rows.new_empty(b, q, c) if mask_weights else None
            work = torch.empty(threads, lib.pattern_pool_work_floats(ctypes.byref(spec)))
            lib.pattern_pool_forward(ctypes.byref(spec), b, threads, _ptr(pooled[layer]), _ptr(normalized),
                                     _ptr(rstd), _ptr(weights), None if q_saved is None else _ptr(q_saved), _ptr(work))
            saved += [*tables, normalized, rstd, weights, q_saved, z_layer]
        ctx.lib, ctx.setup, ctx.factor_shape, ctx.inducing_shape, ctx.z_shape = (lib, setup, factor.shape,
                                                                                 inducing.shape, z.shape)
        ctx.save_for_backward(rows, index, combined, norm_weight, norm_bias, pattern_factor, *saved)
        return pooled

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_pooled):
        plans, heads = ctx.setup[0], ctx.setup[2]
        n = len(plans)
        rows, index, combined, norm_weight, norm_bias, pattern_factor, *saved = ctx.saved_tensors
        (u, d), b, q = rows.shape, index.shape[0], pattern_factor.shape[2]
        grad_pooled, threads = grad_pooled.contiguous(), _threads(b)  # held here: the kernel reads it by address
        grad_rows, grad_factor = torch.zeros_like(rows), rows.new_zeros(ctx.factor_shape)
        grad_inducing = rows.new_zeros(ctx.inducing_shape)
        grad_combined, grad_bias = torch.empty_like(combined), rows.new_empty(n, 1, d)
        grad_nw, grad_nb, grad_pattern = (torch.empty_like(t) for t in (norm_weight, norm_bias, pattern_factor))
        grad_z = rows.new_zeros(ctx.z_shape)
        for layer, (columns, _) in enumerate(plans):
            tables, (normalized, rstd, weights, q_saved, z_layer) = saved[10 * layer:][:5], saved[10 * layer + 5:][:5]
            layer_factor, c = tables[0], z_layer.shape[1]
            # the forward's tables: the value bias shifts each weight's gradient by the same amount over the
            # fields, which the softmax's backward cancels
            spec = _pattern_spec(ctx.setup, layer, tables, index, z_layer, norm_weight, norm_bias, pattern_factor)
            # zeroed here: a slot the OpenMP runtime gives no thread to (it may give fewer than asked) adds nothing
            slots = rows.new_zeros(threads, ctx.lib.pattern_pool_slot_floats(ctypes.byref(spec)))
            work = torch.empty(threads, ctx.lib.pattern_pool_work_floats(ctypes.byref(spec)))
            grad_z_layer = grad_z[:, layer] if columns is None else rows.new_empty(b, c)  # the kernel writes every row
            ctx.lib.pattern_pool_backward(ctypes.byref(spec), b, threads, _ptr(grad_pooled[layer]), _ptr(normalized),
                                          _ptr(rstd), _ptr(weights), None if q_saved is None else _ptr(q_saved),
                                          _ptr(grad_z_layer), grad_z_layer.stride(0), _ptr(slots), _ptr(work))
            grad_scores, grad_values, grad_q, grad_w, grad_b, grad_vb, grad_p = (
                slots.sum(0) if threads > 1 else slots[0]).split(
                [u * heads * c, u * heads * d, c * d, d, d, d, d * q])
            grad_scores, grad_values = grad_scores.view(u, heads * c), grad_values.view(u, heads * d)
            grad_rows.addmm_(grad_scores, layer_factor.t()).addmm_(grad_values, combined[layer].t())
            if columns is None:
                torch.mm(rows.t(), grad_scores, out=grad_factor[layer])
                grad_inducing[layer] = grad_q.view(c, d)
            else:  # a point computed more than once (the dropped points' padding) adds each share
                grad_factor[layer].view(d, heads, -1).index_add_(2, columns, (rows.t() @ grad_scores).view(d, heads, c))
                grad_inducing[layer].index_add_(0, columns, grad_q.view(c, d))
                grad_z[:, layer].index_add_(1, columns, grad_z_layer)
            torch.mm(rows.t(), grad_values, out=grad_combined[layer])
            grad_nw[layer], grad_nb[layer], grad_bias[layer, 0] = grad_w, grad_b, grad_vb
            grad_pattern[layer] = grad_p.view(d, q)
        return (None, None, grad_rows, None, grad_factor, grad_combined, grad_bias, grad_inducing, grad_nw, grad_nb,
                grad_pattern, grad_z)


def native_dynamic_activation(lib: ctypes.CDLL, x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 13's f_D (:func:`apem.nn.selection.dynamic_activation`, the reference) through ``selection.c``: one pass
    forward and one backward instead of torch's seven elementwise ops and their backward."""
    return NativeDynamicActivation.apply(lib, x, float(gamma))


class NativeDynamicActivation(torch.autograd.Function):
    """Autograd for :func:`native_dynamic_activation`; saves x, and the backward takes f_D' from it."""

    @staticmethod
    def forward(ctx, lib, x, gamma):
        x = x.contiguous()
        out = torch.empty_like(x)
        lib.dynamic_activation_forward(x.numel(), _ptr(x), gamma, _threads(x.numel() // 64), _ptr(out))
        ctx.lib, ctx.gamma = lib, gamma
        ctx.save_for_backward(x)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        grad = grad.contiguous()  # held here: the kernel reads it by address
        grad_x = torch.empty_like(x)
        ctx.lib.dynamic_activation_backward(x.numel(), _ptr(x), ctx.gamma, _ptr(grad), _threads(x.numel() // 64),
                                            _ptr(grad_x))
        return None, grad_x, None


class PredictLayer(ctypes.Structure):
    """One layer's inputs to ``fused_predict.c`` (its ``PredictLayer``): the ASRG layer over the kept points,
    eq. 18's factor and the reading of a de-selected point."""

    _fields_ = [("pool", PoolLayer), ("Q", _I64), ("factor", _PTR), ("uniform", _I64), ("points", _I64),
                ("rest", _I64), ("exp_table", _PTR), ("logits", _PTR), ("logits_stride", _I64), ("columns", _PTR),
                ("gamma", ctypes.c_float)]


# exp(-MAX_EXP_RANGE) ~ 9e-27 stays a normal float32 (smallest ~1.2e-38) even summed over a few fields
MAX_EXP_RANGE = 60.0


def score_tables(lib: ctypes.CDLL, rows: torch.Tensor, factor: torch.Tensor, heads: int = 1,
                 columns: torch.Tensor | None = None, width: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """rows (U, d) times factor (d, C): the (U, C) score table, and exp(scores - their column maxima), the
    softmax weights of a point with z = 1 up to the normalisation (a shift per column cancels); None instead
    when a column spans more than :data:`MAX_EXP_RANGE`, where the smallest weights would underflow. With
    ``columns`` (P,) int64, factor is (d, M K) and each of its M = ``heads`` blocks is read at those columns,
    zero-padded to ``width``: tables (U, M width)."""
    rows, factor = rows.contiguous(), factor.contiguous()
    (u, d), c = rows.shape, factor.shape[1]
    k, p = c // heads, 0
    if columns is not None:
        c, p = heads * width, columns.numel()
    scores, exps = rows.new_empty(u, c), rows.new_empty(u, c)
    work = rows.new_empty((2 + (0 if columns is None else d)) * c)
    usable = lib.fused_predict_tables(_ptr(rows), u, d, _ptr(factor), heads, k,
                                      None if columns is None else _ptr(columns), p, c // heads, MAX_EXP_RANGE,
                                      _ptr(scores), _ptr(exps), _ptr(work))
    return scores, exps if usable else None


def distinct_rows(lib: ctypes.CDLL, x: torch.Tensor, offsets: torch.Tensor, table_rows: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The table rows that x (B, >= F) int64 looks up at x[:, f] + offsets[f] (F = offsets' length), ascending (U,),
    and where each lookup is among them (B, F), in one C pass (``distinct_rows.c``) with a flag per table row, as
    :meth:`apem.nn.layers.FieldEmbedding.distinct_rows` does in torch (its reference); IndexError for a lookup outside
    the table's ``table_rows`` rows."""
    x = x if x.stride(1) == 1 else x.contiguous()
    offsets = offsets.contiguous()
    b, f = x.shape[0], offsets.numel()
    rank, distinct = x.new_empty(table_rows), x.new_empty(table_rows)
    index = x.new_empty(b, f)
    count = lib.distinct_rows(b, f, _ptr(x), x.stride(0), _ptr(offsets), table_rows, _ptr(rank), _ptr(distinct),
                              _ptr(index))
    if count < 0:
        raise IndexError(f"an embedding lookup falls outside the table's {table_rows} rows")
    return distinct[:count], index


def kept_points(lib: ctypes.CDLL, logits: torch.Tensor, gamma: float, uniform: bool) -> list[tuple[torch.Tensor, int]]:
    """Per layer of eq. 11's selector logits (B, L', K), the points some row of the batch keeps (f_D != 0, see
    :func:`apem.nn.selection.deselected`), those kept by the most rows first: the kernel computes a sample's columns
    up to its last kept point. Their indices (P,) and the kernel's column count, a multiple of 8 (at least 8) from
    P. Under the uniform reading (``uniform``) the K - P dropped points share one row, which a row's own de-selected
    points output too (all-zero scores): the kernel counts them there, and in column P, past the kept ones, for a
    row that keeps all P; only then, with P a multiple of 8, does the count grow by 8."""
    b, layers, k = logits.shape
    logits = logits.contiguous()
    # per layer: how many rows keep each point, the points by that count, how many some row keeps, and the most one
    # row keeps (selection.c)
    counts, order = torch.empty(layers, k, dtype=torch.int64), torch.empty(layers, k, dtype=torch.int64)
    kept, most = torch.empty(layers, dtype=torch.int64), torch.empty(layers, dtype=torch.int64)
    lib.kept_order(b, layers, k, _ptr(logits), layers * k, gamma, _ptr(counts), _ptr(order), _ptr(kept), _ptr(most))
    points = []
    for layer, (p, widest) in enumerate(zip(kept.tolist(), most.tolist())):
        columns = max(8, -(-p // 8) * 8)
        if uniform and columns == p < k and widest == p:  # a row keeps all P: the shared row needs column P
            columns += 8
        points.append((order[layer, :p], columns))
    return points


def fused_predict(lib, rows, index, factor, logits, gamma: float, combined, bias, queries, norm_weight, norm_bias,
                  heads: int, eps: float, pattern_factor: torch.Tensor, uniform: bool) -> torch.Tensor:
    """Inference of :func:`apem.nn.attention.gathered_pool_norm` followed by
    :func:`apem.nn.attention.row_attention_pool`, in one kernel per layer that computes only the points some
    row of the batch keeps (``fused_predict.c``): pooled (L' B, Q, d_v) as ``row_attention_pool`` returns it,
    with ``pattern_factor`` (L', d_v, Q) and eq. 18's row weights z_K (``uniform`` False, "contributes
    nothing") or none (``uniform`` True). z_K = f_D(``logits`` (B, L', K)) with eq. 13's ``gamma`` is taken in
    the kernel; the other arguments as :func:`gathered_pool_norm_forward`'s."""
    n, b, (k, dv), q = factor.shape[0], index.shape[0], queries.shape[1:], pattern_factor.shape[2]
    _check_index(index, rows)
    pooled = rows.new_empty(n, b, q, dv)
    pattern_factor = pattern_factor.contiguous()
    logits = logits if logits.stride(2) == 1 else logits.contiguous()  # the kernel reads each row's K logits
    threads = _threads(b)
    values = value_table(rows, combined, bias, heads)  # (L', U, M d_v)
    for layer, (used, columns) in enumerate(kept_points(lib, logits, gamma, uniform)):
        # the kernel uses exps for the samples whose z is binary
        scores, exps = score_tables(lib, rows, factor[layer], heads, used, columns)
        pool = PoolLayer.of(scores, values[layer], index, logits[:, layer], queries[layer], norm_weight[layer],
                            norm_bias[layer], heads, eps, points=columns)
        pool.mask = None  # the kernel takes z from the logits, at the kept columns
        spec = PredictLayer(pool, q, _ptr(pattern_factor[layer]), int(uniform), used.numel(), k - used.numel(),
                            None if exps is None else _ptr(exps), _ptr(logits[:, layer]), logits.stride(0), _ptr(used),
                            gamma)
        work = torch.empty(threads, lib.fused_predict_work_floats(ctypes.byref(spec)))
        lib.fused_predict(ctypes.byref(spec), b, threads, _ptr(pooled[layer]), _ptr(work))
    return pooled.view(n * b, q, dv)


def pattern_chain(lib: ctypes.CDLL, task_parts: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """Eq. 19's chain of :meth:`apem.nn.attention.PatternSelector.chain` per sample in C (``pattern_chain.c``),
    task_parts F (L, B, N, d), norm_weight and norm_bias (L, d) -> T^L (B, N, d); differentiable
    (:class:`NativePatternChain`) where gradients are on."""
    if torch.is_grad_enabled():
        return NativePatternChain.apply(lib, task_parts, norm_weight, norm_bias, eps)
    return _pattern_chain_forward(lib, task_parts, norm_weight, norm_bias, eps, for_backward=False)[0]


def pattern_chain_pooled(lib: ctypes.CDLL, pooled: torch.Tensor, combined: torch.Tensor, bias: torch.Tensor,
                         norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Inference: :meth:`apem.nn.attention.PatternSelector.from_pooled` in one C pass (``pattern_chain.c``), eq. 16's
    W^V W^O per task and eq. 19's chain, from eq. 18's pooled rows (L, B, N, M d), combined (L, M d, d) and bias
    (L, 1, d) (:meth:`apem.nn.attention.FactoredAttention.value_out`) and the norms' (L, d) -> T^L (B, N, d)."""
    n, b, tasks, width = pooled.shape
    d = combined.shape[-1]
    pooled, combined, bias = pooled.contiguous(), combined.contiguous(), bias.reshape(n, d).contiguous()
    norm_weight, norm_bias = norm_weight.contiguous(), norm_bias.contiguous()
    out = pooled.new_empty(b, tasks, d)
    lib.pattern_chain_pooled(n, b, tasks, d, width, _ptr(pooled), _ptr(combined), _ptr(bias), _ptr(norm_weight),
                             _ptr(norm_bias), eps, _threads(b), _ptr(out))
    return out


def _pattern_chain_forward(lib: ctypes.CDLL, task_parts: torch.Tensor, norm_weight: torch.Tensor,
                           norm_bias: torch.Tensor, eps: float, for_backward: bool
                           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """T^L (B, N, d) and, ``for_backward``, each layer's normalised rows (L, B, N, d) and 1 / sigma (L, B, N)."""
    n, b, tasks, d = task_parts.shape
    task_parts, norm_weight, norm_bias = task_parts.contiguous(), norm_weight.contiguous(), norm_bias.contiguous()
    out = task_parts.new_empty(b, tasks, d)
    xhat = torch.empty_like(task_parts) if for_backward else None
    rstd = task_parts.new_empty(n, b, tasks) if for_backward else None
    lib.pattern_chain(n, b, tasks, d, _ptr(task_parts), _ptr(norm_weight), _ptr(norm_bias), eps, _threads(b), _ptr(out),
                      None if xhat is None else _ptr(xhat), None if rstd is None else _ptr(rstd))
    return out, xhat, rstd


class NativePatternChain(torch.autograd.Function):
    """Autograd for eq. 19's chain through ``pattern_chain.c``: forward saves each layer's normalised rows and
    1 / sigma (as torch's LayerNorm would), backward runs the chain back per sample."""

    @staticmethod
    def forward(ctx, lib, task_parts, norm_weight, norm_bias, eps):
        out, xhat, rstd = _pattern_chain_forward(lib, task_parts, norm_weight, norm_bias, eps, for_backward=True)
        ctx.lib = lib
        ctx.save_for_backward(norm_weight.contiguous(), xhat, rstd)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        norm_weight, xhat, rstd = ctx.saved_tensors
        n, b, tasks, d = xhat.shape
        grad_out, threads = grad_out.contiguous(), _threads(b)  # held here: the kernel reads it through a raw pointer
        grad_parts = torch.empty_like(xhat)
        # zeroed here: a slot the OpenMP runtime gives no thread to (it may give fewer than asked) adds nothing
        slots = xhat.new_zeros(threads, ctx.lib.pattern_chain_slot_floats(n, d))
        ctx.lib.pattern_chain_backward(n, b, tasks, d, _ptr(norm_weight), _ptr(xhat), _ptr(rstd),
                                       _ptr(grad_out), threads, _ptr(grad_parts), _ptr(slots))
        grad_weight, grad_bias = slots.sum(0).view(2, n, d)
        return None, grad_parts, grad_weight, grad_bias, None


def row_pool_forward(lib: ctypes.CDLL, factor: torch.Tensor, row_weights: torch.Tensor | None,
                     shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """factor (L', d, Q), row_weights (L', B, R) or None, shared (L', B, R, d) -> pooled (L', B, Q, d), the softmax
    weights (L', Q, B, R) and, with row weights, q = e / sum_r(z e) (L', Q, B, R), else None."""
    n, b, r, d = shared.shape
    queries = factor.shape[2]
    shared, factor = shared.contiguous(), factor.contiguous()
    weights = shared.new_empty(n, queries, b, r)
    q = torch.empty_like(weights) if row_weights is not None else None
    row_weights = None if row_weights is None else row_weights.contiguous()
    pooled = shared.new_empty(n, b, queries, d)
    threads = _threads(b)
    work = torch.empty(threads, lib.row_attention_pool_work_floats(r, queries, d))
    for layer in range(n):
        lib.row_attention_pool_forward(
            b, threads, r, queries, d, _ptr(factor[layer]), _ptr(weights[layer]), _layer_ptr(q, layer),
            _layer_ptr(row_weights, layer), _ptr(shared[layer]), _ptr(pooled[layer]), _ptr(work))
    return pooled, weights, q


def row_pool_backward(lib: ctypes.CDLL, factor: torch.Tensor, weights: torch.Tensor, q: torch.Tensor | None,
                      shared: torch.Tensor, grad_pooled: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The per-sample backward of :func:`row_pool_forward`: the gradient of shared (L', B, R, d) through the
    pooling and the scores, the factor's gradient (L', d, Q) and, with q, the row weights' gradient (L', B, R)."""
    n, queries, b, r = weights.shape
    d = shared.shape[3]
    grad_pooled, factor = grad_pooled.contiguous(), factor.contiguous()
    grad_shared, grad_factor = torch.empty_like(shared), torch.empty_like(factor)
    grad_rw = shared.new_empty(n, b, r) if q is not None else None
    threads = _threads(b)
    work = torch.empty(threads, lib.row_attention_pool_work_floats(r, queries, d))
    # zeroed here too: a slot the OpenMP runtime gives no thread to (it may give fewer than asked) adds nothing
    slots = torch.zeros(threads, queries, lib.row_attention_pool_factor_slot_floats(queries, d) // queries)
    for layer in range(n):
        lib.row_attention_pool_backward(
            b, threads, r, queries, d, _ptr(factor[layer]), _ptr(weights[layer]), _layer_ptr(q, layer),
            _ptr(shared[layer]), _ptr(grad_pooled[layer]), _ptr(grad_shared[layer]), _ptr(slots),
            _layer_ptr(grad_rw, layer), _ptr(work))
        torch.sum(slots[:, :, :d], dim=0, out=grad_factor[layer].t())  # (Q, d) summed over the threads
    return grad_shared, grad_factor, grad_rw
