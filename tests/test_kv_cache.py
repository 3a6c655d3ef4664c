"""KV cache API of the seed: appends, growth, decode == last rows of prefill, beam reordering, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashattention import (
    KVCache,
    flash_attention,
    flash_attention_with_kv_cache,
    incremental_attention,
    initialize_kv_cache,
    reorder_kv_cache,
    update_kv_cache,
)
from flashattention.reference import attention_reference


def _qkv(batch, heads, kv_heads, seqlen, head_dim, device, dtype=torch.float32):
    q = torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, seqlen, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, kv_heads, seqlen, head_dim, device=device, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_token_by_token_decode_matches_causal_prefill(device, backend):
    """decode == last row of prefill: tokens fed one by one through the cache give causal attention."""
    batch, heads, kv_heads, seqlen, head_dim = 2, 4, 2, 11, 32
    q, k, v = _qkv(batch, heads, kv_heads, seqlen, head_dim, device)
    cache = initialize_kv_cache(batch, kv_heads, 4, head_dim, device=device)  # grows twice on the way
    outs = []
    for t in range(seqlen):
        update_kv_cache(cache, k[:, :, t : t + 1], v[:, :, t : t + 1])
        outs.append(incremental_attention(q[:, :, t : t + 1], cache, causal=True, backend=backend))
    ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(torch.cat(outs, dim=2).double(), ref, atol=2e-5, rtol=0)
    assert cache.length == seqlen and cache.capacity >= seqlen
    torch.testing.assert_close(cache.keys, k, atol=0, rtol=0)
    torch.testing.assert_close(cache.values, v, atol=0, rtol=0)


def test_chunked_prefill_with_kv_cache(device):
    """A prompt in two chunks through flash_attention_with_kv_cache == one causal pass over the prompt."""
    q, k, v = _qkv(1, 2, 2, 40, 16, device)
    out1, cache = flash_attention_with_kv_cache(q[:, :, :25], k[:, :, :25], v[:, :, :25], kv_cache=None)
    out2, cache = flash_attention_with_kv_cache(q[:, :, 25:], k[:, :, 25:], v[:, :, 25:], kv_cache=cache)
    full = flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(torch.cat([out1, out2], dim=2), full, atol=1e-5, rtol=0)
    assert cache.length == 40


def test_kvcache_from_tensors_holds_them_and_appends(device):
    keys, values = torch.randn(2, 3, 5, 16, device=device), torch.randn(2, 3, 5, 16, device=device)
    cache = KVCache(keys, values)
    assert cache.length == 5 and torch.equal(cache.keys, keys) and torch.equal(cache.values, values)
    k_new, v_new = torch.randn(2, 3, 2, 16, device=device), torch.randn(2, 3, 2, 16, device=device)
    update_kv_cache(cache, k_new, v_new)
    assert torch.equal(cache.keys, torch.cat([keys, k_new], dim=2))
    assert torch.equal(cache.values, torch.cat([values, v_new], dim=2))


def test_reorder_kv_cache_matches_index_select(device):
    cache = KVCache(torch.randn(6, 2, 7, 16, device=device), torch.randn(6, 2, 7, 16, device=device))
    keys, values = cache.keys.clone(), cache.values.clone()
    beam_idx = torch.tensor([1, 0, 2, 5, 3, 3], device=device)
    reorder_kv_cache(cache, beam_idx)
    assert torch.equal(cache.keys, keys[beam_idx]) and torch.equal(cache.values, values[beam_idx])


@pytest.mark.parametrize(
    "beam_idx, error, fragment",
    [
        (torch.tensor([0, 1, 3]), ValueError, "[0, 2]"),
        (torch.tensor([0, -1, 2]), ValueError, "min -1"),
        (torch.tensor([0, 1]), ValueError, "shape (3,)"),
        (torch.tensor([[0, 1, 2]]), ValueError, "1-D"),
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, "integer"),
        ([0, 1, 2], TypeError, "torch.Tensor"),
        (
            torch.tensor([0, 1, 2], device="meta"),
            ValueError,
            "on the cache's device (cpu) or the CPU, got meta",
        ),
        (torch.tensor([0, 1, 2]).to_sparse(), TypeError, "dense"),
    ],
    ids=["too-large", "negative", "wrong-length", "2d", "float", "list", "meta-device", "sparse"],
)
def test_reorder_rejects_bad_beam_indices(beam_idx, error, fragment):
    cache = KVCache(torch.randn(3, 2, 4, 16), torch.randn(3, 2, 4, 16))
    before = cache.keys.clone()
    with pytest.raises(error, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        reorder_kv_cache(cache, beam_idx)
    assert torch.equal(cache.keys, before)  # nothing was moved


def test_update_rejects_mismatched_tokens():
    cache = initialize_kv_cache(2, 4, 8, 16, device="cpu")
    with pytest.raises(ValueError, match="kv_heads=4"):
        update_kv_cache(cache, torch.randn(2, 3, 1, 16), torch.randn(2, 3, 1, 16))
    with pytest.raises(TypeError, match="float16"):
        update_kv_cache(cache, torch.randn(2, 4, 1, 16).half(), torch.randn(2, 4, 1, 16).half())
    with pytest.raises(ValueError, match="one shape"):
        update_kv_cache(cache, torch.randn(2, 4, 1, 16), torch.randn(2, 4, 2, 16))
    # another device is a ValueError (README "Errors"), another dtype a TypeError
    with pytest.raises(
        ValueError, match=r"must match the cache \(torch.float32 on cpu\), got torch.float32 on meta"
    ):
        update_kv_cache(
            cache, torch.randn(2, 4, 1, 16, device="meta"), torch.randn(2, 4, 1, 16, device="meta")
        )
    with pytest.raises(TypeError, match=r"`keys` must be a dense \(strided\) tensor"):
        update_kv_cache(cache, torch.randn(2, 4, 1, 16).to_sparse(), torch.randn(2, 4, 1, 16).to_sparse())
    assert cache.length == 0


def test_initialize_defaults_and_errors():
    cache = initialize_kv_cache(1, 2, 3, 8)
    assert cache._keys.dtype == torch.float32 and cache.length == 0 and cache.capacity == 3
    assert cache.keys.shape == (1, 2, 0, 8)
    assert cache.keys.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="head_dim"):
        initialize_kv_cache(1, 2, 3, 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        initialize_kv_cache(1, 2, -1, 8)
    with pytest.raises(TypeError, match="dtype"):
        initialize_kv_cache(1, 2, 3, 8, dtype=torch.float64)
    # the rules attention applies, at construction: at least one kv head; sizes are ints (TypeError)
    with pytest.raises(ValueError, match="`num_heads` must be an int >= 1, got 0"):
        initialize_kv_cache(1, 0, 3, 8)
    with pytest.raises(TypeError, match=r"`batch_size` must be an int >= 0, got int64"):
        initialize_kv_cache(np.int64(1), 2, 3, 8)
    with pytest.raises(TypeError, match=r"`max_seq_len` must be an int >= 0, got float 3.0"):
        initialize_kv_cache(1, 2, 3.0, 8)
    with pytest.raises(TypeError, match=r"`head_dim` must be an int >= 8, got bool"):
        initialize_kv_cache(1, 2, 3, True)


@pytest.mark.parametrize(
    "keys, error, fragment",
    [
        (torch.zeros(2, 1, 4, 16, dtype=torch.int64), TypeError, "`keys` has dtype torch.int64"),
        (torch.zeros(2, 1, 4, 4), ValueError, r"head_dim between 8 and 256 .*got shape \(2, 1, 4, 4\)"),
        (torch.zeros(2, 1, 4, 264), ValueError, r"head_dim between 8 and 256"),
        (torch.zeros(2, 0, 4, 16), ValueError, r"kv_heads >= 1 .*got shape \(2, 0, 4, 16\)"),
        (torch.zeros(2, 1, 4, 16).to_sparse(), TypeError, r"`keys` must be a dense \(strided\) tensor"),
    ],
    ids=["int64", "head-dim-4", "head-dim-264", "no-kv-heads", "sparse"],
)
def test_kvcache_rejects_storage_attention_rejects(keys, error, fragment):
    """KVCache takes only storage attention can read: the error comes when it is made, not at attention."""
    with pytest.raises(error, match=f"^KVCache: .*{fragment}"):
        KVCache(keys, keys.clone(), length=0)


def test_kvcache_length_type_and_value():
    keys = torch.zeros(2, 1, 4, 16)
    with pytest.raises(TypeError, match=r"`length` must be an int in \[0, 4\], got float 2.0"):
        KVCache(keys, keys, length=2.0)
    with pytest.raises(ValueError, match=r"`length` must be an int in \[0, 4\], got 5"):
        KVCache(keys, keys, length=5)


def test_one_tensor_as_keys_and_values_is_refused_before_a_write(device):
    """A cache whose keys and values are one and the same tensor: an append (or a beam reorder) would write
    the values over the keys, so it raises and leaves the storage as it was; the flash-attn function too."""
    from flashattention.compat import flash_attn_with_kvcache

    storage = torch.randn(2, 1, 8, 16, device=device)
    before = storage.clone()
    cache = KVCache(storage, storage, length=3)
    new = torch.randn(2, 1, 1, 16, device=device)
    with pytest.raises(ValueError, match="same memory"):
        update_kv_cache(cache, new, new.clone())
    with pytest.raises(ValueError, match="same memory"):
        reorder_kv_cache(cache, torch.tensor([1, 0], device=device))
    bshd = storage.transpose(1, 2)
    with pytest.raises(ValueError, match="same memory"):
        flash_attn_with_kvcache(
            torch.randn(2, 1, 2, 16, device=device), bshd, bshd, new.transpose(1, 2), new.transpose(1, 2),
            cache_seqlens=3,
        )  # fmt: skip
    assert torch.equal(storage, before)
    packed = torch.randn(2, 8, 2, 1, 16, device=device)  # k and v interleaved in one buffer: distinct views
    flash_attn_with_kvcache(
        torch.randn(2, 1, 2, 16, device=device), packed[:, :, 0], packed[:, :, 1], new.transpose(1, 2),
        new.transpose(1, 2), cache_seqlens=3,
    )  # fmt: skip


def test_errors_over_a_uniform_cache_name_incremental_attention():
    """incremental_attention over a cache without per-row lengths checks as flash_attention does, under its
    own name."""
    cache = initialize_kv_cache(1, 2, 8, 16, device="cpu")
    update_kv_cache(cache, torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    with pytest.raises(ValueError, match="^incremental_attention: `softmax_scale`"):
        incremental_attention(torch.randn(1, 2, 1, 16), cache, softmax_scale=-1.0)
