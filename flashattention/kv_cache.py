"""KVCache and the cache functions of the seed API: append, attend over the cache, reorder for beams.

Attention over the cache is `flash_attention` with bottom-right causal alignment: a new query i sees every
cached key j <= i + (cached_len - seqlen_q), which is exactly what incremental decoding needs. A cache with
per-row lengths (`cache_seqlens`) applies that rule per row, with the row's own length as cached_len.
update_kv_cache, incremental_attention, flash_attention_with_kv_cache and reorder_kv_cache also take a
PagedKVCache (paged_cache.py), which has per-row lengths always.
"""

from __future__ import annotations

import torch

from . import _validation, api, paged_cache
from .paged_cache import PagedKVCache


class KVCache:
    """Keys and values of past tokens, [batch, kv_heads, capacity, head_dim] storage of which the first
    `length` positions are valid.

    `KVCache(keys, values)` holds exactly those tokens (the tensors become the storage, no copy). Appends
    past the capacity grow the storage (doubling, one copy), so an append never writes out of bounds. The
    storage follows attention's rules, checked here: float16, bfloat16 or float32, kv_heads >= 1, head_dim
    in [8, 256].

    Per-row lengths: `KVCache(keys, values, cache_seqlens=lengths)` with lengths an int32/int64 tensor
    [batch] (on the keys' device or the CPU) of values in [0, capacity]: row b holds the first lengths[b]
    positions of its keys/values (e.g. right-padded prompts), so prompts of different lengths decode
    together. Then `cache_seqlens` is an int32 copy on the cache's device, `length` the longest row (one
    device sync here), and `keys`/`values` are still the first `length` positions: in a row shorter than
    that, the positions past its own length hold whatever the storage holds (padding, stale tokens), not
    tokens of that row. Appends write each row at its own length; attention reads each row's own tokens.

    CUDA graphs: with per-row lengths, a decode step (flash_attention_with_kv_cache, or update_kv_cache then
    incremental_attention, backend "triton") makes no host sync and can be captured; each replay appends at
    the device lengths and advances them. The storage cannot grow inside a capture: make it hold every
    replay's tokens (initialize_kv_cache's max_seq_len, or KVCache storage with room). After a captured
    append the host no longer knows the lengths: `length` reads them from the device (one sync each time),
    and so do later eager appends, for their capacity check.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        *,
        length: int | None = None,
        cache_seqlens: torch.Tensor | None = None,
    ) -> None:
        _validation.check_cache_storage("KVCache", keys, values)
        capacity = keys.shape[2]
        seqlens, longest = None, None
        if cache_seqlens is not None:
            seqlens, longest = _validation.check_cache_seqlens(
                "KVCache", cache_seqlens, keys.shape[0], capacity, keys.device
            )
        if length is None:
            length = capacity if longest is None else longest
        _validation.check_cache_length("KVCache", length, capacity, longest)
        self._keys = keys
        self._values = values
        self._cache_seqlens = seqlens
        self._length: int | None = length  # None: only the device knows (an append was captured)

    @property
    def length(self) -> int:
        """The longest row's token count (every row's, without per-row lengths). After an append captured in
        a CUDA graph, read from cache_seqlens on the device (a sync)."""
        if self._length is None:
            return int(self._cache_seqlens.max())
        return self._length

    @property
    def keys(self) -> torch.Tensor:
        """[batch, kv_heads, length, head_dim]: the valid keys (a view of the storage)."""
        return self._keys[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        """[batch, kv_heads, length, head_dim]: the valid values (a view of the storage)."""
        return self._values[:, :, : self.length]

    @property
    def cache_seqlens(self) -> torch.Tensor | None:
        """int32 [batch] on the cache's device: each row's token count; None when every row holds `length`.
        The cache's own tensor, updated in place by appends and reorders."""
        return self._cache_seqlens

    @property
    def capacity(self) -> int:
        return self._keys.shape[2]

    def __repr__(self) -> str:
        b, h, _, d = self._keys.shape
        per_row = "" if self._cache_seqlens is None else ", per-row lengths"
        length = "on the device" if self._length is None else self._length  # no sync
        return (
            f"KVCache(batch={b}, kv_heads={h}, head_dim={d}, length={length}{per_row}, "
            f"capacity={self.capacity}, dtype={self._keys.dtype}, device={self._keys.device})"
        )

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, : old.shape[2]] = old  # every position: rows may hold up to the old capacity
            setattr(self, name, new)


def initialize_kv_cache(
    batch_size: int,
    num_heads: int,
    max_seq_len: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> KVCache:
    """An empty cache with room for max_seq_len tokens: storage [batch_size, num_heads, max_seq_len,
    head_dim] (num_heads = the number of key/value heads). device: CUDA when available, else CPU."""
    _validation.check_cache_dims(batch_size, num_heads, max_seq_len, head_dim)
    if dtype not in _validation.SUPPORTED_DTYPES:
        raise TypeError(f"initialize_kv_cache: dtype must be float16, bfloat16 or float32, got {dtype}.")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (batch_size, num_heads, max_seq_len, head_dim)
    keys = torch.empty(shape, dtype=dtype, device=device)
    return KVCache(keys, torch.empty_like(keys), length=0)


def update_kv_cache(
    kv_cache: KVCache | PagedKVCache, k_new: torch.Tensor, v_new: torch.Tensor
) -> KVCache | PagedKVCache:
    """Appends k_new, v_new ([batch, kv_heads, new_tokens, head_dim]) in place and returns the cache.
    Past the capacity the storage grows (to at least twice its size): nothing is written out of bounds.
    With per-row lengths, row b's new tokens go to positions [cache_seqlens[b], cache_seqlens[b] +
    new_tokens) of its own row (one batched index_put, no device sync), and every row grows by new_tokens.

    Inside a CUDA graph capture (per-row lengths only: a uniform cache's host position would be frozen into
    the graph) the storage cannot grow; a replay that runs past the capacity stops at index_put's
    device-side bounds check, writing nothing out of bounds.

    A PagedKVCache: kv_cache.append(k_new, v_new) (blocks from its free list; raises before any write when
    the pool is exhausted)."""
    _validation.check_kv_cache("update_kv_cache", kv_cache, (KVCache, PagedKVCache))
    if isinstance(kv_cache, PagedKVCache):
        kv_cache.append(k_new, v_new)
        return kv_cache
    _validation.check_cache_tensors("update_kv_cache", k_new, v_new, like=kv_cache._keys)
    _validation.check_distinct_storage(
        "update_kv_cache", ("the cache's keys", kv_cache._keys), ("its values", kv_cache._values)
    )
    new_tokens = k_new.shape[2]
    capturing = _capturing(kv_cache._keys)
    if capturing:
        _validation.check_captured_append(
            kv_cache._cache_seqlens is not None, kv_cache._length, new_tokens, kv_cache.capacity
        )
        _append_per_row(kv_cache, k_new, v_new)
        kv_cache._cache_seqlens += new_tokens
        kv_cache._length = None  # replays advance the lengths on the device only
        return kv_cache
    start = kv_cache.length
    end = start + new_tokens
    kv_cache._reserve(end)
    if kv_cache._cache_seqlens is None:
        kv_cache._keys[:, :, start:end] = k_new
        kv_cache._values[:, :, start:end] = v_new
    else:
        _append_per_row(kv_cache, k_new, v_new)
        kv_cache._cache_seqlens += new_tokens
    if kv_cache._length is not None:
        kv_cache._length = end
    return kv_cache


def _capturing(storage: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (for the cache on `storage`'s device)."""
    return storage.is_cuda and torch.cuda.is_current_stream_capturing()


def _append_per_row(kv_cache: KVCache, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """Writes row b of k_new/v_new [batch, kv_heads, n, head_dim] at positions cache_seqlens[b] + [0, n)
    of the storage (which has room: the caller reserved length + n)."""
    batch, _, new_tokens, _ = k_new.shape
    device = kv_cache._keys.device
    positions = kv_cache._cache_seqlens.long()[:, None] + torch.arange(new_tokens, device=device)  # [B, n]
    rows = torch.arange(batch, device=device)[:, None].expand(-1, new_tokens)  # [B, n]
    # [batch, capacity, kv_heads, head_dim] views: the indexed positions come first, [B, n, kv_heads, D]
    kv_cache._keys.transpose(1, 2).index_put_((rows, positions), k_new.transpose(1, 2))
    kv_cache._values.transpose(1, 2).index_put_((rows, positions), v_new.transpose(1, 2))


def incremental_attention(
    q: torch.Tensor,
    kv_cache: KVCache | PagedKVCache,
    causal: bool = True,
    *,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of new queries q [batch, heads, seqlen_q, head_dim] over every cached token (append the
    new tokens' keys/values first). causal is bottom-right aligned: the last query sees the whole cache.

    With per-row lengths (kv_cache.cache_seqlens), row b attends over its own cache_seqlens[b] tokens with
    offset cache_seqlens[b] - seqlen_q (causal and window_size per row). backend="triton" runs that on the
    split-KV decode kernel: at most api.DECODE_MAX_QUERIES (16) queries per row and no gradient recorded,
    else NotImplementedError; backend="torch" runs anything (one blockwise call per row, reading the lengths
    on the host: not inside a CUDA graph capture). The triton path reads only the device lengths (graph-safe).

    A PagedKVCache: the same per-row rule over its pages, inference only (gradients raise
    NotImplementedError); backend="triton" runs the decode kernel for any number of queries per row."""
    what = "incremental_attention"
    _validation.check_kv_cache(what, kv_cache, (KVCache, PagedKVCache))
    if isinstance(kv_cache, PagedKVCache):
        mask = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size, backend=backend)
        return paged_cache.attend(q, kv_cache, paged_cache.check_cache_call(what, q, kv_cache, **mask))
    if kv_cache.cache_seqlens is None:  # flash_attention's work, its errors naming this function
        keys, values = kv_cache.keys, kv_cache.values
        return api.dense_attention(
            q, keys, values, causal, softmax_scale, window_size, False, backend, "bhsd", what
        )
    # The longest row bounds the keys (and the launcher's split count) where the host knows it; inside a
    # capture, or once only the device knows the lengths, the whole storage (each row reads its own length).
    if kv_cache._length is None or _capturing(kv_cache._keys):
        keys, values = kv_cache._keys, kv_cache._values
    else:
        keys, values = kv_cache.keys, kv_cache.values
    call = api.check_cache_call(
        "incremental_attention",
        q,
        keys,
        values,
        causal=causal,
        softmax_scale=softmax_scale,
        window_size=window_size,
        backend=backend,
        per_row=True,
    )
    return api.attention_with_seqlens(q, keys, values, kv_cache.cache_seqlens, call)


def flash_attention_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: KVCache | PagedKVCache | None = None,
    causal: bool = True,
    *,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    backend: str = "auto",
    cache_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache | PagedKVCache]:
    """Appends k, v ([batch, kv_heads, new_tokens, head_dim]) to kv_cache (a new cache holding them when
    None), then attends q [batch, heads, seqlen_q, head_dim] over the whole cache (as incremental_attention,
    per row for a cache with per-row lengths). Returns (output [batch, heads, seqlen_q, head_dim], the
    cache). Every argument is checked before anything is appended.

    cache_seqlens (with kv_cache=None only): int32/int64 [batch], starts a cache with per-row lengths from
    right-padded prompts: q, k, v [batch, *, padded_len, head_dim] padded alike, row b's first
    cache_seqlens[b] positions real. Query i of row b is token i and sees the row's keys j <= i (causal;
    window_size likewise, offset 0 within the prompt); outputs at padding positions are to be ignored (0
    when causal). On backend="triton" this takes padded_len <= 16 (the decode kernel); longer prompts:
    backend="torch", or KVCache(k, v, cache_seqlens=...) and your own prefill.

    A PagedKVCache: appends k, v to every row (PagedKVCache.append) and attends as incremental_attention;
    any number of new tokens (a prefill chunk) on either backend."""
    what = "flash_attention_with_kv_cache"
    _validation.check_new_cache_seqlens(what, kv_cache, cache_seqlens)
    if kv_cache is not None:
        _validation.check_kv_cache(what, kv_cache, (KVCache, PagedKVCache))
    if isinstance(kv_cache, PagedKVCache):
        mask = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size, backend=backend)
        call = paged_cache.check_cache_call(what, q, kv_cache, **mask, new=(k, v))
        kv_cache.append(k, v)
        return paged_cache.attend(q, kv_cache, call), kv_cache
    _validation.check_cache_tensors(what, k, v, like=None if kv_cache is None else kv_cache._keys)
    per_row = cache_seqlens is not None or (kv_cache is not None and kv_cache.cache_seqlens is not None)
    call = api.check_cache_call(
        what,
        q,
        k,
        v,
        causal=causal,
        softmax_scale=softmax_scale,
        window_size=window_size,
        backend=backend,
        per_row=per_row,
        cache_storage=() if kv_cache is None else (kv_cache._keys, kv_cache._values),
    )
    if cache_seqlens is not None:
        _validation.check_prompt_queries(what, q, k)
        # checked here too, so that an error names this function (KVCache checks them again: one more sync)
        _validation.check_cache_seqlens(what, cache_seqlens, k.shape[0], k.shape[2], k.device)
        kv_cache = KVCache(k.clone(), v.clone(), cache_seqlens=cache_seqlens)
        out = api.attention_right_padded(q, kv_cache.keys, kv_cache.values, kv_cache.cache_seqlens, call)
        return out, kv_cache
    if kv_cache is None:
        kv_cache = KVCache(k.clone(), v.clone())
    else:
        update_kv_cache(kv_cache, k, v)
    out = incremental_attention(
        q, kv_cache, causal, softmax_scale=softmax_scale, window_size=window_size, backend=backend
    )
    return out, kv_cache


def reorder_kv_cache(kv_cache: KVCache | PagedKVCache, beam_idx: torch.Tensor) -> KVCache | PagedKVCache:
    """In place: batch row b of the cache (and its length, with per-row lengths) becomes old row
    beam_idx[b] (beam search). beam_idx: 1-D integer tensor of length batch with values in [0, batch), on
    the cache's device or the CPU; anything else raises. A PagedKVCache: PagedKVCache.reorder (rows share
    blocks; no K/V copied)."""
    _validation.check_kv_cache("reorder_kv_cache", kv_cache, (KVCache, PagedKVCache))
    if isinstance(kv_cache, PagedKVCache):
        kv_cache.reorder(beam_idx)
        return kv_cache
    _validation.check_beam_idx(beam_idx, kv_cache._keys.shape[0], kv_cache._keys.device)
    _validation.check_distinct_storage(
        "reorder_kv_cache", ("the cache's keys", kv_cache._keys), ("its values", kv_cache._values)
    )
    idx = beam_idx.to(device=kv_cache._keys.device, dtype=torch.long)
    n = kv_cache.length
    kv_cache._keys[:, :, :n] = kv_cache._keys[:, :, :n].index_select(0, idx)
    kv_cache._values[:, :, :n] = kv_cache._values[:, :, :n].index_select(0, idx)
    if kv_cache._cache_seqlens is not None:
        kv_cache._cache_seqlens.copy_(kv_cache._cache_seqlens.index_select(0, idx))
        # repeated beams may drop the longest row: the host length is read again (one sync; check_beam_idx
        # synced already, so a reorder is never captured)
        if kv_cache._length is not None:
            seqlens = kv_cache._cache_seqlens
            kv_cache._length = int(seqlens.max()) if seqlens.numel() else 0
    return kv_cache
