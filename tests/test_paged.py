"""Paged KV cache (flashattention/paged_cache.py, the decode kernel's IS_PAGED): paged == dense through a
random page table (tolerance rule (the README's pass rule) against the float64 oracle per row, and the same
result as the dense kernel), decode and prefill chunks, GQA, causal/window, any split count, ragged lengths
with 0; PagedKVCache's bookkeeping: beam reorder == dense reorder by table edits, fork + copy-on-write,
release, pool exhaustion and bad input raising before anything is written.

Pool positions that no row's length covers are NaN, and table entries past a row's blocks point at a NaN
block: a read of either shows up as NaN in the output, which never passes."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import Case, assert_close_to_reference, assert_same_result, reference_dtype

from flashattention import (
    KVCache,
    PagedKVCache,
    flash_attention_with_kv_cache,
    incremental_attention,
    initialize_paged_kv_cache,
    paged_attention,
    reorder_kv_cache,
    update_kv_cache,
)
from flashattention.kernels.launch_decode import decode_forward
from flashattention.reference import attention_reference

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32
BACKENDS = ("triton", "torch")
# Tiles before a sliding window are never read: keys below the window's start rounded down to this many (a
# multiple of every BLOCK_N the launcher uses) lie in unread tiles.
TILE_ALIGN = 64


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _random_pages(k, v, lengths: list[int], block_size: int, unread: list[int] | None = None, spare: int = 3):
    """(key_pool, value_pool, block_table) holding row b's first lengths[b] tokens of k, v [B, Hkv, S, D] in
    blocks drawn from a random permutation of the pool; every other pool position is NaN, and every table
    entry past a row's blocks points at a NaN block. unread[b]: row b's keys below it must never be read
    (tiles before a sliding window): whole blocks below it point at the NaN block too."""
    batch, kv_heads, _, head_dim = k.shape
    counts = [_cdiv(n, block_size) for n in lengths]
    num_blocks = sum(counts) + spare
    free = torch.randperm(num_blocks).tolist()
    nan_block = free.pop()
    table = torch.full((batch, max(counts, default=0) + 2), nan_block, dtype=torch.int32)
    pools = [torch.full((num_blocks, kv_heads, block_size, head_dim), math.nan, dtype=k.dtype) for _ in "kv"]
    for b, n in enumerate(lengths):
        for j in range(counts[b]):
            block = table[b, j] = free.pop()
            if unread is not None and (j + 1) * block_size <= unread[b]:
                table[b, j] = nan_block
                continue
            rows = min(block_size, n - j * block_size)
            for pool, t in zip(pools, (k, v), strict=True):
                pool[block, :, :rows] = t[b, :, j * block_size : j * block_size + rows].cpu()
    return pools[0].to(k.device), pools[1].to(k.device), table.to(k.device)


def _check_row(name: str, out_row, q_row, k_row, v_row, lse_row=None, **mask) -> None:
    """The pass rule on one row's output [1, heads, seqlen_q, head_dim] (and lse) against the oracle."""
    ref = attention_reference(q_row, k_row, v_row, upcast=True, **mask)
    same = attention_reference(q_row, k_row, v_row, upcast=False, **mask)
    assert_close_to_reference(f"{name} out", out_row, ref[0], same[0])
    if lse_row is not None:
        assert_close_to_reference(f"{name} lse", lse_row, ref[1], same[1])


def _lengths(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor(lengths, dtype=torch.int32, device=device)


# (case, row lengths): Case.seqlen_k is the dense capacity; lengths include 0 and partial last blocks.
PAGED_CASES = [
    (Case(3, 8, 2, 1, 40, 40, F16, causal=True), [0, 37, 19]),  # decode, GQA 4
    (Case(2, 4, 4, 3, 150, 64, B16, causal=True, window=(5, -1)), [150, 2]),  # pages before the window unread
    (Case(2, 8, 1, 16, 40, 32, F32), [40, 17]),  # MQA, 128 packed rows: two row blocks
    (Case(2, 4, 2, 40, 50, 40, F16, causal=True), [50, 41]),  # a prefill chunk of 40 queries
    (Case(1, 4, 2, 24, 48, 16, F32, window=(3, 2)), [48]),  # queries see past the diagonal
]
# In the interpreter (16-key tiles): one table entry per tile (16, and 48 with 3 tiles a block), one per key
# (5); on a GPU (64-key tiles) one per key for all three
BLOCK_SIZES = (16, 48, 5)


@pytest.mark.parametrize(
    ("case", "lengths", "block_size"),
    [
        pytest.param(c, n, bs, id=f"{c.id}-lens{'.'.join(map(str, n))}-block{bs}")
        for c, n in PAGED_CASES
        for bs in BLOCK_SIZES
    ],
)
def test_paged_matches_reference_and_dense(case: Case, lengths, block_size, device):
    """paged_attention through a random page table == the oracle on each row's own keys (out and lse), and
    the same result as the decode kernel on the dense cache with the same lengths."""
    q, k, v, _ = case.inputs(device)
    left = case.window[0]
    unread = [
        max(n - case.seqlen_q - left, 0) // TILE_ALIGN * TILE_ALIGN if left >= 0 else 0 for n in lengths
    ]
    key_pool, value_pool, table = _random_pages(k, v, lengths, block_size, unread)
    seqlens = _lengths(lengths, device)
    mask = case.mask_kwargs()
    with torch.no_grad():
        out, lse = paged_attention(
            q, key_pool, value_pool, table, seqlens, return_lse=True, backend="triton", **mask
        )
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    for b, n in enumerate(lengths):
        sl = slice(b, b + 1)
        _check_row(f"row {b} (length {n})", out[sl], q[sl], k[sl, :, :n], v[sl, :, :n], lse[sl], **mask)
    right = case.window[1]
    dense = decode_forward(
        q,
        k,
        v,
        softmax_scale=case.head_dim**-0.5,
        left=left,
        right=0 if case.causal else right,
        cache_seqlens=seqlens,
    )
    assert_same_result("out paged vs dense", out, dense[0])
    assert_same_result("lse paged vs dense", lse, dense[1])


@pytest.mark.parametrize("block_size", (64, 7))
def test_any_split_count_gives_the_same_result(block_size, device):
    """decode_forward's num_splits over the pages: each count passes the rule and all agree with one."""
    case, lengths = Case(3, 4, 2, 2, 70, 40, F16, causal=True), [70, 0, 33]
    q, k, v, _ = case.inputs(device)
    key_pool, value_pool, table = _random_pages(k, v, lengths, block_size)
    seqlens = _lengths(lengths, device)
    results = {
        n: decode_forward(
            q,
            key_pool,
            value_pool,
            softmax_scale=0.2,
            left=-1,
            right=0,
            cache_seqlens=seqlens,
            block_table=table,
            num_splits=n,
        )
        for n in (1, 2, 5)
    }
    for n, (out, lse) in results.items():
        for b, length in enumerate(lengths):
            sl = slice(b, b + 1)
            kv = (k[sl, :, :length], v[sl, :, :length])
            _check_row(f"splits={n} row {b}", out[sl], q[sl], *kv, lse[sl], causal=True, softmax_scale=0.2)
        assert_same_result(f"out splits={n} vs 1", out, results[1][0])
        assert_same_result(f"lse splits={n} vs 1", lse, results[1][1])


def _check_invariants(cache: PagedKVCache) -> None:
    """The device's table and lengths agree with the host's bookkeeping; every block is free or held, its
    count the number of rows holding it."""
    lengths = cache.seqlens
    assert cache.cache_seqlens.tolist() == lengths
    held = [0] * cache.num_blocks
    for b, n in enumerate(lengths):
        ids = cache.block_ids(b)
        assert len(ids) == _cdiv(n, cache.block_size)
        assert cache.block_table[b, : len(ids)].tolist() == ids
        for block in ids:
            held[block] += 1
    assert [cache.refcount(i) for i in range(cache.num_blocks)] == held
    assert cache.num_free_blocks == held.count(0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_loop_matches_dense_cache(backend, device):
    """Ragged prompts (one empty) appended with num_new, then decode steps of 1 and 3 tokens through the seed
    functions: each output == a dense KVCache with cache_seqlens fed the same tokens (same result) and the
    oracle over the row's tokens so far (pass rule)."""
    heads, kv_heads, head_dim, dtype, block_size = 4, 2, 40, F16, 6
    prompts, steps = [9, 0, 14, 1], (1, 3, 1)
    batch, padded = len(prompts), max(prompts)
    q, k, v, _ = Case(batch, heads, kv_heads, 1, padded, head_dim, dtype).inputs(device)
    cache = initialize_paged_kv_cache(
        batch, kv_heads, head_dim, num_blocks=16, block_size=block_size, dtype=dtype, device=device
    )
    store = [
        torch.full((batch, kv_heads, padded + sum(steps), head_dim), math.nan, dtype=dtype, device=device)
        for _ in "kv"
    ]
    for b, n in enumerate(prompts):
        store[0][b, :, :n], store[1][b, :, :n] = k[b, :, :n], v[b, :, :n]
    dense = KVCache(*store, cache_seqlens=_lengths(prompts, device))
    rows = [[t[b : b + 1, :, :n] for b, n in enumerate(prompts)] for t in (k, v)]
    with torch.no_grad():
        cache.append(k, v, num_new=prompts)
        _check_invariants(cache)
        for n in steps:
            q_new, k_new, v_new, _ = Case(batch, heads, kv_heads, n, n, head_dim, dtype).inputs(device)
            out, same_cache = flash_attention_with_kv_cache(q_new, k_new, v_new, cache, backend=backend)
            expected, _ = flash_attention_with_kv_cache(q_new, k_new, v_new, dense, backend=backend)
            assert same_cache is cache
            _check_invariants(cache)
            assert_same_result(f"step of {n}: paged vs dense", out, expected)
            rows = [
                [torch.cat([r, t[b : b + 1]], dim=2) for b, r in enumerate(rs)]
                for rs, t in zip(rows, (k_new, v_new), strict=True)
            ]
            for b in range(batch):
                sl = slice(b, b + 1)
                _check_row(f"step of {n}, row {b}", out[sl], q_new[sl], rows[0][b], rows[1][b], causal=True)
        # a query over the pages only (no append); the second row is empty: output 0
        out = incremental_attention(q, cache, backend=backend)
        assert_same_result("attention only", out, incremental_attention(q, dense, backend=backend))
    assert cache.seqlens == [n + sum(steps) for n in prompts]
    for b in range(batch):
        gathered = cache.gather(b)
        assert torch.equal(gathered[0], rows[0][b][0]) and torch.equal(gathered[1], rows[1][b][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_chunks_are_the_last_rows_of_the_whole_prefill(backend, device):
    """Chunks of 20 then 7 tokens (more than 16 queries) appended and attended causally: each chunk's output
    == the last rows of the oracle's causal attention over the row's tokens so far."""
    case = Case(2, 4, 2, 27, 27, 32, B16, causal=True)
    q, k, v, _ = case.inputs(device)
    cache = initialize_paged_kv_cache(2, 2, 32, num_blocks=8, block_size=8, dtype=B16, device=device)
    with torch.no_grad():
        for start, end in ((0, 20), (20, 27)):
            chunk = [t[:, :, start:end] for t in (q, k, v)]
            out, _ = flash_attention_with_kv_cache(*chunk, cache, backend=backend)
            ref = attention_reference(q[:, :, :end], k[:, :, :end], v[:, :, :end], causal=True)[0]
            same = attention_reference(
                q[:, :, :end], k[:, :, :end], v[:, :, :end], causal=True, upcast=False
            )[0]
            assert_close_to_reference(f"chunk [{start}, {end})", out, ref[:, :, start:], same[:, :, start:])


def test_beam_reorder_shares_blocks_and_matches_dense(device):
    """reorder_kv_cache on a PagedKVCache: no block taken (rows share), counts follow the rows, blocks no
    row holds are free; attention == the dense cache reordered alike; the next append copies exactly the
    shared partly filled tails (one per sharing row but the last writer)."""
    batch, kv_heads, head_dim, block_size = 4, 2, 16, 4
    lengths, beam_idx = [6, 9, 3, 8], [1, 1, 3, 1]
    q, k, v, _ = Case(batch, 4, kv_heads, 1, 9, head_dim, F32).inputs(device)
    cache = initialize_paged_kv_cache(
        batch, kv_heads, head_dim, num_blocks=12, block_size=block_size, device=device
    )
    dense = KVCache(k.clone(), v.clone(), cache_seqlens=_lengths(lengths, device))
    with torch.no_grad():
        cache.append(k, v, num_new=lengths)
        row1, row3 = cache.block_ids(1), cache.block_ids(3)
        reorder_kv_cache(cache, torch.tensor(beam_idx, device=device))
        reorder_kv_cache(dense, torch.tensor(beam_idx, device=device))
        _check_invariants(cache)
        assert [cache.block_ids(b) for b in range(batch)] == [row1, row1, row3, row1]
        assert [cache.refcount(i) for i in row1] == [3] * len(row1)
        assert cache.num_free_blocks == 12 - len(row1) - len(row3)
        out = incremental_attention(q, cache, backend="triton")
        assert_same_result("reordered paged vs dense", out, incremental_attention(q, dense, backend="triton"))
        free = cache.num_free_blocks
        update_kv_cache(cache, k[:, :, :1], v[:, :, :1])  # rows 0, 1, 3 share a tail holding 1 of 4 tokens
        update_kv_cache(dense, k[:, :, :1], v[:, :, :1])
        _check_invariants(cache)
        # rows 0 and 1 copy the tail (row 3 then holds it alone), row 2 starts a block after its full ones
        assert cache.num_free_blocks == free - 3
        assert [cache.block_ids(b)[:2] for b in (0, 1, 3)] == [row1[:2]] * 3  # full shared blocks stay
        assert cache.block_ids(3) == row1 and cache.block_ids(2)[:2] == row3
        out = incremental_attention(q, cache, backend="triton")
        assert_same_result("after the append", out, incremental_attention(q, dense, backend="triton"))


def test_fork_shares_and_copy_on_write_keeps_the_source(device):
    """fork(0, [1, 2]) shares row 0's blocks; an append to row 1 copies only the partly filled last block
    (full blocks keep their ids, counts drop by one), row 0's results do not change, and row 1 == the
    oracle over row 0's tokens plus its own; a fork at a block boundary copies nothing; release frees a
    block only when its last holder lets it go."""
    kv_heads, head_dim, block_size = 2, 16, 8
    q, k, v, _ = Case(4, 4, kv_heads, 1, 21, head_dim, F16).inputs(device)
    cache = initialize_paged_kv_cache(
        4, kv_heads, head_dim, num_blocks=10, block_size=block_size, dtype=F16, device=device
    )
    with torch.no_grad():
        cache.append(k, v, num_new=[21, 0, 0, 16])
        src = cache.block_ids(0)
        before = incremental_attention(q, cache, backend="triton")[:1].clone()
        cache.fork(0, [1, 2])
        _check_invariants(cache)
        assert cache.block_ids(1) == cache.block_ids(2) == src and [cache.refcount(i) for i in src] == [3] * 3
        k_new, v_new = k[:, :, 5:6].flip(0), v[:, :, 5:6].flip(0)  # other tokens than row 0's
        free = cache.num_free_blocks
        cache.append(k_new, v_new, num_new=[0, 1, 0, 0])
        _check_invariants(cache)
        assert cache.num_free_blocks == free - 1
        assert cache.block_ids(1)[:2] == src[:2] and cache.block_ids(1)[2] not in src
        assert [cache.refcount(i) for i in src] == [3, 3, 2]
        after = incremental_attention(q, cache, backend="triton")
        assert_same_result("source row after the fork's append", after[:1], before)
        keys = torch.cat([k[:1, :, :21], k_new[1:2]], dim=2)
        values = torch.cat([v[:1, :, :21], v_new[1:2]], dim=2)
        _check_row("forked row", after[1:2], q[1:2], keys, values)

        cache.fork(3, [2], prefix_len=16)  # row 2 gives back its share of row 0's blocks
        free = cache.num_free_blocks
        cache.append(k_new, v_new, num_new=[0, 0, 1, 0])  # past a full block: a new block, no copy
        _check_invariants(cache)
        assert cache.num_free_blocks == free - 1 and cache.block_ids(2)[:2] == cache.block_ids(3)

        cache.fork(0, [1], prefix_len=12)  # mid-block prefix: row 1 views 4 of the 8 in src[1]
        cache.release([0])
        _check_invariants(cache)
        assert cache.refcount(src[0]) == 1 and cache.refcount(src[2]) == 0  # src[2]: nobody holds it
        out = incremental_attention(q, cache, backend="triton")
        _check_row("prefix of 12", out[1:2], q[1:2], k[:1, :, :12], v[:1, :, :12])
        cache.release([1, 2, 3])
        _check_invariants(cache)
        assert cache.num_free_blocks == cache.num_blocks and cache.seqlens == [0] * 4


def _snapshot(cache: PagedKVCache) -> tuple:
    return (
        cache.key_pool.clone(),
        cache.value_pool.clone(),
        cache.block_table.clone(),
        cache.cache_seqlens.clone(),
        cache.seqlens,
        [cache.block_ids(b) for b in range(cache.batch_size)],
        cache.num_free_blocks,
    )


def _assert_unchanged(cache: PagedKVCache, snapshot: tuple) -> None:
    now = _snapshot(cache)
    for t, s in zip(now[:4], snapshot[:4], strict=True):
        torch.testing.assert_close(t, s, rtol=0, atol=0, equal_nan=True)
    assert now[4:] == snapshot[4:]


def test_exhaustion_and_bad_appends_raise_before_any_write(device):
    """Appends that need more blocks than are free, more than a row's table holds, or that do not match the
    cache raise and change nothing; copies of shared tails are counted exactly (a pool with just enough
    blocks takes the append)."""
    cache = initialize_paged_kv_cache(
        3, 2, 16, num_blocks=6, block_size=4, max_blocks_per_seq=3, device=device
    )
    k = torch.randn(3, 2, 5, 16, device=device)
    cache.append(k, k, num_new=[5, 2, 0])  # 3 blocks
    snapshot = _snapshot(cache)
    with pytest.raises(ValueError, match="exhausted: this call needs 4 new blocks.*3 of 6 are free"):
        cache.append(k, k)
    with pytest.raises(ValueError, match="row 0 would hold 13 tokens = 4 blocks of 4.*has 3 entries"):
        cache.append(k[:, :, :1].expand(3, 2, 8, 16), k[:, :, :1].expand(3, 2, 8, 16), num_new=[8, 0, 0])
    with pytest.raises(ValueError, match="one count per row"):
        cache.append(k, k, num_new=[6, 0, 0])
    with pytest.raises(TypeError, match="list or tuple of ints"):
        cache.append(k, k, num_new=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"kv_heads=2.*got \(3, 4, 5, 16\)"):
        cache.append(torch.randn(3, 4, 5, 16, device=device), torch.randn(3, 4, 5, 16, device=device))
    with pytest.raises(TypeError, match="float16"):
        cache.append(k.half(), k.half())
    with pytest.raises(NotImplementedError, match="inference-only"):
        cache.append(k.clone().requires_grad_(), k)
    with pytest.raises(ValueError, match="exhausted"):
        flash_attention_with_kv_cache(torch.randn(3, 4, 5, 16, device=device), k, k, cache, backend="torch")
    _assert_unchanged(cache, snapshot)

    cache.fork(0, [2])  # rows 0 and 2 share a tail holding 1 of 4 tokens
    cache.append(k, k, num_new=[0, 5, 0])  # row 1: 7 tokens in 2 blocks; 2 free
    cache.append(k, k, num_new=[3, 2, 3])  # row 0 copies the tail (row 2 then holds it alone), row 1: 1 block
    _check_invariants(cache)
    assert cache.num_free_blocks == 0 and cache.seqlens == [8, 9, 8]


def test_bad_calls_raise_clear_errors(device):
    """Bad tables, lengths, rows, beam indices, prefix lengths, gradients: clear errors, nothing changed."""
    k = torch.randn(2, 2, 12, 16, device=device)
    key_pool, value_pool, table = _random_pages(k, k, [12, 5], 4)
    q = torch.randn(2, 4, 1, 16, device=device)
    seqlens = _lengths([12, 5], device)
    run = lambda t=table, n=seqlens, **kw: paged_attention(
        q, key_pool, value_pool, t, n, backend="torch", **kw
    )  # noqa: E731
    bad_entry = table.clone()
    bad_entry[1, 1] = key_pool.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 8 \(row 1 holds 5 tokens = 2 blocks of 4\)"):
        run(bad_entry)
    unused = table.clone()
    unused[1, 2] = -5  # past row 1's 2 blocks: never read, so accepted
    torch.testing.assert_close(run(unused), run())
    with pytest.raises(TypeError, match="int32"):
        run(table.long())
    with pytest.raises(ValueError, match=r"2-D \[batch=2"):
        run(table[:1])
    # the table's type and shape are checked before the lengths, whose range it gives; the pools' errors
    # name paged_attention and the pool arguments
    for call, error, fragment in (
        (lambda: run(table[0]), ValueError, r"`block_table` must be 2-D \[batch=2.*got shape \(5,\)"),
        (lambda: run(table.tolist()), TypeError, r"`block_table` must be a torch.Tensor.*got list"),
        (lambda: run(return_lse="no"), TypeError, r"paged_attention: `return_lse` must be a bool"),
        (
            lambda: paged_attention(q, key_pool.half(), value_pool.half(), table, seqlens),
            TypeError,
            r"paged_attention: q must match key_pool/value_pool \(torch.float16",
        ),
        (
            lambda: paged_attention(q, key_pool[0], value_pool[0], table, seqlens),
            ValueError,
            r"paged_attention: `key_pool` must have 4 dimensions "
            r"\[num_blocks, kv_heads, block_size, head_dim\], got shape \(2, 4, 16\)",
        ),
        (
            lambda: paged_attention(q, key_pool[:, :, :0], value_pool[:, :, :0], table, seqlens * 0),
            ValueError,
            r"paged_attention: .*`key_pool`/`value_pool`.*block_size >= 1.*block_size=0",
        ),
        (
            lambda: paged_attention(q, key_pool.to_sparse(), value_pool.to_sparse(), table, seqlens),
            TypeError,
            r"`key_pool` must be a dense \(strided\) tensor",
        ),
    ):
        with pytest.raises(error, match=fragment):
            call()
    with pytest.raises(ValueError, match=r"\[0, 20\].*max 21"):  # 5 entries of 4 tokens
        run(n=_lengths([21, 5], device))
    with pytest.raises(ValueError, match="min -1"):
        run(n=_lengths([-1, 5], device))
    with pytest.raises(NotImplementedError, match="inference-only"):
        paged_attention(q.clone().requires_grad_(), key_pool, value_pool, table, seqlens, backend="torch")

    cache = initialize_paged_kv_cache(3, 2, 16, num_blocks=8, block_size=4, device=device)
    cache.append(k[:1].expand(3, -1, -1, -1), k[:1].expand(3, -1, -1, -1), num_new=[6, 3, 0])
    snapshot = _snapshot(cache)
    for call, error, fragment in (
        (lambda: reorder_kv_cache(cache, torch.tensor([0, 3, 1])), ValueError, r"\[0, 2\]"),
        (lambda: reorder_kv_cache(cache, torch.tensor([0, 1])), ValueError, r"shape \(3,\)"),
        (lambda: cache.fork(0, [0, 1]), ValueError, "must not contain the source row 0"),
        (lambda: cache.fork(0, [1, 1]), ValueError, "repeated"),
        (lambda: cache.fork(3, [1]), ValueError, "out of range"),
        (lambda: cache.fork(0, [1], prefix_len=7), ValueError, r"\[0, 6\]"),
        (lambda: cache.release([True]), TypeError, "list/tuple of ints"),
        # one row (or block) where one is meant, not a list of them; beam indices on the cache's device
        (lambda: cache.fork([0, 1], []), TypeError, r"`src_row` must be one int.*\[0, 1\]"),
        (lambda: cache.gather([0, 1]), TypeError, r"`row` must be one int.*\[0, 1\]"),
        (lambda: cache.block_ids([1, 0]), TypeError, r"`row` must be one int.*\[1, 0\]"),
        (lambda: cache.refcount([3, 0]), TypeError, r"`block` must be one int.*\[3, 0\]"),
        (lambda: cache.refcount(8), ValueError, r"`block` must be an index in \[0, 8\).*out of range"),
        (
            lambda: reorder_kv_cache(cache, torch.tensor([0, 1, 2], device="meta")),
            ValueError,
            r"`beam_idx` must be on the cache's device .* or the CPU, got meta",
        ),
        (lambda: incremental_attention(torch.randn(3, 3, 1, 16, device=device), cache), ValueError, "H_kv=2"),
        (lambda: incremental_attention(q, cache), ValueError, "batch size"),
        (lambda: update_kv_cache(cache, k[:, :, :1].clone(), k[:, :, :1].clone()), ValueError, "batch=3"),
        (lambda: update_kv_cache(object(), k, k), TypeError, "KVCache or PagedKVCache"),
    ):
        with pytest.raises(error, match=fragment):
            call()
    with pytest.raises(NotImplementedError, match="inference-only"):
        incremental_attention(torch.randn(3, 4, 1, 16, device=device, requires_grad=True), cache)
    _assert_unchanged(cache, snapshot)
    with pytest.raises(ValueError, match=r"`num_blocks` must be an int >= 0"):
        PagedKVCache(1, 2, 16, num_blocks=-1)
    with pytest.raises(ValueError, match=r"`block_size` must be an int >= 1"):
        PagedKVCache(1, 2, 16, num_blocks=4, block_size=0)
    with pytest.raises(TypeError, match=r"`num_blocks` must be an int >= 0, got float 4.0"):
        PagedKVCache(1, 2, 16, num_blocks=4.0)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", (16, 256))
def test_paged_realistic_sizes_gpu(block_size):
    """GQA 32/8, head_dim 128, bf16, 8 rows of up to 4k tokens appended in interleaved chunks (so each row's
    blocks are scattered over the pool), lengths ragged (0 and 1 included): decode (1 query) and a 16-query
    chunk == the dense decode kernel on the same tokens (same result) and the oracle per row (pass rule)."""
    device, dtype, batch, heads, kv_heads, head_dim = "cuda", torch.bfloat16, 8, 32, 8, 128
    lengths = [4096, 4000, 1, 0, 2500, 4096, 3333, 17]
    k = torch.randn(batch, kv_heads, 4096, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    cache = initialize_paged_kv_cache(
        batch,
        kv_heads,
        head_dim,
        block_size=block_size,
        dtype=dtype,
        num_blocks=sum(_cdiv(n, block_size) for n in lengths) + 4,
        device=device,
    )
    chunk = 512
    with torch.no_grad():
        for start in range(0, 4096, chunk):
            counts = [min(max(n - start, 0), chunk) for n in lengths]
            order = torch.randperm(batch).tolist()  # rows take blocks in a different order every chunk
            for b in order:
                one = [c if r == b else 0 for r, c in enumerate(counts)]
                cache.append(k[:, :, start : start + chunk], v[:, :, start : start + chunk], num_new=one)
        _check_invariants(cache)
        seqlens = _lengths(lengths, device)
        for seqlen_q, window in ((1, (-1, -1)), (16, (-1, -1)), (16, (1000, -1))):
            q = torch.randn(batch, heads, seqlen_q, head_dim, device=device, dtype=dtype)
            out = incremental_attention(q, cache, window_size=window)
            dense, _ = decode_forward(
                q, k, v, softmax_scale=head_dim**-0.5, left=window[0], right=0, cache_seqlens=seqlens
            )
            assert_same_result(f"Sq{seqlen_q} window {window} paged vs dense", out, dense)
            for b, n in enumerate(lengths):
                sl = slice(b, b + 1)
                ref_dtype = reference_dtype(dtype, device)
                ref = attention_reference(
                    q[sl].to(ref_dtype),
                    k[sl, :, :n].to(ref_dtype),
                    v[sl, :, :n].to(ref_dtype),
                    causal=True,
                    window_size=window,
                    upcast=False,
                )[0]
                same = attention_reference(
                    q[sl], k[sl, :, :n], v[sl, :, :n], causal=True, window_size=window, upcast=False
                )[0]
                assert_close_to_reference(f"Sq{seqlen_q} window {window} row {b}", out[sl], ref, same)
