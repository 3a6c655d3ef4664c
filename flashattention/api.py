"""Public attention functions: validation, canonical mask arguments, backend choice."""

from __future__ import annotations

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
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
