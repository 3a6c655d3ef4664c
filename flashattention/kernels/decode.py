"""Split-KV decode: one program per (batch, kv head, split), or per block of its rows when a GQA group has
many; online softmax in exp2 over that split's keys, then a combine kernel merges the splits by their LSEs.

The query rows of all heads that share a KV head are packed into one tile (row r = g * seqlen_q + i is
query i of head kv_head * group + g), so each K/V tile is read once for the whole group. The KV range is
clipped to what the mask lets any of a program's rows see, and split evenly over that visible range only:
    O[i] = sum_s 2^(LSE2_s[i] - LSE2[i]) O_s[i],   LSE2[i] = log2 sum_s 2^LSE2_s[i]
with O_s, LSE2_s the partial output and log2-unit LSE of split s (a split nobody sees: O_s 0, LSE2_s -inf).
A paged cache (IS_PAGED) is the same kernel reading each key through the row's block table
(common.page_rows); every tile, split and mask is computed on logical key positions as for a dense cache.
"""

import triton
import triton.language as tl

from .common import attend_tiles, segment, tile_range, unit_strides

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _visible_range(
    i_first,
    i_last,
    seqlen_k,
    lo_off,
    hi_off,
    BLOCK_N: tl.constexpr,
    HAS_LO: tl.constexpr,
    HAS_HI: tl.constexpr,
):
    """common.tile_range for a set of rows whose query indices span [i_first, i_last] (packed GQA rows are
    not consecutive queries): the loosest bounds (lo, hi) come from the outer rows, the full-tile bounds
    from the strictest ones (full_lo from i_last, full_hi from i_first)."""
    lo, _, full_hi, _ = tile_range(i_first, 1, BLOCK_N, seqlen_k, lo_off, hi_off, HAS_LO, HAS_HI)
    _, full_lo, _, hi = tile_range(i_last, 1, BLOCK_N, seqlen_k, lo_off, hi_off, HAS_LO, HAS_HI)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


# seqlen_k grows by one every decode step and batch changes as requests come and go: not specialised, so
# that they share one compiled kernel
@triton.jit(do_not_specialize=["batch", "seqlen_k"])
def attn_decode_kernel(
    Q, K, V, O, LSE, O_PARTIAL, LSE2_PARTIAL, CACHE_SEQLENS, BLOCK_TABLE,
    q_strides, k_strides, v_strides, o_strides, stride_tb,
    batch, num_kv_heads, group, seqlen_q, seqlen_k, num_splits, window_left, window_right, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, IS_PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, FINAL: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STRIDE_UNIT: tl.constexpr = 1,
):  # fmt: skip
    """Softmax(scale * Q K^T) V of BLOCK_M packed rows of one (batch, kv head) over split program_id(1) of
    their visible keys. Grid: (batch * num_kv_heads * row blocks, num_splits).
    FINAL (one split): writes O (input dtype) and LSE (natural log) directly; else the float32 partials
    O_PARTIAL [num_splits, batch * heads * seqlen_q, HEAD_DIM] and LSE2_PARTIAL [num_splits, ...] (log2).
    HAS_SEQLENS: the batch row's key count is CACHE_SEQLENS[b] (int32 [batch]) instead of seqlen_k.
    IS_PAGED (with HAS_SEQLENS): K/V are block pools [num_blocks, kv_heads, PAGE_SIZE, HEAD_DIM] (stride_kb,
    stride_vb: a block's stride) and key p of batch row b is row p % PAGE_SIZE of block
    BLOCK_TABLE[b, p // PAGE_SIZE] (int32 [batch, max_blocks], row stride stride_tb); only the entries of
    keys below the row's length (inside the visible tiles) are read."""
    stride_qb, stride_qh, stride_qm = unit_strides(q_strides, STRIDE_UNIT)
    stride_kb, stride_kh, stride_kn = unit_strides(k_strides, STRIDE_UNIT)
    stride_vb, stride_vh, stride_vn = unit_strides(v_strides, STRIDE_UNIT)
    stride_ob, stride_oh, stride_om = unit_strides(o_strides, STRIDE_UNIT)
    rows = group * seqlen_q
    row_blocks = tl.cdiv(rows, BLOCK_M)
    split = tl.program_id(1)
    off_bhk = tl.program_id(0) // row_blocks
    row_start = tl.program_id(0) % row_blocks * BLOCK_M
    off_b = off_bhk // num_kv_heads
    off_hk = off_bhk % num_kv_heads
    if HAS_SEQLENS:
        seqlen_k = tl.load(CACHE_SEQLENS + off_b)

    offs_r = row_start + tl.arange(0, BLOCK_M)  # packed row: (head in the group, query index)
    row_mask = offs_r < rows
    offs_i = offs_r % seqlen_q
    off_h = (off_hk * group + offs_r // seqlen_q).to(tl.int64)  # [BLOCK_M] query head of each row
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    io_mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_ptrs = Q + off_b.to(tl.int64) * stride_qb + off_h[:, None] * stride_qh + offs_i[:, None] * stride_qm
    q = tl.load(q_ptrs + offs_d[None, :], mask=io_mask, other=0.0)  # [BLOCK_M, HEAD_DIM_PAD]
    if IS_PAGED:  # the row's keys are spread over the pools' blocks: common.page_rows finds each one
        k_base = K + off_hk.to(tl.int64) * stride_kh
        v_base = V + off_hk.to(tl.int64) * stride_vh
        table = BLOCK_TABLE + off_b.to(tl.int64) * stride_tb
    else:
        k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
        v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh

    # Query indices this block holds: a block inside one head holds a run of them, one that crosses a head
    # boundary holds a head's last and the next head's first query, so all of [0, seqlen_q).
    row_last = tl.minimum(row_start + BLOCK_M, rows) - 1
    one_head = row_start // seqlen_q == row_last // seqlen_q
    i_first = tl.where(one_head, row_start % seqlen_q, 0)
    i_last = tl.where(one_head, row_last % seqlen_q, seqlen_q - 1)
    diag = seqlen_k - seqlen_q
    lo_off = diag - window_left
    hi_off = diag + window_right
    bounds = _visible_range(i_first, i_last, seqlen_k, lo_off, hi_off, BLOCK_N, HAS_LO, HAS_HI)
    lo, _, _, hi = bounds
    # this split's share of the visible tiles (lo is tile-aligned, so split bounds are too); the last
    # splits may get none
    tiles_per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits)
    split_lo = tl.minimum(lo + split * tiles_per_split * BLOCK_N, hi)
    split_hi = tl.minimum(split_lo + tiles_per_split * BLOCK_N, hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    window = (seqlen_k, lo_off, hi_off, qk_scale)
    # the element-masked tiles on either side of the unmasked ones, each cut to the split's range
    for seg in tl.static_range(3):
        seg_start, seg_end = segment(bounds, seg)
        seg_start = tl.maximum(seg_start, split_lo)  # an empty range (end <= start) visits no tile
        seg_end = tl.minimum(seg_end, split_hi)
        # int64 row strides (tl.cast: a stride of one unit is a constexpr): a key's offset in a long cache
        # can pass 2^31 elements
        kv = (k_base, v_base, tl.cast(stride_kn, tl.int64), tl.cast(stride_vn, tl.int64))
        if IS_PAGED:
            pages = (table, tl.cast(stride_kb, tl.int64), tl.cast(stride_vb, tl.int64))
        else:
            pages = None
        acc, l_i, m_i = attend_tiles(
            acc, l_i, m_i, q, kv, None, seg_start, seg_end, offs_i, offs_d, window, BLOCK_N, HEAD_DIM,
            HEAD_DIM_PAD, seg != 1, HAS_LO, HAS_HI, PRECISION, False, pages, PAGE_SIZE, IS_PAGED,
        )  # fmt: skip

    empty = l_i == 0.0  # rows that see no key in this split: output 0, LSE -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    # the row's index in [batch, heads, seqlen_q] order: (b * num_kv_heads + kv_head) * rows + r
    offs_row = off_bhk.to(tl.int64) * rows + offs_r
    if FINAL:
        o_ptrs = O + off_b.to(tl.int64) * stride_ob + off_h[:, None] * stride_oh + offs_i[:, None] * stride_om
        tl.store(o_ptrs + offs_d[None, :], out.to(O.dtype.element_ty), mask=io_mask)
        tl.store(LSE + offs_row, lse2 * LN2, mask=row_mask)
    else:
        offs_part = split.to(tl.int64) * (batch * num_kv_heads * rows) + offs_row
        tl.store(O_PARTIAL + offs_part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=io_mask)
        tl.store(LSE2_PARTIAL + offs_part, lse2, mask=row_mask)


@triton.jit(do_not_specialize=["total_rows"])
def attn_decode_combine_kernel(
    O_PARTIAL, LSE2_PARTIAL, O, LSE, o_strides, num_heads, seqlen_q, total_rows, num_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
    STRIDE_UNIT: tl.constexpr = 1,
):  # fmt: skip
    """O[r] = sum_s w_s O_s[r] / sum_s w_s with w_s = 2^(LSE2_s[r] - max_s LSE2_s[r]), LSE[r] = ln 2 *
    (max + log2 sum_s w_s), one program per row r of the total_rows = batch * heads * seqlen_q rows; its
    num_splits (<= SPLITS_PAD) partials arrive in one [SPLITS_PAD, HEAD_DIM_PAD] load (one round trip to
    L2, not one per split). A row whose every split is empty (all -inf) gets O 0 and LSE -inf."""
    stride_ob, stride_oh, stride_om = unit_strides(o_strides, STRIDE_UNIT)
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_PAD)
    split_mask = offs_s < num_splits
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_part = offs_s * total_rows + row
    lse2 = tl.load(LSE2_PARTIAL + offs_part, mask=split_mask, other=float("-inf"))
    o_mask = split_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O_PARTIAL + offs_part[:, None] * HEAD_DIM + offs_d[None, :], mask=o_mask, other=0.0)
    m = tl.max(lse2, 0)
    # all splits empty: shift by 0 so that every weight is exp2(-inf) = 0, not NaN
    w = tl.math.exp2(lse2 - tl.where(m == float("-inf"), 0.0, m))  # [SPLITS_PAD]
    l = tl.sum(w, 0)
    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    out = tl.sum(w[:, None] * o, 0) / l_safe  # [HEAD_DIM_PAD]
    lse = tl.where(empty, float("-inf"), (m + tl.math.log2(l_safe)) * LN2)
    off_bh = row // seqlen_q
    o_ptrs = O + (off_bh // num_heads) * stride_ob + (off_bh % num_heads) * stride_oh
    o_ptrs += (row % seqlen_q) * stride_om
    tl.store(o_ptrs + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(LSE + row, lse)
