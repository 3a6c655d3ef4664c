"""The seed's import path. Re-exports only; the code lives in flashattention.api and kv_cache."""

from .api import flash_attention
from .kv_cache import (
    KVCache,
    flash_attention_with_kv_cache,
    incremental_attention,
    initialize_kv_cache,
    reorder_kv_cache,
    update_kv_cache,
)

__all__ = [
    "KVCache",
    "flash_attention",
    "flash_attention_with_kv_cache",
    "incremental_attention",
    "initialize_kv_cache",
    "reorder_kv_cache",
    "update_kv_cache",
]
