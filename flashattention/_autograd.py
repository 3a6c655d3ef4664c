"""The autograd wiring, in one place: the forward and backward are two torch.library custom ops (opaque to
torch.compile, so a compiled model keeps them whole, fullgraph=True included) and the forward op's autograd
formula saves (q, k, v, out, stats) and recomputes the probabilities in the backward. `stats` is what the
backend's backward needs of the softmax (its LSE, in the backend's own units)."""

from __future__ import annotations

import torch

from . import blockwise


def _backend_module(backend: str):
    if backend == "triton":
        from .kernels import launch

        return launch
    return blockwise


@torch.library.custom_op("flashattention::attention_forward", mutates_args=())
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    left: int,
    right: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, H, Sq, D] contiguous, lse [B, H, Sq] float32, stats [B, H, Sq] float32), inputs validated."""
    out, lse, stats = _backend_module(backend).attention_forward(
        q, k, v, softmax_scale=softmax_scale, left=left, right=right
    )
    # a backend may hand back one tensor as both (its stats are the LSE); custom-op outputs must not alias
    return out, lse, stats.clone() if stats is lse else stats


@attention_forward.register_fake
def _(q, k, v, softmax_scale, left, right, backend):
    batch, heads, seqlen_q, head_dim = q.shape
    lse = q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)
    return q.new_empty((batch, heads, seqlen_q, head_dim)), lse, torch.empty_like(lse)


@torch.library.custom_op("flashattention::attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    softmax_scale: float,
    left: int,
    right: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, in the shapes and dtypes of (q, k, v)."""
    return _backend_module(backend).attention_backward(
        grad_out, q, k, v, out, stats, softmax_scale=softmax_scale, left=left, right=right
    )


@attention_backward.register_fake
def _(grad_out, q, k, v, out, stats, softmax_scale, left, right, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, softmax_scale, left, right, backend = inputs
    out, lse, stats = output
    ctx.save_for_backward(q, k, v, out, stats)
    ctx.args = (softmax_scale, left, right, backend)
    ctx.mark_non_differentiable(lse, stats)


def _backward(ctx, grad_out, grad_lse, grad_stats):
    q, k, v, out, stats = ctx.saved_tensors
    if grad_out.stride(-1) != 1:  # e.g. the stride-0 gradient of out.sum()
        grad_out = grad_out.contiguous()
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, stats, *ctx.args)
    return dq, dk, dv, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)
