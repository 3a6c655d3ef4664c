"""flash_attention forward and gradients against the float64 oracle (the README's pass rule), and metamorphic
checks, for both backends. On a CPU-only machine backend="triton" runs the kernels in Triton's interpreter
(conftest sets TRITON_INTERPRET=1), so shapes stay small; the big matrix is marked slow."""

import itertools
import math
import os

import pytest
import torch
from _helpers import (
    Case,
    assert_same_result,
    case_params,
    check_attention,
    make_inputs,
    run_ours,
)

from flashattention import flash_attention

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [pytest.param(F16, id="fp16"), pytest.param(B16, id="bf16"), pytest.param(F32, id="fp32")]
BACKENDS = ["torch", "triton"]

# Every feature at small shapes, each with a couple of dtypes (all three for the main ones).
FEATURE_CASES = [
    # full attention, square and seqlen_q != seqlen_k both ways
    *(Case(2, 2, 2, 113, 113, 64, dt) for dt in (F16, B16, F32)),
    Case(1, 2, 2, 40, 130, 64, F16),
    Case(1, 2, 2, 130, 40, 64, B16),
    Case(1, 2, 2, 40, 130, 64, F32),
    # causal, bottom-right aligned
    *(Case(1, 2, 2, 113, 113, 64, dt, causal=True) for dt in (F16, B16, F32)),
    Case(1, 2, 2, 17, 113, 64, F16, causal=True),
    Case(1, 2, 2, 17, 113, 64, F32, causal=True),
    Case(1, 2, 2, 113, 17, 64, B16, causal=True),  # Sq > Sk: the first 96 rows see no key
    Case(1, 2, 2, 113, 17, 64, F32, causal=True),
    Case(1, 2, 1, 255, 255, 64, F16, causal=True),  # several tiles: full and boundary tiles
    Case(2, 4, 2, 113, 203, 72, B16, causal=True),
    # sliding windows: left only, right only, both, left=0, with causal, Sq != Sk
    Case(1, 2, 2, 113, 113, 64, F16, window=(32, -1)),
    Case(1, 2, 2, 113, 113, 64, B16, window=(32, -1)),
    Case(1, 2, 2, 113, 113, 64, F16, window=(-1, 16)),
    Case(1, 2, 2, 113, 113, 64, F32, window=(-1, 16)),
    Case(1, 2, 2, 113, 113, 64, B16, window=(20, 7)),
    Case(1, 2, 2, 113, 113, 64, F32, window=(20, 7)),
    Case(1, 2, 2, 60, 125, 64, F16, window=(16, 8)),
    Case(1, 2, 2, 125, 60, 64, B16, window=(16, 8)),  # the first 57 rows see no key
    Case(1, 2, 2, 113, 113, 64, F16, window=(0, -1)),
    Case(1, 2, 2, 113, 113, 64, F32, window=(0, 0)),  # each query sees one key
    Case(1, 2, 2, 113, 113, 64, B16, causal=True, window=(24, -1)),
    Case(1, 2, 2, 113, 113, 64, F16, causal=True, window=(0, 0)),
    Case(1, 2, 1, 300, 300, 64, F16, causal=True, window=(70, 0)),  # tiles skipped on both sides
    Case(1, 2, 1, 300, 300, 64, F32, window=(40, 90)),
    # GQA and MQA
    Case(2, 4, 2, 113, 113, 64, F16, causal=True),
    Case(1, 4, 2, 70, 113, 64, B16),
    Case(1, 4, 2, 113, 70, 64, F32, window=(16, 16)),
    Case(1, 4, 1, 113, 113, 64, F16, causal=True),
    Case(1, 4, 1, 113, 70, 64, F32, window=(16, 16)),
    Case(1, 6, 2, 50, 50, 40, B16, causal=True),
    # odd sequence lengths
    Case(1, 2, 2, 1, 1, 64, F16),
    Case(1, 2, 2, 1, 1, 64, F32, causal=True),
    Case(1, 2, 2, 1, 113, 64, B16, causal=True),  # one new token against a cache
    Case(1, 2, 2, 113, 1, 64, F16, causal=True),  # only the last row sees the key
    Case(1, 2, 2, 17, 17, 64, F32, causal=True),
    Case(1, 1, 1, 255, 17, 64, B16),
    # large scores: the softmax must subtract its running max (exp would overflow otherwise)
    Case(1, 2, 2, 113, 113, 64, F16, causal=True, input_scale=10.0),
    Case(1, 2, 2, 113, 113, 64, B16, input_scale=10.0),
    Case(1, 2, 2, 113, 113, 64, F32, window=(20, 7), input_scale=4.0),
]

# Every head dim (padding inside the kernel for the non-powers of two), at one tiny shape: the interpreter
# is slow at large head dims.
HEAD_DIMS = (8, 16, 40, 64, 72, 96, 128, 200, 256)
HEAD_DIM_CASES = [
    *(Case(1, 2, 1, 17, 33, d, (F16, B16)[i % 2], causal=True) for i, d in enumerate(HEAD_DIMS)),
    *(Case(1, 1, 1, 33, 17, d, F32) for d in HEAD_DIMS),
]

# The full matrix (slow, run by CI): every dtype x mask x shape, with GQA, head dims taking turns.
SLOW_CASES = [
    Case(1, 4, 2, sq, sk, (64, 96, 128)[(i + i // 3) % 3], dt, causal=causal, window=window)
    for i, (dt, (causal, window), (sq, sk)) in enumerate(
        itertools.product(
            (F16, B16, F32),
            ((False, (-1, -1)), (True, (-1, -1)), (False, (33, 20)), (True, (64, -1))),
            ((255, 255), (128, 301), (301, 128)),
        )
    )
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", case_params(FEATURE_CASES + HEAD_DIM_CASES))
def test_matches_reference(case: Case, backend: str, device: str) -> None:
    q, k, v, dout = case.inputs(device)
    check_attention(q, k, v, dout, backend=backend, **case.mask_kwargs())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", case_params(SLOW_CASES, pytest.mark.slow))
def test_matches_reference_full_matrix(case: Case, backend: str, device: str) -> None:
    q, k, v, dout = case.inputs(device)
    check_attention(q, k, v, dout, backend=backend, **case.mask_kwargs())


FP32_LARGE_SCORES_GAP = (
    "interpreter artefact: the backward recomputes Q K^T in other tile shapes and orientation than the "
    "forward, and the interpreter's numpy matmul sums those products in another order, so scores with "
    "|q.k| ~ 3e3 differ by ~2e-3 between the two passes (P off by ~2.5e-4 relative), while PyTorch reuses "
    "its saved P. Checked: with equal 16x16 tiles and the forward's orientation the test passes. On a GPU "
    "the fp32 dot is expected to sum each score's products in one order whatever the tile (not yet run), "
    "so the mark applies to the interpreter only"
)


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param(
            "triton",
            marks=pytest.mark.xfail(
                os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                reason=FP32_LARGE_SCORES_GAP,
                strict=True,
            ),
        ),
    ],
)
def test_fp32_very_large_scores(backend: str, device: str) -> None:
    case = Case(1, 2, 2, 113, 113, 64, F32, window=(20, 7), input_scale=20.0)
    q, k, v, dout = case.inputs(device)
    check_attention(q, k, v, dout, backend=backend, **case.mask_kwargs())


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_softmax_at_huge_scores_has_finite_gradients(backend: str, device: str) -> None:
    """fp16 q, k of magnitude ~3e3 with softmax_scale 10 (scores ~1e9, a one-hot softmax): every gradient
    is finite. The backward recomputes the scores rounded as the forward made them; another rounding
    (the scale applied after the matmul) put exp(s - lse) past float range on the torch backend."""
    torch.manual_seed(0)
    q, k = ((torch.randn(1, 2, n, 64, device=device) * 3000).half().requires_grad_() for n in (17, 20))
    v = torch.randn(1, 2, 20, 64, device=device).half().requires_grad_()
    out = flash_attention(q, k, v, causal=True, softmax_scale=10.0, backend=backend)
    out.backward(torch.randn_like(out))
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert t.isfinite().all(), f"{name}: {int((~t.isfinite()).sum())} entries not finite"


# ----------------------------------------------------------------------------------------------------------
# Metamorphic checks: ours against ours on an equivalent problem


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [pytest.param(F32, id="fp32"), pytest.param(B16, id="bf16")])
@pytest.mark.parametrize(
    "window", [(13, 5), (0, 0), (-1, 4), (20, -1), (3, 0)], ids=lambda w: f"left{w[0]}-right{w[1]}"
)
def test_window_equals_full_attention_on_sliced_keys(window, dtype, backend: str, device: str) -> None:
    """Query row i with window (left, right) == full attention of row i over keys
    [i + off - left, i + off + right] (clipped to [0, seqlen_k)), for out, lse and dq (dq_i depends on
    row i only)."""
    seqlen_q, seqlen_k = 50, 90
    off = seqlen_k - seqlen_q
    left, right = window
    q, k, v, dout = make_inputs(1, 2, 1, seqlen_q, seqlen_k, 32, dtype, device)
    windowed = run_ours(q, k, v, dout, backend=backend, window_size=window)
    for i in (0, 1, 17, 33, seqlen_q - 1):
        lo = max(0, i + off - left) if left >= 0 else 0
        hi = min(seqlen_k - 1, i + off + right) if right >= 0 else seqlen_k - 1
        rows = slice(i, i + 1)
        full = run_ours(
            q[:, :, rows], k[:, :, lo : hi + 1], v[:, :, lo : hi + 1], dout[:, :, rows], backend=backend
        )
        for name in ("out", "lse", "dq"):
            assert_same_result(f"{name}[row {i}, keys {lo}..{hi}]", windowed[name][:, :, rows], full[name])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("left", [-1, 0, 7])
def test_causal_is_window_right_zero(left: int, backend: str, device: str) -> None:
    q, k, v, dout = make_inputs(1, 2, 2, 40, 70, 32, F16, device)
    expected = run_ours(q, k, v, dout, backend=backend, window_size=(left, 0))
    for window in ((left, -1), (left, 0)):
        got = run_ours(q, k, v, dout, backend=backend, causal=True, window_size=window)
        for name in ("out", "lse", "dq", "dk", "dv"):
            assert_same_result(f"{name} (causal=True, window_size={window})", got[name], expected[name])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "heads, kv_heads, dtype",
    [
        pytest.param(4, 2, F32, id="H4-Hkv2-fp32"),
        pytest.param(4, 1, F32, id="H4-Hkv1-fp32"),
        pytest.param(6, 3, F32, id="H6-Hkv3-fp32"),
        pytest.param(4, 2, F16, id="H4-Hkv2-fp16"),
        pytest.param(6, 3, B16, id="H6-Hkv3-bf16"),
    ],
)
def test_gqa_equals_expanded_kv(heads: int, kv_heads: int, dtype, backend: str, device: str) -> None:
    """GQA == MQA-expanded inputs (K/V heads repeated): same out and dq; dk, dv == the group-summed grads."""
    group = heads // kv_heads
    q, k, v, dout = make_inputs(2, heads, kv_heads, 50, 70, 32, dtype, device)
    gqa = run_ours(q, k, v, dout, backend=backend, causal=True)
    k_exp, v_exp = (t.repeat_interleave(group, dim=1) for t in (k, v))
    expanded = run_ours(q, k_exp, v_exp, dout, backend=backend, causal=True)
    for name in ("out", "lse", "dq"):
        assert_same_result(name, gqa[name], expanded[name])
    for name in ("dk", "dv"):
        summed = expanded[name].float().unflatten(1, (kv_heads, group)).sum(dim=2).to(dtype)
        assert_same_result(f"{name} (group-summed)", gqa[name], summed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_return_lse_and_output_dtype(dtype, backend: str, device: str) -> None:
    q, k, v, _ = make_inputs(2, 4, 2, 17, 33, 40, dtype, device)
    out = flash_attention(q, k, v, backend=backend)
    assert isinstance(out, torch.Tensor), f"return_lse=False must return one tensor, got {type(out)}"
    assert (out.shape, out.dtype, out.device) == (q.shape, dtype, q.device)
    result = flash_attention(q, k, v, backend=backend, return_lse=True)
    assert isinstance(result, tuple) and len(result) == 2
    out2, lse = result
    assert (out2.shape, out2.dtype) == (q.shape, dtype)
    assert (lse.shape, lse.dtype, lse.device) == ((2, 4, 17), torch.float32, q.device)
    assert torch.equal(out, out2)
    lse_expected = torch.logsumexp(
        (q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2)) / math.sqrt(40), dim=-1
    )
    torch.testing.assert_close(lse.double(), lse_expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_the_returned_lse_leaves_the_backward_alone(backend: str, device: str) -> None:
    """The returned lse is the user's own tensor: writing into it changes neither the saved softmax
    statistics nor the gradients (the backward recomputes the probabilities from those)."""
    q, k, v, dout = make_inputs(1, 2, 2, 17, 17, 16, F32, device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = flash_attention(*leaves, backend=backend, causal=True, return_lse=True)
    expected = torch.autograd.grad(flash_attention(*leaves, backend=backend, causal=True), leaves, dout)
    lse.fill_(1e4)
    for got, want in zip(torch.autograd.grad(out, leaves, dout), expected, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_is_not_differentiable(backend: str, device: str) -> None:
    q, k, v, _ = make_inputs(1, 2, 2, 17, 17, 16, F32, device)
    q.requires_grad_()
    out, lse = flash_attention(q, k, v, backend=backend, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_scale_is_inverse_sqrt_head_dim(backend: str, device: str) -> None:
    q, k, v, dout = make_inputs(1, 2, 2, 33, 47, 72, F32, device)
    default = run_ours(q, k, v, dout, backend=backend, causal=True)
    explicit = run_ours(q, k, v, dout, backend=backend, causal=True, softmax_scale=1 / math.sqrt(72))
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert_same_result(name, default[name], explicit[name])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [pytest.param(F16, id="fp16"), pytest.param(F32, id="fp32")])
@pytest.mark.parametrize("scale", [0.05, 0.5, 2.0])
def test_custom_softmax_scale(scale: float, dtype, backend: str, device: str) -> None:
    q, k, v, dout = make_inputs(1, 2, 1, 60, 77, 64, dtype, device)
    check_attention(q, k, v, dout, backend=backend, causal=True, softmax_scale=scale)


def _relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as BHSD x, different strides (never contiguous)."""
    if layout == "bshd":  # flash-attn's layout, viewed as BHSD: stride(-1) == 1
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "head_dim_major":  # stride(-1) == seqlen
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided_last_dim":  # every other element of a wider (NaN-poisoned) buffer: stride(-1) == 2
        wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "offset_slice":  # a slice of a bigger tensor: storage offset, padded row stride
        big = torch.full(
            (x.shape[0] + 1, x.shape[1], x.shape[2] + 3, x.shape[3] + 8),
            float("nan"),
            dtype=x.dtype,
            device=x.device,
        )
        big[1:, :, 3:, 8:] = x
        return big[1:, :, 3:, 8:]
    raise ValueError(layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [pytest.param(F16, id="fp16"), pytest.param(F32, id="fp32")])
@pytest.mark.parametrize("layout", ["bshd", "head_dim_major", "strided_last_dim", "offset_slice"])
def test_non_contiguous_inputs(layout: str, dtype, backend: str, device: str) -> None:
    """Non-contiguous q, k, v and dout give the same out, lse and grads as contiguous copies."""
    q, k, v, dout = make_inputs(2, 4, 2, 37, 53, 40, dtype, device)
    expected = run_ours(q, k, v, dout, backend=backend, causal=True)
    strided = [_relayout(t, layout) for t in (q, k, v, dout)]
    assert not any(t.is_contiguous() for t in strided)
    got = run_ours(*strided, backend=backend, causal=True)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert_same_result(name, got[name], expected[name])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "batch, seqlen_q, seqlen_k",
    [(0, 17, 17), (1, 0, 17), (1, 17, 0), (2, 0, 0)],
    ids=lambda x: str(x),
)
def test_empty_inputs(batch: int, seqlen_q: int, seqlen_k: int, causal: bool, backend: str, device: str):
    """Zero-size batch and zero-length sequences are valid: empty output, rows with no key give out 0 and
    lse -inf, gradients are zeros of the input shapes."""
    heads, kv_heads, head_dim = 4, 2, 16
    q, k, v, dout = make_inputs(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, F16, device)
    got = run_ours(q, k, v, dout, backend=backend, causal=causal)
    assert torch.equal(got["out"], torch.zeros_like(q)), "out must be zeros (no key is visible)"
    assert torch.equal(got["lse"], torch.full((batch, heads, seqlen_q), -math.inf, device=device))
    assert torch.equal(got["dq"], torch.zeros_like(q))
    assert torch.equal(got["dk"], torch.zeros_like(k))
    assert torch.equal(got["dv"], torch.zeros_like(v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_matches_grad_mode(backend: str, device: str) -> None:
    q, k, v, dout = make_inputs(1, 2, 2, 33, 33, 64, B16, device)
    with_grad = run_ours(q, k, v, dout, backend=backend, causal=True)
    with torch.inference_mode():
        out, lse = flash_attention(q, k, v, backend=backend, causal=True, return_lse=True)
    assert torch.equal(out, with_grad["out"]) and torch.equal(lse, with_grad["lse"])


def test_auto_backend_picks_triton_on_cuda_and_torch_elsewhere(device: str) -> None:
    """On the CPU with an LSE wanted, which SDPA does not give (where auto runs SDPA: test_cpu_sdpa.py)."""
    q, k, v, _ = make_inputs(1, 2, 2, 33, 33, 64, F32, device)
    expected_backend = "triton" if device == "cuda" else "torch"
    auto = flash_attention(q, k, v, causal=True, backend="auto", return_lse=True)
    explicit = flash_attention(q, k, v, causal=True, backend=expected_backend, return_lse=True)
    assert torch.equal(auto[0], explicit[0]) and torch.equal(auto[1], explicit[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["square", "sum"])
def test_second_derivative_raises(loss: str, backend: str, device: str) -> None:
    """The backward has no derivative of its own: differentiating the gradients again (a gradient penalty)
    raises, whether or not the incoming gradient depends on q (it was silently wrong on the torch backend
    and silently zero on triton). create_graph=True alone, without a second derivative, still works."""
    q, k, v, _ = Case(1, 2, 2, 9, 11, 16, F32).inputs(device)
    q.requires_grad_()
    out = flash_attention(q, k, v, causal=True, backend=backend)
    objective = (out**2).sum() if loss == "square" else out.sum()
    (dq,) = torch.autograd.grad(objective, q, create_graph=True, retain_graph=True)
    (plain_dq,) = torch.autograd.grad(objective, q)
    assert dq.requires_grad and torch.equal(dq.detach(), plain_dq)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(dq.square().sum(), q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_spanning_past_int32_are_copied(backend: str, device: str, monkeypatch) -> None:
    """A (batch, head) whose rows span 2^31 elements or more (a long BSHD sequence with many heads) reaches
    the kernels copied contiguous, since their row offsets are int32; the gradient of out too. Here the
    limit is lowered to 200 elements: bshd rows of 4 heads x 16 span 64 x 13 = 832."""
    from flashattention import _autograd, api

    q, k, v, dout = (
        t.transpose(1, 2).contiguous().transpose(1, 2) for t in make_inputs(2, 4, 2, 13, 13, 16, F32, device)
    )
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = flash_attention(*leaves, causal=True, backend=backend)
    expected_grads = torch.autograd.grad(expected, leaves, dout)
    seen = []
    real = api.attention
    monkeypatch.setattr(_autograd, "ROW_SPAN_LIMIT", 200)
    monkeypatch.setattr(api, "attention", lambda *a, **kw: seen.append(a[:3]) or real(*a, **kw))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_attention(*leaves, causal=True, backend=backend)
    grads = torch.autograd.grad(out, leaves, dout)
    assert seen and all(t.is_contiguous() for t in seen[0])
    for name, got, want in zip(
        ("out", "dq", "dk", "dv"), (out, *grads), (expected, *expected_grads), strict=True
    ):
        assert_same_result(name, got, want)
