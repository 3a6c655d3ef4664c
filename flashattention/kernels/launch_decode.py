"""Thin launcher of the split-KV decode (kernels/decode.py): allocate the outputs and the float32 partials,
pick the split count and the grid, launch. Inputs are validated by the caller."""

from __future__ import annotations

import math

import torch
import triton

from .. import _env, _prefetch
from . import configs, hooks
from . import device as dev
from .decode import attn_decode_combine_kernel, attn_decode_kernel
from .launch import LOG2E, call_key, mask_args, precision, stride_unit, strides
from .plans import PLANS

# Packed query rows per program at most (a GQA group * seqlen_q above it takes several row blocks): bounds
# the [BLOCK_M, HEAD_DIM_PAD] float32 accumulator that a program keeps in registers.
MAX_BLOCK_M = 64
# The split count aims at this many waves of programs over the SMs (one: a second wave measured slower)...
WAVES = 1
# ...while giving each split at least this many keys, so that its fixed costs (the partials it writes, its
# share of the combine) stay small against its K/V reads.
# In the interpreter (a few "SMs", device.num_sms) a split of one 16-key tile, so that small tests split.
MIN_SPLIT_KEYS = 512
MIN_SPLIT_KEYS_INTERPRETED = 16
MAX_SPLITS = 128


def _visible_keys(capacity: int, seqlen_q: int, left: int, right: int) -> int:
    """An upper bound on the keys one program's rows can see: with a left bound they lie in
    [off - left, off + seqlen_q - 1 + max(right, 0)], else anywhere in the cache."""
    if left < 0:
        return capacity
    return min(capacity, left + seqlen_q + max(right, 0))


def num_splits_heuristic(programs: int, visible_keys: int, sms: int, min_split_keys: int) -> int:
    """Splits of each (batch, kv head, row block) program's keys: one when the programs already fill the
    SMs, else as many as keep programs * splits within WAVES programs per SM (rounding up would start a
    partial extra wave, which the whole call then waits for), with at least min_split_keys keys per split."""
    if programs >= sms:
        return 1
    return max(1, min(WAVES * sms // programs, visible_keys // min_split_keys, MAX_SPLITS))


def _interpreted(device: torch.device) -> bool:
    return _env.interpreting() or device.type != "cuda"


def _config(
    split: bool, head_dim_pad: int, dtype: torch.dtype, device: torch.device, paged: bool
) -> triton.Config:
    """A forced config (hooks, for sweeps), else the table's; 16-key tiles in the interpreter so that small
    tests cross tiles."""
    forced = (hooks.current.configs or {}).get("decode")
    if forced:
        return forced[0]
    if _interpreted(device):
        return configs.DECODE_INTERPRETED
    return configs.decode_config(split, head_dim_pad, dtype, paged)


def decode_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    left: int,
    right: int,
    cache_seqlens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [batch, heads, seqlen_q, head_dim]; k, v: [batch, kv_heads, capacity, head_dim] (cache views, any
    strides with stride 1 on the last dim); cache_seqlens: int32 [batch], each row's key count (<= capacity),
    or None for capacity keys everywhere. Window (left, right) as in the README's mask convention, -1 =
    unbounded, offset seqlen_k[b] - seqlen_q per row. num_splits None: num_splits_heuristic (from batch *
    kv_heads, the visible length bounded by max_seqlen_k or else the capacity, the SM count; no device
    sync).
    Paged (block_table: int32 [batch, max_blocks], stride 1 on the last dim; cache_seqlens required): k, v
    are block pools [num_blocks, kv_heads, block_size, head_dim] and key p of row b is k[block_table[b, p //
    block_size], :, p % block_size]; capacity = max_blocks * block_size. The table entries of keys below
    each row's length must lie in [0, num_blocks) (the caller checks them).
    Returns out [batch, heads, seqlen_q, head_dim] (q.dtype) and lse [batch, heads, seqlen_q] (float32,
    natural log; -inf with out 0 for a row that sees no key)."""
    batch, heads, seqlen_q, head_dim = q.shape
    kv_heads, page_size = k.shape[1], k.shape[2]
    paged = block_table is not None
    capacity = block_table.shape[1] * page_size if paged else page_size
    out = dev.empty((batch, heads, seqlen_q, head_dim), q.dtype, q.device)
    lse = dev.empty((batch, heads, seqlen_q), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    if capacity == 0:  # no keys in any row
        return out.zero_(), lse.fill_(-math.inf)

    group = heads // kv_heads
    rows = group * seqlen_q
    block_m = min(dev.pow2_at_least(rows), MAX_BLOCK_M)
    row_blocks = dev.cdiv(rows, block_m)
    programs = batch * kv_heads * row_blocks
    if num_splits is None:
        num_splits = num_splits_heuristic(
            programs,
            _visible_keys(capacity if max_seqlen_k is None else max_seqlen_k, seqlen_q, left, right),
            dev.num_sms(q.device),
            MIN_SPLIT_KEYS_INTERPRETED if _interpreted(q.device) else MIN_SPLIT_KEYS,
        )
    final = num_splits == 1
    total_rows = batch * heads * seqlen_q
    # float32 partials of every split (NaN-poisoned like the outputs: every element must be written)
    o_partial = None if final else dev.empty((num_splits, total_rows, head_dim), torch.float32, q.device)
    lse2_partial = None if final else dev.empty((num_splits, total_rows), torch.float32, q.device)

    tensors = dict(Q=q, K=k, V=v, O=out, LSE=lse, O_PARTIAL=o_partial, LSE2_PARTIAL=lse2_partial,
                   CACHE_SEQLENS=cache_seqlens, BLOCK_TABLE=block_table)  # fmt: skip
    # a call seen before (shapes, strides, dtypes, alignments, scalars) replays its compiled launches
    kind = ("decode", num_splits, cache_seqlens is not None, paged)
    key = call_key(
        kind, tuple(t for t in tensors.values() if t is not None), softmax_scale, left, right, q.dtype
    )
    if PLANS.replay(key, q.device, tensors, {}):
        return out, lse

    head_dim_pad = dev.pow2_at_least(head_dim)
    config = _config(not final, head_dim_pad, q.dtype, q.device, paged)
    _prefetch.wait()  # Triton's cache key, if the import-time thread is computing it
    unit = stride_unit(q, k, v, out)
    # what the split kernel and the combine both take
    shared = dict(**strides("o", out, unit), seqlen_q=seqlen_q, num_splits=num_splits, HEAD_DIM=head_dim,
                  HEAD_DIM_PAD=head_dim_pad, STRIDE_UNIT=unit)  # fmt: skip
    args = dict(
        tensors,
        **shared,
        **strides("q", q, unit),
        **strides("k", k, unit),
        **strides("v", v, unit),
        stride_tb=block_table.stride(0) if paged else 0,
        batch=batch,
        num_kv_heads=kv_heads,
        group=group,
        seqlen_k=capacity,
        qk_scale=softmax_scale * LOG2E,
        **mask_args(left, right),
        HAS_SEQLENS=cache_seqlens is not None,
        IS_PAGED=paged,
        PAGE_SIZE=page_size if paged else 1,
        FINAL=final,
        PRECISION=precision(q.dtype),
        BLOCK_M=block_m,
        **config.kwargs,
    )
    grid = (programs, num_splits)
    with dev.on(q.device):
        compiled = attn_decode_kernel[grid](**args, num_warps=config.num_warps, num_stages=config.num_stages)
        launches = [("", attn_decode_kernel, compiled, grid, args, None)]
        if not final:
            combine_args = dict(
                {name: tensors[name] for name in ("O_PARTIAL", "LSE2_PARTIAL", "O", "LSE")},
                **shared,
                num_heads=heads,
                total_rows=total_rows,
                SPLITS_PAD=dev.pow2_at_least(num_splits),
            )
            combine_grid = (total_rows,)
            # a [SPLITS_PAD, HEAD_DIM_PAD] float32 tile per program: 8 warps above 32 splits
            warps = 4 if num_splits <= 32 else 8
            compiled = attn_decode_combine_kernel[combine_grid](**combine_args, num_warps=warps)
            launches.append(("", attn_decode_combine_kernel, compiled, combine_grid, combine_args, None))
    PLANS.put(key, tuple(launches))
    return out, lse
