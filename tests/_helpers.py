"""The one tolerance rule of DESIGN.md section 3 and the forward+backward runs it compares.

Pass rule, for every output and gradient:
    max|ours - ref| <= 2 * max|same_dtype - ref| + floor
where `ref` is `flashattention.reference.attention_reference` in float64 (CPU) or float32 (GPU; float64 for
fp32 inputs, else the oracle would be the same computation as same_dtype), and `same_dtype` is the same
plain PyTorch computation in the input dtype (autograd for the gradients). NaN in ours never passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

from flashattention import flash_attention
from flashattention.reference import attention_reference

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# Floor of the pass rule, relative to the largest finite |ref| of the compared tensor: about one rounding
# of the output dtype (fp16 eps 9.8e-4, bf16 eps 7.8e-3), and 1e-5 for fp32 (accumulation-order noise).
FLOOR_REL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}

NAMES = ("out", "lse", "dq", "dk", "dv")


# ----------------------------------------------------------------------------------------------------------
# The tolerance rule


def reference_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The oracle's dtype: float64 on the CPU; on the GPU float32, or float64 for fp32 inputs."""
    if torch.device(device).type == "cpu" or dtype == torch.float32:
        return torch.float64
    return torch.float32


def default_floor(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """FLOOR_REL[dtype] times the scale of the values: the largest finite |ref|, but at least 1, the scale
    of the terms that get summed for O(1) inputs (randn). A result that cancels to ~0 (e.g. dq when each
    query sees one key: dS = P * (dP - rowsum(dO * O)) = 0) still carries rounding noise of that scale."""
    finite = ref[torch.isfinite(ref)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return FLOOR_REL[dtype] * max(scale, 1.0)


def compare_to_reference(
    name: str, ours: torch.Tensor, ref: torch.Tensor, same_dtype: torch.Tensor, floor: float | None = None,
) -> str | None:
    """Applies the pass rule; returns None on pass, else a message with the worst index and both values.

    Infinite reference entries (lse of a row that sees no key is -inf) must be matched exactly; the rule
    applies to the finite ones. Entries where same_dtype itself is not finite do not widen the bound."""
    if ours.shape != ref.shape:
        return f"{name}: shape {tuple(ours.shape)} != reference shape {tuple(ref.shape)}"
    if ours.numel() == 0:
        return None
    ours64 = ours.detach().to(device=ref.device, dtype=torch.float64)
    ref64 = ref.detach().to(torch.float64)
    same64 = same_dtype.detach().to(device=ref.device, dtype=torch.float64)
    if floor is None:
        floor = default_floor(ours.dtype if ours.dtype in FLOOR_REL else torch.float32, ref64)
    if torch.isnan(ref64).any():
        return f"{name}: the reference has {int(torch.isnan(ref64).sum())} NaN entries (oracle bug)"

    ref_finite = torch.isfinite(ref64)
    same_err = (same64 - ref64).abs()
    same_err = torch.where(ref_finite & torch.isfinite(same_err), same_err, torch.zeros_like(same_err))
    bound = 2.0 * same_err.max().item() + floor

    err = (ours64 - ref64).abs()
    # exact match wanted where ref is +-inf (ours == ref gives err NaN from inf - inf); NaN in ours is inf
    err = torch.where(ref_finite, err, torch.where(ours64 == ref64, 0.0, math.inf))
    err = torch.where(torch.isnan(ours64), math.inf, err)
    worst = int(err.flatten().argmax())
    max_err = err.flatten()[worst].item()
    if max_err <= bound:
        return None
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), tuple(ours.shape)))
    n_nan = int(torch.isnan(ours64).sum())
    n_inf_mismatch = int(((~ref_finite) & (ours64 != ref64)).sum())
    n_bad = int((err > bound).sum())
    return (
        f"{name}: max|ours - ref| = {max_err:.4g} > bound {bound:.4g} "
        f"(= 2 * max|same_dtype - ref| {same_err.max().item():.4g} + floor {floor:.4g}); "
        f"{n_bad} of {ours.numel()} entries out of bound; worst at index {idx}: ours={ours64[idx].item()!r}, "
        f"ref={ref64[idx].item()!r}, same_dtype={same64[idx].item()!r}; "
        f"NaN in ours: {'YES, ' + str(n_nan) + ' entries' if n_nan else 'no'}"
        + (f"; {n_inf_mismatch} entries where ref is +-inf and ours differs" if n_inf_mismatch else "")
    )


def assert_close_to_reference(
    name: str, ours: torch.Tensor, ref: torch.Tensor, same_dtype: torch.Tensor, floor: float | None = None,
) -> None:
    """Asserts the pass rule of DESIGN.md section 3 (see `compare_to_reference`)."""
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


@dataclass(frozen=True)
class Case:
    """One attention problem; `id` reads like B2-H4-Hkv2-Sq113-Sk203-D72-causal-bf16."""

    batch: int
    heads: int
    kv_heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    dtype: torch.dtype = torch.float16
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    input_scale: float = 1.0  # multiplies q and k: large scores test the softmax's numerical safety

    @property
    def id(self) -> str:
        parts = [f"B{self.batch}", f"H{self.heads}", f"Hkv{self.kv_heads}", f"Sq{self.seqlen_q}",
                 f"Sk{self.seqlen_k}", f"D{self.head_dim}"]
        if self.causal:
            parts.append("causal")
        if self.window[0] != -1:
            parts.append(f"left{self.window[0]}")
        if self.window[1] != -1:
            parts.append(f"right{self.window[1]}")
        parts.append(DTYPE_NAMES[self.dtype])
        if self.input_scale != 1.0:
            parts.append(f"x{self.input_scale:g}")
        return "-".join(parts)

    def mask_kwargs(self) -> dict:
        return {"causal": self.causal, "window_size": self.window}

    def inputs(self, device: torch.device | str) -> tuple[torch.Tensor, ...]:
        """(q, k, v, dout) in self.dtype, generated in float32 so all dtypes see the same values."""
        return make_inputs(self.batch, self.heads, self.kv_heads, self.seqlen_q, self.seqlen_k, self.head_dim,
                           self.dtype, device, self.input_scale)


def case_params(cases: Sequence[Case], *marks) -> list:
    return [pytest.param(c, id=c.id, marks=marks) for c in cases]


def make_inputs(batch: int, heads: int, kv_heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
                dtype: torch.dtype, device: torch.device | str, input_scale: float = 1.0):
    """Random (q, k, v, dout), BHSD and contiguous, in `dtype` on `device`."""
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    q = randn(batch, heads, seqlen_q, head_dim, scale=input_scale)
    k = randn(batch, kv_heads, seqlen_k, head_dim, scale=input_scale)
    v = randn(batch, kv_heads, seqlen_k, head_dim)
    dout = randn(batch, heads, seqlen_q, head_dim)
    return q, k, v, dout


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
