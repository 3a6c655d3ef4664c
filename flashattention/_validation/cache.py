"""Checks of the KV caches (KVCache, PagedKVCache, reorder_kv_cache, per-row lengths, block tables),
re-exported by _validation. A check that reads lengths, indices or table entries on the host says so: one
device sync."""

from __future__ import annotations

import torch

from . import (
    INTEGER_DTYPES,
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    SUPPORTED_DTYPES,
    check_dtype,
    check_int,
    check_row_values,
    check_same_place,
    check_tensors,
    check_twins,
    check_value_range,
)


def check_cache_dims(batch_size: object, num_heads: object, max_seq_len: object, head_dim: object) -> None:
    """Sizes given to initialize_kv_cache (the rules KVCache and attention apply to its storage)."""
    for name, value, least in (
        ("batch_size", batch_size, 0),
        ("num_heads", num_heads, 1),
        ("max_seq_len", max_seq_len, 0),
        ("head_dim", head_dim, MIN_HEAD_DIM),
    ):
        check_int("initialize_kv_cache", name, value, least)
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"initialize_kv_cache: head_dim must be between {MIN_HEAD_DIM} and {MAX_HEAD_DIM}, "
            f"got {head_dim}."
        )


def check_cache_tensors(what: str, keys: object, values: object, like: torch.Tensor | None = None) -> None:
    """keys/values of a cache or of an append: [batch, kv_heads, seqlen, head_dim], one dtype and device;
    with `like` (the cache storage), batch, heads, head_dim, dtype and device must match it."""
    _check_pair(what, ("keys", "values"), keys, values, "(batch, kv_heads, seqlen, head_dim)")
    if like is None:
        return
    b, h, _, d = like.shape
    if (keys.shape[0], keys.shape[1], keys.shape[3]) != (b, h, d):
        raise ValueError(
            f"{what}: new keys/values must be (batch={b}, kv_heads={h}, seqlen, head_dim={d}) to match the "
            f"cache, got {tuple(keys.shape)}."
        )
    check_same_place(
        what,
        "new keys/values",
        keys,
        "the cache",
        like,
        "Convert them with `.to(dtype=..., device=...)` or create the cache with "
        "initialize_kv_cache(..., dtype=..., device=...).",
    )


def _check_pair(what: str, names: tuple[str, str], keys: object, values: object, axes: str) -> None:
    """Keys and values (argument names `names`): tensors of 4 dimensions `axes`, one shape, dtype, device."""
    key_name, value_name = names
    check_tensors(what, **{key_name: keys, value_name: values})
    for name, t in ((key_name, keys), (value_name, values)):
        if t.dim() != 4:
            raise ValueError(f"{what}: `{name}` must have 4 dimensions {axes}, got shape {tuple(t.shape)}.")
    check_twins(what, key_name, keys, value_name, values)


def check_distinct_storage(what: str, a: tuple[str, torch.Tensor], b: tuple[str, torch.Tensor]) -> None:
    """The key and value caches an append writes are not one and the same memory (the values would
    overwrite the keys). Views that interleave in one buffer (a packed [..., 2, ...] kv) are fine: only the
    same view twice is refused."""
    (a_name, a_t), (b_name, b_t) = a, b
    if a_t.data_ptr() == b_t.data_ptr() and a_t.stride() == b_t.stride() and a_t.numel():
        raise ValueError(
            f"{what}: `{a_name}` and `{b_name}` are the same memory (one tensor passed twice?): appends "
            f"would write the values over the keys. Pass two tensors, e.g. `{b_name}.clone()`."
        )


def check_cache_storage(what: str, keys: object, values: object) -> None:
    """A KVCache's storage: check_cache_tensors, and what attention over it needs (a supported dtype, at
    least one kv head, head_dim in [MIN_HEAD_DIM, MAX_HEAD_DIM]), so that a cache attention would reject
    is rejected when it is made."""
    check_cache_tensors(what, keys, values)
    check_dtype(what, "keys", keys)
    kv_heads, head_dim = keys.shape[1], keys.shape[3]
    if kv_heads < 1:
        raise ValueError(
            f"{what}: `keys`/`values` [batch, kv_heads, seqlen, head_dim] need kv_heads >= 1 (attention "
            f"reads at least one key/value head), got shape {tuple(keys.shape)}."
        )
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"{what}: `keys`/`values` [batch, kv_heads, seqlen, head_dim] need head_dim between "
            f"{MIN_HEAD_DIM} and {MAX_HEAD_DIM} (as attention does), got shape {tuple(keys.shape)}. Pad a "
            f"smaller head dim with zeros (and pass the original softmax_scale), or split a larger one."
        )


def check_beam_idx(beam_idx: object, batch_size: int, device: torch.device) -> None:
    """A 1-D integer tensor of length batch_size with values in [0, batch_size), on the cache's `device` or
    the CPU. Syncs once (host check)."""
    check_row_values(
        "reorder_kv_cache", "beam_idx", beam_idx, batch_size, device, "source rows", INTEGER_DTYPES
    )
    check_value_range("reorder_kv_cache", "beam_idx", beam_idx, 0, batch_size - 1)


def check_cache_seqlens(
    what: str, cache_seqlens: object, batch_size: int, capacity: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Per-row cache lengths: a 1-D int32/int64 tensor of batch_size values in [0, capacity], on `device` or
    the CPU. Returns (an int32 copy on `device`, the longest row); syncs once (the range check)."""
    check_row_values(what, "cache_seqlens", cache_seqlens, batch_size, device, "token counts")
    why = " (the cache's capacity; each row holds at most the keys' seqlen dimension of tokens)"
    longest = max(0, check_value_range(what, "cache_seqlens", cache_seqlens, 0, capacity, why))
    return cache_seqlens.to(device=device, dtype=torch.int32, copy=True), longest


def check_cache_length(what: str, length: object, capacity: int, longest: int | None) -> None:
    """A cache's `length`: an int in [0, capacity]; with per-row lengths (longest = their max), that max."""
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(
            f"{what}: `length` must be an int in [0, {capacity}], got {type(length).__name__} {length!r}. "
            f"Pass a Python int, e.g. `length=int(...)`."
        )
    if not 0 <= length <= capacity:
        raise ValueError(f"{what}: `length` must be an int in [0, {capacity}], got {length!r}.")
    if longest is not None and length != longest:
        raise ValueError(
            f"{what}: `length` must be the longest row of `cache_seqlens` ({longest}), got {length}. Leave "
            f"`length` out when passing `cache_seqlens`."
        )


def check_seqlens_backend(
    what: str, backend: str, seqlen_q: int, max_queries: int, needs_grad: bool, plain: bool, capturing: bool
) -> None:
    """A cache with per-row lengths on the triton backend runs the split-KV decode kernel only: at most
    max_queries queries per row, no gradient recorded, eager plain tensors. Anything else raises. The torch
    backend reads the lengths on the host, which a CUDA graph capture (capturing) cannot."""
    if backend != "triton":
        if capturing:
            raise NotImplementedError(
                f"{what}: backend='torch' reads a cache's per-row lengths on the host (one call per row), "
                f"which cannot happen inside a CUDA graph capture. Capture with backend='triton' (the "
                f"split-KV decode kernel reads the lengths on the device)."
            )
        return
    problems = []
    if seqlen_q > max_queries:
        problems.append(f"{seqlen_q} queries per row (at most {max_queries})")
    if needs_grad:
        problems.append("gradients requested (inputs that require grad, with grad mode on)")
    if not plain:
        problems.append("tracing (torch.compile, a dispatch mode or tensor subclasses)")
    if problems:
        raise NotImplementedError(
            f"{what}: a cache with per-row lengths (cache_seqlens) runs, on backend='triton', only the "
            f"split-KV decode kernel, which takes at most {max_queries} queries per row, records no "
            f"gradient and runs eagerly; got {' and '.join(problems)}. Use backend='torch' (any device, "
            f"differentiable), or call with at most {max_queries} new queries under torch.no_grad()."
        )


def check_captured_append(per_row: bool, length: int | None, new_tokens: int, capacity: int) -> None:
    """An append inside a CUDA graph capture: only to a cache with per-row lengths (whose positions live on
    the device), and without growing the storage (checked where the host knows the longest row)."""
    if not per_row:
        raise NotImplementedError(
            "update_kv_cache: a cache without per-row lengths appends at a position the host keeps, which a "
            "CUDA graph would freeze (every replay writing the same position). To capture decode steps, give "
            "the cache device lengths: KVCache(keys, values, cache_seqlens=torch.full((batch,), length, "
            "dtype=torch.int32, device=keys.device))."
        )
    if length is not None and length + new_tokens > capacity:
        raise ValueError(
            f"update_kv_cache: appending {new_tokens} token(s) to rows of up to {length} needs capacity "
            f"{length + new_tokens}, but the cache holds {capacity} and cannot grow inside a CUDA graph "
            f"capture. Create the cache with room for every replay (initialize_kv_cache's max_seq_len, or "
            f"KVCache storage that long)."
        )


def check_prompt_queries(what: str, q: torch.Tensor, k: torch.Tensor) -> None:
    """Right-padded prompts (cache_seqlens with no cache): q is padded like k, one query per position."""
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"{what}: with `cache_seqlens` and no cache, q, k and v are right-padded prompts alike (query i "
            f"of row b is token i), so q needs k's padded length {k.shape[2]}, got seqlen_q={q.shape[2]}. "
            f"To attend only some queries, build the cache with KVCache(k, v, cache_seqlens=...) and call "
            f"incremental_attention."
        )


def check_kv_cache(what: str, kv_cache: object, cache_type: type | tuple[type, ...]) -> None:
    """`kv_cache` must be one of cache_type (KVCache, or KVCache and PagedKVCache)."""
    types = cache_type if isinstance(cache_type, tuple) else (cache_type,)
    if not isinstance(kv_cache, types):
        names = " or ".join(t.__name__ for t in types)
        raise TypeError(f"{what}: `kv_cache` must be a {names}, got {type(kv_cache).__name__}.")


def check_new_cache_seqlens(what: str, kv_cache: object, cache_seqlens: object) -> None:
    """`cache_seqlens` starts a new cache: it cannot come with an existing one (which has its own)."""
    if kv_cache is not None and cache_seqlens is not None:
        raise ValueError(
            f"{what}: `cache_seqlens` starts a new cache from right-padded prompts (kv_cache=None), but a "
            f"kv_cache was given too; its rows' lengths are `kv_cache.cache_seqlens`. Leave `cache_seqlens` "
            f"out to append to the cache, or pass kv_cache=None to start a new one."
        )


# ----------------------------------------------------------------------------------------------------------
# Paged KV cache (flashattention/paged_cache.py): pools, block tables, appends, forks, releases


def check_paged_dims(
    batch_size: object,
    num_kv_heads: object,
    head_dim: object,
    num_blocks: object,
    block_size: object,
    max_blocks_per_seq: object,
    dtype: object,
) -> int:
    """Sizes given to PagedKVCache / initialize_paged_kv_cache; returns max_blocks_per_seq (default
    num_blocks: one row may hold the whole pool)."""
    what = "PagedKVCache"
    for name, value, least in (
        ("batch_size", batch_size, 0),
        ("num_kv_heads", num_kv_heads, 1),
        ("head_dim", head_dim, MIN_HEAD_DIM),
        ("num_blocks", num_blocks, 0),
        ("block_size", block_size, 1),
        ("max_blocks_per_seq", num_blocks if max_blocks_per_seq is None else max_blocks_per_seq, 0),
    ):
        check_int(what, name, value, least)
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"{what}: head_dim must be between {MIN_HEAD_DIM} and {MAX_HEAD_DIM}, got {head_dim}."
        )
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}: dtype must be float16, bfloat16 or float32, got {dtype}.")
    return num_blocks if max_blocks_per_seq is None else max_blocks_per_seq


def check_paged_grad(what: str, needs_grad: bool) -> None:
    """The paged cache is for inference: nothing that would record a gradient."""
    if needs_grad:
        raise NotImplementedError(
            f"{what}: the paged KV cache is inference-only and records no gradient, got tensors that require "
            f"grad with grad mode on. Call it under torch.no_grad() (or pass detached tensors); for training "
            f"use flash_attention on dense tensors."
        )


def check_paged_backend(what: str, backend: str, plain: bool) -> None:
    """backend="triton" runs the decode kernel eagerly; tracing it is not supported."""
    if backend == "triton" and not plain:
        raise NotImplementedError(
            f"{what}: paged attention on backend='triton' runs eagerly only, got tracing (torch.compile, a "
            f"dispatch mode or tensor subclasses). Call it outside the compiled region, or use "
            f"backend='torch'."
        )


def check_num_new(what: str, num_new: object, batch_size: int, new_tokens: int) -> list[int]:
    """Per-row token counts of an append: a list/tuple of batch_size ints in [0, new_tokens]."""
    if not isinstance(num_new, (list, tuple)) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in num_new
    ):
        raise TypeError(
            f"{what}: `num_new` must be a list or tuple of ints (row b appends its first num_new[b] new "
            f"tokens), got {num_new!r}. Use `lengths.tolist()` for a tensor."
        )
    if len(num_new) != batch_size or any(not 0 <= n <= new_tokens for n in num_new):
        raise ValueError(
            f"{what}: `num_new` must hold one count per row ({batch_size}) in [0, {new_tokens}] (the new "
            f"tokens' seqlen dimension), got {list(num_new)}."
        )
    return list(num_new)


def check_row_room(what: str, row: int, length: int, blocks: int, max_blocks: int, block_size: int) -> None:
    """A row of `length` tokens needs `blocks` table entries; its table has max_blocks."""
    if blocks > max_blocks:
        raise ValueError(
            f"{what}: row {row} would hold {length} tokens = {blocks} blocks of {block_size}, but its block "
            f"table has {max_blocks} entries (max_blocks_per_seq). Nothing was written. Create the cache "
            f"with a larger max_blocks_per_seq, or release rows that are done."
        )


def check_pool_room(what: str, needed: int, free: int, num_blocks: int) -> None:
    """An operation that takes `needed` blocks from the free list of `free` (pool of num_blocks)."""
    if needed > free:
        raise ValueError(
            f"{what}: the block pool is exhausted: this call needs {needed} new blocks (including copies of "
            f"shared partly filled blocks) but {free} of {num_blocks} are free. Nothing was written. Release "
            f"finished rows (cache.release(rows)) or create the cache with more num_blocks."
        )


def check_rows(what: str, name: str, rows: object, batch_size: int) -> list[int]:
    """Row (or block) indices: an int or a list/tuple of distinct ints in [0, batch_size)."""
    values = [rows] if isinstance(rows, int) and not isinstance(rows, bool) else rows
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(r, int) and not isinstance(r, bool) for r in values
    ):
        raise TypeError(f"{what}: `{name}` must be an int or a list/tuple of ints, got {rows!r}.")
    bad = [r for r in values if not 0 <= r < batch_size]
    if bad or len(set(values)) != len(values):
        raise ValueError(
            f"{what}: `{name}` must be distinct indices in [0, {batch_size}), got {list(values)}"
            f"{f' (out of range: {bad})' if bad else ' (repeated)'}."
        )
    return list(values)


def check_index(what: str, name: str, index: object, count: int) -> int:
    """One row (or block) index: an int (not a list of them) in [0, count); returns it."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(
            f"{what}: `{name}` must be one int (a single index in [0, {count})), got {type(index).__name__} "
            f"{index!r}. It takes one index: call it once per index, each a Python int (e.g. `int(...)`)."
        )
    if not 0 <= index < count:
        raise ValueError(f"{what}: `{name}` must be an index in [0, {count}), got {index} (out of range).")
    return index


def check_fork(what: str, src_row: object, dst_rows: list[int], prefix_len: object, src_len: int) -> int:
    """fork(src_row, dst_rows, prefix_len): src not among dst, prefix_len in [0, src's length]; returns it."""
    if src_row in dst_rows:
        raise ValueError(f"{what}: `dst_rows` {dst_rows} must not contain the source row {src_row}.")
    if prefix_len is None:
        return src_len
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
        raise TypeError(
            f"{what}: `prefix_len` must be an int in [0, {src_len}] or None, got {type(prefix_len).__name__} "
            f"{prefix_len!r}. Pass a Python int, e.g. `prefix_len=int(...)`."
        )
    if not 0 <= prefix_len <= src_len:
        raise ValueError(
            f"{what}: `prefix_len` must be an int in [0, {src_len}] (row {src_row}'s length) or None for the "
            f"whole row, got {prefix_len!r}."
        )
    return prefix_len


def check_pools(
    what: str, key_pool: object, value_pool: object, names: tuple[str, str], dims: tuple[str, ...]
) -> int:
    """Block pools (argument names `names`) of 4 dimensions `dims` (e.g. num_blocks, kv_heads, block_size,
    head_dim), one shape, dtype and device, a supported dtype, block_size >= 1 (the block table counts in
    blocks). Returns block_size."""
    key_name, value_name = names
    axes = f"[{', '.join(dims)}]"
    _check_pair(what, names, key_pool, value_pool, axes)
    check_dtype(what, key_name, key_pool)
    block_size = key_pool.shape[dims.index("block_size")]
    if block_size < 1:
        raise ValueError(
            f"{what}: the pools `{key_name}`/`{value_name}` {axes} need block_size >= 1, got shape "
            f"{tuple(key_pool.shape)} (block_size={block_size}). Allocate at least one token per block."
        )
    return block_size


def check_block_table_tensor(what: str, block_table: object, batch_size: int, device: torch.device) -> None:
    """A block table's type and shape: int32 [batch_size, max_blocks] on `device`, stride 1 on the last dim
    (checked before the lengths, whose range it gives)."""
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(
            f"{what}: `block_table` must be a torch.Tensor of int32 block indices [batch={batch_size}, "
            f"max_blocks_per_seq], got {type(block_table).__name__}. Use `torch.tensor(table, "
            f"dtype=torch.int32, device=...)`."
        )
    check_tensors(what, block_table=block_table)  # dense
    if block_table.dtype != torch.int32:
        raise TypeError(
            f"{what}: `block_table` must be int32 block indices, got dtype {block_table.dtype}. Use "
            f"`block_table.to(torch.int32)`."
        )
    if block_table.dim() != 2 or block_table.shape[0] != batch_size:
        raise ValueError(
            f"{what}: `block_table` must be 2-D [batch={batch_size}, max_blocks_per_seq], got shape "
            f"{tuple(block_table.shape)}."
        )
    if block_table.device != device:
        raise ValueError(
            f"{what}: `block_table` must be on the pools' device ({device}), got {block_table.device}."
        )
    if block_table.stride(-1) != 1 and block_table.shape[1] > 1:
        raise ValueError(
            f"{what}: `block_table` needs stride 1 on its last dim; pass `block_table.contiguous()`."
        )


def check_block_table(
    what: str,
    block_table: object,
    cache_seqlens: torch.Tensor,
    batch_size: int,
    num_blocks: int,
    block_size: int,
    device: torch.device,
) -> None:
    """A block table (check_block_table_tensor) whose entries that a row's length covers (the first
    cdiv(cache_seqlens[b], block_size)) are in [0, num_blocks). Checks the entries on the device and syncs
    once. cache_seqlens: the checked int32 lengths on `device`; block_size >= 1 (check_pools)."""
    check_block_table_tensor(what, block_table, batch_size, device)
    if block_table.numel() == 0:
        return
    used = (cache_seqlens.long()[:, None] + block_size - 1) // block_size  # [batch, 1] entries covered
    covered = torch.arange(block_table.shape[1], device=device)[None, :] < used
    bad = covered & ((block_table < 0) | (block_table >= num_blocks))
    count, first = torch.stack([bad.sum(), bad.flatten().int().argmax()]).tolist()
    if count:
        row, col = divmod(first, block_table.shape[1])
        raise ValueError(
            f"{what}: `block_table` entries covered by a row's length must be block indices in [0, "
            f"{num_blocks}) (the pools' first dim); got {count} outside, the first block_table[{row}, {col}] "
            f"= {int(block_table[row, col])} (row {row} holds {int(cache_seqlens[row])} tokens = "
            f"{int(used[row])} blocks of {block_size})."
        )
