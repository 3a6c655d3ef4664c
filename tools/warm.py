"""Fills Triton's disk cache before a benchmark: one process per shape of the benchmark's matrix calls the
public forward and backward once (compiling, and tuning where the package tunes), several at a time, so
that the compiles run in parallel instead of one by one inside the timing process.

    PYTHONPATH=.:.prev python -m tools.warm --module flashattention_prev --dims 64,128 --seqlens 2048,16384
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time


def one(module: str, head_dim: int, seqlen: int, causal: bool) -> None:
    import torch

    attend = importlib.import_module(module).flash_attention
    batch, heads = max(1, 16384 // seqlen), 2048 // head_dim
    q, k, v = (
        torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    attend(q, k, v, causal=causal).sum().backward()
    torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", default="flashattention")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--seqlens", default="2048,4096,8192,16384")
    ap.add_argument("--jobs", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        head_dim, seqlen, causal = args.one
        one(args.module, int(head_dim), int(seqlen), causal == "1")
        return 0
    shapes = [(d, s, c) for d in args.dims.split(",") for s in args.seqlens.split(",") for c in ("0", "1")]
    start, running, codes = time.perf_counter(), [], []
    for shape in shapes:
        cmd = [sys.executable, "-m", "tools.warm", "--module", args.module, "--one", *shape]
        running.append(subprocess.Popen(cmd))
        if len(running) >= args.jobs:
            codes.append(running.pop(0).wait())
    codes += [p.wait() for p in running]
    print(
        f"warm {args.module}: {len(shapes)} shapes, {time.perf_counter() - start:.0f} s, "
        f"exit codes {set(codes)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
