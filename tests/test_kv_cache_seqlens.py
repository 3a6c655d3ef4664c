"""KV cache with per-row lengths (cache_seqlens), on both backends ("triton": the split-KV decode kernel,
in the interpreter on a CPU-only machine; "torch": one blockwise call per row), with the tolerance rule of
the README's pass rule against the float64 oracle on each row's own sliced K/V.

Storage positions past a row's length are NaN wherever a test sets them up: a read of one shows up as NaN in
the output, which never passes."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import Case, assert_close_to_reference

from flashattention import (
    KVCache,
    flash_attention_with_kv_cache,
    incremental_attention,
    reorder_kv_cache,
    update_kv_cache,
)
from flashattention.api import DECODE_MAX_QUERIES
from flashattention.reference import attention_reference

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32
BACKENDS = ("triton", "torch")


def _lengths(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor(lengths, dtype=torch.int32, device=device)


def _nan_past_lengths(lengths: list[int], *tensors: torch.Tensor) -> None:
    for b, n in enumerate(lengths):
        for t in tensors:
            t[b, :, n:] = math.nan


def _check_row(name: str, out_row, q_row, k_row, v_row, **mask) -> None:
    """The pass rule on one row's output [1, heads, seqlen_q, head_dim] against the oracle on (q, k, v)."""
    ref, _ = attention_reference(q_row, k_row, v_row, upcast=True, **mask)
    same, _ = attention_reference(q_row, k_row, v_row, upcast=False, **mask)
    assert_close_to_reference(name, out_row, ref, same)


def _params(cases: list[tuple[Case, list[int]]]) -> list:
    """(backend, case, lengths) for both backends, ids like triton-B2-H8-Hkv2-Sq3-Sk30-D40-fp16-lens0.1."""
    return [
        pytest.param(backend, case, lengths, id=f"{backend}-{case.id}-lens{'.'.join(map(str, lengths))}")
        for backend in BACKENDS
        for case, lengths in cases
    ]


# Case.seqlen_k is the capacity of the cache; lengths 0 and 1 in every case.
DECODE_CASES = [
    (Case(5, 8, 2, 1, 30, 40, F16, causal=True), [0, 1, 17, 30, 23]),
    (Case(4, 4, 1, 3, 37, 64, B16, causal=True, window=(5, -1)), [1, 37, 0, 9]),
    (Case(3, 4, 4, 3, 25, 72, F32), [25, 0, 1]),
    (Case(3, 4, 2, DECODE_MAX_QUERIES, 33, 40, F16, causal=True), [0, 33, 1]),
]


@pytest.mark.parametrize(("backend", "case", "lengths"), _params(DECODE_CASES))
def test_ragged_decode_matches_per_row_reference(backend, case: Case, lengths, device):
    """incremental_attention over a cache whose row b holds lengths[b] tokens == the oracle on the row's
    sliced K/V, with the row's own bottom-right offset (a row with no key gives 0)."""
    q, k, v, _ = case.inputs(device)
    _nan_past_lengths(lengths, k, v)
    cache = KVCache(k, v, cache_seqlens=_lengths(lengths, device))
    assert cache.length == max(lengths) and cache.keys.shape[2] == max(lengths)
    with torch.no_grad():
        out = incremental_attention(q, cache, case.causal, window_size=case.window, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    for b, n in enumerate(lengths):
        sl = slice(b, b + 1)
        _check_row(f"row {b} (length {n})", out[sl], q[sl], k[sl, :, :n], v[sl, :, :n], **case.mask_kwargs())


def test_appends_land_at_each_rows_position_and_survive_growth(device):
    """Row b's new tokens go to [lengths[b], lengths[b] + n) of its own row, in place while they fit; an
    append past the capacity grows the storage (at least doubling) and keeps every row's tokens."""
    lengths, capacity, shape = [3, 0, 5], 8, (3, 2, 8, 16)
    keys, values = torch.randn(shape, device=device), torch.randn(shape, device=device)
    rows_k = [keys[b, :, :n] for b, n in enumerate(lengths)]  # each row's tokens so far
    rows_v = [values[b, :, :n] for b, n in enumerate(lengths)]
    cache = KVCache(keys.clone(), values.clone(), cache_seqlens=torch.tensor(lengths))  # lengths on the CPU
    storage = cache._keys.data_ptr()
    for n_new, grows in ((2, False), (3, True)):
        k_new, v_new = (
            torch.randn(3, 2, n_new, 16, device=device),
            torch.randn(3, 2, n_new, 16, device=device),
        )
        before = cache._keys.clone()
        update_kv_cache(cache, k_new, v_new)
        rows_k = [torch.cat([r, k_new[b]], dim=1) for b, r in enumerate(rows_k)]
        rows_v = [torch.cat([r, v_new[b]], dim=1) for b, r in enumerate(rows_v)]
        lengths = [n + n_new for n in lengths]
        assert cache.cache_seqlens.tolist() == lengths and cache.length == max(lengths)
        assert cache.cache_seqlens.dtype == torch.int32 and cache.cache_seqlens.device == keys.device
        for b, n in enumerate(lengths):
            assert torch.equal(cache._keys[b, :, :n], rows_k[b]) and torch.equal(
                cache._values[b, :, :n], rows_v[b]
            )
        if grows:
            assert cache.capacity >= 2 * capacity
        else:
            assert cache._keys.data_ptr() == storage  # in place
            untouched = torch.ones(shape[0], shape[2], dtype=torch.bool)
            for b, n in enumerate(lengths):
                untouched[b, n - n_new : n] = False
            assert torch.equal(cache._keys.transpose(1, 2)[untouched], before.transpose(1, 2)[untouched])


# Case: the new tokens (seqlen_q) and the longest full row (seqlen_k); full row lengths beside it.
PREFILL_CASES = [
    (Case(4, 8, 2, 1, 20, 40, F16, causal=True), [7, 1, 20, 12]),
    (Case(3, 4, 1, 3, 19, 72, B16, causal=True, window=(5, -1)), [3, 19, 8]),
    (Case(3, 4, 4, 3, 17, 64, F32, causal=True), [17, 5, 3]),
]


@pytest.mark.parametrize(("backend", "case", "lengths"), _params(PREFILL_CASES))
def test_decode_over_ragged_cache_is_last_rows_of_prefill(backend, case: Case, lengths, device):
    """Row b's first lengths[b] - seqlen_q tokens in a ragged cache (the longest one filling the storage, so
    the append grows it), its last seqlen_q appended by flash_attention_with_kv_cache: the output == the
    last seqlen_q rows of that row's causal prefill over all lengths[b] tokens."""
    new = case.seqlen_q
    q, k, v, _ = Case(case.batch, case.heads, case.kv_heads, case.seqlen_k, case.seqlen_k, case.head_dim,
                      case.dtype).inputs(device)  # fmt: skip
    cached = [n - new for n in lengths]
    k_store, v_store = k[:, :, : max(cached)].clone(), v[:, :, : max(cached)].clone()
    _nan_past_lengths(cached, k_store, v_store)
    cache = KVCache(k_store, v_store, cache_seqlens=_lengths(cached, device))
    new_positions = torch.tensor(cached, device=device)[:, None] + torch.arange(new, device=device)

    def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, H, new, D]: row b's tokens lengths[b] - new + [0, new)
        return t[torch.arange(case.batch, device=device)[:, None], :, new_positions].transpose(1, 2)

    with torch.no_grad():
        out, cache = flash_attention_with_kv_cache(
            tokens(q), tokens(k), tokens(v), cache, window_size=case.window, backend=backend
        )
    assert cache.cache_seqlens.tolist() == lengths and cache.capacity >= 2 * max(cached)
    for b, n in enumerate(lengths):
        sl = slice(b, b + 1)
        ref, _ = attention_reference(q[sl, :, :n], k[sl, :, :n], v[sl, :, :n], **case.mask_kwargs())
        same, _ = attention_reference(q[sl, :, :n], k[sl, :, :n], v[sl, :, :n], upcast=False,
                                      **case.mask_kwargs())  # fmt: skip
        assert_close_to_reference(
            f"row {b} (length {n})", out[sl], ref[:, :, n - new :], same[:, :, n - new :]
        )


def test_reorder_keeps_lengths_with_rows(device):
    """reorder_kv_cache moves each row's length with its tokens, and the next append lands at the moved
    lengths."""
    lengths, beam_idx = [4, 0, 7, 2], [2, 2, 0, 3]
    keys, values = torch.randn(4, 2, 9, 16, device=device), torch.randn(4, 2, 9, 16, device=device)
    cache = KVCache(keys.clone(), values.clone(), cache_seqlens=_lengths(lengths, device))
    seqlens = cache.cache_seqlens
    reorder_kv_cache(cache, torch.tensor(beam_idx, device=device))
    moved = [lengths[i] for i in beam_idx]
    assert cache.cache_seqlens is seqlens and cache.cache_seqlens.tolist() == moved  # in place
    for b, i in enumerate(beam_idx):
        assert torch.equal(cache._keys[b, :, : moved[b]], keys[i, :, : moved[b]])
        assert torch.equal(cache._values[b, :, : moved[b]], values[i, :, : moved[b]])
    k_new = torch.randn(4, 2, 1, 16, device=device)
    update_kv_cache(cache, k_new, k_new)
    for b, n in enumerate(moved):
        assert torch.equal(cache._keys[b, :, n], k_new[b, :, 0])


def test_reorder_that_drops_the_longest_row_shortens_the_cache(device):
    """Beams that all continue the shorter row: `length` (the longest row) and the keys/values views follow,
    and appends up to the capacity do not grow the storage."""
    keys = torch.randn(2, 1, 8, 16, device=device)
    cache = KVCache(keys.clone(), keys.clone(), cache_seqlens=_lengths([3, 8], device))
    reorder_kv_cache(cache, torch.tensor([0, 0], device=device))
    assert cache.cache_seqlens.tolist() == [3, 3]
    assert cache.length == 3 and cache.keys.shape[2] == 3 and cache.values.shape[2] == 3
    storage = cache._keys
    for _ in range(5):
        update_kv_cache(
            cache, torch.randn(2, 1, 1, 16, device=device), torch.randn(2, 1, 1, 16, device=device)
        )
    assert cache.length == 8 and cache.capacity == 8 and cache._keys is storage


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_loop_matches_recomputing_each_row(backend, device):
    """Right-padded prompts of different lengths start a cache (flash_attention_with_kv_cache with
    cache_seqlens), then several steps each append one token per row whose q/k/v derive from the row's last
    output (greedy). Every output, prompt and steps, == the oracle's causal attention over that row's whole
    sequence recomputed from scratch."""
    heads, kv_heads, head_dim, dtype, steps = 4, 2, 40, F16, 4
    lengths = [5, 1, 9, 3]
    batch, padded = len(lengths), max(lengths)
    q, k, v, _ = Case(batch, heads, kv_heads, padded, padded, head_dim, dtype).inputs(device)
    _nan_past_lengths(lengths, k, v)  # padding keys must never be read
    proj = torch.randn(heads * head_dim, (heads + 2 * kv_heads) * head_dim, device=device) / head_dim
    with torch.no_grad():
        out, cache = flash_attention_with_kv_cache(
            q, k, v, cache_seqlens=_lengths(lengths, device), backend=backend
        )
        outs = [[out[b : b + 1, :, :n] for b, n in enumerate(lengths)]]
        seqs = [[t[b : b + 1, :, :n] for b, n in enumerate(lengths)] for t in (q, k, v)]
        last = torch.stack([out[b, :, n - 1] for b, n in enumerate(lengths)])  # [batch, heads, head_dim]
        for _ in range(steps):
            qkv = (last.float().flatten(1) @ proj).to(dtype).unflatten(1, (heads + 2 * kv_heads, 1, head_dim))
            step = qkv.split([heads, kv_heads, kv_heads], dim=1)  # q, k, v [batch, *, 1, head_dim]
            out, cache = flash_attention_with_kv_cache(*step, cache, backend=backend)
            outs.append([out[b : b + 1] for b in range(batch)])
            seqs = [
                [torch.cat([r, t[b : b + 1]], dim=2) for b, r in enumerate(s)]
                for s, t in zip(seqs, step, strict=True)
            ]
            last = out[:, :, 0]
    assert cache.cache_seqlens.tolist() == [n + steps for n in lengths]
    for b in range(batch):
        ours = torch.cat([o[b] for o in outs], dim=2)
        _check_row(f"row {b} (prompt {lengths[b]})", ours, *(s[b] for s in seqs), causal=True)


BAD_SEQLENS = [
    (torch.tensor([1.0, 2.0, 3.0]), TypeError, "int32 or int64"),
    ([1, 2, 3], TypeError, "torch.Tensor"),
    (torch.tensor([[1, 2, 3]]), ValueError, "1-D"),
    (torch.tensor([1, 2]), ValueError, r"shape \(3,\)"),
    (torch.tensor([1, -1, 2]), ValueError, "min -1"),
    (torch.tensor([1, 9, 2]), ValueError, r"\[0, 8\].*max 9"),
    (torch.tensor([1, 2, 3], device="meta"), ValueError, "the cache's device"),
    (torch.tensor([1, 2, 3]).to_sparse(), TypeError, "dense"),
]


@pytest.mark.parametrize(
    ("bad", "error", "fragment"),
    BAD_SEQLENS,
    ids=["float", "list", "2d", "wrong-length", "negative", "too-long", "meta", "sparse"],
)
def test_bad_cache_seqlens_raise_before_any_write(bad, error, fragment):
    """Each error names the function called (flash_attention_with_kv_cache, not the KVCache it builds)."""
    keys, values = torch.randn(3, 2, 8, 16), torch.randn(3, 2, 8, 16)
    with pytest.raises(error, match=f"^KVCache: .*{fragment}"):
        KVCache(keys, values, cache_seqlens=bad)
    q = torch.randn(3, 4, 8, 16)
    with pytest.raises(error, match=f"^flash_attention_with_kv_cache: .*{fragment}"):
        flash_attention_with_kv_cache(q, keys, values, cache_seqlens=bad, backend="torch")


def test_bad_calls_leave_a_ragged_cache_untouched():
    """cache_seqlens beside a cache, a wrong `length`, or a q that does not match: errors before any write."""
    cache = KVCache(torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16), cache_seqlens=torch.tensor([3, 5]))
    before = (cache._keys.clone(), cache.cache_seqlens.clone(), cache.length)
    k_new = torch.randn(2, 2, 1, 16)
    with pytest.raises(ValueError, match="kv_cache=None"):
        flash_attention_with_kv_cache(
            torch.randn(2, 4, 1, 16), k_new, k_new, cache, cache_seqlens=torch.tensor([1, 1])
        )
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention_with_kv_cache(torch.randn(2, 4, 1, 24), k_new, k_new, cache, backend="torch")
    with pytest.raises(ValueError, match="longest row"):
        KVCache(cache._keys, cache._values, length=4, cache_seqlens=torch.tensor([3, 5]))
    with pytest.raises(ValueError, match="padded length 8"):
        flash_attention_with_kv_cache(torch.randn(2, 4, 1, 16), cache._keys, cache._values,
                                      cache_seqlens=torch.tensor([3, 5]), backend="torch")  # fmt: skip
    assert torch.equal(cache._keys, before[0]) and torch.equal(cache.cache_seqlens, before[1])
    assert cache.length == before[2]


def test_triton_limits_raise_and_torch_runs_them(device):
    """backend="triton" with per-row lengths: more than DECODE_MAX_QUERIES queries, or gradients, raise
    NotImplementedError (an append that would precede it is not made); backend="torch" runs both."""
    many = DECODE_MAX_QUERIES + 1
    case = Case(2, 4, 2, many, 24, 40, F32, causal=True)
    q, k, v, _ = case.inputs(device)
    lengths = [24, 6]
    cache = KVCache(k.clone(), v.clone(), cache_seqlens=_lengths(lengths, device))
    with torch.no_grad(), pytest.raises(NotImplementedError, match=f"{many} queries.*backend='torch'"):
        incremental_attention(q, cache, backend="triton")
    with pytest.raises(NotImplementedError, match="gradients"):
        incremental_attention(q[:, :, :1].clone().requires_grad_(), cache, backend="triton")
    k_new = torch.randn(2, 2, many, 40, device=device)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="16"):
        flash_attention_with_kv_cache(q, k_new, k_new, cache, backend="triton")
    assert cache.length == 24 and cache.cache_seqlens.tolist() == lengths
    with torch.no_grad(), pytest.raises(NotImplementedError, match="16"):
        flash_attention_with_kv_cache(
            q, k_new, k_new, cache_seqlens=_lengths([3, many], device), backend="triton"
        )

    leaf = q.clone().requires_grad_()
    out = incremental_attention(leaf, cache, backend="torch")
    out.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    for b, n in enumerate(lengths):
        sl = slice(b, b + 1)
        _check_row(f"row {b}", out[sl].detach(), q[sl], k[sl, :, :n], v[sl, :, :n], causal=True)
