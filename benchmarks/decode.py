"""The decode suite of the benchmark (`python -m benchmarks.run --suite decode`): one new query token per
sequence over a KV cache, GQA 32/8, D 128, ours against SDPA flash, SDPA cuDNN and FlexAttention in one run.

Decode is memory-bound, so the measure is the K/V bytes read per second, 2 * batch * kv_heads * cache *
head_dim * element size / time, and its share of the card's copy bandwidth, measured in the same run: a
device-to-device copy of a ~1 GiB tensor, counted as read + write (2 * bytes / time).
Before timing, ours is checked against a peer (SDPA flash, else SDPA math); a mismatch reads WRONG.
"""

from __future__ import annotations

import argparse
import gc
import time
import warnings

import torch

from . import report
from .registry import (
    DECODE_CPU_PROVIDERS,
    DECODE_GPU_PROVIDERS,
    DECODE_PROVIDERS,
    DECODE_REFERENCE_CHAIN,
    DECODE_SHAPES,
    DTYPES,
    DecodeShape,
)
from .run import CHECK_TOLERANCE, FatalDeviceError, _describe, _log, _raise_if_fatal, _rel_err, make_timer

COPY_BYTES = {"cuda": 1 << 30, "cpu": 16 << 20}
CPU_SHAPES = ((1, 256), (4, 256))


def _parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """ "1x8192,64x8192" (or 8k for 8192) -> ((1, 8192), (64, 8192))."""
    shapes = []
    for item in (x.strip().lower() for x in text.split(",") if x.strip()):
        try:
            batch, cache = item.split("x")
            value = int(cache[:-1]) * 1024 if cache.endswith("k") else int(cache)
            shapes.append((int(batch), value))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected BATCHxCACHE items like 1x8192 or 8x8k, got {item!r}"
            ) from None
    if not shapes or min(min(s) for s in shapes) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive BATCHxCACHE items, got {text!r}")
    return tuple(shapes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--suite decode")
    group.add_argument(
        "--decode-shapes",
        type=_parse_shapes,
        help="BATCHxCACHE list (default " + ",".join(f"{b}x{c}" for b, c in DECODE_SHAPES) + " on a GPU)",
    )
    group.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "triton", "torch"),
        help="ours' backend (default auto; triton on the CPU runs the interpreter: smoke tests)",
    )
    group.add_argument(
        "--graphs",
        action="store_true",
        help="time each provider's call as the replay of a CUDA graph that captured it (as a server replays "
        "its decode step: no per-call host cost), not as an eager call",
    )
    group.add_argument(
        "--l2-flush",
        default="read",
        choices=("read", "write"),
        help="how L2 is emptied before each timed call: read a buffer (default; no dirty lines left) or "
        "do_bench's write (the timed call then also writes back the L2's dirty lines)",
    )


def copy_bandwidth(device: torch.device, timer, nbytes: int) -> dict:
    """GB/s of a device-to-device copy of nbytes, counted as read + write (2 * nbytes / time)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return {"bytes": nbytes, "ms": ms, "gbps": 2 * nbytes / (ms * 1e-3) / 1e9}


def _check(fn_ours, q, k, v, shape, backend) -> tuple[str | None, str]:
    """(mismatch or None, summary) of ours against the first reference peer that runs."""
    got = fn_ours(q, k, v)
    for name in DECODE_REFERENCE_CHAIN:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn, _ = DECODE_PROVIDERS[name].make(shape, q, k, v, backend)
                want = fn(q, k, v)
        except Exception as exc:  # noqa: BLE001 - a failing peer passes the turn
            _raise_if_fatal(exc)
            continue
        err, tol = _rel_err(got, want), CHECK_TOLERANCE[q.dtype][0]
        bad = f"out rel err {err:.2g} > {tol:g} vs {name}" if not err <= tol else None
        return bad, f"vs {name}: out rel err {err:.2g}"
    return None, "unchecked: no reference peer ran on this shape"


def _graphed(call):
    """`call` captured once into a CUDA graph (after a warm-up on a side stream, as torch asks); returns the
    graph's replay, which launches the whole call at once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def bench_shape(
    shape: DecodeShape, dtype: torch.dtype, providers, device, timer, backend, copy_gbps, graphs=False
) -> dict:
    """One row: the shape, ours' check and each provider's {ms, gbps, pct_copy, kv} (or error / wrong)."""
    torch.manual_seed(0)
    q = torch.randn(shape.batch, shape.heads, 1, shape.head_dim, device=device, dtype=dtype)
    k, v = (
        torch.randn(shape.batch, shape.kv_heads, shape.cache, shape.head_dim, device=device, dtype=dtype)
        for _ in range(2)
    )
    kv_bytes = shape.kv_bytes(q.element_size())
    row = {"suite": "decode", "dtype": report.dtype_name(dtype), "batch": shape.batch, "cache": shape.cache,
           "heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "kv_bytes": kv_bytes,
           "check": None, "results": {}}  # fmt: skip
    for name in providers:
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                fn, kv = DECODE_PROVIDERS[name].make(shape, q, k, v, backend)
                if name == "ours":
                    wrong, row["check"] = _check(fn, q, k, v, shape, backend)
                    if wrong:
                        row["results"][name] = {"ms": None, "gbps": None, "wrong": wrong}
                        _log(f"    {name:<15} WRONG: {wrong}")
                        continue
                fn(q, k, v)  # first call: compiles, outside timing
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                setup_s = time.perf_counter() - t0
                call = lambda fn=fn: fn(q, k, v)  # noqa: E731
                ms = timer(_graphed(call) if graphs else call)
            gbps = kv_bytes / (ms * 1e-3) / 1e9
            res = {"ms": ms, "gbps": gbps, "pct_copy": 100 * gbps / copy_gbps, "kv": kv,
                   "setup_s": round(setup_s, 3)}  # fmt: skip
            _log(
                f"    {name:<15} {ms * 1e3:9.1f} us  {gbps:8.1f} GB/s  ({kv} K/V, first call {setup_s:.1f} s)"
            )
        except Exception as exc:  # noqa: BLE001 - a failing provider shows "-", it never stops the run
            _raise_if_fatal(exc)
            res = {"ms": None, "gbps": None, "error": _describe(exc, caught)}
            _log(f"    {name:<15} {res['error']}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["results"][name] = res
    if row["check"]:
        _log(f"    {'':<15} check {row['check']}")
    return row


def main(args: argparse.Namespace, argv: list[str], device: torch.device) -> int:
    """Runs the decode suite with the runner's parsed arguments (benchmarks.run.main dispatches here)."""
    cuda = device.type == "cuda"
    shapes = [DecodeShape(b, c) for b, c in (args.decode_shapes or (DECODE_SHAPES if cuda else CPU_SHAPES))]
    providers = list(args.providers or (DECODE_GPU_PROVIDERS if cuda else DECODE_CPU_PROVIDERS))
    unknown = [p for p in providers if p not in DECODE_PROVIDERS]
    if unknown:
        print(f"error: no decode provider {unknown}; choose from {', '.join(DECODE_PROVIDERS)}")
        return 2
    dtypes = args.dtype or (("bf16",) if cuda else ("fp32",))
    timer = make_timer(device, args.warmup, args.rep, clean_l2=args.l2_flush == "read")
    copy = copy_bandwidth(device, timer, COPY_BYTES[device.type])
    _log(f"copy bandwidth: {copy['gbps']:.0f} GB/s ({copy['bytes'] >> 20} MiB copied, read + write)")

    meta = report.environment_meta(device, "python -m benchmarks.run " + " ".join(argv), args.commit)
    timing = (
        f"median of {args.rep} ms of calls after {args.warmup} ms of warm-up, L2 emptied before each call by "
        + ("a 256 MiB read (no dirty lines)" if args.l2_flush == "read" else "do_bench's 256 MiB write")
        if cuda
        else f"median wall clock ({args.warmup} ms warm-up)"
    )
    settings = (
        f"decode: one query token per sequence, GQA {shapes[0].heads}/{shapes[0].kv_heads}, D "
        f"{shapes[0].head_dim}, no mask (a single query sees the whole cache), ours' backend {args.backend}. "
        f"GB/s = 2 * batch * kv_heads * cache * D * element size / time (the K/V a call must read); "
        f"copy = a {copy['bytes'] >> 20} MiB device copy, 2 * bytes / time = {copy['gbps']:.0f} GB/s. "
        f"{timing}{'; each call a CUDA-graph replay' if args.graphs and cuda else ''}. Ours is checked "
        "against SDPA flash (else math) before timing."
    )
    header = report.results_header(meta, settings)
    print(header)
    meta.update(suite="decode", settings=settings, providers=providers, copy=copy, partial=True)

    rows: list[dict] = []
    fatal = None
    started = time.perf_counter()
    total = len(shapes) * len(dtypes)
    for i, (dtype_name, shape) in enumerate(((d, s) for d in dtypes for s in shapes), 1):
        _log(f"[{i}/{total}] {dtype_name} decode {shape.label()}")
        try:
            rows.append(bench_shape(shape, DTYPES[dtype_name], providers, device, timer, args.backend,
                                    copy["gbps"], graphs=args.graphs and cuda))  # fmt: skip
        except FatalDeviceError as exc:
            fatal = str(exc)
            break
        finally:
            gc.collect()
        if args.json:
            report.write_json(args.json, meta, rows)
    table = report.format_decode_table(rows, providers, copy["gbps"])
    title = f"{meta['card']}, {meta['date']}"
    plot = lambda path: report.write_decode_plot(path, rows, providers, copy["gbps"], title)
    return report.finish(args, meta, rows, table, header, fatal, started, plot)
