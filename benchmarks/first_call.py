"""Time to first result in a fresh process: the first causal call of a new process (bf16, B 8, S 2048,
hidden 2048), forward and forward + backward, D 64 and 128, ours against SDPA's default backend, with an
empty Triton cache (cold: every kernel compiles) and with the cache the cold run filled (warm: a new process,
kernels loaded from disk). `fwd+bwd` ends in a scalar loss's `backward()`, as a training step does;
`fwd+bwd(dout)` calls `out.backward(dout)` instead, in which torch itself imports sympy (seconds on a
fresh image, for SDPA too: `autograd._make_grads` with a tensor gradient). Each number is one child
process: inputs are made (CUDA initialised) first, the clock runs from the call to the synchronize after
it; the import of the package is timed apart.
`setup s` > 0: between the import and the call the child does that many seconds of unrelated GPU work
(matmuls, synchronized), as a training script builds its model and moves data first; work that the package
starts at import (flashattention/_prefetch.py) overlaps it there. `ours-nowarm` is ours with
FLASHATTN_WARMUP=0 (no import-time thread, no backward compiles ahead), in the same run.

    PYTHONPATH=. python -m benchmarks.first_call [--dims 64,128] [--setups 0,2] [--providers ours,sdpa]
        [--passes fwd,fwd+bwd] [--profile DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(provider: str, passes: str, head_dim: int, setup_s: float = 0.0) -> dict:
    import torch

    t0 = time.perf_counter()
    if provider.startswith("ours"):
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
    if setup_s > 0:  # unrelated work of the caller's (its model, its data) before the first call
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        end = time.perf_counter() + setup_s
        while time.perf_counter() < end:
            a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()

    def step() -> float:
        t0 = time.perf_counter()
        out = attend(q, k, v)
        if passes == "fwd+bwd":
            (out * dout).sum().backward()
        elif passes == "fwd+bwd(dout)":
            out.backward(dout)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    profile_path = os.environ.get("FIRST_CALL_PROFILE")
    if profile_path:  # where the first call's host time goes: cProfile, cumulative, to a text file
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        first = profiler.runcall(step)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
        with open(profile_path, "w") as f:
            f.write(text.getvalue())
    else:
        first = step()
    return {"import_s": imported, "first_s": first, "second_s": step()}


def run_child(provider: str, passes: str, head_dim: int, setup_s: float, env: dict) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.first_call",
        "--child",
        provider,
        passes,
        str(head_dim),
        str(setup_s),
    ]
    if provider == "ours-nowarm":
        env = dict(env, FLASHATTN_WARMUP="0")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--setups", default="0,2", help="seconds of unrelated GPU work before the call")
    ap.add_argument("--providers", default="ours,ours-nowarm,sdpa")
    ap.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd (scalar loss), fwd+bwd(dout)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--profile", metavar="DIR", help="cProfile each child's first call into DIR (skews it)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        provider, passes, head_dim, setup_s = args.child
        print(json.dumps(child(provider, passes, int(head_dim), float(setup_s))))
        return 0
    rows = []
    for head_dim in (int(d) for d in args.dims.split(",")):
        for passes in args.passes.split(","):
            for setup_s in (float(s) for s in args.setups.split(",")):
                for provider in args.providers.split(","):
                    with tempfile.TemporaryDirectory() as cache:
                        env = dict(
                            os.environ, TRITON_CACHE_DIR=f"{cache}/triton", FLASHATTN_CACHE_DIR=f"{cache}/fa"
                        )
                        for state in ("cold", "warm"):
                            if args.profile:
                                os.makedirs(args.profile, exist_ok=True)
                                # letters, digits, '-', '_' and '.' only (fetched files' names)
                                step = passes.replace("+", "_").replace("(", "_").replace(")", "")
                                name = f"{provider}-D{head_dim}-{step}-setup{setup_s:g}-{state}.txt"
                                env["FIRST_CALL_PROFILE"] = os.path.join(args.profile, name)
                            r = run_child(provider, passes, head_dim, setup_s, env)
                            row = dict(
                                D=head_dim, passes=passes, setup_s=setup_s, provider=provider, cache=state
                            )
                            rows.append(dict(row, **r))
                            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("| D | pass | setup s | provider | Triton cache | first call s | second call s | import s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['D']} | {r['passes']} | {r['setup_s']:g} | {r['provider']} | {r['cache']} |"
        if "error" in r:
            print(f"{head} error: {r['error']} | | |")
            continue
        print(f"{head} {r['first_s']:.2f} | {r['second_s']:.3f} | {r['import_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
