"""Forward kernel: one program per (query block, batch * head), or with PERSISTENT one per SM looping over
those tiles; online softmax in exp2. IS_VARLEN: packed sequences (the batch index is the sequence's, its
rows and keys read from cu_seqlens), see attn_fwd_kernel.

O[i] = sum_j softmax_j(scale * q_i . k_j) v_j over the visible keys j, and
LSE2[i] = log2 sum_j exp(scale * q_i . k_j) in the log2 units (scores times qk_scale = scale * log2(e)) in
which the backward recomputes P.
"""

import triton
import triton.language as tl

from .common import (
    attend_tiles,
    load_rows,
    persistent_count,
    persistent_tile,
    persistent_turn,
    query_window,
    segment,
    unit_strides,
    varlen_bounds,
)


@triton.jit
def _fwd_block(
    start_m,
    off_bh,
    tensors,
    strides,
    sizes,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HAS_LO: tl.constexpr,
    HAS_HI: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TMA: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """One query block [start_m, start_m + BLOCK_M) of one (batch, head): O and LSE2 of its rows.
    IS_VARLEN: off_bh // num_heads is the sequence; seqlen_q is the packed total (LSE2's row length) until
    the sequence's own lengths replace seqlen_q and seqlen_k. tensors, strides (each a (batch, head, row)
    triple in elements) and sizes are the kernel's arguments as attn_fwd_kernel bundles them; TMA: K/V tiles
    through tensor descriptors."""
    Q, K, V, O, LSE2, CU_SEQLENS_Q, CU_SEQLENS_K = tensors
    stride_q, stride_k, stride_v, stride_o = strides
    stride_qb, stride_qh, stride_qm = stride_q
    stride_kb, stride_kh, stride_kn = stride_k
    stride_vb, stride_vh, stride_vn = stride_v
    stride_ob, stride_oh, stride_om = stride_o
    num_heads, group, seqlen_q, seqlen_k, window_left, window_right, qk_scale = sizes
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    off_hk = off_h // group
    if IS_VARLEN:
        q_start, k_start, seqlen_q_i, seqlen_k_i = varlen_bounds(
            CU_SEQLENS_Q, CU_SEQLENS_K, off_b, seqlen_q, seqlen_k
        )
        # a block past the sequence's end (the grid covers the longest one) visits no key, stores nothing
        seqlen_k = tl.where(start_m < seqlen_q_i, seqlen_k_i, 0)
        lse2_row = LSE2 + off_h.to(tl.int64) * seqlen_q + q_start  # LSE2: [heads, total_q]
        seqlen_q = seqlen_q_i
        q_base = Q + q_start * stride_qm + off_h.to(tl.int64) * stride_qh
        k_base = K + k_start * stride_kn + off_hk.to(tl.int64) * stride_kh
        v_base = V + k_start * stride_vn + off_hk.to(tl.int64) * stride_vh
    else:
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
        v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_mask = (offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = load_rows(q_base, offs_m, stride_qm, offs_d, q_mask)

    if TMA:
        k_desc = tl.make_tensor_descriptor(
            k_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM_PAD]
        )
        v_desc = tl.make_tensor_descriptor(
            v_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_DIM_PAD]
        )
        descs = (k_desc, v_desc)
    else:
        descs = None

    bounds, window = query_window(
        start_m, seqlen_q, seqlen_k, window_left, window_right, qk_scale, BLOCK_M, BLOCK_N, HAS_LO, HAS_HI
    )
    kv = (k_base, v_base, stride_kn, stride_vn)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    # the tiles that need element masks, on either side of those that do not (tile_range)
    for seg in tl.static_range(3):
        seg_start, seg_end = segment(bounds, seg)
        acc, l_i, m_i = attend_tiles(
            acc, l_i, m_i, q, kv, descs, seg_start, seg_end, offs_m, offs_d, window, BLOCK_N, HEAD_DIM,
            HEAD_DIM_PAD, seg != 1, HAS_LO, HAS_HI, PRECISION, TMA,
        )  # fmt: skip

    empty = l_i == 0.0  # rows that see no key: output 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_i))
    if IS_VARLEN:
        o_base = O + q_start * stride_om + off_h.to(tl.int64) * stride_oh
        tl.store(
            o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty), mask=q_mask
        )
        tl.store(lse2_row + offs_m, lse2, mask=offs_m < seqlen_q)
    else:
        o_base = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
        tl.store(
            o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty), mask=q_mask
        )
        tl.store(LSE2 + off_bh.to(tl.int64) * seqlen_q + offs_m, lse2, mask=offs_m < seqlen_q)


# batch (read only by the persistent schedule) is not specialised: B = 1 and B % 16 == 0 would each
# compile their own copy of an identical kernel; nor is max_seqlen_q (varlen's grid length)
@triton.jit(do_not_specialize=["batch", "max_seqlen_q"])
def attn_fwd_kernel(
    Q, K, V, O, LSE2,
    q_strides, k_strides, v_strides, o_strides,
    batch, num_heads, group, seqlen_q, seqlen_k,
    seqlen_buckets,  # autotune key only (configs.AUTOTUNE_KEY); unused by the kernel
    window_left, window_right, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    PRECISION: tl.constexpr, CAN_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr = False, PERSISTENT: tl.constexpr = False, STRIDE_UNIT: tl.constexpr = 1,
    CU_SEQLENS_Q=None, CU_SEQLENS_K=None, max_seqlen_q=None, IS_VARLEN: tl.constexpr = False,
):  # fmt: skip
    """CAN_TMA (from the launcher: 16-byte aligned base and strides) gates the USE_TMA config flag.
    PERSISTENT: a grid of about one program per SM, each looping over (head, query block) tiles in
    common.persistent_turn's order (the launcher sizes the grid); else one program per tile.
    IS_VARLEN: Q, O [1, heads, total_q, HEAD_DIM] and K, V [1, kv_heads, total_k, HEAD_DIM] (views of the
    packed [total, heads, head_dim] tensors), LSE2 [heads, total_q]; `batch` sequences, sequence b's queries
    rows CU_SEQLENS_Q[b] to CU_SEQLENS_Q[b + 1] (int32 [batch + 1]), likewise its keys; seqlen_q, seqlen_k
    are the totals and max_seqlen_q the longest sequence's queries (the grid's query blocks). The mask
    offset is each sequence's seqlen_k - seqlen_q; TMA is not used."""
    # what every tile's _fwd_block reads, bundled once for both schedules
    tensors = (Q, K, V, O, LSE2, CU_SEQLENS_Q, CU_SEQLENS_K)
    strides = (
        unit_strides(q_strides, STRIDE_UNIT),
        unit_strides(k_strides, STRIDE_UNIT),
        unit_strides(v_strides, STRIDE_UNIT),
        unit_strides(o_strides, STRIDE_UNIT),
    )
    sizes = (num_heads, group, seqlen_q, seqlen_k, window_left, window_right, qk_scale)
    # varlen reads K/V through pointers: a descriptor per sequence would need each start 16-byte aligned
    # and a length of at least 1 (not yet measured on a GPU)
    TMA: tl.constexpr = USE_TMA and CAN_TMA and not IS_VARLEN
    if PERSISTENT:
        if IS_VARLEN:
            num_m = tl.cdiv(max_seqlen_q, BLOCK_M)
        else:
            num_m = tl.cdiv(seqlen_q, BLOCK_M)
        prog, progs = tl.program_id(0), tl.num_programs(0)
        for j in tl.range(0, persistent_count(prog, progs, num_m * batch * num_heads)):
            off_bh, start_m = persistent_tile(persistent_turn(j, prog, progs), num_m, BLOCK_M)
            _fwd_block(
                start_m, off_bh, tensors, strides, sizes, HEAD_DIM, HEAD_DIM_PAD, HAS_LO, HAS_HI, PRECISION,
                BLOCK_M, BLOCK_N, TMA, IS_VARLEN,
            )  # fmt: skip
    else:
        # Longest rows first: with a causal mask the last query blocks see the most keys.
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
        if IS_VARLEN:  # the grid covers the longest sequence: blocks past this one's end have no work
            off_b = tl.program_id(1) // num_heads
            if start_m >= tl.load(CU_SEQLENS_Q + off_b + 1) - tl.load(CU_SEQLENS_Q + off_b):
                return
        _fwd_block(
            start_m, tl.program_id(1), tensors, strides, sizes, HEAD_DIM, HEAD_DIM_PAD, HAS_LO, HAS_HI,
            PRECISION, BLOCK_M, BLOCK_N, TMA, IS_VARLEN,
        )  # fmt: skip
