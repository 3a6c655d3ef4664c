"""Host time per forward call of one forward config (tiny shape: the GPU waits on the host), and where it
goes (cProfile's top entries). Usage: python -m benchmarks.host_profile [--dim 128] [--causal]"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from flashattention import flash_attention
from flashattention.kernels import configs


def host_us(configs_list, dim: int, causal: bool, grad: bool, calls: int = 100) -> float:
    q, k, v = (
        torch.randn(1, 2, 256, dim, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in "qkv"
    )
    orig = configs.configs_for
    configs.configs_for = lambda kernel, table, d: configs_list if kernel == "fwd" else orig(kernel, table, d)
    try:
        for _ in range(10):
            flash_attention(q, k, v, causal=causal)
        best = float("inf")
        for _ in range(5):  # the best of five: the host's own noise (other processes) only adds
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                flash_attention(q, k, v, causal=causal)
            torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        return best
    finally:
        configs.configs_for = orig


def at_shape(configs_list, seqlen: int, dim: int, causal: bool, grad: bool) -> str:
    """The benchmark's shape (16k tokens, hidden 2048): do_bench's median, the host time per call of 50
    calls queued back to back (no sync between them), and whether a call synchronises (torch's sync debug
    mode, which catches torch-side syncs only)."""
    from triton.testing import do_bench

    b, h = 16384 // seqlen, 2048 // dim
    q, k, v = (
        torch.randn(b, h, seqlen, dim, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in "qkv"
    )
    orig = configs.configs_for
    configs.configs_for = lambda kernel, table, d: configs_list if kernel == "fwd" else orig(kernel, table, d)
    try:
        call = lambda: flash_attention(q, k, v, causal=causal)  # noqa: E731
        call()
        ms = do_bench(call, return_mode="median")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            call()
        host = (time.perf_counter() - t0) / 50 * 1e3
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message)[:80] for w in caught]
        return f"do_bench {ms:.3f} ms, host {host:.3f} ms per call, syncs {syncs}"
    finally:
        configs.configs_for = orig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--seqlen", type=int, default=0, help="also time the benchmark's shape at this length")
    a = p.parse_args()
    cands = {
        "triton 64x64": [configs._c(64, 64, 4, 3)],
        "gluon": [configs._c(128, 128, 4, 2, GLUON_WS=True)],
        "gluon HOST_DESC": [configs._c(128, 128, 4, 2, GLUON_WS=True, HOST_DESC=True)],
    }
    if a.seqlen:
        for grad in (False, True):
            for name, cl in cands.items():
                print(f"S{a.seqlen} D{a.dim} causal={a.causal} {name}, grad={grad}: ", end="", flush=True)
                print(at_shape(cl, a.seqlen, a.dim, a.causal, grad), flush=True)
    for grad in (False, True):
        for name, cl in cands.items():
            print(f"host us per call, {name}, requires_grad={grad}: {host_us(cl, a.dim, a.causal, grad):.0f}")
    orig = configs.configs_for
    configs.configs_for = lambda kernel, table, d: (
        cands["gluon HOST_DESC"] if kernel == "fwd" else orig(kernel, table, d)
    )
    q, k, v = (torch.randn(1, 2, 256, a.dim, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
    flash_attention(q, k, v)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        flash_attention(q, k, v)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
