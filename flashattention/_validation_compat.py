"""Input checks of the flash-attn compatible functions (compat.py) and of the transformers integration
(integrations/transformers.py). The checks shared with the main API stay in _validation.py; these are
split off by concern (that file holds the main API's). Each error names the argument, what was expected,
what was given and how to fix it. The index checks of flash_attn_with_kvcache read the indices on the
host (one device sync), as every index of the package is checked before a kernel runs."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _validation


def check_unsupported(what: str, **features: object) -> None:
    """flash-attn (and transformers) features this package does not implement raise NotImplementedError
    naming the argument: dropout_p / dropout != 0, softcap != 0 (None is off too), alibi_slopes,
    block_table (varlen), s_aux (attention sinks), position_bias."""
    reasons = {
        "dropout_p": "attention dropout is not implemented (pass dropout_p=0.0, as in evaluation)",
        "dropout": "attention dropout is not implemented (set the model's attention_dropout to 0.0, or call "
        "model.eval())",
        "position_bias": "an additive position bias (T5-style) is not implemented",
        "softcap": "score soft-capping is not implemented (pass softcap=0.0)",
        "alibi_slopes": "ALiBi biases are not implemented (pass alibi_slopes=None)",
        "block_table": "a paged KV cache in the varlen function is not implemented; use "
        "flash_attn_with_kvcache(..., block_table=...)",
        "s_aux": "attention sinks (s_aux) are not implemented",
    }
    for name, value in features.items():
        if name in ("dropout_p", "dropout", "softcap") and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{what}: `{name}` must be a float, got {type(value).__name__}.")
            active = value != 0
        else:
            active = value is not None
        if active:
            raise NotImplementedError(f"{what}: `{name}`={_short(value)}: {reasons[name]}.")


def check_deterministic(what: str, deterministic: object) -> None:
    """Accepted either way: every backward of this package is deterministic already (no atomics)."""
    if not isinstance(deterministic, bool):
        raise TypeError(f"{what}: `deterministic` must be a bool, got {type(deterministic).__name__}.")


def _short(value: object) -> str:
    return f"tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


def flash_window(what: str, causal: object, window_size: object, seqlen_k: int) -> tuple[int, int]:
    """flash-attn 2's host rule for (causal, window_size), as a window (left, right) for flash_attention
    with causal=False: a negative bound is unbounded; a bound >= seqlen_k is unbounded; causal sets right
    to 0 (whatever right was given); a left bound with an unbounded right gets right = seqlen_k (which hides
    keys only when seqlen_q > seqlen_k + 1). seqlen_k: the keys' length (the cache's capacity for
    flash_attn_with_kvcache, max_seqlen_k for the varlen function)."""
    _validation.check_mask_types(what, causal, window_size)
    left, right = (w if 0 <= w < seqlen_k else -1 for w in window_size)
    if causal:
        right = 0
    if left >= 0 and right < 0:
        right = seqlen_k
    return left, right


def check_packed(what: str, name: str, packed: object, count: int) -> None:
    """qkv [batch, seqlen, 3, heads, head_dim] (count 3) or kv [batch, seqlen, 2, kv_heads, head_dim]."""
    _validation.check_tensors(what, **{name: packed})
    if packed.dim() != 5 or packed.shape[2] != count:
        heads = "heads" if count == 3 else "kv_heads"
        raise ValueError(
            f"{what}: `{name}` must be [batch, seqlen, {count}, {heads}, head_dim], got shape "
            f"{tuple(packed.shape)}."
        )


# ----------------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache


class KVCachePlan(NamedTuple):
    """The checked arguments of a flash_attn_with_kvcache call. Lengths and indices are on the cache's
    device; `ends` (int32 [batch]) is each row's end after the append (None: the whole capacity, no
    cache_seqlens); `starts` (int64, cache_leftpad) None for 0; `batch_idx` (int64) None for 0..batch-1."""

    batch: int
    capacity: int
    new_tokens: int
    paged: bool
    seqlens: torch.Tensor | None
    ends: torch.Tensor | None
    starts: torch.Tensor | None
    batch_idx: torch.Tensor | None
    longest: int


def check_kvcache(
    what: str,
    q: object,
    k_cache: object,
    v_cache: object,
    k: object,
    v: object,
    cache_seqlens: object,
    cache_batch_idx: object,
    cache_leftpad: object,
    block_table: object,
    rotary_cos: object,
    rotary_sin: object,
    rotary_interleaved: object,
    num_splits: object,
) -> KVCachePlan:
    """Every check of a flash_attn_with_kvcache call, before anything is written into the cache (one
    device sync reads the lengths and indices). Shapes (flash-attn's): q [batch, seqlen_q, heads, head_dim];
    k_cache, v_cache [batch_cache, capacity, kv_heads, head_dim], or with block_table [num_blocks,
    block_size, kv_heads, head_dim]; k, v [batch, seqlen_new, kv_heads, head_dim]."""
    _validation.check_tensors(what, q=q, k_cache=k_cache, v_cache=v_cache)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{what}: `{name}` must have 4 dimensions, got shape {tuple(t.shape)}.")
    _validation.check_twins(what, "k_cache", k_cache, "v_cache", v_cache)
    _validation.check_same_place(
        what, "q", q, "the cache", k_cache, "Convert q with `.to(dtype=..., device=...)`."
    )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(
                f"{what}: `{name}` needs stride 1 on its last dimension (it is written in place, so it is "
                f"never copied), got strides {t.stride()}."
            )
    batch = q.shape[0]
    paged = block_table is not None
    if paged:
        for name, value in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
            if value is not None:
                raise NotImplementedError(
                    f"{what}: `{name}` with a paged cache (block_table) is not supported (nor in "
                    f"flash-attn): the block table already says where each row's tokens are."
                )
        dims = ("num_blocks", "block_size", "kv_heads", "head_dim")
        block_size = _validation.check_pools(what, k_cache, v_cache, ("k_cache", "v_cache"), dims)
        _validation.check_block_table_tensor(what, block_table, batch, k_cache.device)  # capacity from it
        capacity = block_table.shape[1] * block_size
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is None and k_cache.shape[0] < batch:
            raise ValueError(
                f"{what}: k_cache holds {k_cache.shape[0]} rows but q has batch {batch}; without "
                f"cache_batch_idx row b of q reads cache row b."
            )
    _validation.check_qkv(q, _like(k_cache, batch), _like(k_cache, batch), "bshd", what)

    new_tokens = 0
    if (k is None) != (v is None):
        raise ValueError(f"{what}: pass both `k` and `v` (the new tokens to append) or neither.")
    if k is not None:
        _check_new(what, k, v, k_cache, batch)
        _validation.check_distinct_storage(what, ("k_cache", k_cache), ("v_cache", v_cache))
        new_tokens = k.shape[1]
        if cache_seqlens is None:
            raise ValueError(
                f"{what}: `k`/`v` are appended at each row's cache_seqlens; pass `cache_seqlens` (an int or "
                f"an int32 tensor [batch]) with them."
            )
    _validation.check_int(what, "num_splits", num_splits)
    if not isinstance(rotary_interleaved, bool):
        raise TypeError(
            f"{what}: `rotary_interleaved` must be a bool, got {type(rotary_interleaved).__name__}."
        )
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError(f"{what}: pass both `rotary_cos` and `rotary_sin`, or neither.")
    if rotary_cos is not None:
        _check_rotary(what, rotary_cos, rotary_sin, q, k, capacity)

    device = k_cache.device
    seqlens = None
    if cache_seqlens is not None:
        if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
            _check_seqlens_range(what, cache_seqlens, cache_seqlens, new_tokens, capacity)  # fits int32
            cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
        seqlens = _index_tensor(what, "cache_seqlens", cache_seqlens, batch, device)
    batch_idx = (
        None
        if cache_batch_idx is None
        else _index_tensor(what, "cache_batch_idx", cache_batch_idx, batch, device)
    )
    starts = (
        None if cache_leftpad is None else _index_tensor(what, "cache_leftpad", cache_leftpad, batch, device)
    )

    # one sync: the lowest and highest of each index tensor
    parts = [t for t in (seqlens, batch_idx, starts) if t is not None]
    if starts is not None:
        parts.append((seqlens if seqlens is not None else torch.full_like(starts, capacity)) - starts)
    scalars = [x for t in parts for x in (t.min(), t.max())]
    appending_twice = batch_idx is not None and new_tokens and batch > 1
    if appending_twice:  # in the same sync: whether two rows of q would append to one cache row
        ordered = batch_idx.sort().values
        scalars.append((ordered[1:] == ordered[:-1]).any().long())
    values = torch.stack(scalars).tolist() if parts and batch else []
    if appending_twice and values.pop():
        raise ValueError(
            f"{what}: `cache_batch_idx` names one cache row for two batch rows while k/v are appended: both "
            f"would write that row's positions, got {cache_batch_idx.tolist()}. Give each batch row its own "
            f"cache row, or append without cache_batch_idx."
        )
    lows_highs = iter(zip(values[0::2], values[1::2], strict=True))
    longest = capacity
    if seqlens is not None:
        low, high = next(lows_highs, (0, 0))
        _check_seqlens_range(what, low, high, new_tokens, capacity)
        longest = high + new_tokens
    if batch_idx is not None:
        low, high = next(lows_highs, (0, 0))
        if low < 0 or high >= k_cache.shape[0]:
            raise ValueError(
                f"{what}: `cache_batch_idx` must hold rows of k_cache in [0, {k_cache.shape[0]}), got values "
                f"in [{low}, {high}]."
            )
    if starts is not None:
        low, high = next(lows_highs, (0, 0))
        low_len, _ = next(lows_highs, (0, 0))
        if low < 0 or low_len < 0:
            raise ValueError(
                f"{what}: `cache_leftpad` must lie in [0, cache_seqlens[b]] for every row b (the row's "
                f"tokens are positions [cache_leftpad[b], cache_seqlens[b]) of the cache), got values in "
                f"[{low}, {high}] and some row with cache_leftpad > cache_seqlens."
            )
    ends = None if seqlens is None else seqlens + new_tokens
    if paged:
        _validation.check_block_table(
            what,
            block_table,
            ends if ends is not None else torch.full((batch,), capacity, dtype=torch.int32, device=device),
            batch,
            k_cache.shape[0],
            k_cache.shape[1],
            device,
        )
    return KVCachePlan(batch, capacity, new_tokens, paged, seqlens, ends, starts, batch_idx, longest)


def _check_seqlens_range(what: str, low: int, high: int, new_tokens: int, capacity: int) -> None:
    """cache_seqlens (lowest `low`, highest `high`) >= 0, and each + the new tokens within the capacity."""
    if low < 0:
        raise ValueError(
            f"{what}: `cache_seqlens` (each row's tokens before the append) must be >= 0, got values in "
            f"[{low}, {high}]."
        )
    if high + new_tokens > capacity:
        raise ValueError(
            f"{what}: `cache_seqlens` + the {new_tokens} new token(s) must lie in [0, {capacity}] (the "
            f"cache's capacity), got cache_seqlens in [{low}, {high}]. Use a larger cache (or shorter rows)."
        )


def _like(cache: torch.Tensor, batch: int) -> torch.Tensor:
    """A [batch, 0, kv_heads, head_dim] stand-in of the cache for check_qkv (BSHD)."""
    return cache.new_empty(batch, 0, cache.shape[2], cache.shape[3])


def _check_new(what: str, k: object, v: object, cache: torch.Tensor, batch: int) -> None:
    _validation.check_tensors(what, k=k, v=v)
    for name, t in (("k", k), ("v", v)):
        expected = (batch, t.shape[1] if t.dim() == 4 else -1, cache.shape[2], cache.shape[3])
        if t.dim() != 4 or tuple(t.shape) != expected:
            raise ValueError(
                f"{what}: `{name}` must be [batch={batch}, seqlen_new, kv_heads={cache.shape[2]}, "
                f"head_dim={cache.shape[3]}], got shape {tuple(t.shape)}."
            )
    _validation.check_twins(what, "k", k, "v", v)
    _validation.check_same_place(
        what, "k", k, "the cache", cache, "Convert k and v with `.to(dtype=..., device=...)`."
    )


def _check_rotary(what, cos, sin, q, k, capacity: int) -> None:
    if k is None:
        raise ValueError(
            f"{what}: rotary_cos/rotary_sin rotate q and the new k; pass `k` and `v` with them (flash-attn "
            f"applies rotary only to appended keys)."
        )
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{what}: `{name}` must be a 2-D float tensor [seqlen_ro, rotary_dim / 2].")
        if t.device != q.device:
            raise ValueError(f"{what}: `{name}` must be on q's device ({q.device}), got {t.device}.")
    if cos.shape != sin.shape:
        raise ValueError(
            f"{what}: rotary_cos and rotary_sin must have one shape, got {tuple(cos.shape)} and "
            f"{tuple(sin.shape)}."
        )
    if 2 * cos.shape[1] > q.shape[3] or cos.shape[1] == 0:
        raise ValueError(
            f"{what}: rotary_dim = 2 * rotary_cos.shape[1] = {2 * cos.shape[1]} must be in [2, head_dim="
            f"{q.shape[3]}]."
        )
    if cos.shape[0] < capacity:
        raise ValueError(
            f"{what}: rotary_cos/rotary_sin need a row per cache position (seqlen_ro >= {capacity}, the "
            f"cache's capacity), got seqlen_ro={cos.shape[0]}."
        )


def _index_tensor(what: str, name: str, t: object, batch: int, device: torch.device) -> torch.Tensor:
    """A 1-D int32/int64 tensor of batch values on `device` or the CPU; returned int64 on `device`."""
    _validation.check_row_values(what, name, t, batch, device, "row values (or an int, for cache_seqlens)")
    return t.to(device=device, dtype=torch.int64)


def check_kvcache_grad(what: str, needs_grad: bool) -> None:
    if needs_grad:
        raise NotImplementedError(
            f"{what}: inference only (as flash-attn's, it has no backward), got tensors that require grad "
            f"with grad mode on. Call it under torch.no_grad(), or use flash_attn_func to train."
        )


def token_pool_strides(what: str, cache: torch.Tensor) -> int:
    """cache [batch_cache, capacity, kv_heads, head_dim] read one token per page: token (b, s) is page
    b * m + s of a view whose page stride is the sequence stride; m = batch stride / sequence stride must be
    an int (any [batch, seqlen, ...] storage order, e.g. a contiguous cache, has that)."""
    sb, ss = cache.stride(0), cache.stride(1)
    if ss <= 0 or sb % ss or (cache.shape[0] - 1) * (sb // ss) + cache.shape[1] > 2**31 - 1:
        raise NotImplementedError(
            f"{what}: cache_leftpad on backend='triton' reads the cache as one-token pages, which needs its "
            f"batch stride to be a multiple of its sequence stride and fewer than 2**31 tokens in all, got "
            f"strides {cache.stride()} and shape {tuple(cache.shape)}. Pass a contiguous cache, or use "
            f"backend='torch'."
        )
    return sb // ss


# ----------------------------------------------------------------------------------------------------------
# transformers integration


def check_hf_mask(what: str, attention_mask: object, batch: int, seqlen_q: int, seqlen_k: int) -> None:
    """A transformers attention mask: None, or a 4-D bool / float tensor [batch, 1 or heads, seqlen_q,
    seqlen_k] (True / 0 = attend), as transformers' sdpa_mask builds it."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"{what}: `attention_mask` must be None or a 4-D tensor, got {type(attention_mask).__name__} (a "
            f"flex-attention BlockMask? use attn_implementation='flex_attention' for those)."
        )
    shape = tuple(attention_mask.shape)
    if attention_mask.dim() != 4 or shape[0] not in (1, batch) or shape[2:] != (seqlen_q, seqlen_k):
        raise ValueError(
            f"{what}: `attention_mask` must be [batch={batch}, 1 or heads, seqlen_q={seqlen_q}, "
            f"seqlen_k={seqlen_k}], got shape {shape}."
        )


def check_backend_name(what: str, backend: object) -> None:
    if backend not in _validation.BACKENDS:
        raise ValueError(f"{what}: `backend` must be one of {_validation.BACKENDS}, got {backend!r}.")
