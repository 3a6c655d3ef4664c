"""Work that the first kernel launch of a process would otherwise do inside the caller's first call, started
at `import flashattention` in a daemon thread so that it overlaps the caller's own setup (model, data, CUDA
context): import triton and the launch layer (the Gluon modules too), compute Triton's cache key (a hash of
Triton's own files and libtriton, ~0.4 s, once per process, at the first compile or cache lookup), and
import sympy, which torch imports at a backward given an explicit gradient (`out.backward(grad)`) and at an
optimizer's first step (torch._dynamo), ~0.3 s here and seconds where no bytecode cache is written.

Only where torch is built for CUDA and a GPU is visible (counted through NVML by torch: no CUDA context is
made), not under TRITON_INTERPRET, and not with FLASHATTN_WARMUP=0. Nothing here creates a CUDA context or
changes a result: the thread only imports modules and fills Triton's lru_cache of its key; an error in it is
logged at debug level and dropped. The launchers call wait() before their first compile, so that they take
the thread's key instead of hashing the same files again beside it."""

from __future__ import annotations

import importlib
import logging
import os
import threading

import torch

from . import _env

log = logging.getLogger(__name__)

THREAD_NAME = "flashattention-prefetch"
# modules the first launch imports (the Gluon kernels' only on Hopper, where they may run; importing them
# elsewhere is harmless), in import order; sympy last: only a backward or an optimizer needs it
MODULES = (
    "triton",
    "flashattention.kernels.launch",
    "flashattention.kernels.launch_decode",
    "triton.experimental.gluon",
    "flashattention.kernels.fwd_ws",
    "flashattention.kernels.bwd_ws",
)
LATE_MODULES = ("sympy",)
FORK_JOIN_S = 60.0  # a fork waits at most this long for the thread (it holds import locks while it runs)

_key_done = threading.Event()
_key_done.set()  # until a thread starts: nothing to wait for
_thread: threading.Thread | None = None


def should_start(cuda_built: bool) -> bool:
    """Whether `import flashattention` starts the thread: FLASHATTN_WARMUP on (default), not under
    Triton's interpreter, torch built for CUDA. (Whether a GPU is visible, the thread asks itself.)"""
    return _env.warmup() and not _env.interpreting() and cuda_built


def start() -> bool:
    """Starts the thread where should_start says so; True if it did."""
    global _thread
    if _thread is not None or not should_start(torch.version.cuda is not None):
        return False
    _key_done.clear()
    _thread = threading.Thread(target=work, name=THREAD_NAME, daemon=True)
    os.register_at_fork(before=_before_fork, after_in_child=_key_done.set)
    _thread.start()
    return True


def work(has_gpu=lambda: torch.cuda.device_count() > 0) -> None:
    """The thread's work (tests call it directly, with has_gpu=lambda: True on a CPU)."""
    try:
        if not has_gpu():  # NVML's count: no CUDA context
            return
        _import(MODULES[0])
        _triton_key()()
    except BaseException as err:  # noqa: BLE001 (an optimisation: never the caller's error)
        log.debug("flashattention: prefetching Triton's cache key failed: %r", err)
        return
    finally:
        _key_done.set()
    for name in MODULES[1:] + LATE_MODULES:
        try:
            _import(name)
        except BaseException as err:  # noqa: BLE001
            log.debug("flashattention: prefetching %s failed: %r", name, err)


def pending() -> bool:
    """Whether the thread is still computing Triton's key."""
    return not _key_done.is_set()


def wait() -> None:
    """Blocks until the thread has Triton's key (at once if it has, or never started, or failed): the
    first launch takes it from Triton's lru_cache instead of hashing the same files a second time."""
    if not _key_done.is_set():
        _key_done.wait()


def _triton_key():
    """Triton's cache-key function (triton.runtime.cache in 3.5+, triton.compiler.compiler before)."""
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        from triton.compiler.compiler import triton_key
    return triton_key


def _import(name: str) -> None:
    importlib.import_module(name)


def _before_fork() -> None:
    """A child made while the thread imports would inherit import locks that no thread of it releases."""
    thread = _thread
    if thread is not None and thread.is_alive() and thread is not threading.current_thread():
        thread.join(FORK_JOIN_S)
