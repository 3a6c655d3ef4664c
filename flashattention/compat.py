"""flash-attn 2's functions on this package's kernels: `from flashattention.compat import flash_attn_func`.

Same names, argument order, defaults, BSHD layout and return values as flash-attn 2 (flash_attn_interface),
so code written for flash-attn runs unchanged where it uses what we implement. The tensors reach the
kernels as views (BSHD is a transposed BHSD view, packed qkv/kv are unbound), never copied; the differences
from flash-attn are listed in docs/compat.md. In short:

- dropout_p != 0, softcap != 0 and alibi_slopes raise NotImplementedError naming the argument;
  deterministic is accepted either way (our backward is always deterministic).
- return_attn_probs=True returns (out, softmax_lse, None): flash-attn returns the probabilities only with
  dropout_p > 0 (for its tests), which we do not implement.
- causal and window_size follow flash-attn's host rule (compat checks: _validation_compat.flash_window):
  bottom-right alignment, causal sets right = 0 whatever right was given, negative bounds are unbounded.
- every function takes one extra keyword-only argument, backend ("auto" | "triton" | "torch", as
  flash_attention's).
"""

from __future__ import annotations

import torch

from . import _validation, api
from . import _validation_compat as _vc
from ._autograd import plain
from .api import flash_attention_varlen

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
]

Out = torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]


def flash_attn_func(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False, return_attn_probs: bool = False, *, backend: str = "auto",
) -> Out:  # fmt: skip
    """flash-attn's flash_attn_func. q: [batch, seqlen_q, heads, head_dim]; k, v: [batch, seqlen_k,
    kv_heads, head_dim] (heads % kv_heads == 0). Returns out [batch, seqlen_q, heads, head_dim] or, with
    return_attn_probs, (out, softmax_lse [batch, heads, seqlen_q] float32, None). Differentiable.

    causal is bottom-right aligned (query i sees keys j <= i + seqlen_k - seqlen_q); window_size (left,
    right): query i sees keys in [i + off - left, i + off + right], -1 (any negative) unbounded; causal sets
    right = 0. softmax_scale defaults to 1/sqrt(head_dim)."""
    what = "flash_attn_func"
    _check_common(what, dropout_p, softcap, alibi_slopes, deterministic, return_attn_probs)
    _validation.check_qkv(q, k, v, "bshd", what)
    return _bshd(what, q, k, v, softmax_scale, causal, window_size, return_attn_probs, backend)


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False, return_attn_probs: bool = False, *, backend: str = "auto",
) -> Out:  # fmt: skip
    """flash-attn's flash_attn_qkvpacked_func: qkv [batch, seqlen, 3, heads, head_dim] (q, k, v are views
    of it; the gradient flows back into qkv). Otherwise as flash_attn_func."""
    what = "flash_attn_qkvpacked_func"
    _check_common(what, dropout_p, softcap, alibi_slopes, deterministic, return_attn_probs)
    _vc.check_packed(what, "qkv", qkv, 3)
    q, k, v = qkv.unbind(2)
    return _bshd(what, q, k, v, softmax_scale, causal, window_size, return_attn_probs, backend)


def flash_attn_kvpacked_func(
    q: torch.Tensor, kv: torch.Tensor,
    dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False, return_attn_probs: bool = False, *, backend: str = "auto",
) -> Out:  # fmt: skip
    """flash-attn's flash_attn_kvpacked_func: q [batch, seqlen_q, heads, head_dim], kv [batch, seqlen_k, 2,
    kv_heads, head_dim] (k, v are views of it). Otherwise as flash_attn_func."""
    what = "flash_attn_kvpacked_func"
    _check_common(what, dropout_p, softcap, alibi_slopes, deterministic, return_attn_probs)
    _vc.check_packed(what, "kv", kv, 2)
    k, v = kv.unbind(2)
    _validation.check_qkv(q, k, v, "bshd", what)
    return _bshd(what, q, k, v, softmax_scale, causal, window_size, return_attn_probs, backend)


def flash_attn_varlen_func(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False, return_attn_probs: bool = False, block_table: torch.Tensor | None = None,
    *, backend: str = "auto",
) -> Out:  # fmt: skip
    """flash-attn's flash_attn_varlen_func, on flashattention.flash_attention_varlen. q: [total_q, heads,
    head_dim], k, v: [total_k, kv_heads, head_dim], sequence b being rows [cu_seqlens[b], cu_seqlens[b+1])
    (int32, batch + 1 values from 0). Masks per sequence, bottom-right with that sequence's own offset.
    Returns out [total_q, heads, head_dim] or, with return_attn_probs, (out, softmax_lse [heads, total_q]
    float32, None). block_table (paged varlen) raises NotImplementedError."""
    what = "flash_attn_varlen_func"
    _check_common(what, dropout_p, softcap, alibi_slopes, deterministic, return_attn_probs)
    _vc.check_unsupported(what, block_table=block_table)
    _validation.check_int(what, "max_seqlen_k", max_seqlen_k)
    window = _vc.flash_window(what, causal, window_size, max_seqlen_k)
    result = flash_attention_varlen(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal=False,
        softmax_scale=softmax_scale,
        window_size=window,
        return_lse=return_attn_probs,
        backend=backend,
    )
    return (*result, None) if return_attn_probs else result


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """flash-attn's flash_attn_with_kvcache: optionally appends k, v to the cache in place, then attends q
    over each row's cached tokens. Inference only (a call that would record a gradient raises).

    Shapes: q [batch, seqlen_q, heads, head_dim]; k_cache, v_cache [batch_cache, capacity, kv_heads,
    head_dim] (the caller's tensors, written in place at the new tokens' positions), or with block_table
    (int32 [batch, max_blocks]) block pools [num_blocks, block_size, kv_heads, head_dim] where token p of
    row b is block block_table[b, p // block_size], row p % block_size; k, v [batch, seqlen_new, kv_heads,
    head_dim] go to positions cache_seqlens[b] + [0, seqlen_new) of row b (cache_seqlens then required).
    cache_seqlens: int or int32/int64 [batch], each row's tokens before the append (None: the whole
    capacity; not updated by the call). cache_batch_idx [batch]: q's row b uses cache row
    cache_batch_idx[b]. cache_leftpad [batch]: row b's tokens start at position cache_leftpad[b] (they are
    [cache_leftpad[b], cache_seqlens[b] + seqlen_new)). rotary_cos, rotary_sin [seqlen_ro >= capacity,
    rotary_dim / 2]: the new k is rotated at its cache positions, q too when causal or with a window, else
    every query at position cache_seqlens[b]; the first rotary_dim dims, in pairs (2i, 2i+1) when
    rotary_interleaved, else (i, i + rotary_dim / 2). Masks as flash_attn_func, per row with offset
    (row's tokens) - seqlen_q. num_splits is accepted and ignored (our split heuristic decides).
    Returns out [batch, seqlen_q, heads, head_dim] and, with return_softmax_lse, lse [batch, heads,
    seqlen_q] float32."""
    what = "flash_attn_with_kvcache"
    _vc.check_unsupported(what, softcap=softcap, alibi_slopes=alibi_slopes)
    _validation.check_bool(what, "return_softmax_lse", return_softmax_lse)
    plan = _vc.check_kvcache(
        what,
        q,
        k_cache,
        v_cache,
        k,
        v,
        cache_seqlens,
        cache_batch_idx,
        cache_leftpad,
        block_table,
        rotary_cos,
        rotary_sin,
        rotary_interleaved,
        num_splits,
    )
    scale = _validation.check_scale(softmax_scale, q.shape[-1], what)
    left, right = _vc.flash_window(what, causal, window_size, plan.capacity)
    backend = _validation.pick_backend(backend, q.device, what)
    _vc.check_kvcache_grad(what, api._needs_grad(q, k_cache, v_cache, *((k, v) if k is not None else ())))
    _validation.check_paged_backend(what, backend, plain(q, k_cache, v_cache))
    if backend == "triton" and not plan.paged and plan.starts is not None:  # before anything is written
        _vc.token_pool_strides(what, k_cache)
        _vc.token_pool_strides(what, v_cache)
    if rotary_cos is not None:
        seqlen_q, new = q.shape[1], k.shape[1]
        steps = left >= 0 or right >= 0  # causal or local: query i at cache_seqlens + i
        q = _rotary(q, rotary_cos, rotary_sin, _positions(plan.seqlens, seqlen_q, steps), rotary_interleaved)
        k = _rotary(k, rotary_cos, rotary_sin, _positions(plan.seqlens, new, True), rotary_interleaved)
    if k is not None and plan.new_tokens:
        _append(k_cache, v_cache, k, v, plan, block_table)
    left, right = api.normalise_window(left, right, q.shape[1], plan.capacity)
    call = api.CacheCall(scale, left, right, backend)
    if backend == "triton":
        out, lse = _attend_triton(q.transpose(1, 2), k_cache, v_cache, plan, block_table, call)
    else:
        out, lse = _attend_rows(q.transpose(1, 2), k_cache, v_cache, plan, block_table, call)
    out = out.transpose(1, 2)
    return (out, lse) if return_softmax_lse else out


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _check_common(what: str, dropout_p, softcap, alibi_slopes, deterministic, return_attn_probs) -> None:
    _vc.check_unsupported(what, dropout_p=dropout_p, softcap=softcap, alibi_slopes=alibi_slopes)
    _vc.check_deterministic(what, deterministic)
    _validation.check_bool(what, "return_attn_probs", return_attn_probs)


def _bshd(what: str, q, k, v, softmax_scale, causal, window_size, return_attn_probs, backend: str) -> Out:
    """flash_attention on BSHD views, with flash-attn's window rule applied here (causal folded into it)."""
    window = _vc.flash_window(what, causal, window_size, k.shape[1])
    result = api.dense_attention(
        q, k, v, False, softmax_scale, window, return_attn_probs, backend, "bshd", what
    )
    return (*result, None) if return_attn_probs else result


def _positions(seqlens: torch.Tensor, count: int, steps: bool) -> torch.Tensor:
    """int64 [batch, count]: cache_seqlens[b] + i (steps) or cache_seqlens[b] for every i."""
    offsets = torch.arange(count, device=seqlens.device) if steps else seqlens.new_zeros(count)
    return seqlens[:, None] + offsets[None, :]


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions, interleaved: bool):
    """x [batch, seqlen, heads, head_dim] with its first rotary_dim = 2 * cos.shape[1] dims rotated by the
    angles of rows `positions` [batch, seqlen] (computed in float32, returned in x's dtype: a new tensor)."""
    half = cos.shape[1]
    c = cos[positions].float()[:, :, None, :]  # [batch, seqlen, 1, half]
    s = sin[positions].float()[:, :, None, :]
    rot = x[..., : 2 * half].float()
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., 2 * half :]), dim=-1)


@torch.no_grad()
def _append(k_cache, v_cache, k, v, plan: _vc.KVCachePlan, block_table) -> None:
    """Writes k, v [batch, new, kv_heads, head_dim] at positions cache_seqlens[b] + [0, new) of each row, in
    place (one index_put per tensor; positions checked against the capacity)."""
    positions = _positions(plan.seqlens, plan.new_tokens, True)  # [batch, new]
    if plan.paged:
        block_size = k_cache.shape[1]
        index = (block_table.long().gather(1, positions // block_size), positions % block_size)
    else:
        rows = torch.arange(plan.batch, device=k_cache.device) if plan.batch_idx is None else plan.batch_idx
        index = (rows[:, None].expand_as(positions), positions)
    k_cache.index_put_(index, k)
    v_cache.index_put_(index, v)


def _attend_triton(q, k_cache, v_cache, plan: _vc.KVCachePlan, block_table, call: api.CacheCall):
    """The split-KV decode kernel on views of the caller's cache (any number of queries per row):
    dense rows as [batch, kv_heads, capacity, head_dim] views; a paged pool as [num_blocks, kv_heads,
    block_size, head_dim] views; cache_batch_idx as pages of a whole row each (table [batch, 1]);
    cache_leftpad as one-token pages (a table of each row's token positions, built here)."""
    from .kernels import launch_decode

    lengths, table = plan.ends, block_table
    if plan.paged:
        k_view, v_view = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    elif plan.starts is not None:
        m = k_cache.stride(0) // k_cache.stride(1)  # one-token pages (strides checked by the caller)
        k_view, v_view = (_token_pool(c, m) for c in (k_cache, v_cache))
        ends = plan.ends if plan.ends is not None else torch.full_like(plan.starts, plan.capacity)
        lengths = (ends - plan.starts).to(torch.int32)
        rows = torch.arange(plan.batch, device=q.device) if plan.batch_idx is None else plan.batch_idx
        offsets = torch.arange(max(plan.longest, 1), device=q.device)
        table = (rows[:, None] * m + plan.starts[:, None] + offsets[None, :]).clamp_(max=k_view.shape[0] - 1)
        table = table.to(torch.int32)
    elif plan.batch_idx is not None:
        k_view, v_view = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # one page per cache row
        table = plan.batch_idx.to(torch.int32)[:, None]
        if lengths is None:
            lengths = torch.full((plan.batch,), plan.capacity, dtype=torch.int32, device=q.device)
    else:
        k_view, v_view = (c[: plan.batch].transpose(1, 2) for c in (k_cache, v_cache))
    if lengths is not None:
        lengths = lengths.to(torch.int32)
    return launch_decode.decode_forward(
        q,
        k_view,
        v_view,
        **call.mask(),
        cache_seqlens=lengths,
        block_table=table,
        max_seqlen_k=plan.longest,
    )


def _token_pool(cache: torch.Tensor, m: int) -> torch.Tensor:
    """cache [batch_cache, capacity, kv_heads, head_dim] as one-token pages [pages, kv_heads, 1, head_dim]
    (a view): token (b, s) is page b * m + s (m = batch stride / sequence stride)."""
    pages = (cache.shape[0] - 1) * m + cache.shape[1]
    stride_s, stride_h, stride_d = cache.stride(1), cache.stride(2), cache.stride(3)
    return cache.as_strided(
        (pages, cache.shape[2], 1, cache.shape[3]),
        (stride_s, stride_h, stride_s, stride_d),
        cache.storage_offset(),
    )


def _attend_rows(q, k_cache, v_cache, plan: _vc.KVCachePlan, block_table, call: api.CacheCall):
    """The torch backend: one blockwise call per row on its tokens (views of a dense cache; a paged row's
    blocks gathered), reading the lengths on the host (one sync)."""
    ends = plan.ends.tolist() if plan.ends is not None else [plan.capacity] * plan.batch
    starts = plan.starts.tolist() if plan.starts is not None else [0] * plan.batch
    rows = plan.batch_idx.tolist() if plan.batch_idx is not None else range(plan.batch)

    def kv_row(b: int, row: int, start: int, end: int):
        if plan.paged:
            blocks = block_table[b, : -(-end // k_cache.shape[1])].long()
            k_row, v_row = (c[blocks].flatten(0, 1)[:end] for c in (k_cache, v_cache))
        else:
            k_row, v_row = (c[row, start:end] for c in (k_cache, v_cache))
        return tuple(t.transpose(0, 1)[None] for t in (k_row, v_row))  # [1, kv_heads, n, head_dim]

    per_row = zip(rows, starts, ends, strict=True)
    return api.attention_per_row(q, (kv_row(b, *r) for b, r in enumerate(per_row)), call)
