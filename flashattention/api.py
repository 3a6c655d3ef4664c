"""Public attention functions: validation, canonical mask arguments, backend choice."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _validation
from ._autograd import attention, lse_of, plain

# Up to this many queries per sequence, an inference call (no gradient) runs the split-KV decode kernel
# (kernels/decode.py), which spreads the keys over the SMs; longer ones, and calls that need gradients,
# run the forward kernel.
DECODE_MAX_QUERIES = 16


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention, differentiable in q, k and v, in O(seqlen) memory.

    Shapes (BHSD): q: [batch, heads, seqlen_q, head_dim]; k, v: [batch, kv_heads, seqlen_k, head_dim] with
    heads % kv_heads == 0 (GQA/MQA: query head h reads kv head h // (heads // kv_heads)); returns out:
    [batch, heads, seqlen_q, head_dim] in q's dtype and, with return_lse=True, also lse: [batch, heads,
    seqlen_q], float32, the natural log-sum-exp of the scaled scores (not differentiable).

    Masking, with off = seqlen_k - seqlen_q (bottom-right alignment, as flash-attn >= 2.1):
      - causal=True: query i sees key j iff j <= i + off (the same as window_size=(left, 0)).
      - window_size=(left, right): query i sees key j iff i + off - left <= j <= i + off + right;
        -1 means unbounded on that side.
    A query row that sees no key returns 0 and lse -inf.

    softmax_scale defaults to 1/sqrt(head_dim). float32 inputs follow
    torch.get_float32_matmul_precision(): "highest" uses IEEE fp32 products, "high"/"medium" allow tf32.
    backend: "triton" (CUDA; on CPU under TRITON_INTERPRET=1), "torch" (blockwise PyTorch, any device) or
    "auto" (triton on CUDA, torch elsewhere). An explicit backend never falls back: it runs or raises.
    Inputs whose last dimension is not contiguous are copied once (other strides are used as they are).
    With backend "triton", an inference call (no gradient recorded) with at most DECODE_MAX_QUERIES query
    rows per sequence runs the split-KV decode kernel; its result follows the same rules.
    """
    _validation.check_qkv(q, k, v)
    scale = _validation.check_scale(softmax_scale, q.shape[-1])
    left, right = _validation.canonical_window(causal, window_size)
    backend = _validation.pick_backend(backend, q.device)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if backend == "triton" and _decode_applies(q, k, v):
        from .kernels import launch_decode

        out, lse = launch_decode.decode_forward(q, k, v, softmax_scale=scale, left=left, right=right)
        return (out, lse) if return_lse else out
    out, stats = attention(q, k, v, scale, left, right, backend)
    return (out, lse_of(stats, backend)) if return_lse else out


def _decode_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Few queries, no gradient to record, eager plain tensors (torch.compile keeps the custom op)."""
    if q.shape[2] > DECODE_MAX_QUERIES or not plain(q, k, v):
        return False
    return not _needs_grad(q, k, v)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class CacheCall(NamedTuple):
    """The checked, canonical arguments of an attention call over a cache."""

    softmax_scale: float
    left: int
    right: int
    backend: str


def check_cache_call(
    what: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float | None,
    window_size: tuple[int, int],
    backend: str,
    per_row: bool,
    cache_storage: tuple[torch.Tensor, ...] = (),
) -> CacheCall:
    """Every check of an attention call over a cache, made before anything is appended: q against k, v (the
    cache's valid part or the new tokens, which match it), the mask arguments, the backend and, for a cache
    with per-row lengths (per_row), whether the backend can run it (cache_storage: the cache's tensors,
    which may carry gradients of earlier appends)."""
    _validation.check_qkv(q, k, v)
    scale = _validation.check_scale(softmax_scale, q.shape[-1])
    left, right = _validation.canonical_window(causal, window_size)
    backend = _validation.pick_backend(backend, q.device)
    if per_row:
        _validation.check_seqlens_backend(
            what,
            backend,
            q.shape[2],
            DECODE_MAX_QUERIES,
            needs_grad=_needs_grad(q, k, v, *cache_storage),
            plain=plain(q, k, v, *cache_storage),
            capturing=q.is_cuda and torch.cuda.is_current_stream_capturing(),
        )
    return CacheCall(scale, left, right, backend)


def attention_with_seqlens(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor,
    call: CacheCall,
) -> torch.Tensor:
    """Attention over a cache whose rows hold different numbers of tokens (inputs checked by
    check_cache_call). q: [batch, heads, seqlen_q, head_dim]; k, v: [batch, kv_heads, seqlen_k, head_dim] of
    which row b's keys are the first cache_seqlens[b] (int32 [batch] on k's device, each <= seqlen_k).
    Each row applies the mask with its own bottom-right offset cache_seqlens[b] - seqlen_q. Returns out
    [batch, heads, seqlen_q, head_dim]. triton: the split-KV decode kernel; torch: one blockwise call per
    row on its sliced K/V (one device sync for the lengths)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if call.backend == "triton":
        from .kernels import launch_decode

        out, _ = launch_decode.decode_forward(
            q,
            k,
            v,
            softmax_scale=call.softmax_scale,
            left=call.left,
            right=call.right,
            cache_seqlens=cache_seqlens,
        )
        return out
    rows = [
        attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], *call)[0]
        for b, n in enumerate(cache_seqlens.tolist())
    ]
    return torch.cat(rows) if rows else q.new_zeros(q.shape)


def attention_right_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor,
    call: CacheCall,
) -> torch.Tensor:
    """Attention of right-padded prompts: q [batch, heads, padded_len, head_dim] and k, v [batch, kv_heads,
    padded_len, head_dim] padded alike, row b's first cache_seqlens[b] positions real. Query i of row b is
    token i and sees keys j < cache_seqlens[b] under the mask with offset 0 (the row's own query and key
    counts are equal), i.e. attention_with_seqlens on q moved to the end of each row (query i at position
    padded_len - cache_seqlens[b] + i), moved back. Outputs at padding positions (i >= cache_seqlens[b])
    are what that rule gives the queries moved before the row's keys (0 when causal): ignore them."""
    padded_len = q.shape[2]
    if padded_len == 0:
        return attention_with_seqlens(q, k, v, cache_seqlens, call)
    positions = torch.arange(padded_len, device=q.device)
    shift = cache_seqlens.to(torch.long)[:, None]  # [batch, 1]
    to_end = ((positions + shift) % padded_len)[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])
    out = attention_with_seqlens(q.gather(2, to_end), k, v, cache_seqlens, call)
    back = ((positions - shift) % padded_len)[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])
    return out.gather(2, back)
