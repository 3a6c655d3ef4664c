"""Fuzz-style cases drawn once from a fixed seed: random tiny shapes (odd lengths, seqlen_q != seqlen_k,
GQA/MQA), masks (causal, windows small, at the sequence ends and huge), layouts (BHSD contiguous, BSHD through
layout="bshd", BSHD storage viewed as BHSD, offset slices of bigger NaN-filled tensors), dtypes and backends
(torch, triton, auto), forward and backward against the float64 oracle with the tolerance rule. Each case's
draw is in its id, so a failure reproduces with `-k` alone."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch
from _helpers import NAMES, compare_to_reference, make_inputs, reference_dtype, run_reference

from flashattention import flash_attention

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32
LAYOUTS = ("bhsd", "bshd", "bshd-view", "sliced")
HUGE = (2**31 - 1, 2**31, 2**40)


@dataclass(frozen=True)
class FuzzCase:
    batch: int
    heads: int
    kv_heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    window: tuple[int, int]
    layout: str
    backend: str
    return_lse: bool

    @property
    def id(self) -> str:
        left, right = self.window
        parts = ["causal"] if self.causal else []
        parts += [f"left{left}"] if left != -1 else []
        parts += [f"right{right}"] if right != -1 else []
        mask = "-".join(parts) or "full"
        dtype = {F16: "fp16", B16: "bf16", F32: "fp32"}[self.dtype]
        return (
            f"{self.backend}-B{self.batch}-H{self.heads}-Hkv{self.kv_heads}-Sq{self.seqlen_q}-Sk{self.seqlen_k}-"
            f"D{self.head_dim}-{mask}-{self.layout}-{dtype}" + ("" if self.return_lse else "-nolse")
        )


def _bound(rng: random.Random, seqlen: int) -> int:
    """A window bound: unbounded, small, at the sequence's end (seqlen - 2 .. seqlen + 1) or huge."""
    kind = rng.choice(("unbounded", "small", "end", "huge"))
    if kind == "unbounded":
        return -1
    if kind == "small":
        return rng.randint(0, 6)
    if kind == "end":
        return max(0, seqlen + rng.randint(-2, 1))
    return rng.choice(HUGE)


def _draw(rng: random.Random, backend: str) -> FuzzCase:
    kv_heads = rng.choice((1, 2))
    seqlen_q, seqlen_k = rng.randint(1, 40), rng.randint(1, 40)
    causal = rng.random() < 0.4
    left = _bound(rng, seqlen_k) if rng.random() < 0.6 else -1
    right = rng.choice((-1, 0)) if causal else (_bound(rng, seqlen_q) if rng.random() < 0.6 else -1)
    return FuzzCase(
        batch=rng.choice((1, 2)),
        heads=kv_heads * rng.choice((1, 2, 3)),
        kv_heads=kv_heads,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        head_dim=rng.choice((8, 16, 24, 40)),
        dtype=rng.choice((F16, B16, F32)),
        causal=causal,
        window=(left, right),
        layout=rng.choice(LAYOUTS),
        backend=backend,
        # auto without the lse may run SDPA on the CPU (tests/test_cpu_sdpa.py): cover both paths
        return_lse=backend != "auto" or rng.random() < 0.5,
    )


_RNG = random.Random(1616)
CASES = [_draw(_RNG, "torch") for _ in range(12)]
CASES += [_draw(_RNG, "triton") for _ in range(18)]
CASES += [_draw(_RNG, "auto") for _ in range(8)]


def _as_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """BHSD values x as the tensor the caller holds in `layout` (a leaf of its own, with its strides)."""
    if layout in ("bshd", "bshd-view"):
        return x.transpose(1, 2).contiguous().requires_grad_()
    if layout == "sliced":  # storage offset, padded row stride, NaN outside the view
        big = torch.full(
            (x.shape[0] + 1, x.shape[1], x.shape[2] + 3, x.shape[3] + 8),
            math.nan,
            dtype=x.dtype,
            device=x.device,
        )
        big[1:, :, 3:, 8:] = x
        return big[1:, :, 3:, 8:].detach().requires_grad_()
    return x.clone().requires_grad_()


def _to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2) if layout in ("bshd", "bshd-view") else x


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_fuzz_matches_reference(case: FuzzCase, device: str) -> None:
    q, k, v, dout = make_inputs(
        case.batch, case.heads, case.kv_heads, case.seqlen_q, case.seqlen_k, case.head_dim, case.dtype, device
    )
    leaves = [_as_layout(t, case.layout) for t in (q, k, v)]
    args = [t.transpose(1, 2) if case.layout == "bshd-view" else t for t in leaves]
    mask = {"causal": case.causal, "window_size": case.window}
    result = flash_attention(
        *args,
        **mask,
        return_lse=case.return_lse,
        backend=case.backend,
        layout="bshd" if case.layout == "bshd" else "bhsd",
    )
    out, lse = result if case.return_lse else (result, None)
    out = _to_bhsd(out, "bshd" if case.layout == "bshd" else "bhsd")
    out.backward(dout)
    ours = {"out": out.detach(), "lse": lse}
    for name, leaf in zip(("dq", "dk", "dv"), leaves, strict=True):
        ours[name] = _to_bhsd(leaf.grad, case.layout)

    ref = run_reference(q, k, v, dout, dtype=reference_dtype(q.dtype, q.device), **mask)
    same = run_reference(q, k, v, dout, dtype=q.dtype, **mask)
    failures = [compare_to_reference(n, ours[n], ref[n], same[n]) for n in NAMES if ours[n] is not None]
    failures = [f for f in failures if f is not None]
    assert not failures, f"{case.id}:\n  " + "\n  ".join(failures)
