"""Paged decode against the same cache dense, both through our split-KV decode kernel
(kernels/launch_decode.decode_forward): GQA 32/8, head_dim 128, bf16, one query per row, every row holding
S tokens (cache_seqlens = S for both, so that only the paging differs), the pages of the paged cache in a
random order of the pool (a server's pool after a while; --order sequential: in the pool's order, as a
fresh cache hands them out). Reports GB/s of K+V read, batch * S * kv_heads *
head_dim * 2 (K and V) * 2 bytes over the median time, and the paged/dense ratio. Outputs are compared
before timing (paged and dense run the same tiles, so they should agree exactly).

    PYTHONPATH=. python -m benchmarks.paged [--shapes 1x8192,8x8192,64x8192,1x65536] [--block-sizes 16,256]
        [--order random|sequential]

Without a CUDA GPU it runs two tiny shapes on the CPU (set TRITON_INTERPRET=1), in wall-clock time, to
check the script.
"""

from __future__ import annotations

import argparse
import math

import torch

from .run import _int_list, make_timer

HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
GPU_SHAPES = ((1, 8192), (8, 8192), (64, 8192), (1, 65536))
CPU_SHAPES = ((1, 64), (2, 96))


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        shapes = tuple(tuple(int(x) for x in item.split("x")) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BxS,BxS,... e.g. 8x8192, got {text!r}") from None
    if not shapes or any(len(s) != 2 or min(s) <= 0 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected BxS,BxS,... with positive sizes, got {text!r}")
    return shapes


def to_pages(
    k: torch.Tensor, v: torch.Tensor, block_size: int, order: str = "random"
) -> tuple[torch.Tensor, ...]:
    """(key_pool, value_pool, block_table) holding dense k, v [B, H_kv, S, D] in blocks of block_size taken
    in a random order of the pool or in its order ("sequential"; S rounded up to whole blocks; the tail of
    the last block is unused)."""
    batch, kv_heads, seqlen, head_dim = k.shape
    per_row = math.ceil(seqlen / block_size)
    blocks = batch * per_row
    ids = torch.randperm(blocks, device=k.device) if order == "random" else torch.arange(blocks)
    table = ids.to(k.device).view(batch, per_row)
    pools = []
    for t in (k, v):
        padded = torch.nn.functional.pad(t, (0, 0, 0, per_row * block_size - seqlen))
        blocks = padded.view(batch, kv_heads, per_row, block_size, head_dim).transpose(1, 2)
        pool = torch.empty(batch * per_row, kv_heads, block_size, head_dim, dtype=t.dtype, device=t.device)
        pool[table.flatten()] = blocks.reshape(batch * per_row, kv_heads, block_size, head_dim)
        pools.append(pool)
    return pools[0], pools[1], table.to(torch.int32)


def main(argv: list[str] | None = None) -> int:
    from flashattention.kernels.launch_decode import decode_forward

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks.paged", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=_shapes, default=GPU_SHAPES if cuda else CPU_SHAPES, help="BxS list")
    p.add_argument("--block-sizes", type=_int_list, default=(16, 256), help="page sizes (default 16,256)")
    p.add_argument(
        "--order",
        choices=("random", "sequential"),
        default="random",
        help="the pages' order in the pool (default random)",
    )
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (default 25)")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms (default 100)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    timer = make_timer(device, args.warmup, args.rep, clean_l2=True)  # as the decode suite
    name = torch.cuda.get_device_name() if cuda else "CPU (interpreter)"
    print(
        f"paged decode vs dense, GQA {HEADS}/{KV_HEADS}, D {HEAD_DIM}, bf16, 1 query per row, pages in "
        f"{args.order} order, {name}"
    )
    header = " | ".join(f"paged {bs} GB/s | paged/dense" for bs in args.block_sizes)
    print(f"| B x S | dense GB/s | {header} |")
    print("|---|---|" + "---|---|" * len(args.block_sizes))
    for batch, seqlen in args.shapes:
        torch.manual_seed(0)
        q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=DTYPE)
        k = torch.randn(batch, KV_HEADS, seqlen, HEAD_DIM, device=device, dtype=DTYPE)
        v = torch.randn_like(k)
        seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
        gbytes = 2 * k.numel() * k.element_size() / 1e9

        def dense(q=q, k=k, v=v, seqlens=seqlens):
            return decode_forward(
                q, k, v, softmax_scale=HEAD_DIM**-0.5, left=-1, right=-1, cache_seqlens=seqlens
            )[0]

        expected = dense()
        dense_ms = timer(dense)
        cells = [f"{gbytes / (dense_ms / 1e3):.0f}"]
        for block_size in args.block_sizes:
            key_pool, value_pool, table = to_pages(k, v, block_size, args.order)

            def paged(q=q, pools=(key_pool, value_pool), table=table, seqlens=seqlens, seqlen=seqlen):
                return decode_forward(
                    q,
                    *pools,
                    softmax_scale=HEAD_DIM**-0.5,
                    left=-1,
                    right=-1,
                    cache_seqlens=seqlens,
                    block_table=table,
                    max_seqlen_k=seqlen,
                )[0]

            diff = (paged().float() - expected.float()).abs().max().item()
            if not diff <= 1e-2:  # NaN too
                cells += [f"WRONG (max diff {diff:.3g})", "-"]
            else:
                paged_ms = timer(paged)
                cells += [f"{gbytes / (paged_ms / 1e3):.0f}", f"{dense_ms / paged_ms:.2f}"]
            del key_pool, value_pool, table, paged
        print(f"| {batch} x {seqlen} | " + " | ".join(cells) + " |", flush=True)
        del q, k, v, expected
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
