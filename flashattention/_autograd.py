"""The autograd wiring, in one place: the forward and backward are two torch.library custom ops (opaque to
torch.compile, so a compiled model keeps them whole, fullgraph=True included) and the forward op's autograd
formula saves (q, k, v, out, stats) and recomputes the probabilities in the backward. `stats` is what the
backend's backward needs of the softmax (its LSE, in the backend's own units: `lse_of` turns it into the
natural-log LSE, only for callers that asked for it, which saves a launch per call).
Packed varlen sequences go through the same op and Function: cu_seqlens_q/k (int32 [batch + 1], checked)
and max_seqlen_q/k, None and 0 for dense calls; then q, k, v, out are [total, heads, head_dim] and stats
[heads, total_q].

`attention` is the entry point. Under torch.compile it calls the custom op. In eager mode it applies the
same formula (`_setup_context`, `_grads`) through a plain autograd.Function: the custom op's Python
dispatch layers cost ~20 us of host time per call (measured on a CPU: 48 -> 27 us per forward with grad,
launch excluded), which short sequences and decoding pay on every layer."""

from __future__ import annotations

import functools
import inspect

import torch
from torch._functorch.utils import unwrap_dead_wrappers
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import blockwise


def _backend_module(backend: str):
    if backend == "triton":
        from .kernels import launch

        return launch
    return blockwise


@torch.library.custom_op("flashattention::attention_forward", mutates_args=())
def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    softmax_scale: float, left: int, right: int, backend: str,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(out [B, H, Sq, D] contiguous, stats [B, H, Sq] float32), inputs validated; varlen (cu_seqlens_q not
    None): out [total_q, H, D], stats [H, total_q]."""
    varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _forward_impl(q, k, v, softmax_scale, left, right, backend, *varlen)


def _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> dict:
    """The backends' varlen keywords: none for a dense call."""
    if cu_seqlens_q is None:
        return {}
    return dict(
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
    )


def _forward_impl(q, k, v, softmax_scale, left, right, backend, *varlen):
    return _backend_module(backend).forward_stats(
        q, k, v, softmax_scale=softmax_scale, left=left, right=right, **_varlen(*varlen)
    )


@attention_forward.register_fake
def _(q, k, v, softmax_scale, left, right, backend, cu_seqlens_q=None, cu_seqlens_k=None, *max_seqlens):
    if cu_seqlens_q is not None:
        total_q, heads, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((heads, total_q), dtype=torch.float32)
    batch, heads, seqlen_q, head_dim = q.shape
    return q.new_empty((batch, heads, seqlen_q, head_dim)), q.new_empty(
        (batch, heads, seqlen_q), dtype=torch.float32
    )


def lse_of(stats: torch.Tensor, backend: str) -> torch.Tensor:
    """The natural-log LSE [B, H, Sq] float32 from a backend's stats: a tensor of its own, so that changing
    it in place leaves the stats the backward saved alone."""
    scale = _backend_module(backend).STATS_TO_LSE
    return stats * scale if scale != 1.0 else stats.clone()


@torch.library.custom_op("flashattention::attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    stats: torch.Tensor, softmax_scale: float, left: int, right: int, backend: str,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dq, dk, dv), contiguous, in the shapes and dtypes of (q, k, v)."""
    varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _backward_impl(grad_out, q, k, v, out, stats, softmax_scale, left, right, backend, *varlen)


def _backward_impl(grad_out, q, k, v, out, stats, softmax_scale, left, right, backend, *varlen):
    return _backend_module(backend).attention_backward(
        grad_out, q, k, v, out, stats, softmax_scale=softmax_scale, left=left, right=right, **_varlen(*varlen)
    )


@attention_backward.register_fake
def _(grad_out, q, k, v, out, stats, softmax_scale, left, right, backend, *varlen):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, softmax_scale, left, right, backend, *varlen = inputs  # varlen: absent in a dense op call
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = varlen or (None, None, 0, 0)
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, cu_seqlens_q, cu_seqlens_k)
    ctx.args = (softmax_scale, left, right, backend)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(stats)


ROW_SPAN_LIMIT = 2**31  # elements a (batch, head)'s rows may span: the kernels' row offsets are int32


def kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """A BHSD tensor as the kernels take it: as it is, or copied (contiguous) where its last dimension is
    not contiguous or one (batch, head)'s rows span ROW_SPAN_LIMIT elements or more (a long BSHD sequence
    with many heads: the row offsets would overflow; contiguous, a row is head_dim elements)."""
    if t.stride(-1) == 1 and t.shape[2] * t.stride(2) < ROW_SPAN_LIMIT:
        return t
    return t.contiguous()


def _grads(ctx, grad_out, backward_op):
    q, k, v, out, stats, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if grad_out.dim() == 4:  # BHSD (a dense call): as flash_attention takes q, k, v
        grad_out = kernel_layout(grad_out)
    elif grad_out.stride(-1) != 1:  # e.g. the stride-0 gradient of out.sum()
        grad_out = grad_out.contiguous()
    varlen = (cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlens)
    dq, dk, dv = backward_op(grad_out, q, k, v, out, stats, *ctx.args, *varlen)
    return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)


def _first_order(backward):
    """backward made first-order only: its gradients are computed without a graph and, under
    create_graph=True, come back through _NoSecondOrder, so that a second derivative (a gradient penalty,
    say) raises instead of coming out silently wrong (the torch backend's ops take out and the LSE as
    constants) or silently zero (the kernels have no graph)."""

    @functools.wraps(backward)
    def first_order(ctx, *grads):
        if torch._C._functorch.peek_interpreter_stack() is not None:  # jacrev runs the backward under vmap
            from . import _validation

            _validation.check_functorch("flash_attention (backward)")
        with torch.no_grad():
            result = backward(ctx, *grads)
        if not torch.is_grad_enabled():  # create_graph=False: the usual backward
            return result
        q, k, v = ctx.saved_tensors[:3]
        sources = [t for t in (*grads, q, k, v) if isinstance(t, torch.Tensor) and t.requires_grad]
        tensors = [t for t in result if t is not None]
        if not sources or not tensors:
            return result
        guarded = iter(_NoSecondOrder.apply(len(tensors), *tensors, *sources))
        return tuple(None if t is None else next(guarded) for t in result)

    return first_order


class _NoSecondOrder(torch.autograd.Function):
    """Identity on the first `count` tensors, tied in the graph to the rest (the backward's inputs that
    require grad); differentiating through it raises."""

    @staticmethod
    def forward(count, *tensors):
        return tuple(t.view_as(t) for t in tensors[:count])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "flashattention: the attention backward is not differentiable (no second derivative, e.g. for "
            "a gradient penalty through attention). Compute such a term with "
            "torch.nn.functional.scaled_dot_product_attention (math backend)."
        )


@_first_order
def _backward(ctx, grad_out, grad_stats):
    return _grads(ctx, grad_out, attention_backward)


attention_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The custom op's formula without its dispatch layers (eager mode only; see the module docstring).
    The separate setup_context is what torch.func transforms need."""

    @staticmethod
    def forward(q, k, v, softmax_scale, left, right, backend, *varlen):
        return _forward_impl(q, k, v, softmax_scale, left, right, backend, *varlen)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    @_first_order
    def backward(ctx, grad_out, grad_stats):
        return _grads(ctx, grad_out, _backward_impl)


# With a separate setup_context, Function.apply binds the arguments to forward's signature on every call
# (inspect: ~20 us per call on a CPU, ~3x that on the GPU machines' hosts). `attention` calls the C apply
# under it directly where no torch.func transform is active (every argument is passed, none defaulted, so
# there is nothing to bind), after the same unwrapping of dead functorch wrappers Function.apply does. Under
# a transform it goes through Function.apply, for which the stored signature saves inspect.signature.
_EagerAttention.forward.__signature__ = inspect.signature(_EagerAttention.forward)
_apply_unbound = super(torch.autograd.Function, _EagerAttention).apply


def plain(*tensors: torch.Tensor) -> bool:
    """Real tensors run eagerly: no compiler or dispatch mode is tracing, and no tensor subclass (fake,
    functional, distributed tensors go through the custom op, which the dispatcher handles). torch.func
    transforms take the eager path too: the custom op's autograd does not support them, the Function
    (with its separate setup_context) does, for the torch backend (validation refuses triton there)."""
    return (
        not torch.compiler.is_compiling()
        and not is_in_torch_dispatch_mode()
        and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)
    )


def attention(
    q, k, v, softmax_scale: float, left: int, right: int, backend: str,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
):  # fmt: skip
    """(out, stats) of validated inputs, differentiable in q, k and v (lse_of(stats, backend): the LSE).
    Varlen: packed q, k, v with cu_seqlens_q/k and max_seqlen_q/k (see the module docstring)."""
    varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    args = (q, k, v, softmax_scale, left, right, backend, *varlen)
    if plain(q, k, v):
        wants_grad = q.requires_grad or k.requires_grad or v.requires_grad
        # the compiles ahead know the dense backward's launches only: a varlen call must not use up their
        # once-per-process turn
        if backend == "triton" and cu_seqlens_q is None and wants_grad and torch.is_grad_enabled():
            from .kernels import warmup

            warmup.backward_kernels(q, k, v, softmax_scale, left, right)  # once per process: compiles ahead
        if torch._C._are_functorch_transforms_active():
            return _EagerAttention.apply(*args)
        return _apply_unbound(*unwrap_dead_wrappers(args))
    return attention_forward(*args)
