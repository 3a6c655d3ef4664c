"""Hopper dK/dV with warp specialisation (Gluon), after FlashAttention-3's backward. One program per key
block of BLOCK_N = 128 keys (64 at head dim 256) and kv head. A producer warp loads the block's K and V
once, then streams the Q and dO tiles (and each tile's LSE2 and delta rows) of every query head of the GQA
group through a ring of STAGES shared-memory buffers. Two consumer partitions (one warpgroup and 64 keys
each) keep dK and dV in registers. Per query tile each consumer issues S^T = K Q^T and dP^T = V dO^T
asynchronously, reads the tile's LSE2 and delta while they run, forms P^T and dS^T = P^T (dP^T - delta),
then issues dV += P^T dO and dK += dS^T Q.
At head dim 256 (SPLIT_D) a consumer's dK and dV of 64 keys would take 256 registers a thread: the block is
64 keys and the consumers split the work the other way, FlashAttention-3's way for that head dim. Each
forms P^T and dS^T for its half of the tile's queries, both halves meet in shared memory, and each
accumulates its half of dK's and dV's columns over all of the tile's queries.

Same semantics, arguments and outputs as bwd.attn_bwd_dkdv_kernel; attn_bwd_dq_ws_kernel (below) is its
Q-stationary twin for dQ, as bwd.attn_bwd_dq_kernel. Both take bf16/fp16, head dims 64, 128 and 256
(HEAD_DIM == HEAD_DIM_PAD), Q/K/V/dO rows 16-byte aligned (TMA). The launcher selects them through the
GLUON_WS config flag of the bwd_dkdv and bwd_dq tables (configs.py). Triton's interpreter cannot run
Gluon: tests/test_gpu.py checks them on the GPU; the CPU suite compiles them for sm_90a (tests/test_aot.py).
"""

from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .bwd import _key_block, _load_lse2, _query_block, _sequence_inputs
from .common import key_blocks_of_tile, query_window, tile_range, unit_strides, varlen_bounds, visible
from .fwd_ws_tiles import wgmma_layout

# a partition's warps in step (Triton 3.6 names it thread_barrier, later releases barrier)
_sync_warps = getattr(gl, "thread_barrier", None) or gl.barrier


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """Global tile of tensor_desc at coord += shared tile src, one TMA bulk reduction (cp.reduce.async.bulk,
    asynchronous like a TMA store: tma.store_wait before src is written again). Triton 3.6's Gluon has the
    op's builder but no wrapper; later releases name it tma.async_atomic_add."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(
        ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle
    )


_tma_add = getattr(tma, "async_atomic_add", None) or _tma_reduce_add


@gluon.jit
def _head_desc(T, strides, off_b, off_h, length, BLOCK_ROWS: gl.constexpr, smem):
    """TMA descriptor of the [length, head dim] rows of one (batch, head) of T ((batch, head, row) strides),
    boxes of BLOCK_ROWS rows laid out as the buffers of smem ([buffers, rows, head dim])."""
    stride_b, stride_h, stride_m = strides
    HEAD_DIM: gl.constexpr = smem.shape[2]
    return tma.make_tensor_descriptor(
        T + off_b * stride_b + off_h * stride_h, shape=[length, HEAD_DIM], strides=[stride_m, 1],
        block_shape=[BLOCK_ROWS, HEAD_DIM], layout=smem.layout,
    )  # fmt: skip


@gluon.jit
def _load_resident(a_desc, b_desc, row, bar, a_smem, b_smem):
    """The block's two resident tiles (K and V, or Q and dO) from `row` on, box c of each into buffer c of
    a_smem / b_smem, all on one barrier."""
    BOXES: gl.constexpr = a_smem.shape[0]
    ROWS: gl.constexpr = a_smem.shape[1]
    mbarrier.expect(bar, 2 * BOXES * a_desc.block_type.nbytes)
    for c in gl.static_range(BOXES):
        tma.async_copy_global_to_shared(a_desc, [row + c * ROWS, 0], bar, a_smem.index(c))
        tma.async_copy_global_to_shared(b_desc, [row + c * ROWS, 0], bar, b_smem.index(c))


@gluon.jit
def _bwd_producer(
    Q, K, V, DO, q_strides, k_strides, v_strides, do_strides,
    k_smem, v_smem, kv_bar, q_smem, do_smem, ready, empty,
    off_b, off_hk, group, seqlen_q, seqlen_k, start_n, lo, n_tiles, BLOCK_M: gl.constexpr,
    STAGES: gl.constexpr, IS_VARLEN: gl.constexpr, stats,
):  # fmt: skip
    """One warp: the block's K and V once (k_smem / v_smem: [boxes, 64 keys, head dim]), then for each
    query head of the group and each query tile, Q and dO into buffer i % STAGES once both consumers have
    released it (i counts the tiles across heads, as the consumers count them). A head's descriptors are
    rewritten only after its last copies landed. IS_VARLEN: the tensors start at the sequence's rows.
    stats: (LSE2, DELTA, stats_smem, num_heads, lse_len): the tile's LSE2 and DELTA rows go to stats_smem
    beside its Q and dO, loaded once for both consumers (_load_stats, _store_stats)."""
    LSE2, DELTA, stats_smem, num_heads, lse_len = stats
    q_rows = seqlen_q  # the sequence's query rows (the stats' bound)
    ROWS: gl.constexpr = k_smem.shape[1]
    k_desc = _head_desc(K, k_strides, off_b, off_hk, seqlen_k, ROWS, k_smem)
    v_desc = _head_desc(V, v_strides, off_b, off_hk, seqlen_k, ROWS, v_smem)
    _load_resident(k_desc, v_desc, start_n, kv_bar, k_smem, v_smem)
    if IS_VARLEN:  # a sequence without queries reads none (one row described)
        seqlen_q = gl.maximum(seqlen_q, 1)
    issued = 0
    for g in range(group):
        off_h = off_hk * group + g
        for d in gl.static_range(STAGES):  # the previous head's copies in flight (at most STAGES)
            i = issued - 1 - d
            if i >= 0:
                mbarrier.wait(ready.index(i % STAGES), (i // STAGES) & 1)
        q_desc = _head_desc(Q, q_strides, off_b, off_h, seqlen_q, BLOCK_M, q_smem)
        do_desc = _head_desc(DO, do_strides, off_b, off_h, seqlen_q, BLOCK_M, do_smem)
        for i in range(n_tiles):
            s = (issued + i) % STAGES
            start_m = lo + i * BLOCK_M
            # the stats loaded before the buffer is free, so that their latency overlaps the wait
            stats_tile = _load_stats(LSE2, DELTA, (off_b * num_heads + off_h) * lse_len, start_m, q_rows,
                                     stats_smem.shape[1])  # fmt: skip
            # a fresh barrier counts as having completed the phase before 0: the first pass does not wait
            mbarrier.wait(empty.index(s), (((issued + i) // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), 2 * q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [start_m, 0], ready.index(s), q_smem.index(s))
            tma.async_copy_global_to_shared(do_desc, [start_m, 0], ready.index(s), do_smem.index(s))
            _store_stats(stats_tile, stats_smem, s, ready.index(s))
        issued += n_tiles


@gluon.jit
def _load_stats(LSE2, DELTA, row0, start_m, seqlen_q, BLOCK_M: gl.constexpr):
    """A query tile's LSE2 and DELTA (rows start_m.. of the head whose rows start at row0) as the consumers
    use them: rows past seqlen_q and rows that saw no key (-inf) read lse2 = +inf, so that P = 0, and
    delta 0. One warp, BLOCK_M / 32 rows a lane."""
    layout: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
    offs = start_m + gl.arange(0, BLOCK_M, layout)
    mask = offs < seqlen_q
    return _load_lse2(LSE2 + row0, offs, mask), gl.load(DELTA + row0 + offs, mask=mask, other=0.0)


@gluon.jit
def _store_stats(stats_tile, stats_smem, s, bar):
    """_load_stats' pair into rows 2 s and 2 s + 1 of stats_smem ([2 * stages, BLOCK_M] float32), then the
    producer's arrival on bar."""
    lse2, delta = stats_tile
    stats_smem.index(2 * s).store(lse2)
    stats_smem.index(2 * s + 1).store(delta)
    _sync_warps()  # every lane's part stored before the arrival releases them
    mbarrier.arrive(bar)


@gluon.jit
def _bwd_consumer(
    shared, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, HAS_LO: gl.constexpr, HAS_HI: gl.constexpr,
    num_warps: gl.constexpr, ME: gl.constexpr, FUSED_DQ: gl.constexpr, stats_smem, DQ_ORDERED: gl.constexpr,
):  # fmt: skip
    """Consumer ME (`shared`: the runtime arguments both consumers take, as the kernel packs them): dK and
    dV of its ROWS keys over every query tile of every query head of the group, or with SPLIT_D (one K/V
    box: head dim 256) columns ME * HEAD_DIM / 2.. of the block's dK and dV. HAS_LO / HAS_HI are the
    key-side bounds (the query-side flags swapped, as in bwd.py). The tile's LSE2 and DELTA come from
    stats_smem, where the producer put them. FUSED_DQ: both consumers stage their dS^T in pds_smem, and the
    tile's owner (consumer t % 2) computes dS K over the block's keys and adds it into DQ_ACC by TMA bulk
    reductions from dq_smem[ME]. DQ_ORDERED: the owner adds into a query tile in the key blocks' turn (the
    kernel's docstring)."""
    (k_smem, v_smem, kv_bar, q_smem, do_smem, ready, empty, pds_smem, pds_full, pds_free, dq_smem, DK, DV,
     dk_strides, dv_strides, off_b, off_hk, num_heads, group, seqlen_q, seqlen_k, lse_len, start_n, lo,
     full_lo, full_hi, n_tiles, lo_off, hi_off, qk_scale, softmax_scale, DQ_ACC, dq_rows, DQ_TURNS, turns_row,
     dq_tiles) = shared  # fmt: skip
    stride_dkb, stride_dkh, stride_dkn = dk_strides
    stride_dvb, stride_dvh, stride_dvn = dv_strides
    ROWS: gl.constexpr = k_smem.shape[1]
    BLOCK_N: gl.constexpr = k_smem.shape[0] * ROWS
    HEAD_DIM: gl.constexpr = k_smem.shape[2]
    SPLIT_D: gl.constexpr = k_smem.shape[0] == 1
    # the tile's queries this consumer scores and the dK/dV columns it accumulates
    QM: gl.constexpr = BLOCK_M // 2 if SPLIT_D else BLOCK_M
    DC: gl.constexpr = HEAD_DIM // 2 if SPLIT_D else HEAD_DIM
    k_c = k_smem.index(0 if SPLIT_D else ME)
    v_c = v_smem.index(0 if SPLIT_D else ME)
    start_n = start_n + (0 if SPLIT_D else ME * ROWS)
    q0: gl.constexpr = QM * ME if SPLIT_D else 0  # the consumer's first query row in the tile
    c0: gl.constexpr = DC * ME if SPLIT_D else 0  # and first dK/dV column
    dtype: gl.constexpr = k_smem.dtype
    s_layout: gl.constexpr = wgmma_layout(num_warps, QM)
    acc_layout: gl.constexpr = wgmma_layout(num_warps, DC)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    offs_n = start_n + gl.arange(0, ROWS, gl.SliceLayout(1, s_layout))
    zero_s = gl.zeros([ROWS, QM], gl.float32, s_layout)
    dk = gl.zeros([ROWS, DC], gl.float32, acc_layout)
    dv = gl.zeros([ROWS, DC], gl.float32, acc_layout)
    if FUSED_DQ:  # a tile's dQ in pieces of DQ_COLS head-dim columns (a piece's registers, not DC's)
        DQ_COLS: gl.constexpr = dq_smem.shape[2]
        zero_dq = gl.zeros([QM, DQ_COLS], gl.float32, wgmma_layout(num_warps, DQ_COLS))
        # DQ_ACC as [rows, head dim] float32 (LSE2's rows), the reductions' destination
        dq_desc = tma.make_tensor_descriptor(
            DQ_ACC, shape=[dq_rows, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[QM, DQ_COLS],
            layout=dq_smem.layout,
        )  # fmt: skip
    mbarrier.wait(kv_bar, 0)
    done = 0
    passing = 0  # DQ_ORDERED: DQ_TURNS' entry of the owner's last tile, passed once its adds complete
    passes = 0
    for g in range(group):
        row0 = (off_b * num_heads + off_hk * group + g) * lse_len  # DQ_ACC's rows: [batch, heads, lse_len]
        for i in range(n_tiles):
            t = done + i
            s = t % STAGES
            start_m = lo + i * BLOCK_M
            mbarrier.wait(ready.index(s), (t // STAGES) & 1)
            q_s = q_smem.index(s)
            q_mine = q_s.slice(q0, QM, dim=0) if SPLIT_D else q_s  # SPLIT_D: its half of the queries
            st_token = warpgroup_mma(k_c, q_mine.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            do_s = do_smem.index(s)
            do_mine = do_s.slice(q0, QM, dim=0) if SPLIT_D else do_s
            dpt_token = warpgroup_mma(v_c, do_mine.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            offs_m = start_m + q0 + gl.arange(0, QM, col_s)
            # rows that saw no key (-inf) and rows past seqlen_q come as +inf, so that P = 0 (_load_stats)
            lse2 = stats_smem.index(2 * s).slice(q0, QM).load(col_s)
            delta = stats_smem.index(2 * s + 1).slice(q0, QM).load(col_s)
            st = warpgroup_mma_wait(num_outstanding=1, deps=(st_token,))
            p = gl.exp2(st * qk_scale - lse2[None, :])
            if (start_m < full_lo) | (start_m >= full_hi):
                p = gl.where(visible(offs_n, offs_m, seqlen_q, lo_off, hi_off, HAS_LO, HAS_HI), p, 0.0)
            if FUSED_DQ:  # keys past the end (TMA's zeros): P may overflow there, and dQ would add inf * 0
                if start_n + ROWS > seqlen_k:
                    p = gl.where((offs_n < seqlen_k)[:, None], p, 0.0)
            dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt_token,))
            ds = p * (dpt - delta[None, :])
            if SPLIT_D:  # both halves of P^T and dS^T in shared memory, then each its dV / dK columns
                mbarrier.wait(pds_free, (t & 1) ^ 1)  # both consumers' matmuls of the last tile read them
                pds_smem.index(ME).store(p.to(dtype))
                pds_smem.index(2 + ME).store(ds.to(dtype))
                fence_async_shared()
                _sync_warps()  # every warp's part stored before the partition arrives
                mbarrier.arrive(pds_full)
                mbarrier.wait(pds_full, t & 1)
                # [p0, p1, ds0, ds1] against the query halves' rows of dO and Q, this consumer's columns
                dv_token = dv
                dk_token = dk
                for h in gl.static_range(2):
                    dv_token = warpgroup_mma(
                        pds_smem.index(h), _rows_cols(do_s, QM * h, QM, c0, DC), dv_token, is_async=True
                    )
                for h in gl.static_range(2):
                    dk_token = warpgroup_mma(
                        pds_smem.index(2 + h), _rows_cols(q_s, QM * h, QM, c0, DC), dk_token, is_async=True
                    )
            else:
                dv_token = warpgroup_mma(gl.convert_layout(p.to(dtype), a_layout), do_s, dv, is_async=True)
                ds16 = ds.to(dtype)
                dk_token = warpgroup_mma(gl.convert_layout(ds16, a_layout), q_s, dk, is_async=True)
                if FUSED_DQ:  # both consumers' dS^T in shared memory for the tile's owner to multiply
                    mbarrier.wait(pds_free, (t & 1) ^ 1)  # the last tile's dQ matmul has read them
                    pds_smem.index(ME).store(ds16)
                    fence_async_shared()
                    _sync_warps()
                    mbarrier.arrive(pds_full)
            if not FUSED_DQ:
                dv = warpgroup_mma_wait(num_outstanding=1, deps=(dv_token,))
                dk = warpgroup_mma_wait(num_outstanding=0, deps=(dk_token,))
                if SPLIT_D:
                    mbarrier.arrive(pds_free)
                mbarrier.arrive(empty.index(s))
            elif (t & 1) == ME:  # this tile's owner: dQ[tile] += dS K over the block's 128 keys
                mbarrier.wait(pds_full, t & 1)
                dq_token = _dq_piece(pds_smem, k_smem, 0, DQ_COLS, zero_dq)
                dv = warpgroup_mma_wait(num_outstanding=2, deps=(dv_token,))
                dk = warpgroup_mma_wait(num_outstanding=1, deps=(dk_token,))
                mbarrier.arrive(empty.index(s))  # dV and dK have read this tile's dO and Q
                dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq_token,))
                if DQ_COLS == DC:  # one piece: the dS^T tiles are read; the other consumer may store its next
                    mbarrier.arrive(pds_free)
                if DQ_ORDERED:  # this block's turn at the tile: the blocks after it that see it have added
                    tile = (turns_row + off_hk * group + g) * dq_tiles + start_m // BLOCK_M
                    entry = 1 + tile.to(gl.int32)  # [0]: the waits that gave up
                    turn = DQ_TURNS + entry
                    _, last = key_blocks_of_tile(start_m, BLOCK_M, BLOCK_N, seqlen_k, lo_off, hi_off, HAS_LO,
                                                 HAS_HI)  # fmt: skip
                    _wait_turn(turn, last - start_n // BLOCK_N, DQ_TURNS)
                _add_dq(dq_desc, dq, dq_smem.index(ME), pds_smem, k_smem, row0 + start_m, DC, zero_dq)
                if DQ_ORDERED:  # the owner's last tile's adds have completed (this one's may not): its turn
                    _pass_turn(DQ_TURNS + passing, passes, HEAD_DIM // DQ_COLS)
                    passing = entry
                    passes = 1
                if DQ_COLS != DC:  # further pieces read them in _add_dq
                    mbarrier.arrive(pds_free)
            else:
                dv = warpgroup_mma_wait(num_outstanding=1, deps=(dv_token,))
                dk = warpgroup_mma_wait(num_outstanding=0, deps=(dk_token,))
                mbarrier.arrive(empty.index(s))
        done += n_tiles
    if FUSED_DQ:
        if DQ_ORDERED:  # the owner's last tile's turn
            _pass_turn(DQ_TURNS + passing, passes, 0)
        tma.store_wait(0)  # the last reduction has read dq_smem before the program ends

    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    rows = start_n + gl.arange(0, ROWS, gl.SliceLayout(1, store_layout))
    cols = c0 + gl.arange(0, DC, gl.SliceLayout(0, store_layout))
    keep = (rows < seqlen_k)[:, None]
    dk_out = gl.convert_layout((dk * softmax_scale).to(DK.dtype.element_ty), store_layout)
    dv_out = gl.convert_layout(dv.to(DV.dtype.element_ty), store_layout)
    dk_row0 = off_b * stride_dkb + off_hk * stride_dkh
    dv_row0 = off_b * stride_dvb + off_hk * stride_dvh
    gl.store(DK + dk_row0 + rows[:, None] * stride_dkn + cols[None, :], dk_out, mask=keep)
    gl.store(DV + dv_row0 + rows[:, None] * stride_dvn + cols[None, :], dv_out, mask=keep)


@gluon.jit
def _wait_turn(turn, rank, missed):
    """Until `rank` adds into the tile have completed (acquire). Bounded (16384 polls, milliseconds, where a
    block's wait is a few tiles' time): past it the add goes, so that a mistaken order costs
    reproducibility, not a hang, and adds 1 to `missed` (the GPU test checks that it stays 0)."""
    seen = gl.atomic_add(turn, 0, sem="acquire", scope="gpu")
    polls = 0
    while (seen < rank) & (polls < 16384):
        seen = gl.atomic_add(turn, 0, sem="acquire", scope="gpu")
        polls += 1
    if seen < rank:
        gl.atomic_add(missed, 1, sem="relaxed", scope="gpu")


@gluon.jit
def _pass_turn(turn, passes, IN_FLIGHT: gl.constexpr):
    """Adds `passes` (0 or 1) to `turn` once the partition's bulk reductions but the IN_FLIGHT newest have
    completed (written, not only read: `cp.async.bulk.wait_group`, which tma.store_wait is not; Triton
    issues a tile's from two warps): the tile's next add may go (release, from one thread)."""
    gl.static_assert(IN_FLIGHT <= 2, "a tile's dQ is at most two bulk reductions (head dim 128)")
    if IN_FLIGHT == 0:
        wait: gl.constexpr = "cp.async.bulk.wait_group 0;"
    elif IN_FLIGHT == 1:
        wait: gl.constexpr = "cp.async.bulk.wait_group 1;"
    else:
        wait: gl.constexpr = "cp.async.bulk.wait_group 2;"
    gl.inline_asm_elementwise(
        wait + "\nfence.proxy.async;\nmov.u32 $0, $1;", "=r,r", [passes], dtype=gl.int32, is_pure=False,
        pack=1,
    )  # fmt: skip
    _sync_warps()  # every issuing thread's reductions complete before the release
    gl.atomic_add(turn, passes, sem="release", scope="gpu")


@gluon.jit
def _dq_piece(pds_smem, k_smem, col: gl.constexpr, n_cols: gl.constexpr, zero_dq):
    """Issues dS K for head-dim columns col.. col + n_cols over both key boxes (dS^T of box b in
    pds_smem[b], its keys in k_smem[b]); returns the async matmul's token."""
    token = warpgroup_mma(
        pds_smem.index(0).permute((1, 0)), k_smem.index(0).slice(col, n_cols, dim=1), zero_dq, use_acc=False,
        is_async=True,
    )  # fmt: skip
    return warpgroup_mma(
        pds_smem.index(1).permute((1, 0)), k_smem.index(1).slice(col, n_cols, dim=1), token, is_async=True
    )


@gluon.jit
def _add_dq(dq_desc, dq, buf, pds_smem, k_smem, row, HEAD_DIM: gl.constexpr, zero_dq):
    """Adds a tile's dQ (dq: its first column piece, done) at DQ_ACC's `row` (unscaled), then computes and
    adds the further pieces (head dim 128). Each piece goes through `buf` as one TMA bulk reduction; rows
    past the sequence are zeros (their P is 0) and rows past the tensor are clipped by TMA."""
    DQ_COLS: gl.constexpr = dq.shape[1]
    _reduce_add(dq_desc, dq, buf, row, 0)
    for c in gl.static_range(DQ_COLS, HEAD_DIM, DQ_COLS):
        token = _dq_piece(pds_smem, k_smem, c, DQ_COLS, zero_dq)
        dq = warpgroup_mma_wait(num_outstanding=0, deps=(token,))
        _reduce_add(dq_desc, dq, buf, row, c)


@gluon.jit
def _reduce_add(dq_desc, dq, buf, row, col: gl.constexpr):
    """dq into `buf` (once its last bulk reduction has read it), then DQ_ACC[row:, col:] += buf by TMA."""
    tma.store_wait(0)  # the issuing thread's last reduction has read buf...
    _sync_warps()  # ...before any warp overwrites it
    buf.store(dq)
    fence_async_shared()
    _sync_warps()  # every warp's part stored before the reduction reads it
    _tma_add(dq_desc, [row.to(gl.int32), col], buf)


@gluon.jit
def _rows_cols(tile, row, n_rows: gl.constexpr, col, n_cols: gl.constexpr):
    """The [n_rows, n_cols] part of a shared [rows, head dim] tile at (row, col)."""
    return tile.slice(row, n_rows, dim=0).slice(col, n_cols, dim=1)


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
    IS_VARLEN: gl.constexpr = False, FUSED_DQ: gl.constexpr = False, DQ_ACC=None,
    DQ_ORDERED: gl.constexpr = False, DQ_TURNS=None, dq_tiles=None,
):  # fmt: skip
    """Grid (key blocks of BLOCK_N, batch * kv heads). BLOCK_M query rows per tile; WS_STAGES Q/dO buffers
    (the config's num_stages is not used); two consumer partitions of num_warps = 4 warps: 64 keys each
    (BLOCK_N = 128), or at head dim 256 (SPLIT_D, BLOCK_N = 64) half of the tile's queries and of the
    dK/dV columns each. The producer stages each query tile's LSE2 and DELTA rows in shared memory once for
    both consumers. IS_VARLEN: packed sequences as bwd.attn_bwd_dkdv_kernel takes them (the grid covers
    the longest sequence's keys; seqlen_q and seqlen_k come in as the packed totals). FUSED_DQ (head dims
    64 and 128): dQ too, unscaled, added into DQ_ACC (float32, zeroed, LSE2's shape with a head-dim axis)
    by TMA bulk reductions, in no fixed order, so not bitwise reproducible run to run; the launcher then
    skips the dQ kernel. DQ_ORDERED (with FUSED_DQ): the key blocks add into each query tile last block first,
    which makes dQ reproducible: DQ_TURNS (int32, zeroed; [0] counts the waits that gave up, then [batch,
    heads, dq_tiles] for query tiles of BLOCK_M rows) counts each tile's adds so far, and a block waits for
    its turn (the blocks after it that see the tile) before it adds; the owner passes the turn on once the
    reductions have completed, at its next tile (a wait for them at every tile stalls it for their round
    trip). The programs are dispatched (batch, kv head) fastest and last key block first (bwd._key_block's
    LAST_FIRST): a block only ever waits for blocks already resident or done, few blocks of one head run at
    once, and with a causal mask the blocks after it reach a tile first anyway."""
    gl.static_assert(not (FUSED_DQ and HEAD_DIM == 256), "FUSED_DQ takes head dims 64 and 128")
    gl.static_assert(not DQ_ORDERED or FUSED_DQ, "DQ_ORDERED orders FUSED_DQ's adds")
    gl.static_assert(num_warps == 4, "each consumer partition is one warpgroup (num_warps = 4)")
    gl.static_assert(HEAD_DIM == HEAD_DIM_PAD, "the Gluon dK/dV takes head dims 64, 128 and 256")
    SPLIT_D: gl.constexpr = HEAD_DIM == 256
    KV_BOXES: gl.constexpr = 1 if SPLIT_D else 2  # the block's K (and V) as boxes of 64 keys
    gl.static_assert(BLOCK_N == 64 * KV_BOXES, "two consumers of 64 keys, or (head dim 256) one block of 64")
    STAGES: gl.constexpr = WS_STAGES
    ROWS: gl.constexpr = 64  # keys per box
    lse_len = seqlen_q  # the rows of LSE2 and DELTA (seqlen_q becomes the sequence's with IS_VARLEN)
    # each tensor's (batch, head, row) strides in elements, as tuples for the partitions to unpack
    q_strides = unit_strides(q_strides, STRIDE_UNIT)
    k_strides = unit_strides(k_strides, STRIDE_UNIT)
    v_strides = unit_strides(v_strides, STRIDE_UNIT)
    do_strides = unit_strides(do_strides, STRIDE_UNIT)
    dk_strides = unit_strides(dk_strides, STRIDE_UNIT)
    dv_strides = unit_strides(dv_strides, STRIDE_UNIT)
    start_n, off_b, off_hk = _key_block(num_kv_heads, BLOCK_N, DQ_ORDERED)
    turns_row = off_b * num_heads  # DQ_ORDERED: the batch's (sequence's) rows of DQ_TURNS
    if IS_VARLEN:
        q_start, k_start, seqlen_q, seqlen_k = varlen_bounds(
            CU_SEQLENS_Q, CU_SEQLENS_K, off_b, seqlen_q, seqlen_k
        )
        if start_n >= seqlen_k:  # past this sequence's keys
            return
        # every tensor from the sequence's first row on: the sequence is batch 0 from here
        rows = (q_strides[2], do_strides[2], k_strides[2], v_strides[2])
        Q, DO, LSE2, DELTA, K, V = _sequence_inputs(Q, DO, LSE2, DELTA, K, V, q_start, k_start, *rows)
        DK, DV = DK + k_start * dk_strides[2], DV + k_start * dv_strides[2]
        if FUSED_DQ:
            DQ_ACC = DQ_ACC + q_start * HEAD_DIM
        dq_rows = num_heads * lse_len - q_start  # DQ_ACC's rows from the sequence's first on
        off_b = 0
    else:
        dq_rows = (off_b + 1) * num_heads * lse_len  # DQ_ACC's rows up to this batch's last
    dtype: gl.constexpr = Q.dtype.element_ty

    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    k_smem = gl.allocate_shared_memory(dtype, [KV_BOXES, ROWS, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [KV_BOXES, ROWS, HEAD_DIM], kv_layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    if SPLIT_D:  # P^T and dS^T of both query halves ([p0, p1, ds0, ds1]) and their full / free barriers
        pds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_M // 2], dtype)
        pds_smem = gl.allocate_shared_memory(dtype, [4, ROWS, BLOCK_M // 2], pds_layout)
        pds_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        pds_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(pds_full, count=2)
        mbarrier.init(pds_free, count=2)
    elif FUSED_DQ:  # each consumer's dS^T of the tile, the A operand (transposed) of the dQ matmul
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_M], dtype)
        pds_smem = gl.allocate_shared_memory(dtype, [2, ROWS, BLOCK_M], ds_layout)
        pds_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        pds_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(pds_full, count=2)  # both consumers' dS^T stored
        mbarrier.init(pds_free, count=1)  # the tile's owner has multiplied them
        # each consumer's staging tile of dQ pieces (64 head-dim columns, float32) for the bulk reductions
        DQ_COLS: gl.constexpr = 64
        dq_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, DQ_COLS], gl.float32)
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, DQ_COLS], dq_layout)
    else:  # not used: stand-ins, so that the partitions' argument tuple holds no None
        pds_smem = k_smem
        pds_full = kv_bar
        pds_free = kv_bar
    if not FUSED_DQ:
        DQ_ACC = LSE2  # stand-ins, not used
        dq_smem = k_smem
    if not DQ_ORDERED:  # stand-ins, not used
        DQ_TURNS = DQ_ACC
        dq_tiles = 0
        turns_row = 0
    # per Q/dO buffer s, the tile's lse2 and delta rows (rows 2 s and 2 s + 1)
    stats_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])  # a row's layout: index() keeps it
    stats_smem = gl.allocate_shared_memory(gl.float32, [2 * STAGES, BLOCK_M], stats_layout)
    for s in gl.static_range(STAGES):
        # the TMA copies' arrival, and the producer's once it has stored the stats
        mbarrier.init(ready.index(s), count=2)
        mbarrier.init(empty.index(s), count=2)  # both consumers release each buffer

    # key j is seen by queries i with j - diag - right <= i <= j - diag + left (bwd.py)
    diag = seqlen_k - seqlen_q
    lo_off = -diag - window_right
    hi_off = -diag + window_left
    # the block's query range (both consumers' keys): each consumer masks its own rows where needed
    lo, full_lo, full_hi, hi = tile_range(start_n, BLOCK_N, BLOCK_M, seqlen_q, lo_off, hi_off, HAS_HI, HAS_LO)
    n_tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    shared = (k_smem, v_smem, kv_bar, q_smem, do_smem, ready, empty, pds_smem, pds_full, pds_free, dq_smem,
              DK, DV, dk_strides, dv_strides, off_b, off_hk, num_heads, group, seqlen_q, seqlen_k, lse_len,
              start_n, lo, full_lo, full_hi, n_tiles, lo_off, hi_off, qk_scale, softmax_scale, DQ_ACC,
              dq_rows, DQ_TURNS, turns_row, dq_tiles)  # fmt: skip
    gl.warp_specialize(
        [
            (_bwd_consumer, (shared, BLOCK_M, STAGES, HAS_HI, HAS_LO, num_warps, 0, FUSED_DQ, stats_smem,
                             DQ_ORDERED)),
            (_bwd_consumer, (shared, BLOCK_M, STAGES, HAS_HI, HAS_LO, num_warps, 1, FUSED_DQ, stats_smem,
                             DQ_ORDERED)),
            (_bwd_producer, (Q, K, V, DO, q_strides, k_strides, v_strides, do_strides, k_smem, v_smem, kv_bar,
                             q_smem, do_smem, ready, empty, off_b, off_hk, group, seqlen_q, seqlen_k, start_n,
                             lo, n_tiles, BLOCK_M, STAGES, IS_VARLEN,
                             (LSE2, DELTA, stats_smem, num_heads, lse_len))),
        ],
        [num_warps, 1],
        [240, 24],
    )  # fmt: skip


@gluon.jit
def _dq_producer(
    Q, K, V, DO, q_strides, k_strides, v_strides, do_strides, q_smem, do_smem, q_bar, k_smem, v_smem, ready,
    empty, off_b, off_h, off_hk, seqlen_q, seqlen_k, start_m, lo, n_tiles, STAGES: gl.constexpr,
):  # fmt: skip
    """One warp: the block's Q and dO once (q_smem / do_smem: [consumers, rows each, head dim]), then the K
    and V tiles of its visible keys into buffer j % STAGES once both consumers have released it."""
    ROWS: gl.constexpr = q_smem.shape[1]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    q_desc = _head_desc(Q, q_strides, off_b, off_h, seqlen_q, ROWS, q_smem)
    do_desc = _head_desc(DO, do_strides, off_b, off_h, seqlen_q, ROWS, do_smem)
    _load_resident(q_desc, do_desc, start_m, q_bar, q_smem, do_smem)
    keys = gl.maximum(seqlen_k, 1)  # a sequence without keys (varlen) loads none: one row described
    k_desc = _head_desc(K, k_strides, off_b, off_hk, keys, BLOCK_N, k_smem)
    v_desc = _head_desc(V, v_strides, off_b, off_hk, keys, BLOCK_N, v_smem)
    for j in range(n_tiles):
        s = j % STAGES
        # a fresh barrier counts as having completed the phase before 0: the first pass does not wait
        mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), 2 * k_desc.block_type.nbytes)
        start_n = lo + j * BLOCK_N
        tma.async_copy_global_to_shared(k_desc, [start_n, 0], ready.index(s), k_smem.index(s))
        tma.async_copy_global_to_shared(v_desc, [start_n, 0], ready.index(s), v_smem.index(s))


@gluon.jit
def _dq_consumer(
    shared, HAS_LO: gl.constexpr, HAS_HI: gl.constexpr, num_warps: gl.constexpr, ME: gl.constexpr,
):  # fmt: skip
    """Consumer ME: dQ of the block's query rows ME * ROWS.. over its key tiles: S = Q K^T and dP = dO V^T
    issued together, P and dS = P (dP - delta) formed while dP completes, then dQ += dS K."""
    (q_smem, do_smem, q_bar, k_smem, v_smem, ready, empty, LSE2, DELTA, DQ, dq_strides, off_b, off_h, row0,
     seqlen_q, seqlen_k, start_m, lo, full_lo, full_hi, n_tiles, lo_off, hi_off, qk_scale,
     softmax_scale) = shared  # fmt: skip
    ROWS: gl.constexpr = q_smem.shape[1]
    HEAD_DIM: gl.constexpr = q_smem.shape[2]
    STAGES: gl.constexpr = k_smem.shape[0]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = wgmma_layout(num_warps, BLOCK_N)
    acc_layout: gl.constexpr = wgmma_layout(num_warps, HEAD_DIM)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    q_c = q_smem.index(ME)
    do_c = do_smem.index(ME)
    offs_m = start_m + ME * ROWS + gl.arange(0, ROWS, gl.SliceLayout(1, s_layout))
    m_mask = offs_m < seqlen_q
    # rows that saw no key (-inf) and rows past seqlen_q: +inf, so that P = 0
    lse2 = _load_lse2(LSE2 + row0, offs_m, m_mask)
    delta = gl.load(DELTA + row0 + offs_m, mask=m_mask, other=0.0)
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    dq = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
    tile_args = (lse2, delta, offs_m, lo, full_lo, full_hi, seqlen_k, lo_off, hi_off, qk_scale)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    mbarrier.wait(q_bar, 0)
    for j in range(n_tiles):
        s = j % STAGES
        s_token, dp_token = _dq_issue(q_c, do_c, k_smem, v_smem, ready, zero_s, j)
        ds_a = _dq_scores(s_token, dp_token, j, tile_args, BLOCK_N, col_s, a_layout, dtype, HAS_LO, HAS_HI)
        dq_token = warpgroup_mma(ds_a, k_smem.index(s), dq, is_async=True)
        dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq_token,))
        mbarrier.arrive(empty.index(s))

    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    rows = start_m + ME * ROWS + gl.arange(0, ROWS, gl.SliceLayout(1, store_layout))
    cols = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, store_layout))
    stride_dqb, stride_dqh, stride_dqm = dq_strides
    dq_out = gl.convert_layout((dq * softmax_scale).to(DQ.dtype.element_ty), store_layout)
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + rows[:, None] * stride_dqm + cols[None, :]
    gl.store(dq_ptrs, dq_out, mask=(rows < seqlen_q)[:, None])


@gluon.jit
def _dq_issue(q_c, do_c, k_smem, v_smem, ready, zero_s, j):
    """Once key tile j has landed (buffer j % STAGES): S = Q K^T and dP = dO V^T, asynchronously."""
    STAGES: gl.constexpr = k_smem.shape[0]
    s = j % STAGES
    mbarrier.wait(ready.index(s), (j // STAGES) & 1)
    s_token = warpgroup_mma(q_c, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    dp_token = warpgroup_mma(do_c, v_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    return s_token, dp_token


@gluon.jit
def _dq_scores(
    s_token, dp_token, j, tile_args, BLOCK_N: gl.constexpr, col_s: gl.constexpr, a_layout: gl.constexpr,
    dtype: gl.constexpr, HAS_LO: gl.constexpr, HAS_HI: gl.constexpr,
):  # fmt: skip
    """dS = P (dP - delta) of key tile j (S and dP issued last), as the dQ matmul's register operand."""
    lse2, delta, offs_m, lo, full_lo, full_hi, seqlen_k, lo_off, hi_off, qk_scale = tile_args
    start_n = lo + j * BLOCK_N
    qk = warpgroup_mma_wait(num_outstanding=1, deps=(s_token,))
    p = gl.exp2(qk * qk_scale - lse2[:, None])
    if (start_n < full_lo) | (start_n >= full_hi):
        offs_n = start_n + gl.arange(0, BLOCK_N, col_s)
        p = gl.where(visible(offs_m, offs_n, seqlen_k, lo_off, hi_off, HAS_LO, HAS_HI), p, 0.0)
    dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_token,))
    ds = p * (dp - delta[:, None])
    return gl.convert_layout(ds.to(dtype), a_layout)


@gluon.jit
def attn_bwd_dq_ws_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ,
    q_strides, k_strides, v_strides, do_strides, dq_strides,
    num_heads, group, seqlen_q, seqlen_k, seqlen_buckets, window_left, window_right, qk_scale, softmax_scale,
    HEAD_DIM: gl.constexpr, HEAD_DIM_PAD: gl.constexpr, HAS_LO: gl.constexpr, HAS_HI: gl.constexpr,
    PRECISION: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, num_warps: gl.constexpr,
    CAN_TMA: gl.constexpr = False, STRIDE_UNIT: gl.constexpr = 1, GLUON_WS: gl.constexpr = True,
    WS_STAGES: gl.constexpr = 2, CU_SEQLENS_Q=None, CU_SEQLENS_K=None, IS_VARLEN: gl.constexpr = False,
):  # fmt: skip
    """dQ with warp specialisation: the Q-stationary twin of the dK/dV kernel above, same semantics,
    arguments and outputs as bwd.attn_bwd_dq_kernel. Grid (query blocks of BLOCK_M = 128, batch * heads),
    program 0 taking the last block (under a causal mask the last blocks see the most keys). A producer
    warp loads the block's Q and dO once and streams its visible K and V tiles (BLOCK_N keys) through
    WS_STAGES buffers; two consumer partitions of num_warps = 4 warps keep dQ of 64 rows each in
    registers."""
    gl.static_assert(num_warps == 4, "each consumer partition is one warpgroup (num_warps = 4)")
    gl.static_assert(BLOCK_M == 128, "two consumers of 64 query rows")
    gl.static_assert(HEAD_DIM == HEAD_DIM_PAD, "the Gluon dQ takes head dims 64, 128 and 256")
    ROWS: gl.constexpr = 64  # query rows per consumer
    STAGES: gl.constexpr = WS_STAGES
    q_strides = unit_strides(q_strides, STRIDE_UNIT)
    k_strides = unit_strides(k_strides, STRIDE_UNIT)
    v_strides = unit_strides(v_strides, STRIDE_UNIT)
    do_strides = unit_strides(do_strides, STRIDE_UNIT)
    dq_strides = unit_strides(dq_strides, STRIDE_UNIT)
    start_m, off_bh, off_b, off_h = _query_block(num_heads, BLOCK_M)
    off_hk = off_h // group
    lse_len = seqlen_q  # the rows of LSE2 and DELTA (seqlen_q becomes the sequence's with IS_VARLEN)
    row0 = off_bh.to(gl.int64) * lse_len
    if IS_VARLEN:
        q_start, k_start, seqlen_q, seqlen_k = varlen_bounds(
            CU_SEQLENS_Q, CU_SEQLENS_K, off_b, seqlen_q, seqlen_k
        )
        if start_m >= seqlen_q:  # past this sequence's queries
            return
        # every tensor from the sequence's first row on: the sequence is batch 0 from here
        rows = (q_strides[2], do_strides[2], k_strides[2], v_strides[2])
        Q, DO, LSE2, DELTA, K, V = _sequence_inputs(Q, DO, LSE2, DELTA, K, V, q_start, k_start, *rows)
        DQ = DQ + q_start * dq_strides[2]
        off_b = 0
        row0 = off_h * lse_len
    dtype: gl.constexpr = Q.dtype.element_ty

    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_layout)
    do_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumers release each buffer

    bounds, window = query_window(
        start_m, seqlen_q, seqlen_k, window_left, window_right, qk_scale, BLOCK_M, BLOCK_N, HAS_LO, HAS_HI
    )
    lo, full_lo, full_hi, hi = bounds
    _, lo_off, hi_off, _ = window
    n_tiles = (hi - lo + BLOCK_N - 1) // BLOCK_N
    shared = (q_smem, do_smem, q_bar, k_smem, v_smem, ready, empty, LSE2, DELTA, DQ, dq_strides, off_b, off_h,
              row0, seqlen_q, seqlen_k, start_m, lo, full_lo, full_hi, n_tiles, lo_off, hi_off, qk_scale,
              softmax_scale)  # fmt: skip
    gl.warp_specialize(
        [
            (_dq_consumer, (shared, HAS_LO, HAS_HI, num_warps, 0)),
            (_dq_consumer, (shared, HAS_LO, HAS_HI, num_warps, 1)),
            (_dq_producer, (Q, K, V, DO, q_strides, k_strides, v_strides, do_strides, q_smem, do_smem, q_bar,
                            k_smem, v_smem, ready, empty, off_b, off_h, off_hk, seqlen_q, seqlen_k, start_m,
                            lo, n_tiles, STAGES)),
        ],
        [num_warps, 1],
        [240, 24],
    )  # fmt: skip
