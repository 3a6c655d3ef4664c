"""Where the backward's device time goes: each kernel's share of ours (preprocess, dK/dV, dQ) and of the
peers' (SDPA flash and cuDNN, by the same profiler), at the benchmark's shapes (16k tokens, hidden 2048,
bf16). A kernel's own TFLOP/s counts the matmuls it does (dK/dV: S^T, dP^T, dV, dK; dQ: S, dP, dQ; two
FLOPs per multiply-add, halved for causal), so the rows show how near each kernel runs to the tensor cores'
rate, apart from the recompute that two kernels cost; `whole` is the README's FLOP convention (2.5x forward).

    PYTHONPATH=. python -m tools.bwd_breakdown [--dims 64,128] [--seqlens 2048,8192] [--calls 10]
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch.nn.attention import SDPBackend

from benchmarks.run import device_times
from flashattention import flash_attention
from tools.tune import _sdpa

# matmuls per (query, key) pair and head dim element: each of our backward kernels' own, and a whole
# backward's by the README's FLOP convention (2.5x the forward's two)
MATMULS = {"dkdv": 4, "dq": 3, "whole": 5}


def kernel_flops(kind: str, batch: int, heads: int, seqlen: int, head_dim: int, causal: bool) -> float:
    """FLOPs of `kind` ("dkdv", "dq" for our kernels, "whole" for a backward by the README's convention)."""
    pairs = batch * heads * seqlen * seqlen * (0.5 if causal else 1.0)
    return pairs * 2 * head_dim * MATMULS[kind]


def _kind(name: str) -> str:
    """Our dK/dV or dQ kernel from its CUDA name ('' for the preprocess, a peer's or another kernel)."""
    if "attn_bwd_dkdv" in name:
        return "dkdv"
    if "attn_bwd_dq" in name:
        return "dq"
    return ""


def rows_for(head_dim: int, seqlen: int, causal: bool, calls: int) -> list[str]:
    batch, heads = 16384 // seqlen, 2048 // head_dim
    q, k, v = (
        torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    do = torch.randn_like(q)
    case = f"| {head_dim} | {seqlen} | {'yes' if causal else 'no'} "
    whole = kernel_flops("whole", batch, heads, seqlen, head_dim, causal)
    lines = []

    def report(provider: str, forward) -> None:
        out = forward()
        times = device_times(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), calls)
        total = sum(times.values())
        lines.append(f"{case}| {provider} | total | {total:.0f} | 100% | {whole / total / 1e6:.0f} |")
        for name, us in sorted(times.items(), key=lambda item: -item[1]):
            kind = _kind(name)
            rate = (
                f"{kernel_flops(kind, batch, heads, seqlen, head_dim, causal) / us / 1e6:.0f}"
                if kind
                else "-"
            )
            lines.append(f"{case}| {provider} | {name[:48]} | {us:.0f} | {us / total:.0%} | {rate} |")

    report("ours", lambda: flash_attention(q, k, v, causal=causal))
    for provider, backend in (
        ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
    ):
        try:
            report(provider, functools.partial(_sdpa, backend, q, k, v, causal))
        except RuntimeError as exc:  # a backend that does not take the case
            lines.append(f"{case}| {provider} | failed: {str(exc)[:60]} | - | - | - |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--seqlens", default="2048,8192")
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, bf16, 16k tokens, hidden 2048; us per backward (torch.profiler)")
    print("| D | S | causal | provider | kernel | us | share | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for head_dim in (int(d) for d in args.dims.split(",")):
        for seqlen in (int(s) for s in args.seqlens.split(",")):
            for causal in (False, True):
                print("\n".join(rows_for(head_dim, seqlen, causal, args.calls)), flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
