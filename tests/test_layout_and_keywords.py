"""flash_attention's `layout` keyword ("bhsd" as SDPA, "bshd" as flash-attn: transposed views, the output in
the caller's layout) and its keyword surface: SDPA's keyword names raise a TypeError that says what to pass
instead, any other unknown keyword raises (nothing is swallowed)."""

from __future__ import annotations

import inspect

import pytest
import torch
from _helpers import assert_same_result, make_inputs, run_ours

from flashattention import flash_attention
from flashattention._validation import FLASH_ATTENTION_KEYWORDS

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32
BACKENDS = ["torch", "triton"]


def _bshd(x: torch.Tensor) -> torch.Tensor:
    """BHSD values stored as a contiguous [batch, seqlen, heads, head_dim] tensor (real BSHD data)."""
    return x.transpose(1, 2).contiguous()


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
@pytest.mark.parametrize(
    "heads, kv_heads, seqlen_q, seqlen_k, causal, dtype",
    [
        pytest.param(4, 2, 17, 33, True, F16, id="H4-Hkv2-Sq17-Sk33-causal-fp16"),
        pytest.param(2, 2, 29, 29, False, F32, id="H2-Hkv2-Sq29-Sk29-fp32"),
        pytest.param(3, 1, 24, 13, True, B16, id="H3-Hkv1-Sq24-Sk13-causal-bf16"),
    ],
)
def test_bshd_equals_bhsd(
    heads, kv_heads, seqlen_q, seqlen_k, causal, dtype, backend: str, device: str
) -> None:
    """layout="bshd" on BSHD tensors: out (in BSHD), lse ([batch, heads, seqlen_q]) and the gradients (in
    BSHD, as the leaves) are the BHSD call's, transposed."""
    q, k, v, dout = make_inputs(2, heads, kv_heads, seqlen_q, seqlen_k, 32, dtype, device)
    expected = run_ours(q, k, v, dout, backend=backend, causal=causal)
    leaves = [_bshd(t).requires_grad_() for t in (q, k, v)]
    out, lse = flash_attention(*leaves, causal=causal, backend=backend, layout="bshd", return_lse=True)
    assert out.shape == (2, seqlen_q, heads, 32) and lse.shape == (2, heads, seqlen_q)
    out.backward(_bshd(dout))
    assert_same_result("out", out.transpose(1, 2), expected["out"])
    assert_same_result("lse", lse, expected["lse"])
    for name, leaf in zip(("dq", "dk", "dv"), leaves, strict=True):
        assert leaf.grad.shape == leaf.shape
        assert_same_result(name, leaf.grad.transpose(1, 2), expected[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bshd_output_is_a_view_of_the_bhsd_result(backend: str, device: str) -> None:
    """No copy on the way out: the BSHD output is the kernel's contiguous BHSD output, transposed."""
    q, k, v, _ = make_inputs(1, 4, 2, 21, 21, 16, F32, device)
    out = flash_attention(_bshd(q), _bshd(k), _bshd(v), backend=backend, layout="bshd")
    assert out.shape == (1, 21, 4, 16) and out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize(
    "layout, exc_type, fragments",
    [
        ("BSHD", ValueError, ["`layout`", "'bhsd'", "'bshd'", "got 'BSHD'"]),
        ("sbhd", ValueError, ["`layout`", "got 'sbhd'"]),
        (None, ValueError, ["`layout`", "got None"]),
    ],
    ids=["upper-case", "sbhd", "none"],
)
def test_bad_layout_raises(layout, exc_type, fragments) -> None:
    q, k, v, _ = make_inputs(1, 2, 2, 5, 5, 16, F32, "cpu")
    with pytest.raises(exc_type) as info:
        flash_attention(q, k, v, layout=layout)
    missing = [f for f in fragments if f not in str(info.value)]
    assert not missing, f"message lacks {missing}: {info.value}"


def test_bshd_errors_speak_of_bshd_dimensions() -> None:
    """Shape errors name the dimensions in the caller's layout: heads are dimension 2 with "bshd"."""
    q = torch.randn(2, 17, 4, 64)
    k = v = torch.randn(2, 17, 3, 64)
    with pytest.raises(ValueError, match=r"H=4 and H_kv=3 \(dimension 2 with layout='bshd'\)"):
        flash_attention(q, k, v, layout="bshd")
    with pytest.raises(ValueError, match=r"\(batch, seqlen, heads, head_dim\)"):
        flash_attention(q[0], k[0], v[0], layout="bshd")


# SDPA's keyword -> a fragment of what to pass instead (the message names our equivalent)
SDPA_CASES = [
    ("is_causal", True, ["'is_causal'", "causal=True", "bottom-right"]),
    ("attn_mask", torch.ones(5, 5, dtype=torch.bool), ["'attn_mask'", "not supported", "window_size="]),
    ("dropout_p", 0.0, ["'dropout_p'", "not supported"]),
    ("scale", 0.5, ["'scale'", "softmax_scale="]),
    ("enable_gqa", True, ["'enable_gqa'", "automatic"]),
]


@pytest.mark.parametrize("name, value, fragments", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_sdpa_keyword_names_our_equivalent(name: str, value, fragments) -> None:
    q, k, v, _ = make_inputs(1, 2, 2, 5, 5, 16, F32, "cpu")
    with pytest.raises(TypeError) as info:
        flash_attention(q, k, v, **{name: value})
    missing = [f for f in fragments if f not in str(info.value)]
    assert not missing, f"message lacks {missing}: {info.value}"


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"casual": True}, ["unexpected keyword argument 'casual'", "Did you mean 'causal'?"]),
        ({"window": (4, 0)}, ["unexpected keyword argument 'window'", "Did you mean 'window_size'?"]),
        ({"foo": 1}, ["unexpected keyword argument 'foo'"]),
        ({"is_causal": True, "bar": 2}, ["'is_causal'", "causal=True", "unexpected keyword argument 'bar'"]),
    ],
    ids=["casual", "window", "foo", "sdpa-and-unknown"],
)
def test_unknown_keyword_raises_with_the_valid_ones(kwargs: dict, fragments: list[str]) -> None:
    """Every unknown keyword raises (a typo never passes silently), with the list of valid keywords."""
    q, k, v, _ = make_inputs(1, 2, 2, 5, 5, 16, F32, "cpu")
    with pytest.raises(TypeError) as info:
        flash_attention(q, k, v, **kwargs)
    message = str(info.value)
    missing = [f for f in [*fragments, "Valid keyword arguments: causal, softmax_scale"] if f not in message]
    assert not missing, f"message lacks {missing}: {message}"


def test_valid_keyword_list_is_the_signature() -> None:
    params = inspect.signature(flash_attention).parameters.values()
    keyword_only = tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
    assert keyword_only == FLASH_ATTENTION_KEYWORDS
