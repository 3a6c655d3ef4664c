"""Public attention functions: validation, canonical mask arguments, backend choice."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _validation
from ._autograd import attention, kernel_layout, lse_of, plain

# Up to this many queries per sequence, an inference call (no gradient) runs the split-KV decode kernel
# (kernels/decode.py), which spreads the keys over the SMs; longer ones, and calls that need gradients,
# run the forward kernel.
DECODE_MAX_QUERIES = 16


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    causal: bool = False, softmax_scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
    return_lse: bool = False, backend: str = "auto", layout: str = "bhsd", **unsupported: object,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Exact softmax attention, differentiable in q, k and v, in O(seqlen) memory.

    Shapes (layout="bhsd", as SDPA): q: [batch, heads, seqlen_q, head_dim]; k, v: [batch, kv_heads,
    seqlen_k, head_dim] with heads % kv_heads == 0 (GQA/MQA: query head h reads kv head h // (heads //
    kv_heads)); returns out: [batch, heads, seqlen_q, head_dim] in q's dtype and, with return_lse=True, also
    lse: [batch, heads, seqlen_q], float32, the natural log-sum-exp of the scaled scores (not
    differentiable). layout="bshd" (as flash-attn): q [batch, seqlen_q, heads, head_dim], k, v [batch,
    seqlen_k, kv_heads, head_dim], out [batch, seqlen_q, heads, head_dim] (a transposed view of a BHSD
    result, no copy either way); lse stays [batch, heads, seqlen_q].

    Masking, with off = seqlen_k - seqlen_q (bottom-right alignment, as flash-attn >= 2.1):
      - causal=True: query i sees key j iff j <= i + off (the same as window_size=(-1, 0)).
      - window_size=(left, right): query i sees key j iff i + off - left <= j <= i + off + right;
        -1 means unbounded on that side. Any non-negative int is valid; one that hides no key is -1.
    A query row that sees no key returns 0 and lse -inf.

    softmax_scale defaults to 1/sqrt(head_dim). float32 inputs follow
    torch.get_float32_matmul_precision(): "highest" uses IEEE fp32 products, "high"/"medium" allow tf32.
    backend: "triton" (CUDA; on CPU under TRITON_INTERPRET=1), "torch" (blockwise PyTorch, any device) or
    "auto": triton on CUDA; on the CPU, PyTorch's own scaled_dot_product_attention (its CPU flash kernel)
    where its result is ours exactly (sdpa_applies: no window, causal only with seqlen_q == seqlen_k or
    one query, return_lse=False, no empty sequence), else torch; torch on other devices. An explicit
    backend never falls back: it runs or raises.
    Inputs whose last dimension is not contiguous are copied once (other strides are used as they are).
    With backend "triton", an inference call (no gradient recorded) with at most DECODE_MAX_QUERIES query
    rows per sequence runs the split-KV decode kernel; its result follows the same rules.
    Any other keyword raises TypeError; SDPA's (is_causal, attn_mask, dropout_p, scale, enable_gqa) say
    what to pass instead.
    """
    _validation.check_keywords(unsupported)
    return dense_attention(
        q, k, v, causal, softmax_scale, window_size, return_lse, backend, layout, "flash_attention"
    )


def dense_attention(q, k, v, causal, softmax_scale, window_size, return_lse, backend, layout, what: str):
    """flash_attention's work, its errors naming `what` (the public function called: flash-attn's
    compatible functions come here too)."""
    _validation.check_layout(layout)
    _validation.check_bool(what, "return_lse", return_lse)
    _validation.check_qkv(q, k, v, layout, what)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scale = _validation.check_scale(softmax_scale, q.shape[-1], what)
    left, right = _validation.canonical_window(causal, window_size, what)
    left, right = normalise_window(left, right, q.shape[2], k.shape[2])
    requested = backend
    backend = _validation.pick_backend(backend, q.device, what)
    q, k, v = (kernel_layout(t) for t in (q, k, v))
    if requested == "auto" and sdpa_applies(q, k, left, right, return_lse):
        out, lse = _sdpa(q, k, v, scale, causal=right == 0), None
    elif backend == "triton" and _decode_applies(q, k, v):
        from .kernels import launch_decode

        out, lse = launch_decode.decode_forward(q, k, v, softmax_scale=scale, left=left, right=right)
    else:
        out, stats = attention(q, k, v, scale, left, right, backend)
        lse = lse_of(stats, backend) if return_lse else None
    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def flash_attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
    causal: bool = False, softmax_scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
    return_lse: bool = False, backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Exact softmax attention over packed sequences of different lengths (no padding), differentiable in
    q, k and v, as flash-attn's flash_attn_varlen_func.

    Shapes: q: [total_q, heads, head_dim]; k, v: [total_k, kv_heads, head_dim] with heads % kv_heads == 0
    (GQA/MQA as flash_attention); cu_seqlens_q, cu_seqlens_k: int32 [batch + 1] on q's device, starting at
    0, non-decreasing, ending at total_q and total_k: sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]
    attending to k, v[cu_seqlens_k[b]:cu_seqlens_k[b + 1]] (an empty range is a sequence of length 0).
    max_seqlen_q, max_seqlen_k: at least the longest sequence's query and key counts. Returns out:
    [total_q, heads, head_dim] in q's dtype and, with return_lse=True, also lse: [heads, total_q], float32
    (flash-attn's varlen layout; natural log, not differentiable).

    Masks as flash_attention's, per sequence, with that sequence's own bottom-right offset off_b =
    seqlen_k_b - seqlen_q_b: causal=True lets query i see keys j <= i + off_b; window_size=(left, right)
    keys i + off_b - left <= j <= i + off_b + right (-1 = unbounded). A query row that sees no key (a
    sequence without keys, or causal with seqlen_q_b > seqlen_k_b) returns 0 and lse -inf. softmax_scale,
    float32 precision and backend as flash_attention's ("auto": triton on CUDA, the blockwise torch backend
    elsewhere; the torch backend runs one call per sequence).

    Every check runs before any kernel: it reads cu_seqlens_q and cu_seqlens_k on the host (one device sync,
    kept while the same tensors stay unmodified: layers that share them sync once) to check the offsets
    against the tensors and max_seqlen_q/k. The kernels' grids cover the longest
    sequence actually present. A cu_seqlens that is not contiguous is copied; so is a q, k or v whose last
    dimension is not (other strides are used as they are, e.g. q = qkv[:, 0] of a packed qkv tensor).
    """
    what = "flash_attention_varlen"
    _validation.check_bool(what, "return_lse", return_lse)
    _validation.check_varlen_qkv(q, k, v)
    scale = _validation.check_scale(softmax_scale, q.shape[-1], what)
    left, right = _validation.canonical_window(causal, window_size, what)
    backend = _validation.pick_backend(backend, q.device, what)
    longest_q, longest_k = _validation.check_cu_seqlens(
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k
    )
    # a bound that hides no key of the longest sequences hides none of any: exact with the longest lengths
    left, right = normalise_window(left, right, longest_q, longest_k)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cu_seqlens_q, cu_seqlens_k = (t.contiguous() for t in (cu_seqlens_q, cu_seqlens_k))
    out, stats = attention(
        q, k, v, scale, left, right, backend, cu_seqlens_q, cu_seqlens_k, longest_q, longest_k
    )
    if return_lse:
        return out, lse_of(stats, backend)
    return out


# enable_gqa came with torch 2.5; before it, GQA calls take the blockwise path
SDPA_HAS_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def sdpa_applies(q: torch.Tensor, k: torch.Tensor, left: int, right: int, return_lse: bool) -> bool:
    """Whether backend="auto" runs PyTorch's scaled_dot_product_attention: CPU tensors (BHSD views), the
    normalised window (left, right) one that SDPA can express exactly, no LSE wanted (SDPA returns none).
    SDPA's causal is top-left aligned, ours bottom-right: the same only where seqlen_q == seqlen_k (a single
    query's causal bound was normalised to -1 already). A sequence without keys gives SDPA NaN, ours 0; a
    query row with a NaN or inf gives SDPA's CPU kernel zeros, ours NaN (one pass over q tells)."""
    if q.device.type != "cpu" or return_lse or left != -1:
        return False
    if right != -1 and not (right == 0 and q.shape[2] == k.shape[2]):
        return False
    if q.numel() == 0 or k.numel() == 0:
        return False
    if not (q.shape[1] == k.shape[1] or SDPA_HAS_GQA):
        return False
    return bool(torch.isfinite(q).all())


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """SDPA with its default backend choice (on the CPU its flash kernel; differentiable)."""
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)


def normalise_window(left: int, right: int, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
    """A canonical window (left, right) with each bound that hides no key turned into -1, so that every value
    a kernel sees is below the lengths (huge Python ints would overflow its int32 offsets). Query i sees key
    j >= i + off - left with off = seqlen_k - seqlen_q; the largest i + off is seqlen_k - 1, so the left
    bound hides nothing iff left >= seqlen_k - 1. It sees j <= i + off + right; the smallest i + off is off,
    so the right bound hides nothing iff right >= seqlen_q - 1 (whatever seqlen_k). Exactly equivalent.
    With per-row key counts (a cache), seqlen_k is the largest one: the right rule does not depend on it."""
    if left >= seqlen_k - 1:
        left = -1
    if right >= seqlen_q - 1:
        right = -1
    return left, right


def _decode_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Few queries, no gradient to record, eager plain tensors (torch.compile keeps the custom op)."""
    if q.shape[2] > DECODE_MAX_QUERIES or not plain(q, k, v):
        return False
    return not _needs_grad(q, k, v)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class CacheCall(NamedTuple):
    """The checked, canonical arguments of an attention call over a cache (the window not yet normalised
    against the lengths: attention_with_seqlens does that)."""

    softmax_scale: float
    left: int
    right: int
    backend: str

    def mask(self) -> dict:
        """The scale and window keywords of the kernels' launchers (launch_decode.decode_forward)."""
        return dict(softmax_scale=self.softmax_scale, left=self.left, right=self.right)


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
    _validation.check_qkv(q, k, v, what=what)
    scale = _validation.check_scale(softmax_scale, q.shape[-1], what)
    left, right = _validation.canonical_window(causal, window_size, what)
    backend = _validation.pick_backend(backend, q.device, what)
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


def attention_with_seqlens(q, k, v, cache_seqlens: torch.Tensor, call: CacheCall) -> torch.Tensor:
    """Attention over a cache whose rows hold different numbers of tokens (inputs checked by
    check_cache_call). q: [batch, heads, seqlen_q, head_dim]; k, v: [batch, kv_heads, seqlen_k, head_dim] of
    which row b's keys are the first cache_seqlens[b] (int32 [batch] on k's device, each <= seqlen_k).
    Each row applies the mask with its own bottom-right offset cache_seqlens[b] - seqlen_q. Returns out
    [batch, heads, seqlen_q, head_dim]. triton: the split-KV decode kernel; torch: one blockwise call per
    row on its sliced K/V (one device sync for the lengths)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # normalised here, where the cache's keys are known (check_cache_call may see only the new tokens);
    # every row holds at most seqlen_k keys, so a bound that hides none of those hides none of a row's
    left, right = normalise_window(call.left, call.right, q.shape[2], k.shape[2])
    call = call._replace(left=left, right=right)
    if call.backend == "triton":
        from .kernels import launch_decode

        out, _ = launch_decode.decode_forward(q, k, v, **call.mask(), cache_seqlens=cache_seqlens)
        return out
    rows = ((k[b : b + 1, :, :n], v[b : b + 1, :, :n]) for b, n in enumerate(cache_seqlens.tolist()))
    return attention_per_row(q, rows, call)[0]


def attention_per_row(q: torch.Tensor, kv_rows, call: CacheCall) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) with row b of q [batch, heads, seqlen_q, head_dim] attending to the b-th (k, v) of kv_rows
    (each [1, kv_heads, n_b, head_dim]): the torch backend over rows of different lengths, one call a row."""
    outs, lses = [], []
    for b, (k, v) in enumerate(kv_rows):
        out, stats = attention(q[b : b + 1], k, v, *call)
        outs.append(out)
        lses.append(lse_of(stats, call.backend))
    if not outs:
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:3], dtype=torch.float32)
    return torch.cat(outs), torch.cat(lses)


def attention_right_padded(q, k, v, cache_seqlens: torch.Tensor, call: CacheCall) -> torch.Tensor:
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
