"""Varlen (packed) attention against the same tokens as one padded equal-length batch: forward + backward of
ours on packed sequences (flash_attention_varlen), ours dense on the padded batch (flash_attention) and SDPA's
flash backend on the padded batch (FA2; is_causal, which equals ours on the square padded rows). Sequence
lengths are drawn (fixed seed) uniformly in [max_len / 4, max_len]; hidden 2048 (H = 2048 // D, no GQA).
TFLOP/s count the packed tokens' useful work only (4 * H * L^2 * D per sequence forward, halved for causal,
backward 2.5x), so padding shows up as lost speed. Outputs and gradients are compared before timing.
`equal`: ours dense on a batch of as many sequences of one length doing the same work: the root mean square
of the lengths (the same sum of L^2), rounded to a multiple of 128 on the GPU (whole tiles, as the lengths
of a tuned batch are). It is what varlen is measured against (varlen/equal, issue 15's 10% bound): the same
FLOPs at one length, so the ratio is also the time ratio (the mean length, used before, gave the equal batch
less work, off the tiles: benchmarks/NOTES.md).
The timed varlen calls reuse one cu_seqlens tensor, whose host read is kept: a training step with new
offsets pays that read (one sync, shared by the step's layers) once.

    PYTHONPATH=. python -m benchmarks.varlen [--shapes 16x1024,8x4096] [--dims 128] [--causal both]
        [--json out.json] [--results-md [PATH]]

Without a CUDA GPU it runs two tiny shapes on the CPU (ours on triton under TRITON_INTERPRET=1, else the
torch backend), in wall-clock time, to check the script.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from . import report
from .paged import _shapes
from .run import DEFAULT_RESULTS_MD, _describe, _launched_configs, device_times, make_timer

GPU_SHAPES = ((16, 1024), (8, 2048), (4, 4096), (2, 8192))
CPU_SHAPES = ((3, 40), (2, 64))
PROVIDERS = ("varlen", "padded", "sdpa-padded", "equal")


def _lengths(batch: int, max_len: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, max_len // 4), max_len + 1, (batch,), generator=generator).tolist()
    lens[0] = max_len  # the padded batch's length
    return lens


def _flops(lens: list[int], heads: int, head_dim: int, causal: bool) -> float:
    """Forward + backward FLOPs of the packed sequences (3.5x the forward's)."""
    fwd = sum(4 * heads * n * n * head_dim for n in lens) / (2 if causal else 1)
    return 3.5 * fwd


def _timed_fwd_bwd(fn, inputs, dout):
    def step():
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, dout)

    return step


def kernel_times(step, calls: int = 10) -> dict[str, float]:
    """Kernel name -> mean device time per call (ms) of what step() launches, its 6 longest, and "busy":
    the sum over all, which the timed ms exceed by the time the GPU waits for the host."""
    totals = {name: us / 1e3 for name, us in device_times(step, calls).items()}
    top = dict(sorted(totals.items(), key=lambda kv: -kv[1])[:6])
    return {"busy": sum(totals.values()), **top}


def bench_shape(batch, max_len, head_dim, causal, dtype, device, timer, backend, profile=False) -> dict:
    from flashattention import flash_attention, flash_attention_varlen

    heads = 2048 // head_dim if device.type == "cuda" else 2
    lens = _lengths(batch, max_len)
    total = sum(lens)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
    torch.manual_seed(0)
    packed = [
        torch.randn(total, heads, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
    ]
    dout = torch.randn(total, heads, head_dim, device=device, dtype=dtype)
    padded = []
    for t in (*packed, dout):  # [batch, heads, max_len, head_dim], zeros after each sequence
        p = t.new_zeros(batch, max_len, heads, head_dim)
        for b, (start, n) in enumerate(zip(cu[:-1].tolist(), lens, strict=True)):
            p[b, :n] = t[start : start + n].detach()
        padded.append(p.transpose(1, 2).contiguous())
    pq, pk, pv, pdout = padded
    pq, pk, pv = (t.requires_grad_() for t in (pq, pk, pv))

    def ours_varlen(q, k, v):
        return flash_attention_varlen(q, k, v, cu, cu, max_len, max_len, causal=causal, backend=backend)

    def ours_padded(q, k, v):
        return flash_attention(q, k, v, causal=causal, backend=backend)

    def sdpa_padded(q, k, v):
        if device.type != "cuda":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    rms = (sum(n * n for n in lens) / batch) ** 0.5  # the equal batch's length: the same sum of L^2
    equal_len = max(128, round(rms / 128) * 128) if device.type == "cuda" else max(1, round(rms))
    equal = [
        torch.randn(batch, heads, equal_len, head_dim, device=device, dtype=dtype, requires_grad=True)
        for _ in range(3)
    ]
    runs = {
        "varlen": (ours_varlen, packed, dout),
        "padded": (ours_padded, (pq, pk, pv), pdout),
        "sdpa-padded": (sdpa_padded, (pq, pk, pv), pdout),
        "equal": (ours_padded, equal, torch.randn_like(equal[0])),
    }
    row = dict(batch=batch, max_len=max_len, lens=lens, tokens=total, padded_tokens=batch * max_len,
               equal_len=equal_len, heads=heads, head_dim=head_dim, causal=causal,
               dtype=report.dtype_name(dtype), flops=_flops(lens, heads, head_dim, causal),
               equal_flops=_flops([equal_len] * batch, heads, head_dim, causal), results={})  # fmt: skip
    # check: varlen's output and gradients against ours dense on each sequence alone (the first 4). The
    # padded batch's valid rows differ where they see padding keys (non-causal): only its time is comparable.
    got = [ours_varlen(*packed)]
    got += torch.autograd.grad(got[0], packed, dout)
    diff = 0.0
    for start, n in list(zip(cu[:-1].tolist(), lens, strict=True))[:4]:
        alone = [t[start : start + n].detach().transpose(0, 1)[None].requires_grad_() for t in packed]
        out = ours_padded(*alone)
        grads = torch.autograd.grad(out, alone, dout[start : start + n].transpose(0, 1)[None])
        for g, want in zip(got, (out, *grads), strict=True):
            want = want[0].transpose(0, 1).float()  # relative to the largest value (at least 1)
            scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
            diff = max(diff, (g[start : start + n].float() - want).abs().max().item() / scale)
    row["check"] = f"varlen (out, dq, dk, dv) vs per-sequence dense calls: max relative diff {diff:.3g}"
    wrong = not diff <= (1e-2 if dtype != torch.float32 else 1e-4)  # NaN too
    for name, (fn, inputs, grad) in runs.items():
        try:
            ms = timer(_timed_fwd_bwd(fn, inputs, grad))
            flops = row["equal_flops" if name == "equal" else "flops"]
            row["results"][name] = dict(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
            if name in ("varlen", "equal"):  # which kernels ran (the Gluon ones or the Triton ones)
                row["results"][name]["configs"] = {**_launched_configs("fwd"), **_launched_configs("bwd")}
                if profile:
                    row["results"][name]["kernels"] = kernel_times(_timed_fwd_bwd(fn, inputs, grad))
        except Exception as exc:  # a provider that cannot run the shape reads "-"
            row["results"][name] = dict(ms=None, tflops=None, error=_describe(exc, []))
        if name == "varlen" and wrong:
            row["results"][name]["wrong"] = row["check"]
    return row


def format_table(rows: list[dict]) -> str:
    lines = [
        "| D, mask | B x max S | tokens (padded) | varlen ms | padded ms | sdpa-padded ms | varlen TFLOP/s | "
        "varlen/padded | varlen/sdpa-padded | equal TFLOP/s (B x RMS S) | varlen/equal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        res = r["results"]
        ms = {p: res.get(p, {}).get("ms") for p in PROVIDERS}
        cells = [f"{ms[p]:.3f}" if ms[p] else "-" for p in PROVIDERS[:3]]
        if res["varlen"].get("wrong"):
            cells[0] = "WRONG"
        tflops = res["varlen"].get("tflops")
        cells.append(f"{tflops:.1f}" if tflops else "-")
        cells += [f"{ms[p] / ms['varlen']:.2f}" if ms[p] and ms["varlen"] else "-" for p in PROVIDERS[1:3]]
        equal = res.get("equal", {}).get("tflops")
        cells.append(f"{equal:.1f} ({r['batch']} x {r.get('equal_len', '-')})" if equal else "-")
        cells.append(f"{tflops / equal:.2f}" if tflops and equal else "-")
        mask = "causal" if r["causal"] else "non-causal"
        label = (
            f"{r['head_dim']}, {mask} | {r['batch']} x {r['max_len']} | {r['tokens']} ({r['padded_tokens']})"
        )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for r in rows:  # --profile: device time per kernel (ms per call) against the timed ms
        for p in ("varlen", "equal"):
            kernels = r["results"].get(p, {}).get("kernels")
            if kernels:
                mask = "causal" if r["causal"] else "non-causal"
                said = ", ".join(f"{k[:48]} {v:.3f}" for k, v in kernels.items())
                lines.append(
                    f"- D{r['head_dim']} {mask} {r['batch']} x {r['max_len']} {p} kernels (ms): {said}"
                )
    for r in rows:  # the configs behind the two columns compared
        ran = {p: r["results"].get(p, {}).get("configs") for p in ("varlen", "equal")}
        if any(ran.values()):
            mask = "causal" if r["causal"] else "non-causal"
            said = "; ".join(
                f"{p}: " + ", ".join(f"{k} `{v}`" for k, v in c.items()) for p, c in ran.items() if c
            )
            lines.append(f"- D{r['head_dim']} {mask} {r['batch']} x {r['max_len']}: {said}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from flashattention import _env

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks.varlen", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=_shapes, default=None, help="B x max_len list, e.g. 16x1024,4x4096")
    p.add_argument("--dims", default="128" if cuda else "32", help="head dims (default 128; CPU 32)")
    p.add_argument("--causal", choices=("true", "false", "both"), default="both")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16" if cuda else "fp32")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (default 25)")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms (default 100)")
    p.add_argument("--json", metavar="PATH", help="write the rows and the environment as JSON")
    p.add_argument(
        "--results-md", nargs="?", const=DEFAULT_RESULTS_MD, metavar="PATH",
        help=f"append header and table to PATH (no PATH: {DEFAULT_RESULTS_MD})",
    )  # fmt: skip
    p.add_argument("--profile", action="store_true", help="device time per kernel of varlen and equal (GPU)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    backend = "triton" if cuda or _env.interpreter_requested() else "torch"
    shapes = args.shapes or (GPU_SHAPES if cuda else CPU_SHAPES)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    masks = {"true": (True,), "false": (False,), "both": (False, True)}[args.causal]
    timer = make_timer(device, args.warmup, args.rep)

    meta = report.environment_meta(device, "python -m benchmarks.varlen " + " ".join(argv or []))
    timing = (
        "median of triton.testing.do_bench, L2 flushed"
        if cuda
        else f"median wall clock ({args.warmup} ms warm-up)"
    )
    settings = (
        f"varlen: forward + backward, packed sequences (lengths uniform in [S/4, S], seed 0, the first = S) "
        f"vs the same tokens padded to S: ours dense and SDPA flash (padded). {args.dtype}, ours' backend "
        f"{backend}; TFLOP/s of the packed tokens' work (3.5x the forward's). {timing}."
    )
    header = report.results_header(meta, settings)
    print(header)
    meta.update(suite="varlen", settings=settings, providers=list(PROVIDERS), partial=True)
    rows: list[dict] = []
    started = time.perf_counter()
    for head_dim, causal, (batch, max_len) in itertools.product(
        (int(d) for d in args.dims.split(",")), masks, shapes
    ):
        rows.append(
            bench_shape(
                batch, max_len, head_dim, causal, dtype, device, timer, backend, args.profile and cuda
            )
        )
        if args.json:
            report.write_json(args.json, meta, rows)
        if cuda:
            torch.cuda.empty_cache()
    table = format_table(rows)
    problems = "\n".join(
        f"- {r['batch']}x{r['max_len']} {name}: {res['error']}"
        for r in rows
        for name, res in r["results"].items()
        if res.get("error")
    )
    print(table)
    if problems:
        print(problems)
    print(f"{len(rows)} rows in {time.perf_counter() - started:.0f} s.")
    meta.update(partial=False)
    if args.json:
        report.write_json(args.json, meta, rows)
        print(f"JSON written to {args.json}")
    if args.results_md:
        report.append_results_md(args.results_md, header, table, problems)
        print(f"table appended to {args.results_md}")
    return 1 if any(r["results"]["varlen"].get("wrong") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
