"""The seed's import path. Re-exports only; the code lives in flashattention.api and friends."""

from .api import flash_attention

__all__ = ["flash_attention"]
