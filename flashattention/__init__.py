"""flashattention: exact, fast, memory-efficient attention for PyTorch, with Triton kernels."""

from .api import flash_attention

__version__ = "0.1.0"

__all__ = ["__version__", "flash_attention"]
