"""Hopper dK/dV with warp specialisation (Gluon), after FlashAttention-3's backward. One program per key
block of BLOCK_N = 128 keys and kv head. A producer warp loads the block's K and V once, then streams the
Q and dO tiles of every query head of the GQA group through a ring of STAGES shared-memory buffers. Two
consumer partitions (one warpgroup and 64 keys each) keep dK and dV in registers. Per query tile each
consumer issues S^T = K Q^T and dP^T = V dO^T asynchronously, loads the tile's LSE2 and delta while they
run, forms P^T and dS^T = P^T (dP^T - delta), then issues dV += P^T dO and dK += dS^T Q.

Same semantics, arguments and outputs as bwd.attn_bwd_dkdv_kernel (dQ stays with bwd.attn_bwd_dq_kernel);
bf16/fp16, head dims 64 and 128 (HEAD_DIM == HEAD_DIM_PAD), Q/K/V/dO rows 16-byte aligned (TMA). The
launcher selects it through the GLUON_WS config flag of the bwd_dkdv tables (configs.py). Triton's
interpreter cannot run Gluon: tests/test_gpu.py checks it on the GPU; the CPU suite compiles it for sm_90a
(tests/test_aot.py).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .bwd import _key_block, _sequence_inputs
from .common import tile_range, unit_strides, varlen_bounds, visible
from .fwd_ws_tiles import wgmma_layout


@gluon.jit
def _bwd_producer(
    Q, K, V, DO, q_strides, k_strides, v_strides, do_strides,
    k_smem, v_smem, kv_bar, q_smem, do_smem, ready, empty,
    off_b, off_hk, group, seqlen_q, seqlen_k, start_n, lo, n_tiles, BLOCK_M: gl.constexpr,
    STAGES: gl.constexpr, IS_VARLEN: gl.constexpr,
):  # fmt: skip
    """One warp: the block's K and V once (k_smem / v_smem: [consumers, keys each, head dim]), then for each
    query head of the group and each query tile, Q and dO into buffer i % STAGES once both consumers have
    released it (i counts the tiles across heads, as the consumers count them). A head's descriptors are
    rewritten only after its last copies landed. IS_VARLEN: the tensors start at the sequence's rows."""
    CONSUMERS: gl.constexpr = k_smem.shape[0]
    ROWS: gl.constexpr = k_smem.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.shape[2]
    stride_qb, stride_qh, stride_qm = q_strides
    stride_kb, stride_kh, stride_kn = k_strides
    stride_vb, stride_vh, stride_vn = v_strides
    stride_dob, stride_doh, stride_dom = do_strides
    k_desc = tma.make_tensor_descriptor(
        K + off_b * stride_kb + off_hk * stride_kh, shape=[seqlen_k, HEAD_DIM], strides=[stride_kn, 1],
        block_shape=[ROWS, HEAD_DIM], layout=k_smem.layout,
    )  # fmt: skip
    v_desc = tma.make_tensor_descriptor(
        V + off_b * stride_vb + off_hk * stride_vh, shape=[seqlen_k, HEAD_DIM], strides=[stride_vn, 1],
        block_shape=[ROWS, HEAD_DIM], layout=v_smem.layout,
    )  # fmt: skip
    mbarrier.expect(kv_bar, 2 * CONSUMERS * k_desc.block_type.nbytes)
    for c in gl.static_range(CONSUMERS):
        tma.async_copy_global_to_shared(k_desc, [start_n + c * ROWS, 0], kv_bar, k_smem.index(c))
        tma.async_copy_global_to_shared(v_desc, [start_n + c * ROWS, 0], kv_bar, v_smem.index(c))
    if IS_VARLEN:  # a sequence without queries reads none (one row described)
        seqlen_q = gl.maximum(seqlen_q, 1)
    issued = 0
    for g in range(group):
        off_h = off_hk * group + g
        for d in gl.static_range(STAGES):  # the previous head's copies in flight (at most STAGES)
            i = issued - 1 - d
            if i >= 0:
                mbarrier.wait(ready.index(i % STAGES), (i // STAGES) & 1)
        q_desc = tma.make_tensor_descriptor(
            Q + off_b * stride_qb + off_h * stride_qh, shape=[seqlen_q, HEAD_DIM], strides=[stride_qm, 1],
            block_shape=[BLOCK_M, HEAD_DIM], layout=q_smem.layout,
        )  # fmt: skip
        do_desc = tma.make_tensor_descriptor(
            DO + off_b * stride_dob + off_h * stride_doh, shape=[seqlen_q, HEAD_DIM],
            strides=[stride_dom, 1], block_shape=[BLOCK_M, HEAD_DIM], layout=do_smem.layout,
        )  # fmt: skip
        for i in range(n_tiles):
            s = (issued + i) % STAGES
            # a fresh barrier counts as having completed the phase before 0: the first pass does not wait
            mbarrier.wait(empty.index(s), (((issued + i) // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), 2 * q_desc.block_type.nbytes)
            start_m = lo + i * BLOCK_M
            tma.async_copy_global_to_shared(q_desc, [start_m, 0], ready.index(s), q_smem.index(s))
            tma.async_copy_global_to_shared(do_desc, [start_m, 0], ready.index(s), do_smem.index(s))
        issued += n_tiles


@gluon.jit
def _bwd_consumer(
    shared, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, HAS_LO: gl.constexpr, HAS_HI: gl.constexpr,
    num_warps: gl.constexpr, ME: gl.constexpr,
):  # fmt: skip
    """Consumer ME (`shared`: the runtime arguments both consumers take, as the kernel packs them): dK and
    dV of its ROWS keys over every query tile of every query head of the group. HAS_LO / HAS_HI are the
    key-side bounds (the query-side flags swapped, as in bwd.py)."""
    (k_smem, v_smem, kv_bar, q_smem, do_smem, ready, empty, LSE2, DELTA, DK, DV, dk_strides, dv_strides,
     off_b, off_hk, num_heads, group, seqlen_q, seqlen_k, lse_len, start_n, lo, full_lo, full_hi, n_tiles,
     lo_off, hi_off, qk_scale, softmax_scale) = shared  # fmt: skip
    stride_dkb, stride_dkh, stride_dkn = dk_strides
    stride_dvb, stride_dvh, stride_dvn = dv_strides
    ROWS: gl.constexpr = k_smem.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.shape[2]
    k_c = k_smem.index(ME)
    v_c = v_smem.index(ME)
    start_n = start_n + ME * ROWS
    dtype: gl.constexpr = k_smem.dtype
    s_layout: gl.constexpr = wgmma_layout(num_warps, BLOCK_M)
    acc_layout: gl.constexpr = wgmma_layout(num_warps, HEAD_DIM)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    offs_n = start_n + gl.arange(0, ROWS, gl.SliceLayout(1, s_layout))
    zero_s = gl.zeros([ROWS, BLOCK_M], gl.float32, s_layout)
    dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
    mbarrier.wait(kv_bar, 0)
    done = 0
    for g in range(group):
        row0 = (off_b * num_heads + off_hk * group + g) * lse_len  # LSE2 / DELTA: [batch, heads, lse_len]
        for i in range(n_tiles):
            s = (done + i) % STAGES
            start_m = lo + i * BLOCK_M
            mbarrier.wait(ready.index(s), ((done + i) // STAGES) & 1)
            st_token = warpgroup_mma(
                k_c, q_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True
            )
            dpt_token = warpgroup_mma(
                v_c, do_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True
            )
            offs_m = start_m + gl.arange(0, BLOCK_M, col_s)
            m_mask = offs_m < seqlen_q
            # rows that saw no key (-inf) and rows past seqlen_q: +inf, so that P = 0
            lse2 = gl.load(LSE2 + row0 + offs_m, mask=m_mask, other=float("inf"))
            lse2 = gl.where(lse2 == float("-inf"), float("inf"), lse2)
            delta = gl.load(DELTA + row0 + offs_m, mask=m_mask, other=0.0)
            st = warpgroup_mma_wait(num_outstanding=1, deps=(st_token,))
            p = gl.exp2(st * qk_scale - lse2[None, :])
            if (start_m < full_lo) | (start_m >= full_hi):
                p = gl.where(visible(offs_n, offs_m, seqlen_q, lo_off, hi_off, HAS_LO, HAS_HI), p, 0.0)
            dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt_token,))
            ds = p * (dpt - delta[None, :])
            dv_token = warpgroup_mma(
                gl.convert_layout(p.to(dtype), a_layout), do_smem.index(s), dv, is_async=True
            )
            dk_token = warpgroup_mma(
                gl.convert_layout(ds.to(dtype), a_layout), q_smem.index(s), dk, is_async=True
            )
            dv = warpgroup_mma_wait(num_outstanding=1, deps=(dv_token,))
            dk = warpgroup_mma_wait(num_outstanding=0, deps=(dk_token,))
            mbarrier.arrive(empty.index(s))
        done += n_tiles

    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    rows = start_n + gl.arange(0, ROWS, gl.SliceLayout(1, store_layout))
    cols = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, store_layout))
    keep = (rows < seqlen_k)[:, None]
    dk_out = gl.convert_layout((dk * softmax_scale).to(DK.dtype.element_ty), store_layout)
    dv_out = gl.convert_layout(dv.to(DV.dtype.element_ty), store_layout)
    dk_row0 = off_b * stride_dkb + off_hk * stride_dkh
    dv_row0 = off_b * stride_dvb + off_hk * stride_dvh
    gl.store(DK + dk_row0 + rows[:, None] * stride_dkn + cols[None, :], dk_out, mask=keep)
    gl.store(DV + dv_row0 + rows[:, None] * stride_dvn + cols[None, :], dv_out, mask=keep)


@gluon.jit
def attn_bwd_dkdv_ws_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV,
    q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
    num_heads, num_kv_heads, group, seqlen_q, seqlen_k, seqlen_buckets, window_left, window_right, qk_scale,
    softmax_scale, HEAD_DIM: gl.constexpr, HEAD_DIM_PAD: gl.constexpr,
    HAS_LO: gl.constexpr, HAS_HI: gl.constexpr, PRECISION: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, num_warps: gl.constexpr, CAN_TMA: gl.constexpr = False,
    ONE_LOOP: gl.constexpr = False, STRIDE_UNIT: gl.constexpr = 1,
    GLUON_WS: gl.constexpr = True, WS_STAGES: gl.constexpr = 2, CU_SEQLENS_Q=None, CU_SEQLENS_K=None,
    IS_VARLEN: gl.constexpr = False,
):  # fmt: skip
    """Grid (key blocks of BLOCK_N = 128, batch * kv heads). BLOCK_M query rows per tile; WS_STAGES Q/dO
    buffers (the config's num_stages is not used); two consumer partitions of num_warps = 4 warps, 64 keys
    each. IS_VARLEN: packed sequences as bwd.attn_bwd_dkdv_kernel takes them (the grid covers the longest
    sequence's keys; seqlen_q and seqlen_k come in as the packed totals)."""
    gl.static_assert(num_warps == 4, "each consumer partition is one warpgroup (num_warps = 4)")
    gl.static_assert(BLOCK_N == 128, "two consumers of 64 keys")
    gl.static_assert(HEAD_DIM == HEAD_DIM_PAD, "the Gluon dK/dV takes head dims 64 and 128")
    STAGES: gl.constexpr = WS_STAGES
    ROWS: gl.constexpr = 64  # keys per consumer
    lse_len = seqlen_q  # the rows of LSE2 and DELTA (seqlen_q becomes the sequence's with IS_VARLEN)
    # each tensor's (batch, head, row) strides in elements, as tuples for the partitions to unpack
    q_strides = unit_strides(q_strides, STRIDE_UNIT)
    k_strides = unit_strides(k_strides, STRIDE_UNIT)
    v_strides = unit_strides(v_strides, STRIDE_UNIT)
    do_strides = unit_strides(do_strides, STRIDE_UNIT)
    dk_strides = unit_strides(dk_strides, STRIDE_UNIT)
    dv_strides = unit_strides(dv_strides, STRIDE_UNIT)
    start_n, off_b, off_hk = _key_block(num_kv_heads, BLOCK_N)
    if IS_VARLEN:
        q_start, k_start, seqlen_q, seqlen_k = varlen_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, off_b)
        if start_n >= seqlen_k:  # past this sequence's keys
            return
        # every tensor from the sequence's first row on: the sequence is batch 0 from here
        rows = (q_strides[2], do_strides[2], k_strides[2], v_strides[2])
        Q, DO, LSE2, DELTA, K, V = _sequence_inputs(Q, DO, LSE2, DELTA, K, V, q_start, k_start, *rows)
        DK, DV = DK + k_start * dk_strides[2], DV + k_start * dv_strides[2]
        off_b = 0
    dtype: gl.constexpr = Q.dtype.element_ty

    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    k_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], kv_layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumers release each buffer

    # key j is seen by queries i with j - diag - right <= i <= j - diag + left (bwd.py)
    diag = seqlen_k - seqlen_q
    lo_off = -diag - window_right
    hi_off = -diag + window_left
    # the block's query range (both consumers' keys): each consumer masks its own rows where needed
    lo, full_lo, full_hi, hi = tile_range(start_n, BLOCK_N, BLOCK_M, seqlen_q, lo_off, hi_off, HAS_HI, HAS_LO)
    n_tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    shared = (k_smem, v_smem, kv_bar, q_smem, do_smem, ready, empty, LSE2, DELTA, DK, DV, dk_strides,
              dv_strides, off_b, off_hk, num_heads, group, seqlen_q, seqlen_k, lse_len, start_n, lo, full_lo,
              full_hi, n_tiles, lo_off, hi_off, qk_scale, softmax_scale)  # fmt: skip
    gl.warp_specialize(
        [
            (_bwd_consumer, (shared, BLOCK_M, STAGES, HAS_HI, HAS_LO, num_warps, 0)),
            (_bwd_consumer, (shared, BLOCK_M, STAGES, HAS_HI, HAS_LO, num_warps, 1)),
            (_bwd_producer, (Q, K, V, DO, q_strides, k_strides, v_strides, do_strides, k_smem, v_smem, kv_bar,
                             q_smem, do_smem, ready, empty, off_b, off_hk, group, seqlen_q, seqlen_k, start_n,
                             lo, n_tiles, BLOCK_M, STAGES, IS_VARLEN)),
        ],
        [num_warps, 1],
        [240, 24],
    )  # fmt: skip
