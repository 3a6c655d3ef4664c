"""Hopper forward with warp specialisation (Gluon), the FlashAttention-3 schedule. One producer warp issues
the TMA loads of K and V into a ring of STAGES shared-memory buffers. Two consumer partitions (three at D64;
one warpgroup and 64 query rows each) run Q K^T, the softmax and P V. Each consumer issues the next tile's
Q K^T and the previous tile's P V asynchronously, then does the softmax while both run on the tensor cores
(intra-warpgroup overlap).

Same semantics, arguments and outputs as fwd.attn_fwd_kernel (O, and LSE2 in log2 units); bf16/fp16,
head dims 64, 128 and 256 (HEAD_DIM == HEAD_DIM_PAD), Q/K/V rows 16-byte aligned (TMA). The launcher
selects it through the GLUON_WS config flag (configs.py). Triton's interpreter cannot run Gluon: this
kernel is tested on the GPU only (tests/test_gpu.py runs every table and candidate config); the CPU suite
compiles it for sm_90a (tests/test_aot.py).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .common import persistent_count, tile_range, unit_strides
from .fwd_ws_tiles import _in_q, _stamp, _turn, wgmma_layout


@gluon.jit
def _load_q(q_desc, off_b, off_h, start_m, bar, q_smem, qb, CONSUMERS: gl.constexpr, HOST_DESC: gl.constexpr):
    """The tile's Q into Q buffer qb: each consumer's rows of it."""
    ROWS: gl.constexpr = q_smem.shape[1]
    mbarrier.expect(bar, CONSUMERS * q_desc.block_type.nbytes)
    for c in gl.static_range(CONSUMERS):
        _copy(q_desc, off_b, off_h, start_m + c * ROWS, bar, q_smem.index(qb * CONSUMERS + c), HOST_DESC)


@gluon.jit
def _wait_copies(q_bar, k_ready, v_ready, tiles_begun, issued, STAGES: gl.constexpr):
    """Waits for the last Q copy and the last STAGES K and V copies to land (at most STAGES are in flight:
    issuing copy i waited for the consumers to release copy i - STAGES, which had landed), so that their
    tensor descriptors may be rewritten for the next tile."""
    if tiles_begun > 0:
        last = tiles_begun - 1
        mbarrier.wait(q_bar.index(last % q_bar.shape[0]), (last // q_bar.shape[0]) & 1)
    for d in gl.static_range(STAGES):
        i = issued - 1 - d
        if i >= 0:
            mbarrier.wait(k_ready.index(i % STAGES), (i // STAGES) & 1)
            mbarrier.wait(v_ready.index(i % STAGES), (i // STAGES) & 1)


@gluon.jit
def _copy(desc, off_b, off_h, row, bar, dst, HOST_DESC: gl.constexpr):
    """TMA copy of the tile at `row` of one (batch, head) into dst ([rows, head dim]): from a per-head 2-D
    descriptor, or from a host-made 4-D one ([B, H, S, D], box [1, 1, rows, head dim]), whose box lands in
    dst seen with the descriptor's layout (the leading unit dims change no address)."""
    if HOST_DESC:
        view = dst._reinterpret(desc.dtype, desc.block_shape, desc.layout)
        tma.async_copy_global_to_shared(desc, [off_b.to(gl.int32), off_h.to(gl.int32), row, 0], bar, view)
    else:
        tma.async_copy_global_to_shared(desc, [row, 0], bar, dst)


@gluon.jit
def _descriptors(
    Q, K, V, q_strides, k_strides, v_strides, q_smem, k_smem, v_smem, off_b, off_h, off_hk, seq,
    BLOCK_N: gl.constexpr, IS_VARLEN: gl.constexpr,
):  # fmt: skip
    """A tile's per-(batch, head) TMA descriptors of Q, K and V, made on the device: reads past a length
    come back as zeros, not the next rows. IS_VARLEN: from the sequence's first rows (seq, as _tile gives
    it); a sequence without keys describes one row (it reads none)."""
    _, q_start, k_start, seqlen_q, seqlen_k, _, _ = seq
    stride_qb, stride_qh, stride_qm = q_strides
    stride_kb, stride_kh, stride_kn = k_strides
    stride_vb, stride_vh, stride_vn = v_strides
    ROWS: gl.constexpr = q_smem.shape[1]
    HEAD_DIM: gl.constexpr = q_smem.shape[2]
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    if IS_VARLEN:
        q_base += q_start * stride_qm
        k_base += k_start * stride_kn
        v_base += k_start * stride_vn
        seqlen_k = gl.maximum(seqlen_k, 1)
    q_desc = tma.make_tensor_descriptor(
        q_base, shape=[seqlen_q, HEAD_DIM], strides=[stride_qm, 1], block_shape=[ROWS, HEAD_DIM],
        layout=q_smem.layout,
    )  # fmt: skip
    k_desc = tma.make_tensor_descriptor(
        k_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM],
        layout=k_smem.layout,
    )  # fmt: skip
    v_desc = tma.make_tensor_descriptor(
        v_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_DIM],
        layout=v_smem.layout,
    )  # fmt: skip
    return q_desc, k_desc, v_desc


@gluon.jit
def _producer(
    loads, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_LO: gl.constexpr,
    HAS_HI: gl.constexpr, HOST_DESC: gl.constexpr, IS_VARLEN: gl.constexpr, PROBE,
):  # fmt: skip
    """One warp (`loads`: its runtime arguments, as the kernel packs them). For each tile of this program:
    the tile's Q (q_smem: [Q buffers x consumers, rows each, head dim], one or two buffers) once the
    consumers have released the buffer's previous tile, then K and V of its key tiles into the ring, copy i
    into buffer i % STAGES once every consumer has released it (i counts this program's copies across
    tiles, as the consumers count them). IS_VARLEN: tiles without query rows are skipped, as the consumers
    skip them; the Q buffers count the others."""
    (Q, K, V, q_strides, k_strides, v_strides, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready,
     k_empty, v_empty, prog, progs, turns, sizes, group) = loads  # fmt: skip
    issued = 0
    num_heads = sizes[1]
    Q_BUFFERS: gl.constexpr = q_bar.shape[0]
    CONSUMERS: gl.constexpr = q_smem.shape[0] // Q_BUFFERS
    q_turns = 0  # IS_VARLEN: the tiles with query rows so far
    for j in range(0, turns):
        tile, off_bh, start_m, lo, full_lo, full_hi, n_tiles, seq, has_rows, qj = _turn(
            j, q_turns, prog, progs, sizes, BLOCK_M, BLOCK_N, HAS_LO, HAS_HI, IS_VARLEN
        )  # fmt: skip
        if has_rows:
            _stamp(PROBE, tile, 1)
            off_b = seq[0]
            off_h = (off_bh % num_heads).to(gl.int64)
            off_hk = off_h // group
            if HOST_DESC:  # [B, H, S, D] descriptors made on the host: (batch, head, row) coordinates
                q_desc = Q
                k_desc = K
                v_desc = V
            else:  # per-(batch, head) descriptors, made once the copies through the previous ones landed
                _wait_copies(q_bar, k_ready, v_ready, qj, issued, STAGES)
                q_desc, k_desc, v_desc = _descriptors(
                    Q, K, V, q_strides, k_strides, v_strides, q_smem, k_smem, v_smem, off_b, off_h, off_hk,
                    seq, BLOCK_N, IS_VARLEN,
                )  # fmt: skip
            # a fresh barrier counts as having completed the phase before 0: the first wait passes
            qb = qj % Q_BUFFERS
            mbarrier.wait(q_empty.index(qb), ((qj // Q_BUFFERS) & 1) ^ 1)
            _load_q(q_desc, off_b, off_h, start_m, q_bar.index(qb), q_smem, qb, CONSUMERS, HOST_DESC)
            for i in range(n_tiles):
                s = (issued + i) % STAGES
                phase = ((issued + i) // STAGES) & 1
                start_n = lo + i * BLOCK_N
                mbarrier.wait(k_empty.index(s), phase ^ 1)
                mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
                _copy(k_desc, off_b, off_hk, start_n, k_ready.index(s), k_smem.index(s), HOST_DESC)
                mbarrier.wait(v_empty.index(s), phase ^ 1)
                mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
                _copy(v_desc, off_b, off_hk, start_n, v_ready.index(s), v_smem.index(s), HOST_DESC)
            _stamp(PROBE, tile, 12)
            issued += n_tiles
            q_turns += 1


@gluon.jit
def _softmax_step(
    qk, m_i, l_i, start_n, rows, BLOCK_N: gl.constexpr, HAS_LO: gl.constexpr, HAS_HI: gl.constexpr,
    ROWSUM: gl.constexpr,
):  # fmt: skip
    """Online softmax of one score tile: (P in fp32, alpha, m_new, l_new; with ROWSUM l_i as it came: the
    sums are the tensor cores' then, _consumer). Element masks only on the tiles
    outside [full_lo, full_hi) (a scalar branch). rows: what stays fixed along a consumer's tiles, (offs_m,
    full_lo, full_hi, seqlen_k, lo_off, hi_off, qk_scale)."""
    offs_m, full_lo, full_hi, seqlen_k, lo_off, hi_off, qk_scale = rows
    if (start_n < full_lo) | (start_n >= full_hi):
        # per row, the tile's last visible column (the key bound folded in), so one compare per element
        offs_n = start_n + gl.arange(0, BLOCK_N, gl.SliceLayout(0, qk.type.layout))
        last = seqlen_k - 1
        if HAS_HI:
            last = gl.minimum(offs_m + hi_off, last)
        vis = offs_n[None, :] <= last[:, None] if HAS_HI else offs_n[None, :] <= last
        if HAS_LO:
            vis = vis & (offs_n[None, :] >= (offs_m + lo_off)[:, None])
        qk = gl.where(vis, qk, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
    m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
    p = gl.exp2(qk * qk_scale - m_shift[:, None])
    alpha = gl.exp2(m_i - m_shift)
    if not ROWSUM:
        l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _own_tiles(start_m, lo, n_tiles, seqlen_q, seqlen_k, hi_off, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
               HAS_HI: gl.constexpr):  # fmt: skip
    """How many of the block's n_tiles key tiles (from lo) a consumer's rows [start_m, start_m + ROWS) see:
    the block's range is its last rows', so with an upper mask (causal) the first consumers of a tall block
    end earlier, and a consumer whose rows lie outside [0, seqlen_q) sees none."""
    rows_end = gl.minimum(start_m + ROWS, seqlen_q)
    if HAS_HI:  # the last row r sees keys t <= r + hi_off
        hi = gl.minimum(gl.maximum(rows_end + hi_off, 0), seqlen_k)
    else:
        hi = seqlen_k
    own = gl.minimum(gl.maximum(hi - lo + BLOCK_N - 1, 0) // BLOCK_N, n_tiles)
    return gl.where(rows_end > gl.maximum(start_m, 0), own, 0)


@gluon.jit
def _release_unread(k_ready, v_ready, k_empty, v_empty, first, last, STAGES: gl.constexpr):
    """Releases copies [first, last) of the K/V ring that this consumer does not read, in order and each
    only once it has landed: an early arrive would count toward the buffer's previous use."""
    for j in range(first, last):
        mbarrier.wait(k_ready.index(j % STAGES), (j // STAGES) & 1)
        mbarrier.arrive(k_empty.index(j % STAGES))
        mbarrier.wait(v_ready.index(j % STAGES), (j // STAGES) & 1)
        mbarrier.arrive(v_empty.index(j % STAGES))


@gluon.jit
def _take_turn(turn_me, k, ME: gl.constexpr, PINGPONG: gl.constexpr):
    """Waits, before a consumer's k-th issue of matmuls, for the previous consumer's turn to end (round
    robin: consumer c passes the turn to c + 1, the last one to 0). The issues are numbered k = 0 (the first
    tile's Q K^T) to n_tiles (the last P V). Consumer 0's k-th issue waits for the last consumer's (k - 1)-th:
    parity (k - 1) & 1; for k = 0 that is the phase before the first, which a fresh barrier counts as
    complete. Consumer c > 0 waits for consumer c - 1's k-th: parity k & 1."""
    if PINGPONG:
        mbarrier.wait(turn_me, (k + (ME == 0)) & 1)


@gluon.jit
def _pass_turn(turn_other, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn_other)


@gluon.jit
def _consumer(
    shared, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
    HAS_LO: gl.constexpr, HAS_HI: gl.constexpr, num_warps: gl.constexpr, PINGPONG: gl.constexpr,
    OVERLAP: gl.constexpr, ME: gl.constexpr, ROWSUM: gl.constexpr, IS_VARLEN: gl.constexpr, PROBE,
):  # fmt: skip
    """Consumer ME of the block's 2 or 3 (`shared`: the runtime arguments every consumer takes, as the
    kernel packs them): for each tile of this program, its ROWS query rows against every key tile of the
    block. With PINGPONG each issues its matmuls only in its turn (_take_turn / _pass_turn), so the
    consumers' matmuls take turns on the tensor cores and each one's softmax runs under the others'. K/V
    copies and matmul issues are counted across tiles (`done`, `issues`), as the producer and the other
    consumers count them. With OVERLAP a tile's stores wait for the next tile's first Q K^T to be issued
    and run under it (after the last tile, at the end), so that the tensor cores do not idle through them;
    the PROBE's end stamp is then the end of the tile's matmuls. IS_VARLEN: tiles without query rows (blocks
    past their sequence's end) are skipped, as the producer skips them."""
    (q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn, O, LSE2,
     o_strides, prog, progs, turns, sizes, qk_scale, ones_smem) = shared  # fmt: skip
    num_heads = sizes[1]
    stride_ob, stride_oh, stride_om = o_strides
    Q_BUFFERS: gl.constexpr = q_bar.shape[0]
    consumers: gl.constexpr = q_smem.shape[0] // Q_BUFFERS
    ROWS: gl.constexpr = q_smem.shape[1]
    turn_me = turn.index(ME)
    turn_other = turn.index((ME + 1) % consumers)
    # each consumer stops at its own rows' last key tile where that can skip one: the earlier consumers'
    # rows end (consumers - 1) * ROWS keys before the block's (D64's 3 x 64 rows with 128-key tiles, D256's
    # 64-key tiles; at D128 128x128 never, and that code stays as measured). Not with the ping-pong, whose
    # turns count every consumer's issues alike
    OWN_RANGE: gl.constexpr = HAS_HI and (consumers - 1) * ROWS >= BLOCK_N and not PINGPONG
    # where the block spans more key tiles than a consumer's rows, the block's masked tiles (its diagonal
    # tiles under a causal mask: two for 192 rows and 128-key tiles) are more than each consumer's (one)
    OWN_MASKS: gl.constexpr = (HAS_LO or HAS_HI) and (consumers - 1) * ROWS >= BLOCK_N
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = wgmma_layout(num_warps, BLOCK_N)
    o_layout: gl.constexpr = wgmma_layout(num_warps, HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    # ROWSUM: the softmax's row sums as P times a column of ones (8 wide, wgmma's narrowest) on the tensor
    # cores, beside each P V, instead of a float32 add per score on the consumer's own issue slots
    l_layout: gl.constexpr = wgmma_layout(num_warps, 8)
    pl_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, l_layout)
    ones = ones_smem.permute((1, 0))
    # OVERLAP: the previous tile's output (normalised), LSE and rows, stored under the next Q K^T
    out_prev = gl.zeros([ROWS, HEAD_DIM], dtype, o_layout)
    lse_prev = gl.zeros([ROWS], gl.float32, row_s)
    o_prev = gl.to_tensor(0).to(gl.int64)
    lse_row_prev = gl.to_tensor(0).to(gl.int64)
    seqlen_prev = gl.to_tensor(0)
    m_prev = gl.to_tensor(0)
    done = 0  # K/V tiles consumed by this program before the current tile
    issues = 0  # this consumer's matmul issues before the current tile (the ping-pong turns)
    q_turns = 0  # IS_VARLEN: the tiles with query rows so far
    for j in range(0, turns):
        tile, off_bh, start_m, lo, full_lo, full_hi, n_tiles, seq, has_rows, qj = _turn(
            j, q_turns, prog, progs, sizes, BLOCK_M, BLOCK_N, HAS_LO, HAS_HI, IS_VARLEN
        )  # fmt: skip
        off_b, q_start, k_start, seqlen_q, seqlen_k, lo_off, hi_off = seq
        if has_rows:
            start_m = start_m + ME * ROWS  # this consumer's rows
            total = n_tiles  # the block's key tiles: the producer loads them all
            if OWN_MASKS:  # element masks only where this consumer's rows need them
                _, full_lo, full_hi, _ = tile_range(
                    start_m, ROWS, BLOCK_N, seqlen_k, lo_off, hi_off, HAS_LO, HAS_HI
                )  # fmt: skip
            if OWN_RANGE:
                n_tiles = _own_tiles(start_m, lo, n_tiles, seqlen_q, seqlen_k, hi_off, ROWS, BLOCK_N, HAS_HI)
            offs_m = start_m + gl.arange(0, ROWS, row_s)
            rows = (offs_m, full_lo, full_hi, seqlen_k, lo_off, hi_off, qk_scale)
            m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
            l_i = gl.zeros([ROWS], gl.float32, row_s)
            l_acc = gl.zeros([ROWS, 8], gl.float32, l_layout)  # ROWSUM
            acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
            p = gl.zeros([ROWS, BLOCK_N], dtype, p_layout)
            qb = qj % Q_BUFFERS
            q = q_smem.index(qb * consumers + ME)
            mbarrier.wait(q_bar.index(qb), (qj // Q_BUFFERS) & 1)
            _stamp(PROBE, tile, 2 + 3 * ME)
            if n_tiles > 0:
                # tile 0: scores and softmax only (the accumulator is still zero)
                s = done % STAGES
                mbarrier.wait(k_ready.index(s), (done // STAGES) & 1)
                _take_turn(turn_me, issues, ME, PINGPONG)
                k_t = k_smem.index(s).permute((1, 0))
                qk_token = warpgroup_mma(q, k_t, zero_s, use_acc=False, is_async=True)
                _pass_turn(turn_other, PINGPONG)
                if OVERLAP:
                    if qj > 0:
                        _store_tile(O, LSE2, stride_om, out_prev, lse_prev, o_prev, lse_row_prev, seqlen_prev,
                                    m_prev, BLOCK_M)  # fmt: skip
                qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk_token,))
                p, m_i, l_i = _first_softmax(
                    qk, k_empty.index(s), m_i, l_i, lo, rows, dtype, p_layout, HAS_LO, HAS_HI, ROWSUM
                )
            else:
                if OVERLAP:
                    if qj > 0:
                        _store_tile(O, LSE2, stride_om, out_prev, lse_prev, o_prev, lse_row_prev, seqlen_prev,
                                    m_prev, BLOCK_M)  # fmt: skip
            for i in range(1, n_tiles):
                s = (done + i) % STAGES
                prev = (done + i - 1) % STAGES
                prev_phase = ((done + i - 1) // STAGES) & 1
                # S_i = Q K_i^T and O += P_{i-1} V_{i-1} both in flight; S_i's softmax runs under the second
                mbarrier.wait(k_ready.index(s), ((done + i) // STAGES) & 1)
                if PINGPONG:  # both operands ready before taking the turn, so that a wait never holds it
                    mbarrier.wait(v_ready.index(prev), prev_phase)
                    _take_turn(turn_me, issues + i, ME, PINGPONG)
                k_t = k_smem.index(s).permute((1, 0))
                qk_token = warpgroup_mma(q, k_t, zero_s, use_acc=False, is_async=True)
                if not PINGPONG:
                    mbarrier.wait(v_ready.index(prev), prev_phase)
                acc_token = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
                if ROWSUM:
                    l_token = warpgroup_mma(gl.convert_layout(p, pl_layout), ones, l_acc, is_async=True)
                _pass_turn(turn_other, PINGPONG)
                qk = warpgroup_mma_wait(num_outstanding=1 + ROWSUM, deps=(qk_token,))  # the oldest group: S_i
                mbarrier.arrive(k_empty.index(s))
                p32, alpha, m_i, l_i = _softmax_step(
                    qk, m_i, l_i, lo + i * BLOCK_N, rows, BLOCK_N, HAS_LO, HAS_HI, ROWSUM
                )
                if ROWSUM:
                    acc, l_acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_token, l_token))
                    l_acc = l_acc * gl.convert_layout(alpha, row_l)[:, None]
                else:
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_token,))
                mbarrier.arrive(v_empty.index(prev))
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                p = gl.convert_layout(p32.to(dtype), p_layout)
            _stamp(PROBE, tile, 3 + 3 * ME)
            mbarrier.arrive(q_empty.index(qb))  # every Q K^T of this tile has completed: its Q buffer is free
            if n_tiles > 0:
                last = (done + n_tiles - 1) % STAGES
                mbarrier.wait(v_ready.index(last), ((done + n_tiles - 1) // STAGES) & 1)
                _take_turn(turn_me, issues + n_tiles, ME, PINGPONG)
                acc_token = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
                if ROWSUM:
                    l_token = warpgroup_mma(gl.convert_layout(p, pl_layout), ones, l_acc, is_async=True)
                _pass_turn(turn_other, PINGPONG)
                if ROWSUM:
                    acc, l_acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_token, l_token))
                else:
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_token,))
                mbarrier.arrive(v_empty.index(last))
                issues += n_tiles + 1
            # after this consumer's last P V: the producer's next copies may wait for these buffers
            if OWN_RANGE:
                _release_unread(k_ready, v_ready, k_empty, v_empty, done + n_tiles, done + total, STAGES)
            done += total
            if ROWSUM:  # (the 8 columns hold the same sums)
                l_i = gl.convert_layout(gl.max(l_acc, 1), row_s)
            out, lse2 = _normalise(acc, m_i, l_i, dtype)
            # where the tile's rows go: O's first row, LSE2's (dense [batch * heads, seqlen_q]; varlen
            # [heads, total_q], the kernel's seqlen_q being the total)
            off_h = (off_bh % num_heads).to(gl.int64)
            o_row0 = off_b * stride_ob + off_h * stride_oh
            if IS_VARLEN:
                o_row0 += q_start * stride_om
                lse_row0 = off_h * sizes[2] + q_start
            else:
                lse_row0 = off_bh.to(gl.int64) * seqlen_q
            if OVERLAP:
                out_prev = out
                lse_prev = lse2
                o_prev = o_row0
                lse_row_prev = lse_row0
                seqlen_prev = seqlen_q
                m_prev = start_m
            else:
                _store_tile(O, LSE2, stride_om, out, lse2, o_row0, lse_row0, seqlen_q, start_m, BLOCK_M)
            _stamp(PROBE, tile, 4 + 3 * ME)
            q_turns += 1
    if OVERLAP:
        if q_turns > 0:
            _store_tile(O, LSE2, stride_om, out_prev, lse_prev, o_prev, lse_row_prev, seqlen_prev, m_prev,
                        BLOCK_M)  # fmt: skip


@gluon.jit
def _first_softmax(
    qk, k_free, m_i, l_i, lo, rows, dtype: gl.constexpr, p_layout: gl.constexpr, HAS_LO: gl.constexpr,
    HAS_HI: gl.constexpr, ROWSUM: gl.constexpr,
):  # fmt: skip
    """A tile's first scores done: their K buffer released (k_free), their softmax, and P in the inputs'
    dtype in the P V operand's layout: (P, m, l)."""
    mbarrier.arrive(k_free)
    p32, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, lo, rows, qk.shape[1], HAS_LO, HAS_HI, ROWSUM)
    return gl.convert_layout(p32.to(dtype), p_layout), m_i, l_i


@gluon.jit
def _normalise(acc, m_i, l_i, dtype: gl.constexpr):
    """A tile's output in `dtype` and its LSE2 from the accumulator and softmax state (rows that saw no
    key: output 0, LSE -inf)."""
    empty = l_i == 0.0
    lse2 = gl.where(empty, float("-inf"), m_i + gl.log2(l_i))
    l_o = gl.convert_layout(gl.where(empty, 1.0, l_i), gl.SliceLayout(1, acc.type.layout))
    return (acc / l_o[:, None]).to(dtype), lse2


@gluon.jit
def _store_tile(O, LSE2, stride_om, out, lse2, o_row0, lse_row0, seqlen_q, start_m, BLOCK_M: gl.constexpr):
    """A consumer's stores of one tile: its rows' LSE2 and output (normalised, in the output dtype), rows
    [start_m, start_m + ROWS) of the (batch, head) whose first O row is at o_row0 and first LSE2 row at
    lse_row0, those inside [0, seqlen_q)."""
    ROWS: gl.constexpr = out.shape[0]
    HEAD_DIM: gl.constexpr = out.shape[1]
    num_warps: gl.constexpr = gl.num_warps()
    offs_m = start_m + gl.arange(0, ROWS, lse2.type.layout)
    in_q = _in_q(offs_m, seqlen_q, BLOCK_M)
    gl.store(LSE2 + lse_row0 + offs_m, lse2, mask=in_q)
    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    out = gl.convert_layout(out, store_layout)
    out_rows = start_m + gl.arange(0, ROWS, gl.SliceLayout(1, store_layout))
    cols = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, store_layout))
    out_ok = _in_q(out_rows, seqlen_q, BLOCK_M)
    gl.store(O + o_row0 + out_rows[:, None] * stride_om + cols[None, :], out, mask=out_ok[:, None])


@gluon.jit(do_not_specialize=["batch", "max_seqlen_q"])
def attn_fwd_ws_kernel(
    Q, K, V, O, LSE2,
    q_strides, k_strides, v_strides, o_strides,
    num_heads, group, seqlen_q, seqlen_k, seqlen_buckets, window_left, window_right, qk_scale, batch,
    HEAD_DIM: gl.constexpr, HEAD_DIM_PAD: gl.constexpr, HAS_LO: gl.constexpr,
    HAS_HI: gl.constexpr, PRECISION: gl.constexpr, CAN_TMA: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, num_warps: gl.constexpr, STRIDE_UNIT: gl.constexpr = 1,
    GLUON_WS: gl.constexpr = True, WS_PINGPONG: gl.constexpr = False, WS_STAGES: gl.constexpr = 2,
    WS_CONSUMERS: gl.constexpr = 2, PERSISTENT: gl.constexpr = False, HOST_DESC: gl.constexpr = False,
    WS_OVERLAP: gl.constexpr = False, WS_ROWSUM_MMA: gl.constexpr = False, PROBE=None, CU_SEQLENS_Q=None,
    CU_SEQLENS_K=None, max_seqlen_q=None, IS_VARLEN: gl.constexpr = False,
):  # fmt: skip
    """Grid (query blocks, batch * heads), longest query blocks first; with PERSISTENT about one program per
    SM (the launcher sizes the grid), each looping over tiles in common.persistent_turn's order, so that
    the producer loads the next tile's Q, K and V while the consumers finish the current one. WS_STAGES
    K/V buffers (the config's num_stages is not used). WS_CONSUMERS (2, or 3 at D64 as FlashAttention-3
    does) consumer partitions of num_warps = 4 warps (one warpgroup each), 64 rows each (BLOCK_M = 64 *
    WS_CONSUMERS), synchronise only through the K/V barriers, so one partition's thread barriers do not
    stall another. (One partition of 8 warps over all the rows measured no faster than the Triton kernel:
    its barriers held both warpgroups in lockstep; NOTES.md.) WS_PINGPONG: the consumers take turns to
    issue their matmuls (FlashAttention-3's ping-pong), each one's softmax under the others'. WS_OVERLAP
    (not with WS_PINGPONG): each consumer stores a tile's output under the next tile's first Q K^T
    (_consumer). WS_ROWSUM_MMA: the softmax's row sums on the tensor cores (_consumer; at D64 the
    consumers' issue slots bound the softmax, not the MUFU's ex2 rate: NOTES.md). IS_VARLEN: packed
    sequences, as fwd.attn_fwd_kernel takes them (seqlen_q, seqlen_k the totals, the grid's query blocks
    max_seqlen_q's), through per-sequence descriptors made on the device (not HOST_DESC)."""
    gl.static_assert(not (IS_VARLEN and HOST_DESC), "varlen reads through per-sequence device descriptors")
    gl.static_assert(num_warps == 4, "each consumer partition is one warpgroup (num_warps = 4)")
    gl.static_assert(BLOCK_M == 64 * WS_CONSUMERS, "64 query rows per consumer")
    gl.static_assert(WS_CONSUMERS == 2 or (WS_CONSUMERS == 3 and HEAD_DIM == 64), "3 consumers fit D64 only")
    gl.static_assert(HEAD_DIM == HEAD_DIM_PAD, "the Gluon forward takes head dims 64, 128 and 256")
    STAGES: gl.constexpr = WS_STAGES
    ROWS: gl.constexpr = 64  # per consumer
    # each tensor's (batch, head, row) strides in elements, as tuples for the partitions to unpack
    q_strides = unit_strides(q_strides, STRIDE_UNIT)
    k_strides = unit_strides(k_strides, STRIDE_UNIT)
    v_strides = unit_strides(v_strides, STRIDE_UNIT)
    o_strides = unit_strides(o_strides, STRIDE_UNIT)
    num_m = gl.cdiv(max_seqlen_q if IS_VARLEN else seqlen_q, BLOCK_M)
    gl.static_assert(not (WS_OVERLAP and WS_PINGPONG), "WS_OVERLAP: the ping-pong's turns count every issue")
    tiles = num_m * batch * num_heads
    if PERSISTENT:  # turns: this program's tiles, in common.persistent_turn's order
        prog = gl.program_id(0)
        progs = gl.num_programs(0)
        turns = persistent_count(prog, progs, tiles)
    else:  # the tile of this program: (query block, batch * head) of the grid, the same numbering
        prog = gl.program_id(1) * num_m + gl.program_id(0)
        progs = 1
        turns = 1
    dtype: gl.constexpr = Q.dtype if HOST_DESC else Q.dtype.element_ty  # HOST_DESC: Q, K, V are descriptors

    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    # two Q buffers in a persistent program (where they fit: not at D256): the next tile's Q lands while the
    # last consumers finish this one, so that the first ones start the next tile at once
    Q_BUFFERS: gl.constexpr = 2 if PERSISTENT and HEAD_DIM <= 128 else 1
    q_smem = gl.allocate_shared_memory(dtype, [Q_BUFFERS * WS_CONSUMERS, ROWS, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [Q_BUFFERS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_BUFFERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [WS_CONSUMERS, 1], mbarrier.MBarrierLayout())  # WS_PINGPONG
    if WS_ROWSUM_MMA:  # the consumers' column of ones (_consumer), K-major as K's buffers are
        ones_smem = gl.allocate_shared_memory(
            dtype, [8, BLOCK_N], gl.NVMMASharedLayout.get_default_for([8, BLOCK_N], dtype)
        )  # fmt: skip
        ones_smem.store(
            gl.full([8, BLOCK_N], 1.0, dtype, gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0]))
        )
        fence_async_shared()
    else:
        ones_smem = k_smem.index(0)  # (unused)
    for b in gl.static_range(Q_BUFFERS):
        mbarrier.init(q_bar.index(b), count=1)
        mbarrier.init(q_empty.index(b), count=WS_CONSUMERS)  # every consumer releases the Q buffer
    for c in gl.static_range(WS_CONSUMERS):
        mbarrier.init(turn.index(c), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=WS_CONSUMERS)  # every consumer releases each buffer
        mbarrier.init(v_empty.index(s), count=WS_CONSUMERS)

    diag = seqlen_k - seqlen_q
    lo_off = diag - window_left
    hi_off = diag + window_right
    # what _tile reads (varlen: the sequence's lengths and offsets replace the kernel's)
    sizes = (num_m, num_heads, seqlen_q, seqlen_k, lo_off, hi_off, window_left, window_right, CU_SEQLENS_Q,
             CU_SEQLENS_K)  # fmt: skip
    # the tile range is the whole block's: each consumer masks its own rows elementwise where needed
    shared = (q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn, O, LSE2,
              o_strides, prog, progs, turns, sizes, qk_scale, ones_smem)  # fmt: skip
    loads = (Q, K, V, q_strides, k_strides, v_strides, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
             v_ready, k_empty, v_empty, prog, progs, turns, sizes, group)  # fmt: skip
    if WS_CONSUMERS == 2:
        gl.warp_specialize(
            [
                (_consumer, (shared, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LO, HAS_HI, num_warps,
                             WS_PINGPONG, WS_OVERLAP, 0, WS_ROWSUM_MMA, IS_VARLEN, PROBE)),
                (_consumer, (shared, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LO, HAS_HI, num_warps,
                             WS_PINGPONG, WS_OVERLAP, 1, WS_ROWSUM_MMA, IS_VARLEN, PROBE)),
                (_producer, (loads, BLOCK_M, BLOCK_N, STAGES, HAS_LO, HAS_HI, HOST_DESC, IS_VARLEN, PROBE)),
            ],
            [num_warps, 1],
            [240, 24],
        )  # fmt: skip
    else:  # 3 consumers at D64: registers for 3 warpgroups (160 each) instead of 2 (240)
        gl.warp_specialize(
            [
                (_consumer, (shared, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LO, HAS_HI, num_warps,
                             WS_PINGPONG, WS_OVERLAP, 0, WS_ROWSUM_MMA, IS_VARLEN, PROBE)),
                (_consumer, (shared, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LO, HAS_HI, num_warps,
                             WS_PINGPONG, WS_OVERLAP, 1, WS_ROWSUM_MMA, IS_VARLEN, PROBE)),
                (_consumer, (shared, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LO, HAS_HI, num_warps,
                             WS_PINGPONG, WS_OVERLAP, 2, WS_ROWSUM_MMA, IS_VARLEN, PROBE)),
                (_producer, (loads, BLOCK_M, BLOCK_N, STAGES, HAS_LO, HAS_HI, HOST_DESC, IS_VARLEN, PROBE)),
            ],
            [num_warps, num_warps, 1],
            [160, 160, 24],
        )  # fmt: skip
