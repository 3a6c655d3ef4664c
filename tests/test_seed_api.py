"""The seed API (the README's seed API section) as acceptance tests: its snippets as written, on "cuda" when
present, else on the CPU with a shorter sequence. The KV cache snippets belong to a later issue: they are
reported as xfail while their names are not exported, and run for real once they are."""

import importlib

import pytest
import torch
from _helpers import assert_close_to_reference

from flashattention.reference import attention_reference

SEED_MODULE = "flashattention.flash_attention_v3"


def _seed_sizes(device: str) -> tuple[int, int, int, int]:
    """batch_size, num_heads, seq_len, head_dim of the seed; seq_len 128 on the CPU (1024 on the GPU)."""
    return 2, 8, 1024 if device == "cuda" else 128, 64


def _seed_names(*names: str) -> list:
    module = importlib.import_module(SEED_MODULE)
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        pytest.xfail(f"{SEED_MODULE} does not export {missing} yet (KV cache: a later issue)")
    return [getattr(module, n) for n in names]


def _check_against_reference(name, output, q, k, v, causal: bool) -> None:
    ref, _ = attention_reference(q, k, v, causal=causal)
    same_dtype, _ = attention_reference(q, k, v, causal=causal, upcast=False)
    assert_close_to_reference(name, output, ref, same_dtype)


@pytest.mark.parametrize("module", [SEED_MODULE, "flashattention"])
def test_seed_flash_attention(module: str, device: str) -> None:
    flash_attention = importlib.import_module(module).flash_attention

    batch_size, num_heads, seq_len, head_dim = _seed_sizes(device)
    q = torch.randn(batch_size, num_heads, seq_len, head_dim, device=device)
    k = torch.randn(batch_size, num_heads, seq_len, head_dim, device=device)
    v = torch.randn(batch_size, num_heads, seq_len, head_dim, device=device)
    output = flash_attention(q, k, v, causal=True)  # note: float32 inputs

    assert output.shape == (batch_size, num_heads, seq_len, head_dim)
    assert output.dtype == torch.float32 and output.device == q.device
    _check_against_reference("output", output, q, k, v, causal=True)


def test_both_import_paths_give_the_same_function() -> None:
    import flashattention
    from flashattention.flash_attention_v3 import flash_attention

    assert flash_attention is flashattention.flash_attention
    assert "flash_attention" in flashattention.__all__


def test_seed_incremental_attention(device: str) -> None:
    initialize_kv_cache, update_kv_cache, incremental_attention = _seed_names(
        "initialize_kv_cache", "update_kv_cache", "incremental_attention"
    )
    batch_size, num_heads, _, head_dim = _seed_sizes(device)

    max_seq_len = 1024
    kv_cache = initialize_kv_cache(batch_size, num_heads, max_seq_len, head_dim)
    k_first = torch.randn(batch_size, num_heads, 1, head_dim, device=device)
    v_first = torch.randn(batch_size, num_heads, 1, head_dim, device=device)
    update_kv_cache(kv_cache, k_first, v_first)  # appends in place
    q = torch.randn(batch_size, num_heads, 1, head_dim, device=device)
    output = incremental_attention(q, kv_cache, causal=True)

    assert torch.equal(kv_cache.keys, k_first) and torch.equal(kv_cache.values, v_first)
    assert output.shape == q.shape and output.dtype == q.dtype
    _check_against_reference("output", output, q, k_first, v_first, causal=True)


def test_seed_flash_attention_with_kv_cache_and_beam_reorder(device: str) -> None:
    flash_attention_with_kv_cache, reorder_kv_cache, KVCache = _seed_names(  # noqa: N806
        "flash_attention_with_kv_cache", "reorder_kv_cache", "KVCache"
    )
    batch_size, num_heads, seq_len, head_dim = _seed_sizes(device)

    q = torch.randn(batch_size, num_heads, seq_len, head_dim, device=device)
    k = torch.randn(batch_size, num_heads, seq_len, head_dim, device=device)
    v = torch.randn(batch_size, num_heads, seq_len, head_dim, device=device)
    output, kv_cache = flash_attention_with_kv_cache(q, k, v, kv_cache=None, causal=True)

    _check_against_reference("output", output, q, k, v, causal=True)
    assert torch.equal(kv_cache.keys, k) and torch.equal(kv_cache.values, v)

    beam_size = 3
    expanded_keys = kv_cache.keys.repeat_interleave(beam_size, dim=0)
    expanded_values = kv_cache.values.repeat_interleave(beam_size, dim=0)
    kv_cache = KVCache(expanded_keys, expanded_values)
    beam_idx = torch.tensor([1, 0, 2, 5, 3, 4], device=device)
    # computed before the call: the cache may share storage with expanded_keys (advanced indexing copies)
    expected_keys, expected_values = expanded_keys[beam_idx], expanded_values[beam_idx]
    reorder_kv_cache(kv_cache, beam_idx)  # in place

    assert torch.equal(kv_cache.keys, expected_keys)
    assert torch.equal(kv_cache.values, expected_values)


@pytest.mark.parametrize("script", ["seed_basic.py", "seed_kv_cache.py"])
def test_examples_run(script: str, capsys: pytest.CaptureFixture) -> None:
    """The example scripts stay runnable (they pick the CPU and a short sequence without a GPU)."""
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).parent.parent / "examples" / script), run_name="__main__")
    assert "output" in capsys.readouterr().out
