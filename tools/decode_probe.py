"""What bounds the split-KV decode at one sequence: ours against Triton kernels that only stream the same
K/V bytes, all timed as CUDA-graph replays (device time, no host launch cost), GQA 32/8, D 128, bf16.

- `ours`: launch_decode.decode_forward (split kernel + combine), the heuristic's split count;
- `ours 1 split`... `ours N splits`: the same with forced split counts;
- `stream+dot`: per program QK^T and PV dots over its keys (no softmax, no combine), same grid as ours:
  the Triton load/dot pipeline's ceiling for this grid;
- `stream+dot SMs`: the same over exactly one program per SM, key ranges cut across heads;
- `... TMA`: the same two with K/V tiles loaded through TMA descriptors (is the floor the loads' kind?);
- `copy`: a device-to-device copy of the K/V bytes (read + write counted, as benchmarks/decode.py does).
GB/s counts the K and V bytes read once.
`--cold`: an L2 flush before each call inside the graph (its own time subtracted); `--configs 64/s3,32/s4`:
the split kernel's configs to sweep (hooks), each with every `--splits` count; the heuristic's call is also
broken down per kernel (torch.profiler, eager calls after a flush). `--block-size 16`: the same cache also
as a paged pool (pages in a random order, benchmarks.paged.to_pages), its heuristic call and the sweep
(`--paged-configs`, forced as given: the launcher's 2 * stages - 1 rule does not apply to them).
Usage: PYTHONPATH=. python -m tools.decode_probe [--caches 8192,65536] [--splits 8,16,32] [--cold]
       [--block-size 16 --paged-configs 64/s5,32/s5]
"""

from __future__ import annotations

import argparse
import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from benchmarks.decode import _graphed
from benchmarks.paged import to_pages
from benchmarks.run import device_times
from flashattention.kernels import device as dev
from flashattention.kernels import hooks, launch_decode

HEADS, KV_HEADS, D = 32, 8, 128


@triton.jit
def _stream_tile(X, row, offs_n, offs_d, HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    """Rows row.. of the flattened [rows, HEAD_DIM] X: through its TMA descriptor, or pointer loads."""
    if TMA:
        tile = X.load([row.to(tl.int32), 0])
    else:
        tile = tl.load(X + (row + offs_n)[:, None] * HEAD_DIM + offs_d[None, :])
    return tile


@triton.jit
def _stream_dot(
    Q, K, V, OUT, keys_per_program, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr = False
):
    """Program p: keys [p * keys_per_program, (p + 1) * keys_per_program) of the flattened [rows, HEAD_DIM]
    K and V; s = q k^T, acc += s v (bf16 operands, float32 accumulators), as the decode's inner loop
    without its softmax. TMA: K and V are host descriptors with [BLOCK_N, HEAD_DIM] boxes, not pointers."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, 16)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    acc = tl.zeros([16, HEAD_DIM], tl.float32)
    start = pid.to(tl.int64) * keys_per_program
    for n in tl.range(0, keys_per_program, BLOCK_N):
        k = _stream_tile(K, start + n, offs_n, offs_d, HEAD_DIM, TMA)
        s = tl.dot(q, tl.trans(k))
        v = _stream_tile(V, start + n, offs_n, offs_d, HEAD_DIM, TMA)
        acc += tl.dot(s.to(v.dtype), v)
    tl.store(OUT + pid * 16 * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc)


_FLUSH: list[torch.Tensor] = []


def _flush_l2() -> None:
    """Empties L2 by reading 256 MiB (no dirty lines left for the next kernel to write back)."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(1 << 27, device="cuda", dtype=torch.bfloat16).normal_())
    _FLUSH[0].amax()


def graph_us(fn, replays: int = 50, cold: bool = False) -> float:
    """Median device time of fn as CUDA-graph replays of `replays` calls, us per call. cold: each call
    after an L2 flush in the same graph, the flush's own graph time subtracted (so the call reads its K/V
    from memory, not from the 50 MB L2 that a repeated 1 x 8k call would sit in)."""

    def timed(body) -> float:
        body()
        replay = _graphed(lambda: [body() for _ in range(replays)])
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / replays)
        return sorted(times)[len(times) // 2]

    if not cold:
        return timed(fn)
    return timed(lambda: (_flush_l2(), fn())) - timed(_flush_l2)


def _config(text: str) -> triton.Config:
    """ "64/s3" -> BLOCK_N 64, 4 warps, 3 stages ("64/s3/w8": 8 warps)."""
    block_n, stages, *warps = text.split("/")
    return triton.Config(
        {"BLOCK_N": int(block_n)}, num_warps=int(warps[0][1:]) if warps else 4, num_stages=int(stages[1:])
    )


def kernel_breakdown(fn, calls: int = 20) -> dict[str, float]:
    """Mean device time per call of each kernel fn launches (torch.profiler), each call after an L2 flush."""
    times = device_times(lambda: (_flush_l2(), fn()), calls)
    return {name: us for name, us in times.items() if "decode" in name}


def probe(
    cache: int,
    splits_list: list[int],
    sms: int,
    cold: bool,
    config_texts: list[str],
    block_size: int = 0,
    paged_texts: tuple[str, ...] = (),
) -> None:
    """Prints the rows of one cache length (block_size > 0: the paged rows too)."""
    q = torch.randn(1, HEADS, 1, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, KV_HEADS, cache, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    nbytes = 2 * k.numel() * k.element_size()

    def row(name: str, programs: int, us: float) -> None:
        print(f"| {cache} | {name} | {programs} | {us:.1f} | {nbytes / us / 1e3:.0f} |", flush=True)

    def ours(num_splits=None, cache_seqlens=None):
        return launch_decode.decode_forward(
            q,
            k,
            v,
            softmax_scale=D**-0.5,
            left=-1,
            right=-1,
            cache_seqlens=cache_seqlens,
            num_splits=num_splits,
        )

    def sweep(label: str, fn, texts) -> None:
        """A row per forced split config and split count of fn(num_splits)."""
        for text in texts:
            with hooks.overrides(configs={"decode": [_config(text)]}):
                for n in splits_list:
                    row(f"{label} {text} {n} splits", KV_HEADS * n, graph_us(lambda n=n: fn(n), cold=cold))

    splits = launch_decode.num_splits_heuristic(KV_HEADS, cache, sms, launch_decode.MIN_SPLIT_KEYS)
    row(f"ours (heuristic: {splits} splits)", KV_HEADS * splits, graph_us(ours, cold=cold))
    for name, us in kernel_breakdown(ours).items():
        row(f"  kernel {name[:40]} (profiler, eager)", 0, us)
    sweep("ours", ours, config_texts)
    if block_size:
        key_pool, value_pool, table = to_pages(k, v, block_size, "random")
        seqlens = torch.full((1,), cache, dtype=torch.int32, device="cuda")

        def paged(num_splits=None):
            return launch_decode.decode_forward(
                q, key_pool, value_pool, softmax_scale=D**-0.5, left=-1, right=-1, cache_seqlens=seqlens,
                block_table=table, max_seqlen_k=cache, num_splits=num_splits,
            )  # fmt: skip

        dense = functools.partial(ours, cache_seqlens=seqlens)  # through the same per-row-length path

        torch.testing.assert_close(paged()[0], dense()[0], rtol=0, atol=2e-2)  # the same tiles: close
        row(
            f"dense, cache_seqlens (heuristic: {splits} splits)",
            KV_HEADS * splits,
            graph_us(dense, cold=cold),
        )
        row(f"paged {block_size} (heuristic: {splits} splits)", KV_HEADS * splits, graph_us(paged, cold=cold))
        sweep(f"paged {block_size}", paged, paged_texts)
    q16 = torch.randn(16, D, device="cuda", dtype=torch.bfloat16)
    total = KV_HEADS * cache
    for name, programs in (("stream+dot", KV_HEADS * splits), ("stream+dot SMs", sms)):
        per = (total // programs) // 64 * 64
        out = torch.empty(programs, 16, D, device="cuda", dtype=torch.float32)
        shapes = [(False, 64, 3), (False, 64, 4), (False, 128, 3)]
        shapes += [(True, 64, 3), (True, 64, 4), (True, 128, 3), (True, 128, 4)]
        for tma, block_n, stages in shapes:
            kv = (
                (TensorDescriptor.from_tensor(t.view(-1, D), [block_n, D]) for t in (k, v)) if tma else (k, v)
            )

            def stream(per=per, programs=programs, out=out, block_n=block_n, stages=stages, kv=kv, tma=tma):
                _stream_dot[(programs,)](
                    q16, *kv, out, per, BLOCK_N=block_n, HEAD_DIM=D, TMA=tma, num_warps=4, num_stages=stages
                )

            us = graph_us(stream, cold=cold) * total / (per * programs)  # scaled to every key
            row(f"{name}{' TMA' if tma else ''} {block_n}/s{stages}", programs, us)
    flat = torch.cat([k.flatten(), v.flatten()])
    dst = torch.empty_like(flat)
    row("copy (read+write)", 0, graph_us(lambda: dst.copy_(flat), cold=cold) / 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caches", default="8192,65536")
    ap.add_argument("--splits", default="8,16,32")
    ap.add_argument("--configs", default="64/s3", help="split configs BLOCK_N/sSTAGES[/wWARPS], comma list")
    ap.add_argument("--cold", action="store_true", help="an L2 flush before each call (its time subtracted)")
    ap.add_argument("--block-size", type=int, default=0, help="also time it paged, blocks of this size")
    ap.add_argument("--paged-configs", default="64/s5", help="the paged split configs to sweep, comma list")
    args = ap.parse_args()
    sms = dev.num_sms(torch.device("cuda"))
    print("| cache | variant | programs | us | GB/s |\n|---|---|---|---|---|")
    for cache in (int(c) for c in args.caches.split(",")):
        probe(
            cache, [int(s) for s in args.splits.split(",")], sms, args.cold, args.configs.split(","),
            args.block_size, tuple(args.paged_configs.split(",")),
        )  # fmt: skip


if __name__ == "__main__":
    main()
