"""Every bad input raises the right exception type with a message that names the argument and the value
given (the README's Errors section)."""

import math

import pytest
import torch

from flashattention import flash_attention


def _t(*shape, dtype=torch.float16, device="cpu"):
    return torch.randn(*shape, device="cpu").to(dtype=dtype, device=device)


def _qkv(q_shape=(2, 4, 17, 64), kv_shape=(2, 2, 17, 64), dtype=torch.float16):
    return _t(*q_shape, dtype=dtype), _t(*kv_shape, dtype=dtype), _t(*kv_shape, dtype=dtype)


def _replace(index: int, tensor):
    qkv = list(_qkv())
    qkv[index] = tensor
    return tuple(qkv)


# (id, (q, k, v) factory, flash_attention kwargs, exception type, message fragments)
BAD_INPUTS = [
    # types of q, k, v
    ("q-is-list", lambda: _replace(0, [[1.0]]), {}, TypeError, ["`q`", "torch.Tensor", "list"]),
    (
        "v-is-ndarray",
        lambda: _replace(2, _t(2, 2, 17, 64).float().numpy()),
        {},
        TypeError,
        ["`v`", "torch.Tensor", "ndarray"],
    ),
    ("k-is-none", lambda: _replace(1, None), {}, TypeError, ["`k`", "NoneType"]),
    (
        "q-sparse",
        lambda: _replace(0, _t(2, 4, 17, 64).to_sparse()),
        {},
        TypeError,
        ["`q`", "dense", "to_dense()"],
    ),
    (
        "v-sparse-csr",
        lambda: _replace(2, _t(2, 2, 17, 64).flatten(0, 2).to_sparse_csr()),
        {},
        TypeError,
        ["`v`", "dense", "sparse_csr"],
    ),
    # dtypes
    (
        "qkv-dtype-mismatch",
        lambda: _replace(1, _t(2, 2, 17, 64, dtype=torch.float32)),
        {},
        TypeError,
        ["one dtype", "q=torch.float16", "k=torch.float32"],
    ),
    (
        "q-bf16-kv-fp16",
        lambda: _replace(0, _t(2, 4, 17, 64, dtype=torch.bfloat16)),
        {},
        TypeError,
        ["one dtype", "bfloat16"],
    ),
    ("float64", lambda: _qkv(dtype=torch.float64), {}, TypeError, ["`q`", "torch.float64", "float16"]),
    (
        "int32",
        lambda: _replace(2, torch.ones(2, 2, 17, 64, dtype=torch.int32)),
        {},
        TypeError,
        ["`v`", "torch.int32"],
    ),
    ("bool", lambda: _replace(1, torch.ones(2, 2, 17, 64, dtype=torch.bool)), {}, TypeError, ["`k`", "bool"]),
    # ranks and shapes
    ("q-rank3", lambda: _replace(0, _t(4, 17, 64)), {}, ValueError, ["`q`", "4 dimensions", "(4, 17, 64)"]),
    (
        "k-rank5",
        lambda: _replace(1, _t(1, 2, 2, 17, 64)),
        {},
        ValueError,
        ["`k`", "4 dimensions", "(1, 2, 2, 17, 64)"],
    ),
    ("v-rank2", lambda: _replace(2, _t(17, 64)), {}, ValueError, ["`v`", "4 dimensions", "(17, 64)"]),
    (
        "head-dims-differ",
        lambda: _qkv(q_shape=(2, 4, 17, 64), kv_shape=(2, 2, 17, 32)),
        {},
        ValueError,
        ["head_dim", "64", "32"],
    ),
    (
        "k-v-shapes-differ",
        lambda: _replace(2, _t(2, 2, 19, 64)),
        {},
        ValueError,
        ["k and v", "(2, 2, 17, 64)", "(2, 2, 19, 64)"],
    ),
    ("batch-differs", lambda: _qkv(q_shape=(3, 4, 17, 64)), {}, ValueError, ["batch", "3", "2"]),
    (
        "heads-not-multiple",
        lambda: _qkv(q_shape=(2, 4, 17, 64), kv_shape=(2, 3, 17, 64)),
        {},
        ValueError,
        ["H=4", "H_kv=3"],
    ),
    (
        "kv-heads-more-than-q",
        lambda: _qkv(q_shape=(2, 2, 17, 64), kv_shape=(2, 4, 17, 64)),
        {},
        ValueError,
        ["H=2", "H_kv=4"],
    ),
    ("zero-kv-heads", lambda: _qkv(kv_shape=(2, 0, 17, 64)), {}, ValueError, ["H=4", "H_kv=0"]),
    (
        "head-dim-4",
        lambda: _qkv(q_shape=(2, 4, 17, 4), kv_shape=(2, 2, 17, 4)),
        {},
        ValueError,
        ["head_dim", "8", "256", "got 4"],
    ),
    (
        "head-dim-7",
        lambda: _qkv(q_shape=(2, 4, 17, 7), kv_shape=(2, 2, 17, 7)),
        {},
        ValueError,
        ["head_dim", "got 7"],
    ),
    (
        "head-dim-257",
        lambda: _qkv(q_shape=(1, 2, 3, 257), kv_shape=(1, 2, 3, 257)),
        {},
        ValueError,
        ["head_dim", "got 257"],
    ),
    (
        "head-dim-512",
        lambda: _qkv(q_shape=(1, 2, 3, 512), kv_shape=(1, 2, 3, 512)),
        {},
        ValueError,
        ["head_dim", "8", "256", "got 512"],
    ),
    # mask arguments
    ("window-left-minus2", _qkv, {"window_size": (-2, 0)}, ValueError, ["window_size", "left=-2"]),
    ("window-right-minus5", _qkv, {"window_size": (3, -5)}, ValueError, ["window_size", "right=-5"]),
    ("window-float", _qkv, {"window_size": (1.5, 0)}, TypeError, ["window_size", "1.5"]),
    ("window-bool", _qkv, {"window_size": (True, 0)}, TypeError, ["window_size", "True"]),
    ("window-length3", _qkv, {"window_size": (1, 2, 3)}, TypeError, ["window_size", "(1, 2, 3)"]),
    ("window-length1", _qkv, {"window_size": (4,)}, TypeError, ["window_size", "(4,)"]),
    ("window-int", _qkv, {"window_size": 16}, TypeError, ["window_size", "16"]),
    ("window-none", _qkv, {"window_size": None}, TypeError, ["window_size", "None"]),
    (
        "causal-with-right3",
        _qkv,
        {"causal": True, "window_size": (8, 3)},
        ValueError,
        ["causal=True", "right=3"],
    ),
    ("causal-not-bool", _qkv, {"causal": 1}, TypeError, ["causal", "int"]),
    ("causal-str", _qkv, {"causal": "yes"}, TypeError, ["causal", "str"]),
    # flags
    ("return-lse-str", _qkv, {"return_lse": "False"}, TypeError, ["`return_lse`", "bool", "str"]),
    ("return-lse-int", _qkv, {"return_lse": 1}, TypeError, ["`return_lse`", "bool", "int"]),
    # softmax_scale
    ("scale-nan", _qkv, {"softmax_scale": math.nan}, ValueError, ["softmax_scale", "finite", "nan"]),
    ("scale-inf", _qkv, {"softmax_scale": math.inf}, ValueError, ["softmax_scale", "finite", "inf"]),
    ("scale-minus-inf", _qkv, {"softmax_scale": -math.inf}, ValueError, ["softmax_scale", "-inf"]),
    ("scale-zero", _qkv, {"softmax_scale": 0.0}, ValueError, ["softmax_scale", "> 0", "got 0.0"]),
    ("scale-negative", _qkv, {"softmax_scale": -0.5}, ValueError, ["softmax_scale", "> 0", "got -0.5"]),
    ("scale-str", _qkv, {"softmax_scale": "0.1"}, TypeError, ["softmax_scale", "str"]),
    ("scale-past-fp32", _qkv, {"softmax_scale": 1e39}, ValueError, ["softmax_scale", "float32", "got 1e+39"]),
    ("scale-huge-int", _qkv, {"softmax_scale": 10**400}, ValueError, ["softmax_scale", "finite"]),
    ("scale-fp32-overflow", _qkv, {"softmax_scale": 3e38}, ValueError, ["softmax_scale", "log2(e)"]),
    ("scale-below-fp32", _qkv, {"softmax_scale": 1e-40}, ValueError, ["softmax_scale", "between"]),
    # backend
    ("backend-unknown", _qkv, {"backend": "flash"}, ValueError, ["backend", "'flash'", "triton", "torch"]),
    ("backend-cuda", _qkv, {"backend": "cuda"}, ValueError, ["backend", "'cuda'"]),
    ("backend-none", _qkv, {"backend": None}, ValueError, ["backend", "None"]),
]


@pytest.mark.parametrize(
    "make_qkv, kwargs, exc_type, fragments",
    [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS],
)
def test_bad_input_raises_clear_error(make_qkv, kwargs, exc_type, fragments) -> None:
    q, k, v = make_qkv()
    with pytest.raises(exc_type) as info:
        flash_attention(q, k, v, **kwargs)
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message lacks {missing}: {message!r}"


@pytest.mark.parametrize("bad", ["k", "v"])
def test_device_mismatch_raises(bad: str) -> None:
    """One tensor on another device (the meta device stands in for a second device on any machine)."""
    q, k, v = _qkv()
    tensors = {"q": q, "k": k, "v": v}
    tensors[bad] = tensors[bad].to("meta")
    with pytest.raises(ValueError) as info:
        flash_attention(tensors["q"], tensors["k"], tensors["v"])
    message = str(info.value)
    assert "one device" in message and "meta" in message and "cpu" in message, message


def test_triton_on_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit backend never falls back silently: triton with CPU tensors needs TRITON_INTERPRET=1."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv()
    with pytest.raises(ValueError) as info:
        flash_attention(q, k, v, backend="triton")
    message = str(info.value)
    assert "backend='triton'" in message and "cpu" in message and "TRITON_INTERPRET" in message, message


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cpu_backends_run_without_interpreter(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The counterpart of the test above: "auto" and "torch" do not need the interpreter on CPU tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv()
    assert flash_attention(q, k, v, backend=backend).shape == q.shape


@pytest.mark.parametrize("head_dim", [8, 256])
def test_head_dim_bounds_are_inclusive(head_dim: int) -> None:
    q, k, v = _qkv(q_shape=(1, 2, 3, head_dim), kv_shape=(1, 1, 3, head_dim))
    assert flash_attention(q, k, v, backend="torch").shape == q.shape
