"""flashattention: exact, fast, memory-efficient attention for PyTorch, with Triton kernels."""

from .api import flash_attention, flash_attention_varlen
from .kv_cache import (
    KVCache,
    flash_attention_with_kv_cache,
    incremental_attention,
    initialize_kv_cache,
    reorder_kv_cache,
    update_kv_cache,
)
from .paged_cache import PagedKVCache, initialize_paged_kv_cache, paged_attention

__version__ = "0.1.0"

from . import _prefetch  # noqa: E402 (after the API: it imports the launch layer in a thread)

_prefetch.start()  # Triton's import and cache key in a daemon thread, where a GPU is (FLASHATTN_WARMUP)

__all__ = [
    "KVCache",
    "PagedKVCache",
    "__version__",
    "flash_attention",
    "flash_attention_varlen",
    "flash_attention_with_kv_cache",
    "incremental_attention",
    "initialize_kv_cache",
    "initialize_paged_kv_cache",
    "paged_attention",
    "reorder_kv_cache",
    "update_kv_cache",
]
