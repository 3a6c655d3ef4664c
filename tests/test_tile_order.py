"""The deterministic fused dQ's turn order (kernels/bwd_ws.py, DQ_ORDERED): a key block's rank at a query tile
comes from common.key_blocks_of_tile (the query side), while the tiles a key block visits come from
common.tile_range on the key side. The two must agree exactly: the key blocks that visit a tile are the
consecutive blocks first..last, so that the ranks last - block are 0, 1, ... once each. A block whose rank
counted a block that never visits the tile would wait out its bound; one that missed a visitor would add out
of turn. And the blocks it waits for are dispatched before it (bwd._key_block's LAST_FIRST)."""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl

from flashattention.kernels.bwd import _key_block
from flashattention.kernels.common import key_blocks_of_tile, tile_range


@triton.jit
def _visits_kernel(
    KEY_LO, KEY_HI, FIRST, LAST, seqlen_q, seqlen_k, left, right, n_blocks, n_tiles,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_HAS_LO: tl.constexpr, Q_HAS_HI: tl.constexpr,
):  # fmt: skip
    # the dK/dV kernels' offsets: key j is seen by queries i with j - diag - right <= i <= j - diag + left
    diag = seqlen_k - seqlen_q
    lo_off = -diag - tl.maximum(right, 0)
    hi_off = -diag + tl.maximum(left, 0)
    for j in range(n_blocks):  # the key side: flags swapped, as the dK/dV kernels pass them
        lo, _, _, hi = tile_range(j * BLOCK_N, BLOCK_N, BLOCK_M, seqlen_q, lo_off, hi_off, Q_HAS_HI, Q_HAS_LO)
        tl.store(KEY_LO + j, lo)
        tl.store(KEY_HI + j, hi)
    for m in range(n_tiles):  # the query side, as the consumers call it (with the key-side flags)
        first, last = key_blocks_of_tile(m * BLOCK_M, BLOCK_M, BLOCK_N, seqlen_k, lo_off, hi_off, Q_HAS_HI,
                                         Q_HAS_LO)  # fmt: skip
        tl.store(FIRST + m, first)
        tl.store(LAST + m, last)


SHAPES = [(256, 256), (200, 320), (320, 200), (64, 448), (448, 64), (130, 130), (1, 300), (300, 1)]
WINDOWS = [(-1, -1), (-1, 0), (0, 0), (37, 0), (0, 37), (100, 5), (5, 100), (-1, 70), (70, -1), (500, 500)]


@pytest.mark.parametrize("block_m, block_n", [(64, 128), (128, 128), (64, 64)], ids=lambda b: str(b))
@pytest.mark.parametrize("seqlen_q, seqlen_k", SHAPES, ids=lambda s: str(s))
def test_tile_visitors_are_the_query_sides_consecutive_blocks(seqlen_q, seqlen_k, block_m, block_n) -> None:
    n_blocks, n_tiles = -(-seqlen_k // block_n), -(-seqlen_q // block_m)
    for left, right in WINDOWS:
        key_lo, key_hi = (torch.full((n_blocks,), -7, dtype=torch.int32) for _ in range(2))
        first, last = (torch.full((n_tiles,), -7, dtype=torch.int32) for _ in range(2))
        _visits_kernel[(1,)](
            key_lo, key_hi, first, last, seqlen_q, seqlen_k, left, right, n_blocks, n_tiles,
            BLOCK_M=block_m, BLOCK_N=block_n, Q_HAS_LO=left >= 0, Q_HAS_HI=right >= 0,
        )  # fmt: skip
        # the tiles each key block's loop visits: lo + i * BLOCK_M for i < ceil((hi - lo) / BLOCK_M)
        visitors = {m: [] for m in range(n_tiles)}
        for j in range(n_blocks):
            lo, hi = int(key_lo[j]), int(key_hi[j])
            assert lo % block_m == 0, (j, lo)
            for start in range(lo, hi, block_m):
                visitors[start // block_m].append(j)
        for m in range(n_tiles):
            expected = list(range(int(first[m]), int(last[m]) + 1))
            assert visitors[m] == expected, (
                f"window ({left}, {right}), tile {m}: visited by key blocks {visitors[m]}, the query side "
                f"counts {expected}"
            )


def test_causal_square_by_hand() -> None:
    """Causal, 256 x 256, tiles and blocks of 128: worked out by hand, not by the functions."""
    seqlen_q = seqlen_k = 256
    first, last = (torch.full((2,), -7, dtype=torch.int32) for _ in range(2))
    key_lo, key_hi = (torch.full((2,), -7, dtype=torch.int32) for _ in range(2))
    _visits_kernel[(1,)](
        key_lo, key_hi, first, last, seqlen_q, seqlen_k, -1, 0, 2, 2, BLOCK_M=128, BLOCK_N=128,
        Q_HAS_LO=False, Q_HAS_HI=True,
    )  # fmt: skip
    # causal, square: tile 0 is seen by key block 0 alone, tile 1 by blocks 0 and 1
    assert [int(x) for x in first] == [0, 0]
    assert [int(x) for x in last] == [0, 1]
    assert list(itertools.chain(key_lo.tolist(), key_hi.tolist())) == [0, 128, 256, 256]


@triton.jit
def _key_block_kernel(OUT, num_kv_heads, BLOCK_N: tl.constexpr, LAST_FIRST: tl.constexpr):
    start_n, off_b, off_hk = _key_block(num_kv_heads, BLOCK_N, LAST_FIRST)
    pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)  # the dispatch order (axis 0 fastest)
    tl.store(OUT + pid * 3 + 0, start_n)
    tl.store(OUT + pid * 3 + 1, off_b.to(tl.int32))
    tl.store(OUT + pid * 3 + 2, off_hk.to(tl.int32))


@pytest.mark.parametrize("last_first", [False, True], ids=["grid-order", "last-first"])
def test_key_block_dispatch_order(last_first: bool) -> None:
    """bwd._key_block over a (key blocks, batch * kv heads) grid: every (key block, batch, kv head) once;
    LAST_FIRST dispatches (batch, kv head) fastest and the last key block first, so that a DQ_ORDERED block
    waits only for blocks dispatched before it (the ones after it in key order)."""
    blocks, batch, kv_heads, block_n = 5, 2, 3, 128
    out = torch.full((blocks * batch * kv_heads, 3), -1, dtype=torch.int32)
    _key_block_kernel[(blocks, batch * kv_heads)](out, kv_heads, BLOCK_N=block_n, LAST_FIRST=last_first)
    seen = [(n // block_n, b, h) for n, b, h in out.tolist()]
    assert sorted(seen) == sorted(itertools.product(range(blocks), range(batch), range(kv_heads)))
    if last_first:
        expected = [(j, b, h) for j in reversed(range(blocks)) for b in range(batch) for h in range(kv_heads)]
    else:
        expected = [(j, b, h) for b in range(batch) for h in range(kv_heads) for j in range(blocks)]
    assert seen == expected
