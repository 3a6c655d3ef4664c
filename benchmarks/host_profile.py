"""Where the host (CPU) time of one call goes, at a tiny shape where the GPU work is negligible: cProfile
over many back-to-back calls of the public forward (inputs requiring grad) and forward + backward.

    PYTHONPATH=. python -m benchmarks.host_profile [--calls 300] [--lines 30]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from flashattention import flash_attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--lines", type=int, default=30)
    args = ap.parse_args()
    q, k, v = (
        torch.randn(1, 2, 128, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    do = torch.randn_like(q)
    fns = {
        "forward": lambda: flash_attention(q, k, v, causal=True),
        "forward + backward": lambda: torch.autograd.grad(
            flash_attention(q, k, v, causal=True), (q, k, v), do
        ),
    }
    for name, fn in fns.items():
        for _ in range(50):  # compiles and autotunes outside the profile
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.calls):
            fn()
        torch.cuda.synchronize()
        print(f"== {name}: {(time.perf_counter() - start) / args.calls * 1e6:.1f} us per call (no profiler)")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            fn()
        torch.cuda.synchronize()
        profile.disable()
        for order in ("tottime", "cumulative"):
            print(f"-- {name}, {args.calls} calls, by {order}")
            pstats.Stats(profile).sort_stats(order).print_stats(args.lines)


if __name__ == "__main__":
    main()
