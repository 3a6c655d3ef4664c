"""Backward kernels compiled ahead: the first forward of a process that records gradients starts, in daemon
threads, the compiles of the three kernels its backward will launch (preprocess, dK/dV, dQ), with the
arguments that backward will pass (kernels/launch.backward_launches, stand-ins for the tensors that do not
exist yet: contiguous, 16-byte aligned, as the backward allocates them and as a gradient usually comes) and
the config its choice tries first (registry.first_choice). They overlap the forward's own compile and each
other (Triton releases the GIL in its MLIR/LLVM passes and waits on ptxas, a subprocess), so a cold forward
+ backward pays about the longest compile instead of the sum.

The backward waits for those threads (wait()) before it launches: a compile still running is nearer its end
than a new one, and two compiles of one kernel would share the CPU. Each compile lands in the kernel's
in-memory cache and Triton's disk cache; the launch then finds it there if its arguments specialise the same
way (a gradient with other strides or alignment does not: that launch compiles its own, as without this
module). A compile that fails in a thread is logged at debug level and dropped: the launch compiles again
and raises or falls back as it always does. No thread touches the GPU: they compile only (Triton loads a
kernel into the CUDA context at its first launch, in the caller's thread).

On by default on CUDA devices; FLASHATTN_WARMUP=0 turns it off, and hooks.overrides(warmup=...) for tests
and tools (warmup_compile= replaces the compile a thread runs, to record what it would compile)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import os
import threading

import torch
import triton

from .. import _env, _prefetch
from . import device as dev
from . import hooks, registry, tuning

log = logging.getLogger(__name__)

MAX_WORKERS = 4
FORK_JOIN_S = 60.0  # a fork waits at most this long for compiles in flight

_requested = False  # a forward with gradients asked for the compiles in this process (hooks re-arm it)
_pending: list[concurrent.futures.Future] = []


class StandIn:
    """What the launch arguments and Triton's specialisation read of a tensor that the backward will
    allocate: shape, contiguous strides, dtype, device, a 16-byte aligned address (0, as Triton's
    MockTensor)."""

    def __init__(self, shape, dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, device

    def stride(self) -> tuple[int, ...]:
        strides, step = [], 1
        for size in reversed(self.shape):
            strides.append(step)
            step *= max(size, 1)
        return tuple(reversed(strides))

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize

    @staticmethod
    def data_ptr() -> int:
        return 0

    @staticmethod
    def ptr_range() -> int:
        return 0


def enabled(device: torch.device) -> bool:
    """hooks.overrides(warmup=...) if set, else: a CUDA device, FLASHATTN_WARMUP on, not tuning (a tuned
    launch times every config; which one it keeps is not known ahead)."""
    if hooks.current.warmup is not None:
        return hooks.current.warmup
    return device.type == "cuda" and not _env.interpreting() and _env.warmup() and not tuning.enabled()


def backward_jobs(q, k, v, softmax_scale: float, left: int, right: int) -> list[tuple]:
    """(name, kernel_fn, grid, keyword arguments) of each backward launch that a forward of (q, k, v) with
    gradients will lead to, for the gradient the backward usually gets (contiguous, in out's shape)."""
    from .launch import backward_launches, dkdv_choice, fused_dq_args

    batch, heads, seqlen_q, head_dim = q.shape
    like = lambda shape, dtype=q.dtype: StandIn(shape, dtype, q.device)  # noqa: E731
    out = like(q.shape)  # the forward's out and LSE2 are fresh contiguous allocations too
    tensors = dict(
        O=out, DO=like(q.shape), DELTA=like((batch, heads, seqlen_q), torch.float32), Q=q, K=k, V=v,
        LSE2=like((batch, heads, seqlen_q), torch.float32), DQ=like(q.shape), DK=like(k.shape),
        DV=like(v.shape),
    )  # fmt: skip
    jobs = []
    fused = False  # a FUSED_DQ dK/dV choice: no dQ kernel (as launch.attention_backward decides)
    for name, (args, grid) in backward_launches(tensors, softmax_scale, left, right).items():
        if name == "pre":
            from .bwd import attn_bwd_preprocess_kernel

            jobs.append((name, attn_bwd_preprocess_kernel, grid, args))
            continue
        if name == "bwd_dq" and fused:
            continue
        if name == "bwd_dkdv":  # FUSED_DQ configs included, as the backward chooses
            config = dkdv_choice(args, tensors["LSE2"], q.device, q.dtype)
            fused = config is not None and bool(config.kwargs.get("FUSED_DQ"))
            if fused:
                _, extra = fused_dq_args(config, tensors["LSE2"].shape, head_dim, batch, seqlen_q, like)
                args = dict(args, **extra)
        else:
            config = registry.first_choice(name, args, q.device, q.dtype)
        if config is None:
            continue
        fn, args = registry.launch_args(registry.KERNELS[name], config, args)
        meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        jobs.append((name, fn, grid, dict(args, **meta)))
    return jobs


def backward_kernels(q, k, v, softmax_scale: float, left: int, right: int) -> None:
    """At a forward with gradients: starts the backward's compiles, once per process (hooks re-arm it)."""
    global _requested
    if _requested:
        return
    _requested = True
    if not enabled(q.device) or q.numel() == 0 or k.numel() == 0 or dev.capturing():
        return
    try:
        jobs = backward_jobs(q, k, v, softmax_scale, left, right)
    except Exception as err:  # noqa: BLE001 (an optimisation: the backward builds its own arguments)
        log.debug("flashattention: no backward compiles ahead: %r", err)
        return
    compile_fn = hooks.current.warmup_compile or compile_one
    for name, fn, grid, kwargs in jobs[:MAX_WORKERS]:
        future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        thread = threading.Thread(
            target=_work,
            args=(future, compile_fn, name, fn, grid, kwargs, q.device),
            name=f"flashattention-compile-{name}",
            daemon=True,  # a process that exits before its backward does not wait for these
        )
        _pending.append(future)
        thread.start()


def compile_one(name: str, fn, grid, kwargs: dict, device: torch.device) -> None:
    """Compiles `fn` for these arguments on `device` without launching it (Triton's warmup: the kernel
    lands in its in-memory and disk caches), and builds its launcher (Triton 3.6 compiles a C stub per
    signature, kept on disk, which the first launch would otherwise build)."""
    _prefetch.wait()
    with dev.on(device):
        compiled = fn.warmup(grid=grid, **kwargs)
    if compiled is None or not hasattr(compiled, "metadata"):
        return
    try:
        triton.runtime.driver.active.launcher_cls(compiled.src, compiled.metadata)
    except Exception as err:  # noqa: BLE001 (the launch builds it again)
        log.debug("flashattention: launcher of %s not built ahead: %r", name, err)


def _work(future, compile_fn, name, fn, grid, kwargs, device) -> None:
    try:
        compile_fn(name, fn, grid, kwargs, device)
    except BaseException as err:  # noqa: BLE001 (the launch compiles again, and raises if it must)
        log.debug("flashattention: compiling %s ahead failed: %r", name, err)
        future.set_result(False)
        return
    future.set_result(True)


def wait() -> None:
    """Blocks until the compiles started ahead have ended (at once if none runs); the backward calls it
    before its launches."""
    _prefetch.wait()
    while _pending:  # threads may wait at once (autograd's per-device ones): each waits for every compile
        try:
            future = _pending[-1]
        except IndexError:  # another thread took the last one meanwhile
            break
        future.result()
        with contextlib.suppress(ValueError):  # or removed it first
            _pending.remove(future)


def reset() -> None:
    """Waits for compiles in flight and re-arms backward_kernels (hooks.overrides: each block starts anew)."""
    global _requested
    wait()
    _requested = False


def _before_fork() -> None:
    """A child made mid-compile would wait for threads it does not have: finish them first (bounded)."""
    for future in list(_pending):
        try:
            future.result(FORK_JOIN_S)
        except concurrent.futures.TimeoutError:
            pass


def _after_in_child() -> None:
    _pending.clear()


os.register_at_fork(before=_before_fork, after_in_child=_after_in_child)
