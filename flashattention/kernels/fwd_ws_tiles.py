"""What the Gluon forward's producer and consumers (kernels/fwd_ws.py) share: the tile order (which query
block, head and sequence a tile number names, and the key range it sees), which rows of a block are query
rows, the probe's timestamps; and the wgmma result layout, which the dK/dV kernel (bwd_ws.py) takes too."""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .common import persistent_tile, persistent_turn, tile_range, varlen_bounds


@gluon.constexpr_function
def wgmma_layout(num_warps, n):
    """The register layout of a warpgroup matmul's [rows, n] result (n columns per instruction), for the
    consumers of both Gluon kernels."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.jit
def _tile(
    tile, sizes, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HAS_LO: gl.constexpr, HAS_HI: gl.constexpr,
    IS_VARLEN: gl.constexpr,
):  # fmt: skip
    """Tile number -> (batch * head, first query row, lo, full_lo, full_hi, key tiles, seq), in the order of
    common.persistent_tile. seq: the tile's sequence, (batch index into the tensors, first query row, first
    key row, seqlen_q, seqlen_k, lo_off, hi_off): the kernel's, or with IS_VARLEN the packed sequence's
    (batch 0 of the [1, heads, total, head dim] views, its rows and lengths from the cu_seqlens, its own
    mask offsets; a block past its end has no rows: start_m >= seqlen_q). With 192-row blocks the blocks
    end at seqlen_q, so where BLOCK_M does not divide it the first block is the partial one, starting before
    row 0: under a causal mask that block sees the fewest keys, where the last one sees the most (at 2k,
    D64: one consumer of three idle through the longest tile)."""
    num_m, num_heads, seqlen_q, seqlen_k, lo_off, hi_off, window_left, window_right, CU_Q, CU_K = sizes
    off_bh, start_m = persistent_tile(tile, num_m, BLOCK_M)
    off_b = (off_bh // num_heads).to(gl.int64)
    if IS_VARLEN:
        q_start, k_start, seqlen_q, seqlen_k = varlen_bounds(CU_Q, CU_K, off_b, seqlen_q, seqlen_k)
        lo_off = seqlen_k - seqlen_q - window_left
        hi_off = seqlen_k - seqlen_q + window_right
        mem_b = 0
        own_m = gl.cdiv(seqlen_q, BLOCK_M)  # the sequence's blocks, the first ones of the grid's
    else:
        q_start = 0
        k_start = 0
        mem_b = off_b
        own_m = num_m
    if (BLOCK_M & (BLOCK_M - 1)) != 0:  # 192 rows (the 2^k blocks keep their code as measured)
        start_m = start_m - (own_m * BLOCK_M - seqlen_q)
    lo, full_lo, full_hi, hi = tile_range(start_m, BLOCK_M, BLOCK_N, seqlen_k, lo_off, hi_off, HAS_LO, HAS_HI)
    n_tiles = (hi - lo + BLOCK_N - 1) // BLOCK_N
    return off_bh, start_m, lo, full_lo, full_hi, n_tiles, (mem_b, q_start, k_start, seqlen_q, seqlen_k,
                                                            lo_off, hi_off)  # fmt: skip


@gluon.jit
def _turn(
    j, q_turns, prog, progs, sizes, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HAS_LO: gl.constexpr,
    HAS_HI: gl.constexpr, IS_VARLEN: gl.constexpr,
):  # fmt: skip
    """Turn j of program prog of progs, as the producer and the consumers both take it: the tile
    (common.persistent_turn), _tile's (off_bh, start_m, lo, full_lo, full_hi, n_tiles, seq), whether it has
    query rows and its number among the tiles that do (what the Q buffers count): every tile, numbered j;
    with IS_VARLEN the blocks that start before their sequence's end, numbered q_turns."""
    tile = persistent_turn(j, prog, progs)
    off_bh, start_m, lo, full_lo, full_hi, n_tiles, seq = _tile(
        tile, sizes, BLOCK_M, BLOCK_N, HAS_LO, HAS_HI, IS_VARLEN
    )  # fmt: skip
    if IS_VARLEN:
        has_rows = start_m < seq[3]
        qj = q_turns
    else:
        has_rows = True
        qj = j
    return tile, off_bh, start_m, lo, full_lo, full_hi, n_tiles, seq, has_rows, qj


@gluon.jit
def _in_q(rows, seqlen_q, BLOCK_M: gl.constexpr):
    """Which of `rows` are query rows: below seqlen_q, and with _tile's 192-row blocks (whose first block
    may start before row 0) not negative."""
    inside = rows < seqlen_q
    if (BLOCK_M & (BLOCK_M - 1)) != 0:  # as in _tile
        inside = inside & (rows >= 0)
    return inside


@gluon.jit
def _stamp(PROBE, tile, slot):
    """PROBE (tools/probe.py; None in every launch of the library): the global timer (ns) into slot
    `slot` of this tile's row of 16 int64, and the SM's number into slot 0."""
    if PROBE is not None:
        now = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False,
                                        pack=1)  # fmt: skip
        sm = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        gl.store(PROBE + tile.to(gl.int64) * 16 + slot, now)
        gl.store(PROBE + tile.to(gl.int64) * 16, sm.to(gl.int64))
