"""The one tolerance rule (the README's pass rule) and the forward+backward runs it compares.

Pass rule, for every output and gradient:
    max|ours - ref| <= 2 * max|same_dtype - ref| + floor
where `ref` is `flashattention.reference.attention_reference` in float64 (CPU) or float32 (GPU; float64 for
fp32 inputs, else the oracle would be the same computation as same_dtype), and `same_dtype` is the same
plain PyTorch computation in the input dtype (autograd for the gradients). NaN in ours never passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from flashattention import flash_attention
from flashattention.reference import attention_reference
from flashattention.testing import (  # noqa: F401 - re-exported for the test modules
    DTYPE_NAMES,
    FLOOR_REL,
    Case,
    compare_to_reference,
    default_floor,
    make_inputs,
)

NAMES = ("out", "lse", "dq", "dk", "dv")
# a padded head dim -> an odd head dim that its table entry serves (exercises the padding masks)
ODD_HEAD_DIM = {64: 40, 128: 72, 256: 200}


# ----------------------------------------------------------------------------------------------------------
# The tolerance rule


def reference_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The oracle's dtype: float64 on the CPU; on the GPU float32, or float64 for fp32 inputs."""
    if torch.device(device).type == "cpu" or dtype == torch.float32:
        return torch.float64
    return torch.float32


def assert_close_to_reference(
    name: str,
    ours: torch.Tensor,
    ref: torch.Tensor,
    same_dtype: torch.Tensor,
    floor: float | None = None,
) -> None:
    """Asserts the pass rule of the README (see `compare_to_reference`)."""
    message = compare_to_reference(name, ours, ref, same_dtype, floor)
    if message is not None:
        raise AssertionError(message)


def assert_same_result(name: str, ours: torch.Tensor, expected: torch.Tensor) -> None:
    """For metamorphic checks (ours against ours on an equivalent problem): equal up to about one rounding
    of the dtype, relative to the largest value (at least 1, as in default_floor); +-inf must match exactly;
    NaN never passes."""
    assert ours.shape == expected.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(expected.shape)}"
    assert ours.dtype == expected.dtype, f"{name}: dtype {ours.dtype} != {expected.dtype}"
    if ours.numel() == 0:
        return
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(ours.dtype, 2e-5)
    exp64 = expected.detach().to(torch.float64)
    floor = tol / FLOOR_REL[torch.float32] * default_floor(torch.float32, exp64)  # tol * max(max|exp|, 1)
    message = compare_to_reference(name, ours, exp64, exp64, floor=floor)
    if message is not None:
        raise AssertionError(f"(metamorphic check: 'ref' is the equivalent problem's result) {message}")


# ----------------------------------------------------------------------------------------------------------
# Problems and their forward+backward runs


def case_params(cases: Sequence[Case], *marks) -> list:
    return [pytest.param(c, id=c.id, marks=marks) for c in cases]


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def forward_backward(fn: AttentionFn, q, k, v, dout, dtype: torch.dtype | None = None) -> dict:
    """Runs (out, lse) = fn(q, k, v) on fresh leaves (cast to `dtype` if given), then out.backward(dout).

    Returns {"out", "lse", "dq", "dk", "dv"}; a gradient autograd left as None (nothing flowed) is zeros."""
    dtype = dtype or q.dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    out.backward(dout.to(dtype))
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return dict(zip(NAMES, (out.detach(), lse.detach(), *grads), strict=True))


def run_ours(q, k, v, dout, *, backend: str, **kwargs) -> dict:
    """flash_attention forward (with lse) and backward; checks that grads exist and dtypes are kept."""

    def fn(q_, k_, v_):
        return flash_attention(q_, k_, v_, return_lse=True, backend=backend, **kwargs)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    out.backward(dout)
    for name, t in zip(("q", "k", "v"), leaves, strict=True):
        assert t.grad is not None, f"no gradient reached {name} (backend={backend})"
    result = dict(zip(NAMES, (out.detach(), lse.detach(), *(t.grad for t in leaves)), strict=True))
    assert result["out"].dtype == q.dtype, f"out dtype {result['out'].dtype} != input dtype {q.dtype}"
    assert result["lse"].dtype == torch.float32, f"lse dtype {result['lse'].dtype} != torch.float32"
    for name in ("dq", "dk", "dv"):
        assert result[name].dtype == q.dtype, f"{name} dtype {result[name].dtype} != input dtype {q.dtype}"
    return result


def run_reference(q, k, v, dout, *, dtype: torch.dtype, **kwargs) -> dict:
    """attention_reference forward and autograd backward, computed in `dtype` (the leaves' dtype)."""
    upcast = dtype == torch.float64  # float64 all the way; otherwise compute in the leaves' own dtype

    def fn(q_, k_, v_):
        return attention_reference(q_, k_, v_, upcast=upcast, **kwargs)

    return forward_backward(fn, q, k, v, dout, dtype=dtype)


def check_attention(q, k, v, dout, *, backend: str, floors: dict | None = None, **kwargs) -> dict:
    """Runs ours, the oracle and the same-dtype computation; asserts the pass rule on out, lse, dq, dk, dv
    (reporting every failure at once). kwargs: causal, window_size, softmax_scale. Returns ours."""
    ours = run_ours(q, k, v, dout, backend=backend, **kwargs)
    ref = run_reference(q, k, v, dout, dtype=reference_dtype(q.dtype, q.device), **kwargs)
    same = run_reference(q, k, v, dout, dtype=q.dtype, **kwargs)
    floors = floors or {}
    failures = [compare_to_reference(n, ours[n], ref[n], same[n], floors.get(n)) for n in NAMES]
    failures = [f for f in failures if f is not None]
    if failures:
        raise AssertionError(f"backend={backend}, {kwargs}:\n  " + "\n  ".join(failures))
    return ours
