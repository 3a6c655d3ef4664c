"""KVCache and the cache functions of the seed API: append, attend over the cache, reorder for beams.

Attention over the cache is `flash_attention` with bottom-right causal alignment: a new query i sees every
cached key j <= i + (cached_len - seqlen_q), which is exactly what incremental decoding needs.
"""

from __future__ import annotations

import torch

from . import _validation
from .api import flash_attention


class KVCache:
    """Keys and values of past tokens, [batch, kv_heads, capacity, head_dim] storage of which the first
    `length` positions are valid.

    `KVCache(keys, values)` holds exactly those tokens (the tensors become the storage, no copy). Appends
    past the capacity grow the storage (doubling, one copy), so an append never writes out of bounds.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, *, length: int | None = None) -> None:
        _validation.check_cache_tensors("KVCache", keys, values)
        if length is None:
            length = keys.shape[2]
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= keys.shape[2]:
            raise ValueError(f"KVCache: `length` must be an int in [0, {keys.shape[2]}], got {length!r}.")
        self._keys = keys
        self._values = values
        self.length = length

    @property
    def keys(self) -> torch.Tensor:
        """[batch, kv_heads, length, head_dim]: the valid keys (a view of the storage)."""
        return self._keys[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        """[batch, kv_heads, length, head_dim]: the valid values (a view of the storage)."""
        return self._values[:, :, : self.length]

    @property
    def capacity(self) -> int:
        return self._keys.shape[2]

    def __repr__(self) -> str:
        b, h, _, d = self._keys.shape
        return (
            f"KVCache(batch={b}, kv_heads={h}, head_dim={d}, length={self.length}, "
            f"capacity={self.capacity}, dtype={self._keys.dtype}, device={self._keys.device})"
        )

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, : self.length] = old[:, :, : self.length]
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


def update_kv_cache(kv_cache: KVCache, k_new: torch.Tensor, v_new: torch.Tensor) -> KVCache:
    """Appends k_new, v_new ([batch, kv_heads, new_tokens, head_dim]) in place and returns the cache.
    Past the capacity the storage grows (to at least twice its size): nothing is written out of bounds."""
    if not isinstance(kv_cache, KVCache):
        raise TypeError(f"update_kv_cache: `kv_cache` must be a KVCache, got {type(kv_cache).__name__}.")
    _validation.check_cache_tensors("update_kv_cache", k_new, v_new, like=kv_cache._keys)
    start, end = kv_cache.length, kv_cache.length + k_new.shape[2]
    kv_cache._reserve(end)
    kv_cache._keys[:, :, start:end] = k_new
    kv_cache._values[:, :, start:end] = v_new
    kv_cache.length = end
    return kv_cache


def incremental_attention(
    q: torch.Tensor,
    kv_cache: KVCache,
    causal: bool = True,
    *,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of new queries q [batch, heads, seqlen_q, head_dim] over every cached token (append the
    new tokens' keys/values first). causal is bottom-right aligned: the last query sees the whole cache."""
    if not isinstance(kv_cache, KVCache):
        raise TypeError(
            f"incremental_attention: `kv_cache` must be a KVCache, got {type(kv_cache).__name__}."
        )
    return flash_attention(
        q,
        kv_cache.keys,
        kv_cache.values,
        causal=causal,
        softmax_scale=softmax_scale,
        window_size=window_size,
        backend=backend,
    )


def flash_attention_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: KVCache | None = None,
    causal: bool = True,
    *,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    backend: str = "auto",
) -> tuple[torch.Tensor, KVCache]:
    """Appends k, v to kv_cache (a new cache holding them when None), then attends q over the whole cache.
    Returns (output [batch, heads, seqlen_q, head_dim], the cache)."""
    if kv_cache is None:
        _validation.check_cache_tensors("flash_attention_with_kv_cache", k, v)
        kv_cache = KVCache(k.clone(), v.clone())
    else:
        update_kv_cache(kv_cache, k, v)
    out = incremental_attention(
        q, kv_cache, causal, softmax_scale=softmax_scale, window_size=window_size, backend=backend
    )
    return out, kv_cache


def reorder_kv_cache(kv_cache: KVCache, beam_idx: torch.Tensor) -> KVCache:
    """In place: batch row b of the cache becomes old row beam_idx[b] (beam search). beam_idx: 1-D integer
    tensor of length batch with values in [0, batch); anything else raises."""
    if not isinstance(kv_cache, KVCache):
        raise TypeError(f"reorder_kv_cache: `kv_cache` must be a KVCache, got {type(kv_cache).__name__}.")
    _validation.check_beam_idx(beam_idx, kv_cache._keys.shape[0])
    idx = beam_idx.to(device=kv_cache._keys.device, dtype=torch.long)
    n = kv_cache.length
    kv_cache._keys[:, :, :n] = kv_cache._keys[:, :, :n].index_select(0, idx)
    kv_cache._values[:, :, :n] = kv_cache._values[:, :, :n].index_select(0, idx)
    return kv_cache
