"""The tolerance rule (the README's pass rule), shared by the tests, `python -m flashattention check` and the
tuning script:

    max|ours - ref| <= 2 * max|same_dtype - ref| + floor

`ref` is the float64 (CPU) / float32 (GPU) oracle, `same_dtype` the plain PyTorch computation in the input
dtype. NaN in ours never passes; infinite reference entries (the LSE of a row that sees no key) must match.
Also the problems both compare on: `Case` and `make_inputs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "DTYPE_NAMES",
    "FLOOR_REL",
    "Case",
    "compare_to_reference",
    "default_floor",
    "error_and_bound",
    "make_inputs",
]

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# Floor of the pass rule, relative to the largest finite |ref| of the compared tensor: about one rounding
# of the output dtype (fp16 eps 9.8e-4, bf16 eps 7.8e-3), and 1e-5 for fp32 (accumulation-order noise).
FLOOR_REL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}


def default_floor(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """FLOOR_REL[dtype] times the scale of the values: the largest finite |ref|, but at least 1, the scale
    of the terms that get summed for O(1) inputs (randn). A result that cancels to ~0 (e.g. dq when each
    query sees one key: dS = P * (dP - rowsum(dO * O)) = 0) still carries rounding noise of that scale."""
    finite = ref[torch.isfinite(ref)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return FLOOR_REL[dtype] * max(scale, 1.0)


def _errors(ours: torch.Tensor, ref: torch.Tensor, same_dtype: torch.Tensor, floor: float | None):
    """Elementwise error of ours (inf where ours is NaN or misses an infinite reference entry), the bound,
    and the float64 copies the message needs."""
    ours64 = ours.detach().to(device=ref.device, dtype=torch.float64)
    ref64 = ref.detach().to(torch.float64)
    same64 = same_dtype.detach().to(device=ref.device, dtype=torch.float64)
    if floor is None:
        floor = default_floor(ours.dtype if ours.dtype in FLOOR_REL else torch.float32, ref64)
    ref_finite = torch.isfinite(ref64)
    same_err = (same64 - ref64).abs()
    same_err = torch.where(ref_finite & torch.isfinite(same_err), same_err, torch.zeros_like(same_err))
    bound = 2.0 * same_err.max().item() + floor
    err = (ours64 - ref64).abs()
    # exact match wanted where ref is +-inf (ours == ref gives err NaN from inf - inf); NaN in ours is inf
    err = torch.where(ref_finite, err, torch.where(ours64 == ref64, 0.0, math.inf))
    err = torch.where(torch.isnan(ours64), math.inf, err)
    return err, bound, floor, same_err.max().item(), ours64, ref64, same64


def error_and_bound(
    ours: torch.Tensor,
    ref: torch.Tensor,
    same_dtype: torch.Tensor,
    floor: float | None = None,
) -> tuple[float, float]:
    """(max|ours - ref|, bound): the rule passes when the first is <= the second (inf: NaN or an infinite
    entry missed). Shapes must match; empty tensors give (0, 0)."""
    if ours.numel() == 0:
        return 0.0, 0.0
    err, bound, *_ = _errors(ours, ref, same_dtype, floor)
    return err.max().item(), bound


def compare_to_reference(
    name: str,
    ours: torch.Tensor,
    ref: torch.Tensor,
    same_dtype: torch.Tensor,
    floor: float | None = None,
) -> str | None:
    """Applies the pass rule; returns None on pass, else a message with the worst index and both values.

    Infinite reference entries (lse of a row that sees no key is -inf) must be matched exactly; the rule
    applies to the finite ones. Entries where same_dtype itself is not finite do not widen the bound."""
    if ours.shape != ref.shape:
        return f"{name}: shape {tuple(ours.shape)} != reference shape {tuple(ref.shape)}"
    if ours.numel() == 0:
        return None
    if torch.isnan(ref).any():
        return f"{name}: the reference has {int(torch.isnan(ref).sum())} NaN entries (oracle bug)"
    err, bound, floor, same_max, ours64, ref64, same64 = _errors(ours, ref, same_dtype, floor)
    worst = int(err.flatten().argmax())
    max_err = err.flatten()[worst].item()
    if max_err <= bound:
        return None
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), tuple(ours.shape)))
    n_nan = int(torch.isnan(ours64).sum())
    n_inf_mismatch = int(((~torch.isfinite(ref64)) & (ours64 != ref64)).sum())
    n_bad = int((err > bound).sum())
    return (
        f"{name}: max|ours - ref| = {max_err:.4g} > bound {bound:.4g} "
        f"(= 2 * max|same_dtype - ref| {same_max:.4g} + floor {floor:.4g}); "
        f"{n_bad} of {ours.numel()} entries out of bound; worst at index {idx}: ours={ours64[idx].item()!r}, "
        f"ref={ref64[idx].item()!r}, same_dtype={same64[idx].item()!r}; "
        f"NaN in ours: {'YES, ' + str(n_nan) + ' entries' if n_nan else 'no'}"
        + (f"; {n_inf_mismatch} entries where ref is +-inf and ours differs" if n_inf_mismatch else "")
    )


def make_inputs(
    batch: int,
    heads: int,
    kv_heads: int,
    seqlen_q: int,
    seqlen_k: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    input_scale: float = 1.0,
):
    """Random (q, k, v, dout), BHSD and contiguous, in `dtype` on `device`, drawn in float32 (so every dtype
    sees the same values for a seed) from torch's global generator."""

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    q = randn(batch, heads, seqlen_q, head_dim, scale=input_scale)
    k = randn(batch, kv_heads, seqlen_k, head_dim, scale=input_scale)
    v = randn(batch, kv_heads, seqlen_k, head_dim)
    dout = randn(batch, heads, seqlen_q, head_dim)
    return q, k, v, dout


@dataclass(frozen=True)
class Case:
    """One attention problem; `id` reads like B2-H4-Hkv2-Sq113-Sk203-D72-causal-bf16; `name` says what it
    is for (optional)."""

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
    name: str = ""

    @property
    def id(self) -> str:
        parts = [
            f"B{self.batch}",
            f"H{self.heads}",
            f"Hkv{self.kv_heads}",
            f"Sq{self.seqlen_q}",
            f"Sk{self.seqlen_k}",
            f"D{self.head_dim}",
        ]
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
        """(q, k, v, dout) in self.dtype (make_inputs)."""
        return make_inputs(
            self.batch,
            self.heads,
            self.kv_heads,
            self.seqlen_q,
            self.seqlen_k,
            self.head_dim,
            self.dtype,
            device,
            self.input_scale,
        )
