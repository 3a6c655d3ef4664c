"""@triton.jit helpers shared by the forward and backward kernels.

Visibility: along one axis ("self", e.g. queries) a row s sees the other axis' rows t with
    s + lo_off <= t <= s + hi_off          (each bound only when HAS_LO / HAS_HI).
Forward / dQ: self = query i, other = key j, lo_off = off - left, hi_off = off + right (off = Sk - Sq).
dK/dV:        self = key j, other = query i, lo_off = -off - right, hi_off = -off + left.
"""

import triton
import triton.language as tl


@triton.jit
def round_tf32(x):
    """fp32 -> the nearest tf32 value (ties away from zero), kept in fp32: add half of the 13 dropped
    mantissa bits' range, then clear them (inf stays inf)."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """a @ b (+ acc). With PRECISION "tf32" the operands are rounded to nearest tf32 first: the tensor
    cores (and Triton, which emits no conversion) drop the low 13 mantissa bits, a truncation whose bias
    adds up along the dot product (measured on an H100: 2-3.5x PyTorch's tf32 error on the LSE and the
    gradients; with rounding, within the tests' 2x rule)."""
    if PRECISION == "tf32":
        a = round_tf32(a)
        b = round_tf32(b)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def persistent_count(prog, progs, tiles):
    """How many of `tiles` tiles program `prog` of `progs` takes in persistent_turn's order: one from every
    full round of `progs` tiles, and one from the last, partial round if its place there is below
    tiles % progs."""
    rounds = tiles // progs
    place = tl.where(rounds % 2 == 0, prog, progs - 1 - prog)
    return rounds + (place < tiles % progs).to(tl.int32)


@triton.jit
def persistent_turn(j, prog, progs):
    """The tile number of program `prog`'s j-th turn: the tiles are dealt in rounds of `progs`, forward in
    even rounds and backward in odd ones (a snake). A program that took one of a round's first (longest)
    tiles takes one of the next round's last. Dealt forward every round, a program would take every progs-th
    tile, and where the query blocks per head divide progs (11 x 192 rows at 2k on 132 SMs) the same block of
    every head: some programs all the longest causal blocks, others all the shortest. With one program per
    tile (prog = tile number, progs = tiles, j = 0) this is the tile itself."""
    return j * progs + tl.where(j % 2 == 0, prog, progs - 1 - prog)


@triton.jit
def persistent_tile(tile, num_m, BLOCK_M: tl.constexpr):
    """Tile number -> (batch * head, first query row): head by head, each head's query blocks longest-first
    (with a causal mask the last blocks see the most keys). (Longest-first across groups of heads sized to
    L2 measured slower: benchmarks/NOTES.md.)"""
    return tile // num_m, (num_m - 1 - tile % num_m) * BLOCK_M


@triton.jit
def varlen_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, off_b, total_q, total_k):
    """Packed sequence off_b: (first query row, first key row) as int64 (row offsets of a long packed batch
    exceed 2^31 elements), and its (seqlen_q, seqlen_k) as int32, from the cu_seqlens (int32 [batch + 1]),
    each range clamped into the packed rows [0, total): the host checks the offsets, and the clamp keeps
    every access inside the tensors should they change unseen after the check (a write bypassing PyTorch)."""
    q_start = tl.minimum(tl.maximum(tl.load(CU_SEQLENS_Q + off_b), 0), total_q)
    k_start = tl.minimum(tl.maximum(tl.load(CU_SEQLENS_K + off_b), 0), total_k)
    seqlen_q = tl.minimum(tl.maximum(tl.load(CU_SEQLENS_Q + off_b + 1), q_start), total_q) - q_start
    seqlen_k = tl.minimum(tl.maximum(tl.load(CU_SEQLENS_K + off_b + 1), k_start), total_k) - k_start
    return q_start.to(tl.int64), k_start.to(tl.int64), seqlen_q, seqlen_k


@triton.jit
def tile_range(
    start,
    BLOCK_SELF: tl.constexpr,
    BLOCK_OTHER: tl.constexpr,
    len_other,
    lo_off,
    hi_off,
    HAS_LO: tl.constexpr,
    HAS_HI: tl.constexpr,
):
    """Splits the other axis, for the self block [start, start + BLOCK_SELF), into tile-aligned ranges:
    [lo, full_lo) and [full_hi, hi) need element masks, [full_lo, full_hi) is visible for every row and
    inside len_other; tiles outside [lo, hi) are fully masked and never visited."""
    if HAS_LO:
        lo = tl.maximum(start + lo_off, 0)
        lo = tl.minimum(lo, len_other) // BLOCK_OTHER * BLOCK_OTHER
        # every row of the block (the last one is the strictest) sees t >= start + BLOCK_SELF - 1 + lo_off
        full_lo = tl.maximum(start + BLOCK_SELF - 1 + lo_off, 0)
        full_lo = (full_lo + BLOCK_OTHER - 1) // BLOCK_OTHER * BLOCK_OTHER
    else:
        lo = 0
        full_lo = 0
    if HAS_HI:
        hi = tl.minimum(tl.maximum(start + BLOCK_SELF + hi_off, 0), len_other)
        # every row (the first one is the strictest) sees t <= start + hi_off
        full_hi = tl.minimum(tl.maximum(start + hi_off + 1, 0), len_other)
    else:
        hi = len_other
        full_hi = len_other
    full_hi = full_hi // BLOCK_OTHER * BLOCK_OTHER
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def key_blocks_of_tile(start_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, seqlen_k, lo_off, hi_off,
                       HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):  # fmt: skip
    """The first and last key blocks of BLOCK_N whose query range (tile_range from the key side, with the
    key side's offsets and flags as given) holds query tile start_m; last < first where none does."""
    lo, _, _, hi = tile_range(start_m, BLOCK_M, BLOCK_N, seqlen_k, -hi_off, -lo_off, HAS_HI, HAS_LO)
    return lo // BLOCK_N, (hi + BLOCK_N - 1) // BLOCK_N - 1


@triton.jit
def query_window(
    start_m, seqlen_q, seqlen_k, window_left, window_right, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
):  # fmt: skip
    """(tile_range bounds, window) of the query block [start_m, start_m + BLOCK_M) over the keys, as the
    forward's and dQ's inner loops take them: window = (seqlen_k, lo_off, hi_off, qk_scale)."""
    diag = seqlen_k - seqlen_q
    lo_off = diag - window_left
    hi_off = diag + window_right
    bounds = tile_range(start_m, BLOCK_M, BLOCK_N, seqlen_k, lo_off, hi_off, HAS_LO, HAS_HI)
    return bounds, (seqlen_k, lo_off, hi_off, qk_scale)


@triton.jit
def visible(
    offs_self,
    offs_other,
    len_other,
    lo_off,
    hi_off,
    HAS_LO: tl.constexpr,
    HAS_HI: tl.constexpr,
):
    """[len(offs_self), len(offs_other)] bool: which pairs are visible (and inside len_other)."""
    mask = offs_other[None, :] < len_other
    if HAS_LO:
        mask = mask & (offs_other[None, :] >= offs_self[:, None] + lo_off)
    if HAS_HI:
        mask = mask & (offs_other[None, :] <= offs_self[:, None] + hi_off)
    return mask


@triton.jit
def load_tile(ptrs, row_mask, col_mask, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Loads a tile, applying only the masks that are needed (zeros where masked)."""
    if MASK_ROWS and MASK_COLS:
        return tl.load(ptrs, mask=row_mask & col_mask, other=0.0)
    elif MASK_ROWS:
        return tl.load(ptrs, mask=row_mask, other=0.0)
    elif MASK_COLS:
        return tl.load(ptrs, mask=col_mask, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def load_rows(base, offs_rows, stride_row, offs_d, mask):
    """The [len(offs_rows), len(offs_d)] tile of rows offs_rows (stride stride_row; columns offs_d, unit
    stride) from base, zeros where masked: a block the kernel loads once, outside its tile loops."""
    return tl.load(base + offs_rows[:, None] * stride_row + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def unit_strides(strides, STRIDE_UNIT: tl.constexpr):
    """A tensor's (batch, head, row) strides in elements from the launcher's tuple, which gives them in units
    of STRIDE_UNIT elements (the largest power of two up to 16 that divides them all). Multiplying back by
    the constexpr tells the compiler that rows stay aligned, so loads vectorise and pipeline even where
    Triton's own specialisation of each element (1, multiples of 16) does not apply, e.g. contiguous tensors
    with head dim 40, 72 or 200."""
    return strides[0] * STRIDE_UNIT, strides[1] * STRIDE_UNIT, strides[2] * STRIDE_UNIT


@triton.jit
def page_rows(
    block_table,
    start_n,
    offs_n,
    kv_mask,
    stride_kpage,
    stride_vpage,
    stride_kn,
    stride_vn,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
):
    """[BLOCK_N] int64 element offsets of keys offs_n in the K and V pools (from the kv head's base): row
    n % PAGE_SIZE of page block_table[n // PAGE_SIZE]. A tile inside one page (PAGE_SIZE a multiple of
    BLOCK_N; tiles start at multiples of BLOCK_N) reads one table entry; otherwise each key reads its own
    (4 bytes beside a key's 2 * HEAD_DIM elements), masked to the keys below seqlen_k in masked tiles."""
    if PAGE_SIZE % BLOCK_N == 0:
        pages = tl.load(block_table + start_n // PAGE_SIZE).to(tl.int64)  # start_n < seqlen_k: in the table
        in_page = start_n % PAGE_SIZE + tl.arange(0, BLOCK_N)
    else:
        if MASKED:
            pages = tl.load(block_table + offs_n // PAGE_SIZE, mask=kv_mask, other=0).to(tl.int64)
        else:
            pages = tl.load(block_table + offs_n // PAGE_SIZE).to(tl.int64)
        in_page = offs_n % PAGE_SIZE
    return pages * stride_kpage + in_page * stride_kn, pages * stride_vpage + in_page * stride_vn


@triton.jit
def segment(bounds, seg: tl.constexpr, ONE_LOOP: tl.constexpr = False):
    """[start, end) of segment seg of tile_range's bounds (lo, full_lo, full_hi, hi): 0 the element-masked
    tiles below the unmasked ones, 1 the unmasked ones, 2 the element-masked ones above. ONE_LOOP: all of
    [lo, hi) as the one segment."""
    lo, full_lo, full_hi, hi = bounds
    if ONE_LOOP:
        seg_start, seg_end = lo, hi
    elif seg == 0:
        seg_start, seg_end = lo, full_lo
    elif seg == 1:
        seg_start, seg_end = full_lo, full_hi
    else:
        seg_start, seg_end = full_hi, hi
    return seg_start, seg_end


@triton.jit
def attend_tiles(
    acc, l_i, m_i, q, kv, descs, tile_start, tile_end, offs_m, offs_d, window,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MASKED: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    pages=None, PAGE_SIZE: tl.constexpr = 1, IS_PAGED: tl.constexpr = False,
):  # fmt: skip
    """The online softmax over key tiles [tile_start, tile_end), folded into (acc, l_i, m_i) in log2 units
    (the forward's and the decode's inner loop); MASKED tiles apply element masks. kv: (k_base, v_base,
    stride_kn, stride_vn); window: (seqlen_k, lo_off, hi_off, qk_scale).
    USE_TMA loads K/V tiles through descs, the (K, V) tensor descriptors (zero-filled outside [seqlen_k,
    HEAD_DIM]).
    IS_PAGED: pages is (block_table, stride_kpage, stride_vpage): key n is row n % PAGE_SIZE of page
    block_table[n // PAGE_SIZE] (int32, this sequence's row of the table); k_base/v_base point at the pools'
    kv head, stride_kpage/stride_vpage are the pages' (int64) strides. Tiles start at multiples of BLOCK_N
    (tile_range), so the table entries read are those of keys below seqlen_k only."""
    k_base, v_base, stride_kn, stride_vn = kv
    if USE_TMA:
        k_desc, v_desc = descs
    seqlen_k, lo_off, hi_off, qk_scale = window
    if IS_PAGED:
        block_table, stride_kpage, stride_vpage = pages
    d_mask = offs_d < HEAD_DIM
    for start_n in tl.range(tile_start, tile_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = offs_n < seqlen_k
        if IS_PAGED:
            k_rows, v_rows = page_rows(
                block_table, start_n, offs_n, kv_mask, stride_kpage, stride_vpage, stride_kn, stride_vn,
                PAGE_SIZE, BLOCK_N, MASKED,
            )  # fmt: skip
            k_ptrs = k_base + k_rows[:, None] + offs_d[None, :]
            k = load_tile(k_ptrs, kv_mask[:, None], d_mask[None, :], MASKED, HEAD_DIM != HEAD_DIM_PAD)
        elif USE_TMA:
            k = k_desc.load([start_n, 0])  # [BLOCK_N, HEAD_DIM_PAD]
        else:
            k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
            k = load_tile(k_ptrs, kv_mask[:, None], d_mask[None, :], MASKED, HEAD_DIM != HEAD_DIM_PAD)
        qk = mma(q, tl.trans(k), None, PRECISION)  # [BLOCK_M, BLOCK_N], unscaled
        if MASKED:
            vis = visible(offs_m, offs_n, seqlen_k, lo_off, hi_off, HAS_LO, HAS_HI)
            qk = tl.where(vis, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            # a row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # qk_scale > 0: max commutes with it
            m_shift = m_new
        p = tl.math.exp2(qk * qk_scale - m_shift[:, None])  # one FMA per score, in log2 units
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
        if IS_PAGED:
            v_ptrs = v_base + v_rows[:, None] + offs_d[None, :]
        else:
            v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
        if USE_TMA:
            v = v_desc.load([start_n, 0])  # [BLOCK_N, HEAD_DIM_PAD]
        else:
            v = load_tile(v_ptrs, kv_mask[:, None], d_mask[None, :], MASKED, HEAD_DIM != HEAD_DIM_PAD)
        acc = mma(p.to(v.dtype), v, acc, PRECISION)
    return acc, l_i, m_i
