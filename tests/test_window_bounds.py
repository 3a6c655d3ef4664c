"""Window bounds at and past the sequence lengths, up to huge Python ints (2**31 - 1, 2**40, 2**100): every
accepted value gives the reference's answer on every path that takes a window (dense forward and backward,
the decode kernel, the KV-cache functions with uniform and per-row lengths). The API turns a bound that hides
no key into -1 (api.normalise_window); these tests check that this is exact and that the kernels never see
a value whose offsets overflow."""

from __future__ import annotations

import itertools

import pytest
import torch
from _helpers import Case, assert_close_to_reference, case_params, check_attention

from flashattention import (
    KVCache,
    PagedKVCache,
    blockwise,
    flash_attention,
    incremental_attention,
    paged_attention,
)
from flashattention.api import normalise_window
from flashattention.reference import attention_reference, visible_mask

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32
BACKENDS = ["torch", "triton"]
HUGE = (2**31 - 1, 2**31, 2**40)

# Windows whose huge bounds overflowed int32 offsets in the kernels (zeros, lse -inf, zero dk/dv).
HUGE_WINDOW_CASES = [
    Case(1, 2, 1, 20, 33, 16, F32, window=(0, 2**31 - 1)),
    Case(1, 2, 2, 33, 20, 32, F16, window=(2**31 - 1, 0)),
    Case(1, 2, 1, 27, 27, 16, B16, window=(2**31 - 1, 2**31 - 1)),
    Case(1, 2, 2, 20, 37, 32, F32, window=(2**40, 3)),
    Case(1, 4, 2, 37, 20, 16, F16, window=(5, 2**40)),
    Case(1, 2, 1, 33, 33, 16, F32, causal=True, window=(2**31, -1)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", case_params(HUGE_WINDOW_CASES))
def test_huge_window_matches_reference(case: Case, backend: str, device: str) -> None:
    """Forward (out, lse) and backward (dq, dk, dv) against the oracle, which takes the window as given."""
    q, k, v, dout = case.inputs(device)
    check_attention(q, k, v, dout, backend=backend, **case.mask_kwargs())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "window", [(2**31 - 1, 0), (0, 2**31 - 1), (2**40, 2**40), (3, 2**100)], ids=lambda w: f"{w[0]}-{w[1]}"
)
def test_huge_window_decode_matches_reference(window, backend: str, device: str) -> None:
    """Few queries without gradients: on triton the split-KV decode kernel."""
    q, k, v, _ = Case(2, 4, 2, 3, 37, 32, F32).inputs(device)
    with torch.no_grad():
        out, lse = flash_attention(q, k, v, window_size=window, return_lse=True, backend=backend)
    # the oracle's mask arithmetic is int64: for 2**100 it gets the equivalent 2**62
    oracle_window = tuple(min(w, 2**62) for w in window)
    ref_out, ref_lse = attention_reference(q, k, v, window_size=oracle_window)
    same_out, same_lse = attention_reference(q, k, v, window_size=oracle_window, upcast=False)
    assert_close_to_reference("out", out, ref_out, same_out)
    assert_close_to_reference("lse", lse, ref_lse, same_lse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_row", [False, True], ids=["uniform", "per-row"])
def test_huge_window_kv_cache_matches_reference(per_row: bool, backend: str, device: str) -> None:
    """incremental_attention over a cache (per row: each row's own length and offset) with huge bounds."""
    lengths = [30, 1, 17] if per_row else [30, 30, 30]
    q, k, v, _ = Case(3, 4, 2, 2, 30, 16, F32).inputs(device)
    seqlens = torch.tensor(lengths, dtype=torch.int32) if per_row else None
    cache = KVCache(k, v, cache_seqlens=seqlens)
    for window in ((2**31 - 1, 0), (2**40, 2**31)):
        with torch.no_grad():
            out = incremental_attention(q, cache, causal=False, window_size=window, backend=backend)
        for b, n in enumerate(lengths):
            rows = slice(b, b + 1)
            args = (q[rows], k[rows, :, :n], v[rows, :, :n])
            ref, _ = attention_reference(*args, window_size=window)
            same, _ = attention_reference(*args, window_size=window, upcast=False)
            assert_close_to_reference(f"row {b} (length {n}), window {window}", out[rows], ref, same)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_window_paged_matches_reference(backend: str, device: str) -> None:
    """A PagedKVCache (blocks of 4, rows of 10, 1 and 7 tokens) through incremental_attention and
    paged_attention, 1 and 12 queries a row, with huge bounds: each row's reference."""
    lengths = [10, 1, 7]
    _, k, v, _ = Case(3, 4, 2, 1, 10, 16, F32).inputs(device)
    cache = PagedKVCache(3, 2, 16, num_blocks=12, block_size=4, dtype=F32, device=device)
    with torch.no_grad():
        cache.append(k, v, num_new=lengths)
    for seqlen_q, window in itertools.product((1, 12), ((-1, 2**31 - 1), (2**31 - 1, -1), (2**40, 2**31))):
        q = torch.randn(3, 4, seqlen_q, 16, device=device)
        with torch.no_grad():
            outs = (
                incremental_attention(q, cache, causal=False, window_size=window, backend=backend),
                paged_attention(
                    q, cache.key_pool, cache.value_pool, cache.block_table, cache.cache_seqlens,
                    window_size=window, backend=backend,
                ),
            )  # fmt: skip
        for (b, n), out in itertools.product(enumerate(lengths), outs):
            args = (q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n])
            ref, _ = attention_reference(*args, window_size=window)
            same, _ = attention_reference(*args, window_size=window, upcast=False)
            name = f"row {b} (length {n}), {seqlen_q} queries, window {window}"
            assert_close_to_reference(name, out[b : b + 1], ref, same)


def _boundary_values(seqlen: int) -> list[int]:
    return [-1, 0, *range(max(seqlen - 2, 0), seqlen + 2), *HUGE]


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1, 1), (5, 5), (3, 9), (9, 3), (0, 4), (4, 0)])
def test_normalise_window_is_exact(seqlen_q: int, seqlen_k: int) -> None:
    """The normalised window shows every (query, key) pair the given one shows (reference mask), for values
    around both thresholds (seqlen - 2 .. seqlen + 1 of both lengths) and huge ones; and it bounds what it
    keeps by the lengths (no value a kernel's int32 offsets cannot hold)."""
    values = sorted(set(_boundary_values(seqlen_q) + _boundary_values(seqlen_k)))
    for left, right in itertools.product(values, values):
        n_left, n_right = normalise_window(left, right, seqlen_q, seqlen_k)
        given = visible_mask(seqlen_q, seqlen_k, False, (left, right))
        normalised = visible_mask(seqlen_q, seqlen_k, False, (n_left, n_right))
        assert torch.equal(given, normalised), f"window {(left, right)} -> {(n_left, n_right)}"
        assert n_left == -1 or 0 <= n_left < max(seqlen_k - 1, 0), (left, n_left)
        assert n_right == -1 or 0 <= n_right < max(seqlen_q - 1, 0), (right, n_right)


@pytest.mark.parametrize(
    "window", [(8, 2), (9, 4), (10, 5), (2**40, 2**31 - 1)], ids=lambda w: f"{w[0]}-{w[1]}"
)
def test_normalised_window_gives_the_same_blockwise_result(window) -> None:
    """The torch backend's blockwise code with the given window (as it ran before normalising) and with the
    normalised one: bitwise the same outputs, lse and gradients (Sq 5, Sk 10: thresholds right 4, left 9)."""
    q, k, v, dout = Case(1, 2, 1, 5, 10, 16, F32).inputs("cpu")
    normalised = normalise_window(*window, 5, 10)
    results = []
    for left, right in (window, normalised):
        out, lse = blockwise.forward_stats(q, k, v, softmax_scale=0.25, left=left, right=right)
        grads = blockwise.attention_backward(
            dout, q, k, v, out, lse, softmax_scale=0.25, left=left, right=right
        )
        results.append((out, lse, *grads))
    for name, given, canon in zip(("out", "lse", "dq", "dk", "dv"), *results, strict=True):
        assert torch.equal(given, canon), f"{name}: window {window} vs normalised {normalised}"
