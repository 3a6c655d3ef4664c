"""The seed's import path. Re-exports only; the code lives in flashattention.api and kv_cache."""

from . import *  # noqa: F403 (the package's public names)
from . import __all__ as _package_names

__all__ = [name for name in _package_names if name != "__version__"]
