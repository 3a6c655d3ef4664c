"""Paged KV cache: every row's keys and values live in fixed-size blocks of two shared pools, found through
the row's block table (vLLM's PagedAttention layout). Appends take blocks from a free list; beam reorder and
prefix sharing edit block tables and per-block reference counts instead of copying K/V, and an append into a
shared, partly filled last block copies that block first (copy-on-write).

The host keeps the bookkeeping (each row's block list, lengths, reference counts, the free list), so no
operation waits for the device except a reorder (it reads beam_idx) and the torch backend. The device holds
what the kernel reads: the pools, `block_table` and `cache_seqlens`; each operation sends its changes in one
host-to-device copy (pinned and non-blocking on CUDA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _validation, api
from ._autograd import plain


class PagedKVCache:
    """A KV cache of batch_size rows whose tokens live in blocks of two pools.

    Pools `key_pool`, `value_pool`: [num_blocks, num_kv_heads, block_size, head_dim]. `block_table`: int32
    [batch_size, max_blocks_per_seq] on the pools' device; token p of row b is
    `key_pool[block_table[b, p // block_size], :, p % block_size]`. `cache_seqlens`: int32 [batch_size], each
    row's token count. Table entries past a row's length are unused (never read). block_size may be any
    int >= 1 (a multiple of the kernel's key tile reads one table entry per tile, others one per key);
    max_blocks_per_seq defaults to num_blocks.

    A new cache holds no tokens and every block is free. Appends (`append`, update_kv_cache) take blocks
    from the free list and raise ValueError before writing anything when the pool cannot hold the tokens.
    Blocks are reference-counted: `reorder` (reorder_kv_cache) and `fork` share blocks between rows,
    `release` gives a row's blocks back; a block whose count reaches 0 returns to the free list. A block is
    written only while one row holds it: an append into a shared, partly filled last block first copies it
    to a fresh block for the writing row; full shared blocks are never written.

    Inference only: appends and attention that would record a gradient raise NotImplementedError.
    Attention: incremental_attention(q, cache) (or flash_attention_with_kv_cache with new tokens), any number
    of queries per row, each row with its own bottom-right offset cache_seqlens[b] - seqlen_q.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        num_blocks: int,
        block_size: int = 16,
        max_blocks_per_seq: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        max_blocks_per_seq = _validation.check_paged_dims(
            batch_size, num_kv_heads, head_dim, num_blocks, block_size, max_blocks_per_seq, dtype
        )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        pool_shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self._key_pool = torch.empty(pool_shape, dtype=dtype, device=device)
        self._value_pool = torch.empty_like(self._key_pool)
        device = self._key_pool.device
        self._block_table = torch.zeros(batch_size, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        # a [batch, kv_heads, 0, head_dim] stand-in for the cache in the shape checks of q and new tokens
        self._like = self._key_pool.new_empty(batch_size, num_kv_heads, 0, head_dim)
        self._tables: list[list[int]] = [[] for _ in range(batch_size)]
        self._lengths = [0] * batch_size
        self._refcounts = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is taken first

    # ------------------------------------------------------------------------------------------------------
    # What the kernel reads and the host's view of it

    @property
    def key_pool(self) -> torch.Tensor:
        """[num_blocks, num_kv_heads, block_size, head_dim]: every row's keys, in blocks."""
        return self._key_pool

    @property
    def value_pool(self) -> torch.Tensor:
        """[num_blocks, num_kv_heads, block_size, head_dim]: every row's values, in blocks."""
        return self._value_pool

    @property
    def block_table(self) -> torch.Tensor:
        """int32 [batch_size, max_blocks_per_seq] on the pools' device: row b's blocks, in order (entries past
        cdiv(cache_seqlens[b], block_size) unused). The cache's own tensor: do not modify it."""
        return self._block_table

    @property
    def cache_seqlens(self) -> torch.Tensor:
        """int32 [batch_size] on the pools' device: each row's token count. The cache's own tensor."""
        return self._cache_seqlens

    # the sizes given at construction, read from the tensors' shapes (read-only)
    batch_size = property(lambda self: self._block_table.shape[0])
    max_blocks_per_seq = property(lambda self: self._block_table.shape[1])
    num_blocks = property(lambda self: self._key_pool.shape[0])
    block_size = property(lambda self: self._key_pool.shape[2])

    @property
    def seqlens(self) -> list[int]:
        """Each row's token count (the host's copy of cache_seqlens; no device sync)."""
        return list(self._lengths)

    @property
    def length(self) -> int:
        """The longest row's token count."""
        return max(self._lengths, default=0)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def block_ids(self, row: int) -> list[int]:
        """Row `row`'s blocks in order (the host's copy of its block-table entries in use)."""
        return list(
            self._tables[_validation.check_index("PagedKVCache.block_ids", "row", row, self.batch_size)]
        )

    def refcount(self, block: int) -> int:
        """How many rows hold block `block` (0: it is free)."""
        return self._refcounts[
            _validation.check_index("PagedKVCache.refcount", "block", block, self.num_blocks)
        ]

    def gather(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row `row`'s keys and values as dense copies, each [num_kv_heads, seqlen, head_dim]."""
        row = _validation.check_index("PagedKVCache.gather", "row", row, self.batch_size)
        blocks = torch.tensor(self._tables[row], dtype=torch.long, device=self._key_pool.device)
        n = self._lengths[row]
        return tuple(
            pool[blocks].transpose(0, 1).flatten(1, 2)[:, :n] for pool in (self._key_pool, self._value_pool)
        )

    def __repr__(self) -> str:
        _, h, bs, d = self._key_pool.shape
        return (
            f"PagedKVCache(batch={self.batch_size}, kv_heads={h}, head_dim={d}, block_size={bs}, "
            f"num_blocks={self.num_blocks} ({self.num_free_blocks} free), longest row={self.length}, "
            f"dtype={self._key_pool.dtype}, device={self._key_pool.device})"
        )

    # ------------------------------------------------------------------------------------------------------
    # Operations

    def append(
        self, k_new: torch.Tensor, v_new: torch.Tensor, *, num_new: Sequence[int] | None = None
    ) -> None:
        """Appends k_new, v_new [batch_size, num_kv_heads, new_tokens, head_dim] after each row's own tokens.
        num_new (list of batch_size ints in [0, new_tokens]): row b appends only its first num_new[b] new
        tokens (right-padded chunks; 0 leaves a row as it is); default every row appends new_tokens.
        Every check (shapes, dtype, device, the rows' table room, the free blocks, copies of shared blocks
        included) comes before anything is written. No device sync."""
        what = "PagedKVCache.append"
        _validation.check_cache_tensors(what, k_new, v_new, like=self._like)
        _validation.check_paged_grad(what, api._needs_grad(k_new, v_new))
        batch, _, new_tokens, _ = k_new.shape
        counts = (
            [new_tokens] * batch
            if num_new is None
            else _validation.check_num_new(what, num_new, batch, new_tokens)
        )
        self._check_append_room(what, counts)

        bs = self.block_size
        copy_src, copy_dst, entries = [], [], []  # entries: (row, column, block) of the table to set
        blk, off, src = [], [], []
        for b, count in enumerate(counts):
            if count == 0:
                continue
            length, table = self._lengths[b], self._tables[b]
            if self._shared_tail(b):  # copy-on-write: this row gets its own copy of the partly filled block
                block = self._take()
                copy_src.append(table[-1])
                copy_dst.append(block)
                self._drop(table[-1])
                table[-1] = block
                entries += (b, len(table) - 1, block)
            while len(table) < _cdiv(length + count, bs):
                table.append(self._take())
                entries += (b, len(table) - 1, table[-1])
            # token p of the row goes to row p % bs of block table[p // bs]: one run of rows per block
            p, end = length, length + count
            while p < end:
                run = min(bs - p % bs, end - p)
                blk += [table[p // bs]] * run
                off += range(p % bs, p % bs + run)
                src += range(b * new_tokens + p - length, b * new_tokens + p - length + run)
                p += run
            self._lengths[b] = end
        device = self._key_pool.device
        copy_src, copy_dst, entries, blk, off, src, lengths = _upload(
            device, [copy_src, copy_dst, entries, blk, off, src, self._lengths]
        )
        for pool, new in ((self._key_pool, k_new), (self._value_pool, v_new)):
            if copy_dst.numel():
                pool[copy_dst] = pool[copy_src]
            rows = new.transpose(1, 2).reshape(batch * new_tokens, new.shape[1], new.shape[3])
            # the [num_blocks, block_size, kv_heads, head_dim] view: (block, row) pairs select [kv_heads, D]
            pool.transpose(1, 2).index_put_((blk, off), rows if num_new is None else rows[src])
        entries = entries.view(-1, 3)
        self._block_table[entries[:, 0], entries[:, 1]] = entries[:, 2].to(torch.int32)
        self._cache_seqlens.copy_(lengths)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Row b becomes old row beam_idx[b] (beam search), by sharing blocks: the block tables and lengths
        are gathered, reference counts go up for the blocks a row takes and down for those it leaves (a
        block no row holds returns to the free list); no K/V is copied. beam_idx: 1-D integer tensor of
        batch_size values in [0, batch_size), on the pools' device or the CPU (read on the host: one device
        sync)."""
        _validation.check_beam_idx(beam_idx, self.batch_size, self._block_table.device)
        idx = beam_idx.tolist()
        old = self._tables
        self._tables = [list(old[i]) for i in idx]
        self._lengths = [self._lengths[i] for i in idx]
        for table in self._tables:
            for block in table:
                self._refcounts[block] += 1
        for table in old:
            for block in table:
                self._drop(block)
        dev_idx = beam_idx.to(device=self._block_table.device, dtype=torch.long)
        self._block_table.copy_(self._block_table.index_select(0, dev_idx))
        self._cache_seqlens.copy_(self._cache_seqlens.index_select(0, dev_idx))

    def fork(self, src_row: int, dst_rows: int | Sequence[int], *, prefix_len: int | None = None) -> None:
        """Prefix sharing: each row of dst_rows gives back its own blocks and then holds the first prefix_len
        tokens of src_row (default: all of them) by sharing src_row's blocks (reference counts up; no K/V
        copied). The first append into a shared, partly filled block, by any of its rows, copies it."""
        what = "PagedKVCache.fork"
        src_row = _validation.check_index(what, "src_row", src_row, self.batch_size)
        dst_rows = _validation.check_rows(what, "dst_rows", dst_rows, self.batch_size)
        n = _validation.check_fork(what, src_row, dst_rows, prefix_len, self._lengths[src_row])
        shared = self._tables[src_row][: _cdiv(n, self.block_size)]
        for row in dst_rows:
            for block in shared:
                self._refcounts[block] += 1
            self._release_row(row)
            self._tables[row] = list(shared)
            self._lengths[row] = n
        (dst,) = _upload(self._key_pool.device, [dst_rows])
        self._block_table[dst] = self._block_table[src_row].clone()  # a copy: the source row is in the target
        self._cache_seqlens.index_fill_(0, dst, n)

    def release(self, rows: int | Sequence[int]) -> None:
        """Rows `rows` give back their blocks (to the free list where no other row holds them) and hold no
        token; a later append starts them afresh."""
        rows = _validation.check_rows("PagedKVCache.release", "rows", rows, self.batch_size)
        for row in rows:
            self._release_row(row)
        (dev_rows,) = _upload(self._key_pool.device, [rows])
        self._cache_seqlens.index_fill_(0, dev_rows, 0)

    # ------------------------------------------------------------------------------------------------------
    # Bookkeeping

    def _shared_tail(self, row: int) -> bool:
        """Whether the row's last block is partly filled and held by another row too (an append copies it)."""
        table = self._tables[row]
        return self._lengths[row] % self.block_size != 0 and self._refcounts[table[-1]] > 1

    def _check_append_room(self, what: str, counts: list[int]) -> None:
        """The rows' table room and the free blocks for an append of counts[b] tokens to row b, counting
        the copies of shared tails as the append makes them, in row order (a copy drops a reference, so a
        later row sharing that block may find it its own)."""
        needed, dropped = 0, {}
        for b, count in enumerate(counts):
            if count == 0:
                continue
            length, table = self._lengths[b], self._tables[b]
            blocks = _cdiv(length + count, self.block_size)
            _validation.check_row_room(
                what, b, length + count, blocks, self.max_blocks_per_seq, self.block_size
            )
            needed += blocks - len(table)
            if length % self.block_size and self._refcounts[table[-1]] - dropped.get(table[-1], 0) > 1:
                dropped[table[-1]] = dropped.get(table[-1], 0) + 1
                needed += 1
        _validation.check_pool_room(what, needed, len(self._free), self.num_blocks)

    def _take(self) -> int:
        block = self._free.pop()
        self._refcounts[block] = 1
        return block

    def _drop(self, block: int) -> None:
        self._refcounts[block] -= 1
        if self._refcounts[block] == 0:
            self._free.append(block)

    def _release_row(self, row: int) -> None:
        for block in self._tables[row]:
            self._drop(block)
        self._tables[row] = []
        self._lengths[row] = 0


# The seed API's initialize_kv_cache has a factory beside KVCache; the paged cache's is the class itself
# (same arguments, same object): an empty cache, every block free, every row empty.
initialize_paged_kv_cache = PagedKVCache


def paged_attention(
    q: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [batch, heads, seqlen_q, head_dim] over paged keys/values (pools you manage yourself;
    PagedKVCache manages them for you): key_pool, value_pool [num_blocks, kv_heads, block_size, head_dim],
    block_table int32 [batch, max_blocks_per_seq], cache_seqlens int32/int64 [batch] (values in [0,
    max_blocks_per_seq * block_size]): token p of row b is key_pool[block_table[b, p // block_size], :,
    p % block_size]. Masks as flash_attention, per row with offset cache_seqlens[b] - seqlen_q. Returns out
    [batch, heads, seqlen_q, head_dim] (and lse [batch, heads, seqlen_q], float32, with return_lse).
    Checks the lengths and the table entries they cover against the pools (two small device syncs).
    Inference only (a call that would record a gradient raises NotImplementedError)."""
    what = "paged_attention"
    _validation.check_bool(what, "return_lse", return_lse)
    dims = ("num_blocks", "kv_heads", "block_size", "head_dim")
    _validation.check_pools(what, key_pool, value_pool, ("key_pool", "value_pool"), dims)
    _validation.check_tensors(what, q=q)
    _validation.check_same_place(
        what,
        "q",
        q,
        "key_pool/value_pool",
        key_pool,
        "Convert q with `q.to(key_pool.dtype)` (or `.to(device)`).",
    )
    batch = q.shape[0] if q.dim() else 0
    num_blocks, kv_heads, block_size, head_dim = key_pool.shape
    like = key_pool.new_empty(batch, kv_heads, 0, head_dim)
    call = _check_call(what, q, like, causal, softmax_scale, window_size, backend, (key_pool, value_pool))
    _validation.check_block_table_tensor(what, block_table, batch, key_pool.device)  # the lengths' range
    seqlens, longest = _validation.check_cache_seqlens(
        what, cache_seqlens, batch, block_table.shape[1] * block_size, key_pool.device
    )
    _validation.check_block_table(what, block_table, seqlens, batch, num_blocks, block_size, key_pool.device)
    out, lse = _attention(q, key_pool, value_pool, block_table, seqlens, call, longest)
    return (out, lse) if return_lse else out


def attend(q: torch.Tensor, cache: PagedKVCache, call: api.CacheCall) -> torch.Tensor:
    """incremental_attention over a PagedKVCache, `call` from check_cache_call (the cache's tables are valid
    by construction: no device sync)."""
    return _attention(
        q, cache.key_pool, cache.value_pool, cache.block_table, cache.cache_seqlens, call, cache.length
    )[0]


def check_cache_call(
    what: str,
    q: torch.Tensor,
    cache: PagedKVCache,
    *,
    causal: bool,
    softmax_scale: float | None,
    window_size: tuple[int, int],
    backend: str,
    new: tuple[torch.Tensor, ...] = (),
) -> api.CacheCall:
    """Every check of an attention call over `cache` (with `new`, the tokens to append first)."""
    return _check_call(what, q, cache._like, causal, softmax_scale, window_size, backend, new)


def _check_call(what, q, like, causal, softmax_scale, window_size, backend, others) -> api.CacheCall:
    """q against a [batch, kv_heads, 0, head_dim] stand-in of the cache, the mask arguments, the backend,
    and no gradient to record (q and `others`, the tensors the call reads or appends)."""
    _validation.check_qkv(q, like, like, what=what)
    scale = _validation.check_scale(softmax_scale, q.shape[-1], what)
    left, right = _validation.canonical_window(causal, window_size, what)
    backend = _validation.pick_backend(backend, q.device, what)
    _validation.check_paged_grad(what, api._needs_grad(q, *others))
    _validation.check_paged_backend(what, backend, plain(q, *others))
    return api.CacheCall(scale, left, right, backend)


def _attention(q, key_pool, value_pool, block_table, cache_seqlens, call: api.CacheCall, max_seqlen_k: int):
    """(out, lse) of checked arguments. triton: the split-KV decode kernel reading the pools through the
    table (any number of queries: more than a group's 64 packed rows take several row blocks); torch: one
    blockwise call per row on its gathered keys/values (one device sync for the lengths)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    # no row holds more than max_seqlen_k keys: a bound hiding none of those is -1 (the kernel's int32
    # offsets would wrap on a huge one), as api.attention_with_seqlens does for dense rows
    left, right = api.normalise_window(call.left, call.right, q.shape[2], max_seqlen_k)
    call = call._replace(left=left, right=right)
    if call.backend == "triton":
        from .kernels import launch_decode

        return launch_decode.decode_forward(
            q,
            key_pool,
            value_pool,
            **call.mask(),
            cache_seqlens=cache_seqlens,
            block_table=block_table,
            max_seqlen_k=max_seqlen_k,
        )
    block_size = key_pool.shape[2]

    def kv_row(b: int, n: int):  # row b's n keys/values gathered from its blocks: [1, kv_heads, n, head_dim]
        blocks = block_table[b, : _cdiv(n, block_size)].long()
        return tuple(
            pool[blocks].transpose(0, 1).flatten(1, 2)[None, :, :n] for pool in (key_pool, value_pool)
        )

    return api.attention_per_row(q, (kv_row(b, n) for b, n in enumerate(cache_seqlens.tolist())), call)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _upload(device: torch.device, parts: list[list[int]]) -> list[torch.Tensor]:
    """Several lists of ints as int64 tensors on `device`, in one host-to-device copy (pinned and
    non-blocking on CUDA, so the host does not wait for the device)."""
    flat = torch.tensor([x for part in parts for x in part], dtype=torch.int64)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    return list(flat.split([len(part) for part in parts]))
