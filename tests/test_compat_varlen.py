"""flashattention.compat.flash_attn_varlen_func: flash-attn's packed varlen call ([total, heads, head_dim],
cu_seqlens, max_seqlen) on flashattention.flash_attention_varlen, against the float64 oracle run per
sequence with the tolerance rule: out, lse ([heads, total_q]), gradients, flash-attn's causal/window rule
(bottom-right per sequence, causal sets right = 0, a left bound alone gets right = max_seqlen_k)."""

from __future__ import annotations

import pytest
import torch
from _helpers import compare_to_reference

from flashattention.compat import flash_attn_varlen_func
from flashattention.reference import attention_reference

BACKENDS = ["torch", "triton"]


def _cu(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _per_sequence(q, k, v, dout, lens_q, lens_k, dtype, **mask):
    """The oracle (or the same-dtype computation) per sequence, concatenated: out [total_q, H, D], lse [H,
    total_q], dq, dk, dv."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    cq, ck = _cu(lens_q, "cpu").tolist(), _cu(lens_k, "cpu").tolist()
    outs, lses = [], []
    for b in range(len(lens_q)):
        qb, kb, vb = (
            t[s:e].transpose(0, 1)[None]
            for t, (s, e) in zip(
                leaves, ((cq[b], cq[b + 1]), (ck[b], ck[b + 1]), (ck[b], ck[b + 1])), strict=True
            )
        )
        out, lse = attention_reference(qb, kb, vb, upcast=dtype == torch.float64, **mask)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs)
    out.backward(dout.to(dtype))
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return dict(out=out.detach(), lse=torch.cat(lses, dim=1).detach(), dq=grads[0], dk=grads[1], dv=grads[2])


CASES = [
    # lengths q, lengths k, heads, kv_heads, head_dim, causal, window given, (causal, window) meant
    pytest.param([5, 17, 1], [9, 17, 30], 4, 2, 32, True, (-1, -1), (True, (-1, -1)), id="causal-Sq<=Sk-GQA"),
    pytest.param([7, 0, 12], [7, 4, 12], 2, 2, 16, False, (3, 2), (False, (3, 2)), id="window3,2-empty-seq"),
    pytest.param([11, 6], [20, 6], 3, 1, 16, True, (4, 9), (True, (4, 0)), id="MQA-causal-window4,9->4,0"),
    pytest.param([13, 3], [5, 3], 2, 1, 16, False, (2, -1), (False, (2, 5)), id="window2,-1->2,max_seqlen_k"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lens_q, lens_k, heads, kv_heads, d, causal, window, meant", CASES)
def test_flash_attn_varlen_func(lens_q, lens_k, heads, kv_heads, d, causal, window, meant, backend, device):
    q = torch.randn(sum(lens_q), heads, d, device=device)
    k, v = (torch.randn(sum(lens_k), kv_heads, d, device=device) for _ in range(2))
    dout = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, probs = flash_attn_varlen_func(
        *leaves,
        _cu(lens_q, device),
        _cu(lens_k, device),
        max(lens_q),
        max(lens_k),
        causal=causal,
        window_size=window,
        return_attn_probs=True,
        backend=backend,
    )
    assert probs is None and out.shape == q.shape and lse.shape == (heads, sum(lens_q))
    out.backward(dout)
    ours = dict(out=out, lse=lse, dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
    mask = dict(causal=meant[0], window_size=meant[1])
    ref = _per_sequence(q, k, v, dout, lens_q, lens_k, torch.float64, **mask)
    same = _per_sequence(q, k, v, dout, lens_q, lens_k, q.dtype, **mask)
    failures = [compare_to_reference(n, ours[n], ref[n], same[n]) for n in ours]
    failures = [f for f in failures if f is not None]
    assert not failures, "\n".join(failures)


def test_flash_attn_varlen_func_out_only(device):
    """Without return_attn_probs only out, in q's dtype."""
    q = torch.randn(9, 2, 16, device=device, dtype=torch.float16)
    cu = _cu([4, 5], device)
    out = flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, causal=True)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.dtype == q.dtype


def test_flash_attn_varlen_func_unsupported():
    q = torch.randn(4, 2, 16)
    cu = _cu([4], "cpu")
    with pytest.raises(NotImplementedError, match="dropout_p"):
        flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, alibi_slopes=torch.ones(2))
