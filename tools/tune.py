"""Checks and times every config of this GPU's autotune tables (one call of the device tool).

For each (head dim, causal) it checks every config against a float32 reference with the tolerance rule
(flashattention.testing; the same-dtype term is SDPA flash in bf16) and times it beside SDPA flash and
cuDNN; CANDIDATES (below: configs not in the tables yet) are run too. Backward configs are timed as the
whole backward with that kernel's config forced (hooks.overrides). A "call" row per shape times the public
`flash_attention` forward (the table's pick) twice: with do_bench, as benchmarks.run does, and replayed from
a CUDA graph (no CPU launch cost), and names the config it launched; a gap between the two means the GPU
waits on the launch path; a "tuned" row does the same with FLASHATTN_AUTOTUNE's pick. First of
all it prints the host time per call at a tiny shape (ours and SDPA flash): the CPU cost of a launch.
Usage: PYTHONPATH=. python -m tools.tune [--seqlen 4096[,1024,...]] [--dims 64,128,256]
       [--kernels fwd,bwd_dkdv,bwd_dq] [--json PATH] [--warm-jobs N]
Before timing, N processes (default: cores - 2, at most 12) compile every config in parallel into Triton's
disk cache, so the timing process does not compile one kernel at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench as _do_bench
from triton.testing import do_bench_cudagraph

from flashattention import flash_attention
from flashattention.kernels import configs, hooks, launch, registry
from flashattention.kernels.configs import _c
from flashattention.kernels.device import pow2_at_least
from flashattention.testing import error_and_bound

NAMES = ("out", "dq", "dk", "dv")

_D64_PERSISTENT = dict(GLUON_WS=True, WS_CONSUMERS=3, PERSISTENT=True, HOST_DESC=True)
# Configs to measure before they may enter a table (kernel -> table -> padded head dim -> configs): they
# must pass this tool's check on the GPU and win a case (benchmarks/NOTES.md has what each measured).
CANDIDATES: dict[str, dict[str, dict[int, list]]] = {
    "fwd": {
        "sm90": {
            64: [
                _c(192, 128, 4, 2, GLUON_WS=True, WS_CONSUMERS=3, PERSISTENT=True),
                _c(192, 128, 4, 2, **_D64_PERSISTENT, WS_STAGES=3, WS_OVERLAP=True),
                _c(192, 128, 4, 2, **_D64_PERSISTENT),
                _c(128, 128, 4, 2, GLUON_WS=True),
                _c(128, 128, 4, 2, GLUON_WS=True, WS_PINGPONG=True),
                _c(128, 128, 4, 2, GLUON_WS=True, WS_STAGES=3),
            ],
            128: [_c(128, 128, 4, 2, GLUON_WS=True, WS_PINGPONG=True, PERSISTENT=True)],
            256: [_c(128, 64, 4, 2, GLUON_WS=True, HOST_DESC=True)],
        }
    },
    # the Gluon dK/dV computing dQ too (FUSED_DQ, TMA bulk reductions in no fixed order; DQ_ORDERED: in a
    # fixed order, bitwise reproducible); their sm_90a builds: benchmarks/NOTES.md
    "bwd_dkdv": {
        "sm90": {
            64: [
                _c(64, 128, 4, 2, GLUON_WS=True, FUSED_DQ=True, DQ_ORDERED=True),
                _c(64, 128, 4, 2, GLUON_WS=True, FUSED_DQ=True),
            ],
            128: [_c(64, 128, 4, 2, GLUON_WS=True, FUSED_DQ=True)],
        }
    },
    # the Gluon dQ (kernels/bwd_ws.py) where it has not won a table place
    "bwd_dq": {
        "sm90": {
            64: [_c(128, 128, 4, 2, GLUON_WS=True)],
            128: [_c(128, 64, 4, 2, GLUON_WS=True)],
        }
    },
}


def candidates_for(kernel: str, table: str, head_dim_pad: int) -> list:
    """The candidates of exactly this padded head dim (empty when there are none)."""
    return CANDIDATES.get(kernel, {}).get(table, {}).get(head_dim_pad, [])


def tables_and_candidates() -> list:
    """(kernel, table, head_dim_pad, config) of every table config, then of every candidate."""
    candidates = [
        (kernel, table, dim, config)
        for kernel, tables in CANDIDATES.items()
        for table, dims in tables.items()
        for dim, entry in dims.items()
        for config in entry
    ]
    return configs.all_configs() + candidates


def do_bench(fn) -> float:
    """Median ms (triton's default is the mean, which one slow rep can move)."""
    return _do_bench(fn, return_mode="median")


def _sdpa(backend, q, k, v, causal):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _sdpa_fwd_bwd(backend, q, k, v, do, causal):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = _sdpa(backend, *leaves, causal)
    return out, torch.autograd.grad(out, leaves, do, retain_graph=True), leaves


def _reference(q, k, v, do, causal) -> tuple[torch.Tensor, ...]:
    """out, dq, dk, dv in float32 by the math backend, one head at a time: its [S, S] float32 scores (and
    their gradient) for every head at once would not fit at 16k tokens."""
    parts = []
    for h in range(q.shape[1]):
        one = [t[:, h : h + 1].float() for t in (q, k, v, do)]
        out, grads, _ = _sdpa_fwd_bwd(SDPBackend.MATH, *one, causal)
        parts.append((out, *grads))
    return tuple(torch.cat(group, dim=1) for group in zip(*parts, strict=True))


def tune_shape(head_dim: int, causal: bool, seqlen: int, kernels: list[str], table: str) -> list[dict]:
    """Rows for one shape: every config of `kernels` checked and timed, peers timed alongside."""
    q, k, v, do = _inputs(seqlen, head_dim)
    batch, heads = q.shape[:2]
    ref = _reference(q, k, v, do, causal)
    peer_out, peer_grads, _ = _sdpa_fwd_bwd(SDPBackend.FLASH_ATTENTION, q, k, v, do, causal)
    same = (peer_out, *peer_grads)
    flops = 4 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
    peers = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            peers[f"{name}_fwd"] = flops / do_bench(lambda b=backend: _sdpa(b, q, k, v, causal)) / 1e9
            out, _, leaves = _sdpa_fwd_bwd(backend, q, k, v, do, causal)
            peers[f"{name}_bwd"] = (
                2.5
                * flops
                / do_bench(lambda o=out, lv=leaves: torch.autograd.grad(o, lv, do, retain_graph=True))
                / 1e9
            )
        except RuntimeError as exc:
            print(f"peer {name} failed: {exc}")
    base = dict(D=head_dim, causal=causal, S=seqlen, **peers)
    rows = [_public_call_row(q, k, v, causal, flops, base, tuned) for tuned in (False, True)]
    for kernel, label, run in _config_runs(q, k, v, do, causal, kernels, table):
        row = dict(D=head_dim, causal=causal, S=seqlen, kernel=kernel, config=label, **peers)
        work = flops if kernel == "fwd" else 2.5 * flops
        try:
            results = run()
            idx = (0,) if kernel == "fwd" else (1, 2, 3)
            checks = [error_and_bound(r, ref[i], same[i]) for r, i in zip(results, idx, strict=True)]
            row["ok"] = all(err <= bound for err, bound in checks)
            row["errors"] = {NAMES[i]: err for (err, _), i in zip(checks, idx, strict=True)}
            row["tflops"] = work / do_bench(run) / 1e9
            row["again"] = work / do_bench(run) / 1e9  # the same config twice: the run's noise
        except Exception as exc:  # a config that fails to compile is reported, not fatal
            row.update(ok=False, tflops=0.0, error=str(exc)[:200])
        print(
            f"D{head_dim} causal={causal} {kernel:9s} {row['config']:20s} ok={row['ok']} "
            f"{row['tflops']:6.1f} TFLOP/s {row.get('error', '')}",
            flush=True,
        )
        rows.append(row)
    return rows


def _config_runs(q, k, v, do, causal: bool, kernels: list[str], table: str):
    """(kernel, label, run) for every config of `kernels` (tables first, then candidates); run()
    launches that config once and returns (out,) for "fwd", else (dq, dk, dv)."""
    scale, right, pad = q.shape[-1] ** -0.5, (0 if causal else -1), pow2_at_least(q.shape[-1])
    out, _, lse2 = launch.attention_forward(
        q, k, v, softmax_scale=scale, left=-1, right=right, config=configs.configs_for("fwd", table, pad)[0]
    )
    for kernel in kernels:
        candidates = candidates_for(kernel, table, pad)
        for cfg in configs.configs_for(kernel, table, pad) + candidates:
            label = configs.label(cfg) + (" (candidate)" if cfg in candidates else "")
            if kernel == "fwd":

                def run(c=cfg):
                    return launch.attention_forward(
                        q, k, v, softmax_scale=scale, left=-1, right=right, config=c
                    )[:1]

            else:

                def run(c=cfg, kern=kernel):
                    with hooks.overrides(configs={kern: [c]}):
                        return launch.attention_backward(
                            do, q, k, v, out, lse2, softmax_scale=scale, left=-1, right=right
                        )

            yield kernel, label, run


def _shapes(seqlens: list[int], dims: list[int]) -> list[tuple[int, int, bool]]:
    return [(s, d, c) for s in seqlens for d in dims for c in (False, True)]


def _inputs(seqlen: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    batch, heads = max(1, 16384 // seqlen), 2048 // head_dim
    return tuple(
        torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4)
    )


def warm(seqlens, dims, kernels, table: str, shard: int, shards: int) -> None:
    """Compiles (runs once, untimed and unchecked) every `shards`-th config run starting at `shard` (every
    table config is among them, so the public call's tuning finds them compiled): Triton's disk cache then
    serves the timing process. Each shard is its
    own process, so the CPU-bound compiles run in parallel (one process compiles one kernel at a time)."""
    i = 0
    for seqlen, head_dim, causal in _shapes(seqlens, dims):
        q, k, v, do = _inputs(seqlen, head_dim)
        if i % shards == shard:
            flash_attention(q, k, v, causal=causal)
        i += 1
        for _, label, run in _config_runs(q, k, v, do, causal, kernels, table):
            if i % shards == shard:
                try:
                    run()
                except Exception as exc:  # noqa: BLE001  (the timing process reports it)
                    print(f"warm: {label}: {str(exc)[:100]}", flush=True)
            i += 1
        torch.cuda.synchronize()


def _public_call_row(q, k, v, causal: bool, flops: float, row: dict, autotune: bool) -> dict:
    """flash_attention's forward as users call it (or with FLASHATTN_AUTOTUNE's pick): do_bench vs CUDA-graph
    replay, and the config it launched."""
    call = lambda: flash_attention(q, k, v, causal=causal)
    kind = "tuned" if autotune else "call"
    row = dict(row)
    try:
        with hooks.overrides(autotune=autotune):
            call()  # tunes (autotune) outside the timing
            eager = flops / do_bench(call) / 1e9
            graph = flops / do_bench_cudagraph(call, return_mode="median") / 1e9
            picked = configs.label(registry.last_launched["fwd"])
        row.update(kernel=kind, config=f"{picked}; graph {graph:.0f}", ok=True, tflops=eager, graph=graph)
    except Exception as exc:  # noqa: BLE001
        row.update(kernel=kind, config="public call", ok=False, tflops=0.0, error=str(exc)[:200])
    print(f"D{row['D']} causal={causal} {kind} {row['config']:20s} {row['tflops']:6.1f} TFLOP/s", flush=True)
    return row


def launch_overhead(calls: int = 500, device: str = "cuda") -> dict:
    """Host time per call (us) at a tiny shape, where the GPU work is negligible: back-to-back calls and one
    synchronize, so the rate is the CPU's submit rate. Ours (public forward; forward + backward) against
    SDPA flash."""
    q, k, v = (
        torch.randn(1, 2, 128, 128, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    do = torch.randn_like(q)

    def ours_fwd_bwd():
        torch.autograd.grad(flash_attention(q, k, v, causal=True), (q, k, v), do)

    def sdpa_fwd_bwd():
        torch.autograd.grad(_sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, True), (q, k, v), do)

    fns = {
        "ours fwd": lambda: flash_attention(q, k, v, causal=True),
        "sdpa-flash fwd": lambda: _sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, True),
        "ours fwd+bwd": ours_fwd_bwd,
        "sdpa-flash fwd+bwd": sdpa_fwd_bwd,
    }
    result = {}
    for name, fn in fns.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        result[name] = (time.perf_counter() - start) / calls * 1e6
        print(f"host time per call, {name}: {result[name]:.1f} us", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", default="4096", help="one or more, comma-separated")
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--kernels", default="fwd,bwd_dkdv,bwd_dq")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--warm-jobs",
        type=int,
        default=max(1, min(12, (os.cpu_count() or 2) - 2)),
        help="processes that compile every config first, in parallel (1: compile while timing)",
    )
    ap.add_argument(
        "--warm-only",
        action="store_true",
        help="compile (the parallel warm-up) and stop: before benchmarks.run",
    )
    ap.add_argument("--warm-shard", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    table = configs.table_name(torch.device("cuda"), torch.bfloat16)
    seqlens = [int(s) for s in args.seqlen.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    kernels = args.kernels.split(",")
    if args.warm_shard is not None:
        warm(seqlens, dims, kernels, table, args.warm_shard, args.warm_jobs)
        return
    if args.warm_jobs > 1:
        start = time.perf_counter()
        env = dict(os.environ, FLASHATTN_AUTOTUNE="0")  # every table config is run forced anyway
        cmd = [sys.executable, "-m", "tools.tune", "--seqlen", args.seqlen, "--dims", args.dims]
        cmd += ["--kernels", args.kernels, "--warm-jobs", str(args.warm_jobs)]
        procs = [subprocess.Popen([*cmd, "--warm-shard", str(i)], env=env) for i in range(args.warm_jobs)]
        codes = [p.wait() for p in procs]
        print(f"warm-up: {args.warm_jobs} processes, {time.perf_counter() - start:.0f} s, exit codes {codes}")
    if args.warm_only:
        return
    overhead = launch_overhead()
    rows = []
    for seqlen, head_dim, causal in _shapes(seqlens, dims):
        torch.manual_seed(0)
        rows += tune_shape(head_dim, causal, seqlen, kernels, table)
        torch.cuda.empty_cache()
        if args.json:  # after every shape, so that a run cut off by a time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"launch_overhead_us": overhead, "rows": rows}, f, indent=1)
    print(f"\n{torch.cuda.get_device_name()}  bf16")
    print("host us per call (tiny shape): " + ", ".join(f"{n} {t:.0f}" for n, t in overhead.items()))
    print("| S | D | causal | kernel | config | ok | TFLOP/s | again | flash fwd/bwd | cudnn fwd/bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['S']} | {r['D']} | {r['causal']} | {r['kernel']} | {r['config']} | {r['ok']} | "
            f"{r['tflops']:.0f} | {r.get('again', 0):.0f} | "
            f"{r.get('flash_fwd', 0):.0f}/{r.get('flash_bwd', 0):.0f} | "
            f"{r.get('cudnn_fwd', 0):.0f}/{r.get('cudnn_bwd', 0):.0f} |"
        )


if __name__ == "__main__":
    main()
