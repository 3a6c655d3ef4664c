"""Where the host (CPU) time of one call goes, at a tiny shape where the GPU work is negligible: cProfile
over many back-to-back calls of the public forward (inputs requiring grad) and forward + backward.
With --configs, the host time of the forward per forced forward config (Triton, Gluon, Gluon HOST_DESC);
with --seqlen, the same configs at the benchmark's shape (16k tokens, hidden 2048): do_bench's median, the
host time per call and whether a call synchronises.

    PYTHONPATH=. python -m tools.host_profile [--calls 300] [--lines 30]
    PYTHONPATH=. python -m tools.host_profile --configs [--seqlen 512 --dim 128 --causal]
    PYTHONPATH=. python -m tools.host_profile --ab   # the launch plans against the full path, A/B
    PYTHONPATH=. python -m tools.host_profile --paths --seqlen 2048 --dim 64 --causal  # per path
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
import warnings

import torch

from flashattention import flash_attention, flash_attention_varlen
from flashattention.kernels import configs, hooks, launch, registry

FWD_CONFIGS = {
    "triton 64x64": configs._c(64, 64, 4, 3),
    "gluon": configs._c(128, 128, 4, 2, GLUON_WS=True),
    "gluon HOST_DESC": configs._c(128, 128, 4, 2, GLUON_WS=True, HOST_DESC=True),
}


def forced_forward(config):
    """The forward launches `config` only (the backward keeps its tables); HOST_DESC's size gate is off."""
    return hooks.overrides(configs={"fwd": [config]}, host_desc_min_work=0)


def host_us(fn, calls: int) -> float:
    """The best of five back-to-back runs (the host's own noise only adds), us per call."""
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def at_shape(seqlen: int, dim: int, causal: bool, grad: bool) -> str:
    from triton.testing import do_bench

    b, h = 16384 // seqlen, 2048 // dim
    q, k, v = (
        torch.randn(b, h, seqlen, dim, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in "qkv"
    )
    call = lambda: flash_attention(q, k, v, causal=causal)  # noqa: E731
    call()
    ms = do_bench(call, return_mode="median")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):  # queued back to back, no sync between them
        call()
    host = (time.perf_counter() - t0) / 50 * 1e3
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")  # catches torch-side syncs only
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message)[:80] for w in caught if "prototype" not in str(w.message)]
    return f"do_bench {ms:.3f} ms, host {host:.3f} ms per call, syncs {syncs}"


def per_config(args) -> None:
    for grad in (False, True):
        for name, cfg in FWD_CONFIGS.items():
            with forced_forward(cfg):
                if args.seqlen:
                    result = at_shape(args.seqlen, args.dim, args.causal, grad)
                else:
                    q, k, v = (
                        torch.randn(
                            1, 2, 256, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=grad
                        )
                        for _ in "qkv"
                    )
                    for _ in range(10):
                        flash_attention(q, k, v, causal=args.causal)
                    us = host_us(lambda: flash_attention(q, k, v, causal=args.causal), args.calls)  # noqa: B023
                    result = f"{us:.0f} us per call"
            print(f"{name}, requires_grad={grad}: {result}", flush=True)


def tiny_calls(seqlen: int, varlen: bool = False) -> dict:
    """name -> call: the public causal forward and forward + backward at a tiny shape (1 x 2 heads x seqlen
    x 128, bf16, inputs requiring grad), where the GPU work is negligible; with varlen, the same through
    flash_attention_varlen too (4 packed sequences)."""
    q, k, v = (
        torch.randn(1, 2, seqlen, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv"
    )
    do = torch.randn_like(q)
    calls = {
        "forward": lambda: flash_attention(q, k, v, causal=True),
        "forward + backward": lambda: torch.autograd.grad(
            flash_attention(q, k, v, causal=True), (q, k, v), do
        ),
    }
    if varlen:  # (not through host_ab's forced HOST_DESC forward, which takes no packed sequences)
        # the same tokens as 4 packed sequences
        pq, pk, pv = (t.detach()[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v))
        cu = torch.arange(0, seqlen + 1, seqlen // 4, device="cuda", dtype=torch.int32)
        pdo = do[0].transpose(0, 1).contiguous()

        def varlen_call():
            return flash_attention_varlen(pq, pk, pv, cu, cu, seqlen // 4, seqlen // 4, causal=True)

        calls["varlen forward"] = varlen_call
        calls["varlen forward + backward"] = lambda: torch.autograd.grad(varlen_call(), (pq, pk, pv), pdo)
    return calls


def profile_calls(args) -> None:
    fns = tiny_calls(128, varlen=True)
    for name, fn in fns.items():
        for _ in range(50):  # compiles and autotunes outside the profile
            fn()
        print(f"== {name}: {host_us(fn, args.calls):.1f} us per call (no profiler)")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            fn()
        torch.cuda.synchronize()
        profile.disable()
        for order in ("tottime", "cumulative"):
            print(f"-- {name}, {args.calls} calls, by {order}")
            pstats.Stats(profile).sort_stats(order).print_stats(args.lines)


def host_ab(args) -> None:
    """Host time per call with the launch plans (kernels/plans.py: a seen case replays its launches) against
    the full launch path, on one host, interleaved: the forward (inputs requiring grad) and the forward +
    backward, with the table's config (Triton at this tiny shape) and with Gluon HOST_DESC."""
    calls = tiny_calls(256)
    results = {}
    for _ in range(3):
        for forced in ("table", "gluon HOST_DESC"):
            config = (
                {"configs": {"fwd": [FWD_CONFIGS[forced]]}, "host_desc_min_work": 0}
                if forced != "table"
                else {}
            )
            for plans in ("plans", "no plans"):
                with hooks.overrides(**config, plans=plans == "plans"):
                    for name, call in calls.items():
                        for _ in range(20):
                            call()
                        results.setdefault((forced, name, plans), []).append(host_us(call, args.calls))
    for (forced, name, plans), times in results.items():
        runs = ", ".join(f"{t:.0f}" for t in times)
        print(f"host us per call, {forced} {name}, {plans}: {min(times):.0f} (runs {runs})")


def paths(args) -> None:
    """do_bench (L2 flushed) of one benchmark shape through each launch path, interleaved three times: the
    public call (inputs requiring grad) with the launch plans, the same without them, forward_stats with the
    tuned config forced (Triton's launch path, no autograd), and a CUDA graph replay of the public call."""
    from triton.testing import do_bench

    b, h = 16384 // args.seqlen, 2048 // args.dim
    q, k, v = (
        torch.randn(b, h, args.seqlen, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in "qkv"
    )
    public = lambda: flash_attention(q, k, v, causal=args.causal)  # noqa: E731
    public()  # compiles
    cfg = registry.last_launched["fwd"]
    qd, kd, vd = (t.detach() for t in (q, k, v))
    right = 0 if args.causal else -1
    forced = lambda: launch.forward_stats(  # noqa: E731
        qd, kd, vd, softmax_scale=args.dim**-0.5, left=-1, right=right, config=cfg
    )
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        public()
    variants = {
        "public, plans": (public, True),
        "public, no plans": (public, False),
        "forward_stats, forced config": (forced, True),
        "CUDA graph of the public call": (graph.replay, True),
    }
    times = {name: [] for name in variants}
    for _ in range(3):
        for name, (fn, plans) in variants.items():
            with hooks.overrides(plans=plans):
                times[name].append(do_bench(fn, return_mode="median"))
    print(f"S={args.seqlen} D={args.dim} causal={args.causal} config {configs.label(cfg)}")
    for name, ms in times.items():
        print(f"  {name}: " + ", ".join(f"{t:.3f}" for t in ms) + " ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--lines", type=int, default=30)
    ap.add_argument("--configs", action="store_true", help="host time per forced forward config")
    ap.add_argument("--seqlen", type=int, default=0, help="with --configs: at the benchmark's shape")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument(
        "--ab", action="store_true", help="host time with the launch plans against the full launch path"
    )
    ap.add_argument("--paths", action="store_true", help="do_bench of one shape through each launch path")
    args = ap.parse_args()
    if args.paths:
        paths(args)
    elif args.ab:
        host_ab(args)
    elif args.configs:
        per_config(args)
    else:
        profile_calls(args)


if __name__ == "__main__":
    main()
