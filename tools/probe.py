"""Per-program timeline of the Gluon forward (kernels/fwd_ws.py's PROBE): where a launch's time goes.

Each program's tile gets a row of global-timer stamps (ns): the producer's start and last copy issue, each
consumer's start (Q landed), end of its key-tile loop and end of its stores, and the SM it ran on. From them:
the kernel's span, per tile the Q latency, loop and drain (last P V + epilogue) times, a least-squares fit
of a tile's duration against its key tiles (fixed cost + cost per key tile), per SM the idle gaps
between one program's end and the next one's start (block launch), and per consumer and SM its time inside
tiles and between them. Timed without the probe beside SDPA.
Usage: PYTHONPATH=. python -m tools.probe [--dim 64] [--config "192x128 ..."] [--cases nc2k,c2k,c4k]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from flashattention.kernels import configs, hooks, launch
from tools.tune import candidates_for

CASES = {  # name -> (causal, seqlen, batch); 2048 // D heads, the benchmark's shapes
    "nc2k": (False, 2048, 8),
    "c2k": (True, 2048, 8),
    "c4k": (True, 4096, 4),
    "nc4k": (False, 4096, 4),
    "c8k": (True, 8192, 2),
}


def key_tiles(causal: bool, seqlen: int, block_m: int, block_n: int) -> list[int]:
    """Key tiles of each query block in the kernel's tile order (common.persistent_tile: longest first;
    192-row blocks end at seqlen_q, as fwd_ws_tiles._tile places them)."""
    num_m = -(-seqlen // block_m)
    out = []
    for j in range(num_m):
        start = (num_m - 1 - j) * block_m - (num_m * block_m - seqlen)
        end = min(start + block_m, seqlen) if causal else seqlen
        out.append(-(-end // block_n))
    return out


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def probe(cfg, causal: bool, seqlen: int, batch: int, dim: int, heads: int = 32) -> dict:
    q, k, v = (torch.randn(batch, heads, seqlen, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    right = 0 if causal else -1
    kw = dict(softmax_scale=dim**-0.5, left=-1, right=right, config=cfg)

    def run():
        return launch.forward_stats(q, k, v, **kw)

    ms = do_bench(run, return_mode="median")
    peers = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            peers[name] = do_bench(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), return_mode="median"
            )
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    tiles = key_tiles(causal, seqlen, bm, bn)
    num_m = len(tiles)
    stamps = torch.zeros(num_m * batch * heads, 16, dtype=torch.int64, device="cuda")
    with hooks.overrides(extra_args={"fwd": {"PROBE": stamps}}):
        for _ in range(3):  # the last launch's stamps
            run()
        torch.cuda.synchronize()
    rows = stamps[: num_m * batch * heads].cpu().tolist()
    flops = 4 * batch * heads * seqlen * seqlen * dim / (2 if causal else 1)
    return dict(
        ms=ms, **peers, tflops=flops / ms / 1e9, **summarize(rows, tiles, cfg.kwargs.get("WS_CONSUMERS", 2))
    )


def summarize(rows: list[list[int]], tiles: list[int], consumers: int) -> dict:
    """The timeline's numbers from the stamp rows (one per tile, in tile order; key_tiles' counts per query
    block)."""
    num_m = len(tiles)
    t0 = min(r[1] for r in rows)
    ends = [max(r[4 + 3 * c] for c in range(consumers)) for r in rows]
    span = (max(ends) - t0) / 1e3
    n = [tiles[i % num_m] for i in range(len(rows))]
    dur = [(ends[i] - rows[i][1]) / 1e3 for i in range(len(rows))]
    qlat = [(min(r[2 + 3 * c] for c in range(consumers)) - r[1]) / 1e3 for r in rows]
    loop = [(max(r[3 + 3 * c] for c in range(consumers)) - min(r[2 + 3 * c] for c in range(consumers))) / 1e3
            for r in rows]  # fmt: skip
    drain = [(ends[i] - max(rows[i][3 + 3 * c] for c in range(consumers))) / 1e3 for i in range(len(rows))]
    skew = [(max(r[4 + 3 * c] for c in range(consumers)) - min(r[4 + 3 * c] for c in range(consumers))) / 1e3
            for r in rows]  # fmt: skip
    a, b = _fit(n, dur)
    by_sm: dict[int, list[tuple[int, int]]] = {}
    for i, r in enumerate(rows):
        by_sm.setdefault(r[0], []).append((r[1], ends[i]))
    gaps, busy, first, last = [], [], [], []
    for spans in by_sm.values():
        spans.sort()
        gaps += [(s2 - e1) / 1e3 for (_, e1), (s2, _) in zip(spans, spans[1:], strict=False)]
        busy.append(sum(e - s for s, e in spans) / 1e3)
        first.append((spans[0][0] - t0) / 1e3)
        last.append((spans[-1][1] - t0) / 1e3)
    # per consumer and SM: time inside its tiles (Q landed to stores done) and between them (waiting for
    # the next tile's Q; in a persistent program also the other consumers' ends)
    c_busy, c_idle = [], []
    for c in range(consumers):
        per_sm: dict[int, list[tuple[int, int]]] = {}
        for r in rows:
            per_sm.setdefault(r[0], []).append((r[2 + 3 * c], r[4 + 3 * c]))
        for spans in per_sm.values():
            spans.sort()
            c_busy.append(sum(e - s for s, e in spans) / 1e3)
            c_idle.append(sum(s2 - e1 for (_, e1), (s2, _) in zip(spans, spans[1:], strict=False)) / 1e3)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return dict(
        span_us=span, sms=len(by_sm),
        tiles_per_sm=len(rows) / max(len(by_sm), 1), fixed_us=a, per_key_tile_us=b,
        qlat_us=mean(qlat), loop_us=mean(loop), drain_us=mean(drain), skew_us=mean(skew),
        gap_us=mean(gaps), gap_total_us=sum(gaps) / max(len(by_sm), 1), busy_us=mean(busy),
        first_start_us=max(first), end_min_us=min(last), end_mean_us=mean(last), mean_key_tiles=mean(n),
        loop_per_key_tile_us=mean([loop[i] / n[i] for i in range(len(n)) if n[i]]),
        consumer_busy_us=mean(c_busy), consumer_idle_us=mean(c_idle),
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--config", default="", help="a config label of the sm90 table (default: its first)")
    ap.add_argument("--cases", default="nc2k,c2k,c4k")
    ap.add_argument("--programs", type=int, default=0, help="PERSISTENT grids sized for this many SMs")
    args = ap.parse_args()
    table = configs.configs_for("fwd", "sm90", args.dim) + candidates_for("fwd", "sm90", args.dim)
    labels = [c.strip() for c in args.config.split(";") if c.strip()] or [configs.label(table[0])]
    print(torch.cuda.get_device_name(), flush=True)
    for label in labels:
        cfg = configs.by_label(table, label)
        for case in args.cases.split(","):
            causal, seqlen, batch = CASES[case]
            with hooks.overrides(num_sms=args.programs or None):
                r = probe(cfg, causal, seqlen, batch, args.dim, heads=2048 // args.dim)
            text = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())
            print(f"{label} | {case}: {text}", flush=True)


if __name__ == "__main__":
    main()
