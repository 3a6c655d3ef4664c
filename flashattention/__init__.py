"""flashattention: exact, fast, memory-efficient attention for PyTorch, with Triton kernels."""

from .api import flash_attention
from .kv_cache import (
    KVCache,
    flash_attention_with_kv_cache,
    incremental_attention,
    initialize_kv_cache,
    reorder_kv_cache,
    update_kv_cache,
)

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "__version__",
    "flash_attention",
    "flash_attention_with_kv_cache",
    "incremental_attention",
    "initialize_kv_cache",
    "reorder_kv_cache",
    "update_kv_cache",
]
