"""Calls into the C kernels of APEM's two attention poolings (``apem/resources/kernels``, built by
:mod:`apem.nn.native`); :mod:`apem.nn.attention` holds the torch reference of each.

- One :func:`apem.nn.attention.gathered_pool` layer (``gathered_pool.c``): per sample, the kernel
  computes the (S, M, K) softmax weights, pools the value rows and adds eq. 17's residual while
  the weights are in cache; the backward recomputes them (cheaper than writing 32 KB a row per
  layer out and reading them back). The score and value tables stay torch GEMMs, and so do their
  gradients' products with the weights.
- :func:`apem.nn.attention.row_attention_pool` (``row_attention_pool.c``): the per-sample softmax,
  pooling and their backward products; the score GEMM and the products with the factor stay in torch.

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
def _typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    signatures = {
        "gathered_pool_work_floats": ([_I64] * 4, _I64),
        "gathered_pool_forward": ([_I64] * 6 + [_PTR] * 4 + [_I64] + [_PTR] * 3, None),
        "gathered_pool_backward": ([_I64] * 6 + [_PTR] * 4 + [_I64] + [_PTR] * 2 + [_PTR, _I64] * 4 + [_PTR], None),
        "row_attention_pool_work_floats": ([_I64] * 2, _I64),
        "row_attention_pool_forward": ([_I64] * 5 + [_PTR] * 5, None),
        "row_attention_pool_backward": ([_I64] * 5 + [_PTR] * 8, None),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


def native_library(*tensors: torch.Tensor | None) -> ctypes.CDLL | None:
    """The compiled kernels when every tensor given is a float32 CPU tensor and the kernels are built, else None."""
    if any(t is not None and (t.device.type != "cpu" or t.dtype != torch.float32) for t in tensors):
        return None
    lib = load_kernels()
    return None if lib is None else _typed(lib)


def typed_library(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` (from :func:`apem.nn.native.load_kernels`, e.g. another build of the kernels) with its signatures set."""
    return _typed(lib)


def _threads(rows: int) -> int:
    """Threads for a batch of ``rows``: torch's (the kernels run on its OpenMP pool), with at least 64 rows each."""
    return max(1, min(torch.get_num_threads(), rows // 64))


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _checked_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.stride(1) == 1 else mask.contiguous()


def pool_forward(lib: ctypes.CDLL, score_table: torch.Tensor, value_table: torch.Tensor, index: torch.Tensor,
                 mask: torch.Tensor, queries: torch.Tensor, heads: int, out: torch.Tensor) -> None:
    """Writes O + I (.) z_K (B, K, d_v) into ``out``. score_table (U, M K), value_table (U, M d_v) (bias / M
    included), index (B, S) int64, mask (B, K) with unit column stride, queries (K, d_v)."""
    b, s = index.shape
    k, dv = queries.shape
    mask = _checked_mask(mask)
    score_table, value_table, index, queries = (t.contiguous() for t in (score_table, value_table, index, queries))
    threads = _threads(b)
    work = torch.empty(threads, lib.gathered_pool_work_floats(s, heads, k, dv))
    lib.gathered_pool_forward(b, threads, s, heads, k, dv, _ptr(score_table), _ptr(value_table), _ptr(index),
                              _ptr(mask), mask.stride(0), _ptr(queries), _ptr(out), _ptr(work))


def pool_backward(lib: ctypes.CDLL, score_table: torch.Tensor, value_table: torch.Tensor, index: torch.Tensor,
                  mask: torch.Tensor, queries: torch.Tensor, heads: int, grad_out: torch.Tensor,
                  grad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`pool_forward`'s tables (U, M K), (U, M d_v) and queries (K, d_v); writes
    d/d mask (B, K) into ``grad_mask`` (unit column stride)."""
    b, s = index.shape
    (u, mk), (k, dv) = score_table.shape, queries.shape
    mask = _checked_mask(mask)
    score_table, value_table, index, queries, grad_out = (
        t.contiguous() for t in (score_table, value_table, index, queries, grad_out))
    threads = _threads(b)
    grad_scores, grad_values = score_table.new_zeros(threads, u, mk), value_table.new_zeros(threads, u, heads * dv)
    grad_queries = queries.new_zeros(threads, k, dv)
    work = torch.empty(threads, lib.gathered_pool_work_floats(s, heads, k, dv))
    lib.gathered_pool_backward(b, threads, s, heads, k, dv, _ptr(score_table), _ptr(value_table), _ptr(index),
                               _ptr(mask), mask.stride(0), _ptr(queries), _ptr(grad_out),
                               _ptr(grad_scores), u * mk, _ptr(grad_values), u * heads * dv, _ptr(grad_mask),
                               grad_mask.stride(0), _ptr(grad_queries), k * dv, _ptr(work))
    if threads == 1:
        return grad_scores[0], grad_values[0], grad_queries[0]
    return grad_scores.sum(0), grad_values.sum(0), grad_queries.sum(0)


def _optional_ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def row_pool_forward(lib: ctypes.CDLL, scores: torch.Tensor, row_weights: torch.Tensor | None,
                     shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """scores (L', Q, B, R) (contiguous; replaced by the softmax weights), row_weights (L', B, R) or None,
    shared (L', B, R, d) contiguous -> pooled (L', B, Q, d), the weights (``scores``) and, with row weights,
    q = e / sum_r(z e) (L', Q, B, R), else None."""
    n, queries, b, r = scores.shape
    d = shared.shape[3]
    q = torch.empty_like(scores) if row_weights is not None else None
    row_weights = None if row_weights is None else row_weights.contiguous()
    pooled = shared.new_empty(n, b, queries, d)
    for layer in range(n):
        lib.row_attention_pool_forward(
            b, _threads(b), r, queries, d, _ptr(scores[layer]), _optional_ptr(None if q is None else q[layer]),
            _optional_ptr(None if row_weights is None else row_weights[layer]), _ptr(shared[layer]), _ptr(pooled[layer]))
    return pooled, scores, q


def row_pool_backward(lib: ctypes.CDLL, weights: torch.Tensor, q: torch.Tensor | None, shared: torch.Tensor,
                      grad_pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The per-sample backward of :func:`row_pool_forward`: grad through the pooling to shared (L', B, R, d),
    the scores' gradient (L', Q, B, R) and, with q, the row weights' gradient (L', B, R)."""
    n, queries, b, r = weights.shape
    d = shared.shape[3]
    grad_pooled = grad_pooled.contiguous()
    grad_shared, grad_scores = torch.empty_like(shared), torch.empty_like(weights)
    grad_rw = shared.new_empty(n, b, r) if q is not None else None
    threads = _threads(b)
    work = torch.empty(threads, lib.row_attention_pool_work_floats(r, queries))
    for layer in range(n):
        lib.row_attention_pool_backward(
            b, threads, r, queries, d, _ptr(weights[layer]), _optional_ptr(None if q is None else q[layer]),
            _ptr(shared[layer]), _ptr(grad_pooled[layer]), _ptr(grad_shared[layer]), _ptr(grad_scores[layer]),
            _optional_ptr(None if grad_rw is None else grad_rw[layer]), _ptr(work))
    return grad_shared, grad_scores, grad_rw
