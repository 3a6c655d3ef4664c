"""Every environment variable the package reads, read here and nowhere else (the README lists them)."""

from __future__ import annotations

import os
from pathlib import Path


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default) not in ("", "0")


# Triton reads TRITON_INTERPRET when the kernels are defined (import): read once, as Triton does.
_INTERPRETING = _flag("TRITON_INTERPRET", "0")


def interpreting() -> bool:
    """Whether Triton's kernels were defined for its CPU interpreter (TRITON_INTERPRET at import)."""
    return _INTERPRETING


def interpreter_requested() -> bool:
    """TRITON_INTERPRET as set now (validation: whether backend='triton' may take CPU tensors)."""
    return _flag("TRITON_INTERPRET", "0")


def autotune() -> bool:
    """FLASHATTN_AUTOTUNE=1: time every config of a table entry on a case's first call (the pick is kept
    on disk); unset or 0: the table's measured pick. Never in the interpreter."""
    return _flag("FLASHATTN_AUTOTUNE", "0") and not _INTERPRETING


# read once: every output allocation asks, and an environment lookup is host time on every call
_POISON = _flag("FLASHATTN_POISON", "0")


def poison() -> bool:
    """FLASHATTN_POISON=1 at import (or set_poison): outputs are NaN-filled before the kernels write them."""
    return _POISON


def set_poison(on: bool) -> None:
    """Turns poisoning on or off after the import (the CLI's `check`)."""
    global _POISON
    _POISON = on


def warmup() -> bool:
    """FLASHATTN_WARMUP=0: no work ahead of the first call (flashattention._prefetch's thread at import,
    kernels/warmup.py's backward compiles at the first forward with gradients). Default 1."""
    return _flag("FLASHATTN_WARMUP", "1")


def first_visible_gpu() -> int:
    """The NVML index of the first GPU CUDA_VISIBLE_DEVICES lists (0 where unset or given by UUID)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def cache_dir() -> Path:
    """Where tuning results persist: FLASHATTN_CACHE_DIR, else $XDG_CACHE_HOME/flashattention (~/.cache)."""
    explicit = os.environ.get("FLASHATTN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flashattention"


def settings() -> dict[str, str | None]:
    """The variables as set (info, reports)."""
    names = ("TRITON_INTERPRET", "FLASHATTN_AUTOTUNE", "FLASHATTN_POISON", "FLASHATTN_CACHE_DIR")
    names += ("FLASHATTN_WARMUP",)
    return {name: os.environ.get(name) for name in names}
