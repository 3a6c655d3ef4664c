"""Time to first result in a fresh process: the first causal call of a new process (bf16, B 8, S 2048,
hidden 2048), forward and forward + backward, D 64 and 128, ours against SDPA's default backend, with an
empty Triton cache (cold: every kernel compiles) and with the cache the cold run filled (warm: a new process,
kernels loaded from disk). Each number is one child process: inputs are made (CUDA initialised) first, the
clock runs from the call to the synchronize after it; the import of the package is timed apart.

    PYTHONPATH=. python -m benchmarks.first_call [--dims 64,128] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(provider: str, passes: str, head_dim: int) -> dict:
    import torch

    t0 = time.perf_counter()
    if provider == "ours":
        from flashattention import flash_attention

        attend = lambda q, k, v: flash_attention(q, k, v, causal=True)  # noqa: E731
    else:
        import torch.nn.functional as F

        attend = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    imported = time.perf_counter() - t0
    q, k, v = (
        torch.randn(
            8, 2048 // head_dim, 2048, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
        )
        for _ in range(3)
    )
    dout = torch.randn_like(q)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = attend(q, k, v)
    if passes == "fwd+bwd":
        out.backward(dout)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = attend(q, k, v)
    if passes == "fwd+bwd":
        out.backward(dout)
    torch.cuda.synchronize()
    return {"import_s": imported, "first_s": first, "second_s": time.perf_counter() - t0}


def run_child(provider: str, passes: str, head_dim: int, env: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.first_call", "--child", provider, passes, str(head_dim)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        provider, passes, head_dim = args.child
        print(json.dumps(child(provider, passes, int(head_dim))))
        return 0
    rows = []
    for head_dim in (int(d) for d in args.dims.split(",")):
        for passes in ("fwd", "fwd+bwd"):
            for provider in ("ours", "sdpa"):
                with tempfile.TemporaryDirectory() as cache:
                    env = dict(
                        os.environ, TRITON_CACHE_DIR=f"{cache}/triton", FLASHATTN_CACHE_DIR=f"{cache}/fa"
                    )
                    for state in ("cold", "warm"):
                        r = run_child(provider, passes, head_dim, env)
                        rows.append(dict(D=head_dim, passes=passes, provider=provider, cache=state, **r))
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("| D | pass | provider | Triton cache | first call s | second call s | import s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['D']} | {r['passes']} | {r['provider']} | {r['cache']} | error: {r['error']} | | |")
            continue
        print(
            f"| {r['D']} | {r['passes']} | {r['provider']} | {r['cache']} | {r['first_s']:.2f} | "
            f"{r['second_s']:.3f} | {r['import_s']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
