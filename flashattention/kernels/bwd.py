"""Backward kernels: delta preprocess, dK/dV (one program per key block and kv head, looping over the
query heads of its GQA group, so no atomics are needed), and dQ (one program per query block and head).
Both recompute P = exp2(qk_scale * Q K^T - LSE2) with the forward's own log2-unit LSE2 (no conversion, so
no extra rounding of |scores|-sized numbers); dS = P * (dP - delta), dP = dO V^T, delta = rowsum(dO * O).
Deterministic: every output element is written by exactly one program, in a fixed order.
IS_VARLEN (dK/dV and dQ): packed sequences, as the forward's (fwd.attn_fwd_kernel): the batch index is the
sequence's, its rows read from cu_seqlens; the program moves every tensor to the sequence's first row and
goes on as batch 0 of one sequence of its own lengths (LSE2 and DELTA are [heads, total_q]). The preprocess
needs no flag: delta is per row, so it runs over the packed rows as one sequence.
"""

import triton
import triton.language as tl

from .common import (
    load_rows,
    load_tile,
    mma,
    query_window,
    segment,
    tile_range,
    unit_strides,
    varlen_bounds,
    visible,
)


@triton.jit
def attn_bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    o_strides,
    do_strides,
    num_heads,
    seqlen_q,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    stride_ob, stride_oh, stride_om = o_strides  # in elements (unit 1)
    stride_dob, stride_doh, stride_dom = do_strides
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = (off_bh % num_heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = load_rows(O + off_b * stride_ob + off_h * stride_oh, offs_m, stride_om, offs_d, mask)
    do = load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dom, offs_d, mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BLOCK_M]
    tl.store(DELTA + off_bh.to(tl.int64) * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _load_lse2(LSE2_ROW, offs_m, mask):
    """LSE2 (log2 units); rows that saw no key (-inf) become +inf so that exp2(s - lse2) = 0."""
    lse2 = tl.load(LSE2_ROW + offs_m, mask=mask, other=float("inf"))
    return tl.where(lse2 == float("-inf"), float("inf"), lse2)


@triton.jit
def _load_t(base, offs, stride, offs_d, mask, d_mask, MASKED: tl.constexpr, MASK_D: tl.constexpr):
    """The transposed tile [HEAD_DIM_PAD, len(offs)] of rows offs (stride `stride`) from base, loaded with
    load_tile's masks (rows: MASKED, head dims: MASK_D)."""
    return load_tile(
        base + offs[None, :] * stride + offs_d[:, None], mask[None, :], d_mask[:, None], MASKED, MASK_D
    )


@triton.jit
def _key_block(num_kv_heads, BLOCK_N: tl.constexpr, LAST_FIRST: tl.constexpr = False):
    """A dK/dV program's first key, batch and kv head (int64), from its place in the grid (key blocks,
    batch * kv heads); the Triton and Gluon dK/dV kernels both take it. LAST_FIRST: in dispatch order (grid
    axis 0 fastest) every (batch, kv head)'s last key block comes first, then each one's block before it."""
    if LAST_FIRST:
        n_bhk = tl.num_programs(1)
        pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        start_n = (tl.num_programs(0) - 1 - pid // n_bhk) * BLOCK_N
        off_bhk = pid % n_bhk
    else:
        start_n = tl.program_id(0) * BLOCK_N
        off_bhk = tl.program_id(1)
    return start_n, (off_bhk // num_kv_heads).to(tl.int64), (off_bhk % num_kv_heads).to(tl.int64)


@triton.jit
def _query_block(num_heads, BLOCK_M: tl.constexpr):
    """A dQ program's first query row, batch * head, batch and head (int64), from its place in the grid
    (query blocks, batch * heads): program 0 takes the last block (with a causal mask the last query blocks
    see the most keys); the Triton and Gluon dQ kernels both take it."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    off_bh = tl.program_id(1)
    return start_m, off_bh, (off_bh // num_heads).to(tl.int64), (off_bh % num_heads).to(tl.int64)


@triton.jit
def _sequence_inputs(Q, DO, LSE2, DELTA, K, V, q_start, k_start, stride_qm, stride_dom, stride_kn, stride_vn):
    """IS_VARLEN: the inputs from the sequence's first query and key rows on (the sequence is batch 0 of
    them), once the program knows it has work there."""
    return (
        Q + q_start * stride_qm,
        DO + q_start * stride_dom,
        LSE2 + q_start,
        DELTA + q_start,
        K + k_start * stride_kn,
        V + k_start * stride_vn,
    )


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, rows, tile_start, tile_end, offs_n, offs_d, window,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MASKED: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulates dK, dV of one key block over the query tiles [tile_start, tile_end). rows: (q_base,
    do_base, lse2_row, delta_row, stride_qm, stride_dom) of one query head; window: (seqlen_q, lo_off,
    hi_off, qk_scale)."""
    q_base, do_base, lse2_row, delta_row, stride_qm, stride_dom = rows
    d_mask = offs_d < HEAD_DIM
    seqlen_q, lo_off, hi_off, qk_scale = window
    for start_m in tl.range(tile_start, tile_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seqlen_q
        # [HEAD_DIM_PAD, BLOCK_M]
        q_t = _load_t(q_base, offs_m, stride_qm, offs_d, m_mask, d_mask, MASKED, HEAD_DIM != HEAD_DIM_PAD)
        lse = _load_lse2(lse2_row, offs_m, m_mask)
        qk_t = mma(k, q_t, None, PRECISION)  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(visible(offs_n, offs_m, seqlen_q, lo_off, hi_off, HAS_LO, HAS_HI), p_t, 0.0)
        do = load_tile(
            do_base + offs_m[:, None] * stride_dom + offs_d[None, :],
            m_mask[:, None],
            d_mask[None, :],
            MASKED,
            HEAD_DIM != HEAD_DIM_PAD,
        )  # [BLOCK_M, HEAD_DIM_PAD]
        dv = mma(p_t.to(do.dtype), do, dv, PRECISION)
        dp_t = mma(v, tl.trans(do), None, PRECISION)  # [BLOCK_N, BLOCK_M]
        delta = tl.load(delta_row + offs_m, mask=m_mask, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = mma(ds_t.to(q_t.dtype), tl.trans(q_t), dk, PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV,
    q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
    num_heads, num_kv_heads, group, seqlen_q, seqlen_k,
    seqlen_buckets,  # autotune key only (configs.AUTOTUNE_KEY); unused by the kernel
    window_left, window_right, qk_scale, softmax_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_LOOP: tl.constexpr = False,
    STRIDE_UNIT: tl.constexpr = 1,
    CAN_TMA: tl.constexpr = False,  # the autotune key's (GLUON_WS configs need TMA); unused here
    CU_SEQLENS_Q=None, CU_SEQLENS_K=None, IS_VARLEN: tl.constexpr = False,
):  # fmt: skip
    """dK, dV of one key block and kv head. IS_VARLEN: the grid covers the longest sequence's keys; seqlen_q
    and seqlen_k come in as the packed totals."""
    stride_qb, stride_qh, stride_qm = unit_strides(q_strides, STRIDE_UNIT)
    stride_kb, stride_kh, stride_kn = unit_strides(k_strides, STRIDE_UNIT)
    stride_vb, stride_vh, stride_vn = unit_strides(v_strides, STRIDE_UNIT)
    stride_dob, stride_doh, stride_dom = unit_strides(do_strides, STRIDE_UNIT)
    stride_dkb, stride_dkh, stride_dkn = unit_strides(dk_strides, STRIDE_UNIT)
    stride_dvb, stride_dvh, stride_dvn = unit_strides(dv_strides, STRIDE_UNIT)
    start_n, off_b, off_hk = _key_block(num_kv_heads, BLOCK_N)
    lse_len = seqlen_q  # the rows of LSE2 and DELTA
    if IS_VARLEN:
        q_start, k_start, seqlen_q, seqlen_k = varlen_bounds(
            CU_SEQLENS_Q, CU_SEQLENS_K, off_b, seqlen_q, seqlen_k
        )
        if start_n >= seqlen_k:  # past this sequence's keys
            return
        # every tensor from the sequence's first row on: the sequence is batch 0 from here
        Q, DO, LSE2, DELTA, K, V = _sequence_inputs(
            Q, DO, LSE2, DELTA, K, V, q_start, k_start, stride_qm, stride_dom, stride_kn, stride_vn
        )
        DK, DV = DK + k_start * stride_dkn, DV + k_start * stride_dvn
        off_b = 0
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    kv_mask = (offs_n < seqlen_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
    # [BLOCK_N, HEAD_DIM_PAD] each
    k = load_rows(K + off_b * stride_kb + off_hk * stride_kh, offs_n, stride_kn, offs_d, kv_mask)
    v = load_rows(V + off_b * stride_vb + off_hk * stride_vh, offs_n, stride_vn, offs_d, kv_mask)

    # key j is seen by queries i with j - diag - right <= i <= j - diag + left
    diag = seqlen_k - seqlen_q
    lo_off = -diag - window_right
    hi_off = -diag + window_left
    bounds = tile_range(start_n, BLOCK_N, BLOCK_M, seqlen_q, lo_off, hi_off, HAS_HI, HAS_LO)
    window = (seqlen_q, lo_off, hi_off, qk_scale)

    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    for g in range(0, group):
        off_h = off_hk * group + g
        rows = (
            Q + off_b * stride_qb + off_h * stride_qh,
            DO + off_b * stride_dob + off_h * stride_doh,
            LSE2 + (off_b * num_heads + off_h) * lse_len,
            DELTA + (off_b * num_heads + off_h) * lse_len,
            stride_qm,
            stride_dom,
        )
        # the tiles that need element masks, on either side of those that do not (tile_range)
        # ONE_LOOP: a single pass over [lo, hi) with element masks on every tile, for configs whose three
        # loops keep too many registers live (the compiler's report shows spills)
        for seg in tl.static_range(1 if ONE_LOOP else 3):
            seg_start, seg_end = segment(bounds, seg, ONE_LOOP)
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, rows, seg_start, seg_end, offs_n, offs_d, window, BLOCK_M, HEAD_DIM,
                HEAD_DIM_PAD, ONE_LOOP or seg != 1, HAS_HI, HAS_LO, PRECISION,
            )  # fmt: skip

    dk_ptrs = DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, (dk * softmax_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, kv, tile_start, tile_end, offs_m, offs_d, window,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MASKED: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulates dQ of one query block over the key tiles [tile_start, tile_end). kv: (k_base, v_base,
    stride_kn, stride_vn); window: (seqlen_k, lo_off, hi_off, qk_scale)."""
    k_base, v_base, stride_kn, stride_vn = kv
    seqlen_k, lo_off, hi_off, qk_scale = window
    d_mask = offs_d < HEAD_DIM
    for start_n in tl.range(tile_start, tile_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seqlen_k
        # [HEAD_DIM_PAD, BLOCK_N] each
        k_t = _load_t(k_base, offs_n, stride_kn, offs_d, n_mask, d_mask, MASKED, HEAD_DIM != HEAD_DIM_PAD)
        v_t = _load_t(v_base, offs_n, stride_vn, offs_d, n_mask, d_mask, MASKED, HEAD_DIM != HEAD_DIM_PAD)
        qk = mma(q, k_t, None, PRECISION)  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(visible(offs_m, offs_n, seqlen_k, lo_off, hi_off, HAS_LO, HAS_HI), p, 0.0)
        dp = mma(do, v_t, None, PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(k_t.dtype), tl.trans(k_t), dq, PRECISION)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ,
    q_strides, k_strides, v_strides, do_strides, dq_strides,
    num_heads, group, seqlen_q, seqlen_k,
    seqlen_buckets,  # autotune key only (configs.AUTOTUNE_KEY); unused by the kernel
    window_left, window_right, qk_scale, softmax_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STRIDE_UNIT: tl.constexpr = 1,
    CU_SEQLENS_Q=None, CU_SEQLENS_K=None, IS_VARLEN: tl.constexpr = False,
    CAN_TMA: tl.constexpr = False,  # the autotune key's (GLUON_WS configs need TMA); unused here
):  # fmt: skip
    """dQ of one query block and head; program 0 takes the last block (with a causal mask the last query
    blocks see the most keys). IS_VARLEN: the grid covers the longest sequence's queries; seqlen_q and
    seqlen_k come in as the packed totals."""
    stride_qb, stride_qh, stride_qm = unit_strides(q_strides, STRIDE_UNIT)
    stride_kb, stride_kh, stride_kn = unit_strides(k_strides, STRIDE_UNIT)
    stride_vb, stride_vh, stride_vn = unit_strides(v_strides, STRIDE_UNIT)
    stride_dob, stride_doh, stride_dom = unit_strides(do_strides, STRIDE_UNIT)
    stride_dqb, stride_dqh, stride_dqm = unit_strides(dq_strides, STRIDE_UNIT)
    start_m, off_bh, off_b, off_h = _query_block(num_heads, BLOCK_M)
    lse_len = seqlen_q  # the rows of LSE2 and DELTA
    off_hk = off_h // group
    if IS_VARLEN:
        q_start, k_start, seqlen_q, seqlen_k = varlen_bounds(
            CU_SEQLENS_Q, CU_SEQLENS_K, off_b, seqlen_q, seqlen_k
        )
        if start_m >= seqlen_q:  # past this sequence's queries
            return
        # every tensor from the sequence's first row on: the sequence is batch 0 from here
        DQ += q_start * stride_dqm
        Q, DO, LSE2, DELTA, K, V = _sequence_inputs(
            Q, DO, LSE2, DELTA, K, V, q_start, k_start, stride_qm, stride_dom, stride_kn, stride_vn
        )
        off_b = 0
        off_bh = off_h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m_mask = offs_m < seqlen_q
    q_mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qm, offs_d, q_mask)
    do = load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dom, offs_d, q_mask)
    lse = _load_lse2(LSE2 + off_bh.to(tl.int64) * lse_len, offs_m, m_mask)
    delta = tl.load(DELTA + off_bh.to(tl.int64) * lse_len + offs_m, mask=m_mask, other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh

    bounds, window = query_window(
        start_m, seqlen_q, seqlen_k, window_left, window_right, qk_scale, BLOCK_M, BLOCK_N, HAS_LO, HAS_HI
    )
    kv = (k_base, v_base, stride_kn, stride_vn)

    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    # the tiles that need element masks, on either side of those that do not (tile_range)
    for seg in tl.static_range(3):
        seg_start, seg_end = segment(bounds, seg)
        dq = _dq_tiles(
            dq, q, do, lse, delta, kv, seg_start, seg_end, offs_m, offs_d, window, BLOCK_N, HEAD_DIM,
            HEAD_DIM_PAD, seg != 1, HAS_LO, HAS_HI, PRECISION,
        )  # fmt: skip
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, (dq * softmax_scale).to(DQ.dtype.element_ty), mask=q_mask)
