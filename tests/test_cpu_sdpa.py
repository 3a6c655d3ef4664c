"""backend="auto" on the CPU runs PyTorch's scaled_dot_product_attention exactly where its semantics are
ours (api.sdpa_applies) and the blockwise torch backend everywhere else; an explicit backend="torch" never
runs SDPA. Each case checks which path ran (SDPA replaced by a counting wrapper) and the result against the
float64 oracle with the tolerance rule (out, dq, dk, dv)."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_close_to_reference, make_inputs

from flashattention import flash_attention
from flashattention.api import SDPA_HAS_GQA
from flashattention.reference import attention_reference

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32

# (id, (batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype), flash_attention kwargs, SDPA runs)
CASES = [
    # SDPA's side of the rule
    ("full-Sq17-Sk33-fp32", (2, 2, 2, 17, 33, 40, F32), {}, True),
    ("full-Sq33-Sk17-bf16", (1, 4, 4, 33, 17, 64, B16), {}, True),
    ("causal-square-fp16", (1, 2, 2, 29, 29, 32, F16), {"causal": True}, True),
    ("causal-one-query", (2, 2, 2, 1, 37, 32, F32), {"causal": True}, True),  # normalised: no mask
    ("window-minus1-0-square", (1, 2, 2, 21, 21, 72, B16), {"window_size": (-1, 0)}, True),
    ("window-past-both-ends", (1, 2, 2, 19, 23, 16, F32), {"window_size": (22, 18)}, True),
    ("huge-window-causal", (1, 2, 2, 25, 25, 16, F16), {"causal": True, "window_size": (2**40, 0)}, True),
    ("gqa-H4-Hkv2-causal", (1, 4, 2, 31, 31, 32, F32), {"causal": True}, SDPA_HAS_GQA),
    ("mqa-H3-Hkv1-bf16", (2, 3, 1, 13, 26, 16, B16), {}, SDPA_HAS_GQA),
    ("bshd-causal", (1, 4, 2, 20, 20, 32, F32), {"causal": True, "layout": "bshd"}, SDPA_HAS_GQA),
    ("scale-0.3", (1, 2, 2, 15, 15, 16, F32), {"softmax_scale": 0.3}, True),
    # the blockwise side
    ("causal-Sq17-Sk33", (1, 2, 2, 17, 33, 32, F32), {"causal": True}, False),  # bottom-right != top-left
    ("causal-Sq33-Sk17-fp16", (1, 2, 2, 33, 17, 32, F16), {"causal": True}, False),  # rows without keys
    ("window-left-21", (1, 2, 2, 19, 23, 16, F32), {"window_size": (21, -1)}, False),  # one below the end
    ("window-right-17", (1, 2, 2, 19, 23, 16, B16), {"window_size": (-1, 17)}, False),
    ("window-4-0-causal", (1, 2, 2, 25, 25, 16, F32), {"causal": True, "window_size": (4, 0)}, False),
    ("return-lse", (1, 2, 2, 20, 20, 32, F32), {"return_lse": True}, False),
    ("no-keys", (1, 2, 2, 7, 0, 16, F32), {}, False),
    ("explicit-torch", (1, 2, 2, 20, 20, 32, F32), {"backend": "torch"}, False),
]


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """torch.nn.functional.scaled_dot_product_attention, wrapped to count its calls."""
    calls: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def _out_and_grads(fn, q, k, v, dout) -> list[torch.Tensor]:
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout)
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return [out.detach(), *grads]


@pytest.mark.parametrize("shape, kwargs, runs_sdpa", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_auto_on_cpu_matches_reference_and_picks_sdpa_where_exact(shape, kwargs, runs_sdpa, sdpa_calls):
    q, k, v, dout = make_inputs(*shape, "cpu")
    kwargs = {"backend": "auto", **kwargs}
    layout, return_lse = kwargs.get("layout", "bhsd"), kwargs.get("return_lse", False)

    def ours(q_, k_, v_):
        if layout == "bshd":
            q_, k_, v_ = (t.transpose(1, 2) for t in (q_, k_, v_))
        out = flash_attention(q_, k_, v_, **kwargs)
        out = out[0] if return_lse else out
        return out.transpose(1, 2) if layout == "bshd" else out

    mask = {"causal": kwargs.get("causal", False), "window_size": kwargs.get("window_size", (-1, -1))}
    scale = kwargs.get("softmax_scale")
    got = _out_and_grads(ours, q, k, v, dout)
    assert len(sdpa_calls) == int(runs_sdpa), f"SDPA ran {len(sdpa_calls)} times, expected {int(runs_sdpa)}"
    ref = _out_and_grads(
        lambda *t: attention_reference(*t, softmax_scale=scale, **mask)[0],
        *(t.double() for t in (q, k, v, dout)),
    )
    same = _out_and_grads(
        lambda *t: attention_reference(*t, softmax_scale=scale, upcast=False, **mask)[0], q, k, v, dout
    )
    for name, a, r, s in zip(("out", "dq", "dk", "dv"), got, ref, same, strict=True):
        assert_close_to_reference(name, a, r, s)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_auto_with_a_nonfinite_query_matches_the_torch_backend(bad, causal, sdpa_calls):
    """A query row holding a NaN or inf gives NaN on every backend (SDPA's CPU kernel gives that row zeros,
    so backend="auto" does not run it); the other rows are unaffected."""
    q, k, v, _ = make_inputs(1, 2, 2, 6, 6, 16, torch.float32, "cpu")
    q[0, 1, 2, 5] = bad
    auto = flash_attention(q, k, v, causal=causal, backend="auto")
    blockwise = flash_attention(q, k, v, causal=causal, backend="torch")
    assert not sdpa_calls
    assert auto[0, 1, 2].isnan().all() and blockwise[0, 1, 2].isnan().all()
    torch.testing.assert_close(auto, blockwise, equal_nan=True, rtol=0, atol=0)
