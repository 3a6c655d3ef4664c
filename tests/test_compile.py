"""torch.compile and the custom ops: the op registrations are consistent (torch.library.opcheck) and a
compiled model with fullgraph=True (no graph break allowed) gives the eager results, gradients included."""

from __future__ import annotations

import pytest
import torch

from flashattention import flash_attention
from flashattention._autograd import attention_forward


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_forward_and_autograd(backend: str, device: str) -> None:
    q = torch.randn(1, 4, 40, 16, device=device, requires_grad=True)
    k = torch.randn(1, 2, 56, 16, device=device, requires_grad=True)
    v = torch.randn(1, 2, 56, 16, device=device, requires_grad=True)
    torch.library.opcheck(attention_forward, (q, k, v, 0.25, 8, 0, backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_fullgraph_matches_eager(backend: str, device: str) -> None:
    def layer(q, k, v):
        out = flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, backend=backend
        )
        return (out.transpose(1, 2) * 2).sum(dim=-1)

    leaves = [torch.randn(2, 37, h, 32, device=device) for h in (4, 2, 2)]  # BSHD, GQA 4/2
    eager_in = [t.clone().requires_grad_() for t in leaves]
    compiled_in = [t.clone().requires_grad_() for t in leaves]
    dout = torch.randn(2, 37, 4, device=device)
    eager = layer(*eager_in)
    eager.backward(dout)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(*compiled_in)
    compiled.backward(dout)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    for a, b in zip(compiled_in, eager_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tracing_records_the_custom_ops(backend: str, device: str) -> None:
    """Eager calls skip the custom op's dispatch layers (_autograd.attention); anything that traces (fake
    tensors, make_fx, AOT autograd) must still see the two custom ops and never run a kernel on a fake
    tensor."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def fwd_bwd(q, k, v):
        out = flash_attention(q, k, v, causal=True, backend=backend)
        return torch.autograd.grad(out.sum(), (q, k, v))

    q, k, v = (torch.randn(1, 2, 24, 16, device=device, requires_grad=True) for _ in range(3))
    graph = make_fx(fwd_bwd, tracing_mode="fake")(q, k, v)
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert "flashattention.attention_forward.default" in targets, targets
    assert "flashattention.attention_backward.default" in targets, targets


def test_torch_func_grad_torch_backend(device: str) -> None:
    """torch.func.grad works through the eager autograd.Function (the custom op's autograd does not
    support torch.func) and gives autograd's gradient."""
    q, k, v = (torch.randn(1, 2, 24, 16, device=device) for _ in range(3))

    def loss(q_):
        return (flash_attention(q_, k, v, causal=True, backend="torch") ** 2).sum()

    got = torch.func.grad(loss)(q)
    leaf = q.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss(leaf), leaf)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_torch_func_with_triton_backend_is_refused(device: str) -> None:
    """The kernels cannot take torch.func's wrapped tensors: a clear error, not a crash inside Triton."""
    q, k, v = (torch.randn(1, 2, 24, 16, device=device) for _ in range(3))
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda q_: flash_attention(q_, k, v, backend="triton").sum())(q)


@pytest.mark.parametrize("transform", ["vmap", "jacrev", "jacfwd", "vmap-of-grad"])
def test_torch_func_transforms_without_a_rule_are_refused(transform: str, device: str) -> None:
    """vmap (jacrev vmaps the backward) and forward mode (jvp, jacfwd) have no rule for the attention:
    NotImplementedError naming the transform and what works, not an error from inside the autograd
    Function."""
    q, k, v = (torch.randn(1, 2, 9, 16, device=device) for _ in range(3))

    def f(q_):
        return flash_attention(q_, k, v, backend="torch")

    run = {
        "vmap": lambda: torch.func.vmap(f)(q[None].expand(3, -1, -1, -1, -1)),
        "jacrev": lambda: torch.func.jacrev(f)(q),
        "jacfwd": lambda: torch.func.jacfwd(f)(q),
        "vmap-of-grad": lambda: torch.func.vmap(torch.func.grad(lambda x: f(x).sum()))(
            q[None].repeat(2, 1, 1, 1, 1)
        ),
    }[transform]
    with pytest.raises(NotImplementedError, match=r"torch.func.(vmap|jvp).*torch.func.grad works"):
        run()
