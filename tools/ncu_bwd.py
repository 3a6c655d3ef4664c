"""A few backward calls with one dK/dV config forced, for Nsight Compute to profile (tools/gpu_run.sh
profile): the table's first config or a tools.tune candidate, at the benchmark's shapes (16k tokens,
hidden 2048, bf16). Nothing is timed here; ncu reads the counters of the launches it is told to take.

    PYTHONPATH=. python -m tools.ncu_bwd --dim 64 --seqlen 8192 [--causal] [--candidate 0] [--calls 3]
"""

from __future__ import annotations

import argparse

import torch

from flashattention.kernels import configs, hooks, launch
from tools.tune import _inputs, candidates_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--candidate", type=int, default=-1, help="index into tools.tune's dK/dV candidates")
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    table = configs.table_name(torch.device("cuda"), torch.bfloat16)
    q, k, v, do = _inputs(args.seqlen, args.dim)
    pick = (
        candidates_for("bwd_dkdv", table, args.dim)[args.candidate]
        if args.candidate >= 0
        else configs.configs_for("bwd_dkdv", table, args.dim)[0]
    )
    print(f"dK/dV config: {configs.label(pick)}", flush=True)
    scale, right = args.dim**-0.5, (0 if args.causal else -1)
    out, _, lse2 = launch.attention_forward(q, k, v, softmax_scale=scale, left=-1, right=right)
    with hooks.overrides(configs={"bwd_dkdv": [pick]}):
        for _ in range(args.calls):
            launch.attention_backward(do, q, k, v, out, lse2, softmax_scale=scale, left=-1, right=right)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
