"""The attention benchmark: ours against SDPA (flash, cuDNN, memory-efficient) and FlexAttention, one run.

    python -m benchmarks.run                      # the README's full benchmark matrix (CUDA GPU)
    python -m benchmarks.run --quick              # a few shapes
    python -m benchmarks.run --json r.json --plot r.png --results-md
    python -m benchmarks.run --suite decode       # decode GB/s (benchmarks/decode.py)

Each shape gets fresh inputs shared by all providers. Before timing, ours is checked against a peer (SDPA
flash where it runs): outputs and, for the backward, gradients must agree within a tolerance of the dtype,
else the cell reads WRONG and is not timed. A provider that fails (unsupported shape, OOM, compile error)
shows "-", and the reason is printed below the table; it never stops the run. Only a broken CUDA context
(illegal memory access, device assert) stops it early, with the rows measured so far still reported.

Without a CUDA GPU it says so and compares ours (backend auto, which on the CPU runs SDPA itself on these
square shapes) and our blockwise torch backend against SDPA's default CPU backend (its flash kernel), in
milliseconds, with ratio columns (higher is better for ours).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from . import report
from .registry import (
    CPU_PROVIDERS,
    DTYPES,
    GPU_PROVIDERS,
    PASSES,
    PROVIDERS,
    REFERENCE_CHAIN,
    STANDARD_HEAD_DIMS,
    STANDARD_HIDDEN,
    STANDARD_SEQLENS,
    STANDARD_TOKENS,
    Shape,
    standard_shapes,
)

DEFAULT_RESULTS_MD = str(Path(__file__).resolve().parent / "RESULTS.md")
# max|ours - peer| / max|peer| allowed (forward, backward). Loose enough for two correct low-precision
# implementations (both round P and dS), tight enough for any masking or scaling bug (those are O(1)).
CHECK_TOLERANCE = {torch.bfloat16: (2.5e-2, 5e-2), torch.float16: (5e-3, 1e-2), torch.float32: (1e-3, 2e-3)}
FATAL_MARKERS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "illegal instruction",
    "CUDA error: misaligned address",
)
MATH_MAX_SCORE_BYTES = 2 << 30  # the math reference materialises [B, H, S, S] float32 scores


class FatalDeviceError(RuntimeError):
    """The CUDA context is broken: nothing after this can run in this process."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from {', '.join(choices)}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Attention benchmark (the README's Benchmarks section): ours against SDPA flash, cuDNN, "
        "memory-efficient and FlexAttention in one run, TFLOP/s per shape, ratios to the peers. Standard "
        "shapes: 16k tokens per batch (B = 16384 // S), hidden 2048 (H = 2048 // D), square (Sq = Sk).",
    )
    sel = p.add_argument_group("what to run (defaults: the full standard matrix on a GPU)")
    sel.add_argument(
        "--suite",
        choices=("attention", "decode"),
        default="attention",
        help="attention (default): the forward/backward matrix; decode: one query token over a KV cache, "
        "GB/s against the copy bandwidth (benchmarks/decode.py; takes --decode-shapes, --backend, "
        "--providers, --dtype and the timing and output options)",
    )
    sel.add_argument("--dims", type=_int_list, help="head dims, e.g. 64,128 (default 64,128,256)")
    sel.add_argument("--seqlens", type=_int_list, help="sequence lengths, e.g. 512,2048 (default 512..16384)")
    sel.add_argument("--causal", choices=("both", "true", "false"), default="both", help="default both")
    sel.add_argument(
        "--passes", type=_name_list(PASSES), default=PASSES, help="fwd, bwd or fwd,bwd (default)"
    )
    sel.add_argument(
        "--providers",
        type=_name_list(tuple(PROVIDERS)),
        help=f"comma-separated, from {', '.join(PROVIDERS)} (default {','.join(GPU_PROVIDERS)})",
    )
    sel.add_argument(
        "--dtype", type=_name_list(tuple(DTYPES)), help="bf16, fp16, fp32 or a list (default bf16)"
    )
    sel.add_argument("--quick", action="store_true", help="a tiny subset: D 128, S 1024 and 8192")
    sel.add_argument("--tokens", type=int, help=f"tokens per batch (default {STANDARD_TOKENS})")
    sel.add_argument("--hidden", type=int, help=f"hidden size = heads * head_dim (default {STANDARD_HIDDEN})")
    sel.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        help="default: cuda if available, else the small CPU comparison. --device cpu with "
        "--providers runs any provider set on the CPU (to test the runner)",
    )
    from . import decode  # here, not at the top: decode imports this module's helpers

    decode.add_arguments(p)
    tim = p.add_argument_group("timing")
    tim.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (default 25)")
    tim.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms (default 100)")
    out = p.add_argument_group("output (the table always goes to stdout, progress to stderr)")
    out.add_argument(
        "--commit",
        metavar="REV",
        help="the commit to record in the header (default: git rev-parse HEAD of this checkout; use this "
        "where the tree is a copy without .git)",
    )
    out.add_argument("--json", metavar="PATH", help="write meta and rows as JSON")
    out.add_argument("--plot", metavar="PATH", help="write a PNG: speed against S per provider (matplotlib)")
    out.add_argument(
        "--results-md",
        metavar="PATH",
        nargs="?",
        const=DEFAULT_RESULTS_MD,
        help=f"append header and table to PATH (no PATH: {DEFAULT_RESULTS_MD})",
    )
    return p


def _resolve_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Fills what the command line left open: the standard matrix on CUDA, a small comparison on CPU."""
    if device.type == "cuda":
        defaults = dict(
            dims=STANDARD_HEAD_DIMS,
            seqlens=STANDARD_SEQLENS,
            providers=GPU_PROVIDERS,
            dtype=("bf16",),
            tokens=STANDARD_TOKENS,
            hidden=STANDARD_HIDDEN,
        )
        quick = dict(dims=(128,), seqlens=(1024, 8192))
    else:
        defaults = dict(
            dims=(64,), seqlens=(512, 2048), providers=CPU_PROVIDERS, dtype=("fp32",), tokens=2048, hidden=512
        )
        quick = dict(seqlens=(512,))
    if args.quick:
        defaults.update(quick)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def device_times(step, calls: int = 10) -> dict[str, float]:
    """Kernel name -> mean device time per call (us) of the CUDA kernels step() launches, from torch.profiler
    over `calls` calls after one outside it."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.device_time / calls
    return totals


def make_timer(
    device: torch.device, warmup_ms: int, rep_ms: int, clean_l2: bool = False
) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds per call: triton's do_bench on CUDA (flushes L2 before every call, so inputs
    never sit in cache), wall clock on the CPU. Each timing starts after flashattention's import-time thread
    has ended (its imports would take the GIL from the calls timed; benchmarks.first_call times first
    calls). clean_l2 (memory-bound suites): the L2 is emptied by reading a buffer instead of do_bench's
    writing one, so that the timed call does not also write back an L2's worth of the flush's dirty lines
    (benchmarks/NOTES.md has what that cost)."""
    from flashattention import _prefetch

    if device.type == "cuda":
        from triton.testing import do_bench

        # the read flush's 256 MiB, made once per timer (do_bench keeps its own write buffer likewise)
        flush = torch.zeros(64 << 20, dtype=torch.int32, device=device) if clean_l2 else None

        def timed(fn: Callable[[], object]) -> float:
            _prefetch.finish()
            if clean_l2:
                return _bench_clean_l2(fn, warmup_ms, rep_ms, flush)
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))

        return timed

    def wall_clock(fn: Callable[[], object]) -> float:
        _prefetch.finish()
        end = time.perf_counter() + warmup_ms / 1e3
        fn()
        while time.perf_counter() < end:
            fn()
        times: list[float] = []
        end = time.perf_counter() + rep_ms / 1e3
        while len(times) < 3 or (time.perf_counter() < end and len(times) < 1000):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return wall_clock


def _bench_clean_l2(fn: Callable[[], object], warmup_ms: int, rep_ms: int, flush: torch.Tensor) -> float:
    """do_bench's loop (warm-up, then each call timed by events after an L2 flush; the median) with a flush
    that only reads: a sum over 256 MiB leaves the L2 holding clean lines of a buffer the call never
    touches."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.sum()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = start.elapsed_time(end) / 5
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(max(1, int(rep_ms / estimate_ms)))
    ]
    for begin, finish in events:
        flush.sum()
        begin.record()
        fn()
        finish.record()
    torch.cuda.synchronize()
    return statistics.median(begin.elapsed_time(finish) for begin, finish in events)


def _describe(exc: BaseException, caught: list[warnings.WarningMessage]) -> str:
    """One line: the exception, its root cause and the warnings that came with it (SDPA's warnings say why
    a kernel was not used)."""

    def first_line(e: BaseException) -> str:
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"

    text = first_line(exc)
    root = exc
    while root.__cause__ is not None:  # torch.compile hides the reason: "Unsupported: Observed exception"
        root = root.__cause__
    if root is not exc:
        text += f" (caused by {first_line(root)})"
    messages = (str(w.message).strip() for w in caught)
    reasons = list(dict.fromkeys(m.splitlines()[0] for m in messages if m))
    if reasons:
        text += " [" + "; ".join(reasons) + "]"
    return text if len(text) <= 400 else text[:397] + "..."


def _raise_if_fatal(exc: BaseException) -> None:
    if any(marker in str(exc) for marker in FATAL_MARKERS):
        raise FatalDeviceError(f"the CUDA context is broken, stopping: {type(exc).__name__}: {exc}") from exc


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_backward(fn, q, k, v, dout, with_grads: bool) -> list[torch.Tensor]:
    out = fn(q, k, v)
    if not with_grads:
        return [out.detach()]
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(ours).all():
        return float("inf")
    scale = ref.float().abs().max().clamp_min(1e-6)
    return float((ours.float() - ref.float()).abs().max() / scale)


def check_ours(fn_ours, shape: Shape, q, k, v, dout, passes, device) -> tuple[dict[str, str | None], str]:
    """Compares ours with the first reference peer that runs. Returns ({pass: mismatch or None}, summary).
    Exceptions from ours propagate (they are ours' errors); a failing peer just passes the turn."""
    with_grads = "bwd" in passes
    got = _forward_backward(fn_ours, q, k, v, dout, with_grads)
    for ref_name in REFERENCE_CHAIN:
        if ref_name == "sdpa-math" and shape.batch * shape.heads * shape.seqlen**2 * 4 > MATH_MAX_SCORE_BYTES:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref_fn = PROVIDERS[ref_name].make(shape, device)
                want = _forward_backward(ref_fn, q, k, v, dout, with_grads)
        except Exception as exc:  # noqa: BLE001 - any failure of a peer only means "try the next one"
            _raise_if_fatal(exc)
            continue
        tol_fwd, tol_bwd = CHECK_TOLERANCE[q.dtype]
        names = ("out", "dq", "dk", "dv")[: len(got)]
        errs = {name: _rel_err(a, b) for name, a, b in zip(names, got, want, strict=True)}
        mismatch: dict[str, str | None] = {}
        for pass_, tensors, tol in (("fwd", ["out"], tol_fwd), ("bwd", ["dq", "dk", "dv"], tol_bwd)):
            if pass_ in passes:
                bad = [f"{n} rel err {errs[n]:.2g} > {tol:g}" for n in tensors if not errs[n] <= tol]
                mismatch[pass_] = f"{', '.join(bad)} vs {ref_name}" if bad else None
        worst = max(errs, key=lambda n: errs[n])
        return mismatch, f"vs {ref_name}: worst {worst} rel err {errs[worst]:.2g}"
    return dict.fromkeys(passes), "unchecked: no reference peer ran on this shape"


def bench_provider(name, shape, q, k, v, dout, passes, device, timer) -> tuple[dict[str, dict], str | None]:
    """Times one provider on one shape for each pass. Returns ({pass: result}, check summary for ours)."""
    results: dict[str, dict] = {}
    check_summary = None
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn = PROVIDERS[name].make(shape, device)
            mismatch = dict.fromkeys(passes)
            if name == "ours":
                mismatch, check_summary = check_ours(fn, shape, q, k, v, dout, passes, device)
    except Exception as exc:  # noqa: BLE001 - a failing provider shows "-", it never stops the run
        _raise_if_fatal(exc)
        error = _describe(exc, caught)
        return {p: {"ms": None, "tflops": None, "error": error} for p in passes}, check_summary
    for pass_ in passes:
        if mismatch.get(pass_):
            results[pass_] = {"ms": None, "tflops": None, "wrong": mismatch[pass_]}
            continue
        out = None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                if pass_ == "fwd":
                    fn(q, k, v)  # first call: compiles / autotunes, outside timing
                    _sync(device)
                    setup_s = time.perf_counter() - t0
                    ms = timer(lambda: fn(q, k, v))
                else:
                    out = fn(q, k, v)
                    torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
                    _sync(device)
                    setup_s = time.perf_counter() - t0
                    ms = timer(lambda out=out: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
            results[pass_] = {
                "ms": ms,
                "tflops": shape.flops(pass_) / (ms * 1e-3) / 1e12,
                "setup_s": round(setup_s, 3),
            }
            if name == "ours":  # the configs the timed calls launched (the tuner's picks)
                results[pass_]["configs"] = _launched_configs(pass_)
        except Exception as exc:  # noqa: BLE001
            _raise_if_fatal(exc)
            results[pass_] = {"ms": None, "tflops": None, "error": _describe(exc, caught)}
        finally:
            out = None  # frees the retained graph
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results, check_summary


def _launched_configs(pass_: str) -> dict[str, str]:
    """Kernel -> the config of its last launch (flashattention.kernels.registry.last_launched), for the
    pass's kernels; empty where the Triton launcher did not run (another backend)."""
    try:
        from flashattention.kernels import configs, registry
    except ImportError:
        return {}
    names = ("fwd",) if pass_ == "fwd" else ("bwd_dkdv", "bwd_dq")
    return {n: configs.label(registry.last_launched[n]) for n in names if n in registry.last_launched}


def _progress(res: dict) -> str:
    if res.get("wrong"):
        return "WRONG: " + res["wrong"]
    if res.get("error"):
        return res["error"]
    picked = "; ".join(f"{k} {v}" for k, v in res.get("configs", {}).items())
    return f"{res['ms']:.3f} ms  {res['tflops']:.1f} TFLOP/s  (first call {res['setup_s']:.1f} s)" + (
        f"  [{picked}]" if picked else ""
    )


def run_matrix(
    shapes,
    dtypes,
    passes,
    providers,
    device,
    timer,
    on_shape_done: Callable[[list[dict]], None] | None = None,
) -> tuple[list[dict], str | None]:
    """All rows, in table order, and the fatal error that ended the run early (or None). `on_shape_done`
    gets the rows so far after each shape (the JSON is rewritten then, so a killed run leaves its rows)."""
    rows: list[dict] = []
    total = len(shapes) * len(dtypes)
    for i, (dtype_name, shape) in enumerate(((d, s) for d in dtypes for s in shapes), 1):
        dtype = DTYPES[dtype_name]
        shape_rows = {
            p: {
                "dtype": dtype_name,
                "head_dim": shape.head_dim,
                "causal": shape.causal,
                "seqlen": shape.seqlen,
                "pass": p,
                "batch": shape.batch,
                "heads": shape.heads,
                "flops": shape.flops(p),
                "check": None,
                "results": {},
            }
            for p in passes
        }
        rows += shape_rows.values()
        _log(f"[{i}/{total}] {dtype_name} {shape.label()}")
        torch.manual_seed(0)
        q, k, v = (
            torch.randn(
                shape.batch,
                shape.heads,
                shape.seqlen,
                shape.head_dim,
                device=device,
                dtype=dtype,
                requires_grad=True,
            )
            for _ in range(3)
        )
        dout = torch.randn_like(q)
        try:
            for name in providers:
                t0 = time.perf_counter()
                results, check = bench_provider(name, shape, q, k, v, dout, passes, device, timer)
                for pass_, res in results.items():
                    shape_rows[pass_]["results"][name] = res
                    shape_rows[pass_]["check"] = check or shape_rows[pass_]["check"]
                    _log(f"    {name:<15} {pass_}  {_progress(res)}")
                if check:
                    _log(f"    {'':<15} check {check}")
                _log(f"    {'':<15} ({time.perf_counter() - t0:.1f} s)")
        except FatalDeviceError as exc:
            return rows, str(exc)
        finally:
            del q, k, v, dout
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if on_shape_done is not None:
            on_shape_done(rows)
    return rows, None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA GPU here.", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.suite == "decode":
        from . import decode

        return decode.main(args, argv, device)
    if device.type == "cpu" and args.device is None:
        print(
            "No CUDA GPU here: the README's benchmark needs one. Running a small CPU "
            "comparison instead (B = 2048 // S, H 8, D 64, fp32): ours (backend auto: SDPA itself on these "
            "shapes) and ours-torch (the blockwise backend) against SDPA's default CPU backend, in ms.\n"
        )
    _resolve_defaults(args, device)
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    shapes = standard_shapes(args.dims, args.seqlens, causals, args.tokens, args.hidden)
    providers = list(args.providers)
    unit = "TFLOP/s" if device.type == "cuda" else "ms"
    timer = make_timer(device, args.warmup, args.rep)

    meta = report.environment_meta(device, "python -m benchmarks.run " + " ".join(argv), args.commit)
    timing = (
        f"median of triton.testing.do_bench(warmup={args.warmup}, rep={args.rep}), L2 flushed before "
        "each call"
        if device.type == "cuda"
        else f"median wall clock ({args.warmup} ms warm-up)"
    )
    settings = (
        f"{unit}; forward FLOPs 4*B*H*S*S*D, halved for causal; backward 2.5x forward. {timing}; forward "
        f"timed with inputs that require grad; backward timed alone (autograd.grad on a retained graph). "
        f"{args.tokens} tokens per batch (B = {args.tokens} // S), hidden {args.hidden} (H = {args.hidden} "
        "// D), square shapes only (SDPA's and flex's top-left causal = our bottom-right there). Ours is "
        "checked against SDPA flash (else the next peer that runs) before timing."
    )
    header = report.results_header(meta, settings)
    print(header)

    meta.update(settings=settings, providers=providers, partial=True)
    checkpoint = None
    if args.json:
        checkpoint = lambda rows: report.write_json(args.json, meta, rows)
    started = time.perf_counter()
    rows, fatal = run_matrix(shapes, args.dtype, args.passes, providers, device, timer, checkpoint)
    table = report.format_table(rows, providers, unit)
    title = f"{meta['card']}, {meta['date']}"
    plot = lambda path: report.write_plot(path, rows, providers, unit, title)
    return report.finish(args, meta, rows, table, header, fatal, started, plot)


if __name__ == "__main__":
    sys.exit(main())
