"""Explicit hooks for tools and tests, instead of patching private functions: the configs a kernel may
choose from, extra kernel arguments (a probe's buffer), the SM count, the HOST_DESC work threshold,
autotuning, the launch plans and the backward compiles ahead (kernels/warmup.py), each set for a `with`
block. Entering or leaving a block clears the launch plans and the in-process tuning picks, so that nothing
chosen under one setting replays under another, and re-arms the compiles ahead."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import triton


@dataclasses.dataclass(frozen=True)
class Overrides:
    configs: dict[str, list[triton.Config]] | None = None  # kernel name -> configs, in place of its table
    extra_args: dict[str, dict] | None = None  # kernel name -> arguments added to each launch of it
    num_sms: int | None = None
    host_desc_min_work: int | None = None
    autotune: bool | None = None  # None: FLASHATTN_AUTOTUNE decides
    plans: bool = True  # False: every call takes the full launch path (host-time comparisons)
    warmup: bool | None = None  # backward compiles ahead (kernels/warmup.py); None: FLASHATTN_WARMUP, CUDA
    # replaces the compile a warm-up thread runs: called as (name, kernel_fn, grid, kwargs, device)
    warmup_compile: Callable | None = None


current = Overrides()


@contextlib.contextmanager
def overrides(**changes):
    """`with overrides(configs={"fwd": [cfg]}, num_sms=5): ...`: the settings hold inside the block."""
    global current
    previous = current
    current = dataclasses.replace(current, **changes)
    clear_caches()
    try:
        yield current
    finally:
        current = previous
        clear_caches()


def clear_caches() -> None:
    """Forgets the launch plans and the tuning picks of this process (the on-disk picks stay), and re-arms
    the backward compiles ahead (after those in flight end)."""
    from . import plans, tuning, warmup

    plans.PLANS.clear()
    tuning.PICKS.clear_memory()
    warmup.reset()
