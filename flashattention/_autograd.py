"""The one autograd Function: forward saves (q, k, v, out, stats); backward recomputes the probabilities.
`stats` is whatever the backend's backward needs of the softmax (the LSE, in the backend's own units)."""

from __future__ import annotations

import torch

from . import blockwise


def _backend_module(backend: str):
    if backend == "triton":
        from .kernels import launch

        return launch
    return blockwise


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale: float, left: int, right: int, backend: str):
        impl = _backend_module(backend)
        out, lse, stats = impl.attention_forward(q, k, v, softmax_scale=softmax_scale, left=left, right=right)
        ctx.save_for_backward(q, k, v, out, stats)
        ctx.args = (softmax_scale, left, right, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, stats = ctx.saved_tensors
        softmax_scale, left, right, backend = ctx.args
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        dq, dk, dv = _backend_module(backend).attention_backward(
            grad_out, q, k, v, out, stats, softmax_scale=softmax_scale, left=left, right=right
        )
        return dq, dk, dv, None, None, None, None
