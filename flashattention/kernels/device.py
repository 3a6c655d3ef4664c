"""Host helpers of the launchers: output allocation, the launch device, SM count, TMA eligibility and
Triton's scratch allocator, and integer helpers cheaper than Triton's on the launch path."""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
import triton

from .. import _env
from . import hooks


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation; NaN-filled under FLASHATTN_POISON=1 so that an unwritten element shows."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if _env.poison() else t


# triton.cdiv and triton.next_power_of_2 are ConstexprFunction objects, ~3.5 us a call on the host
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_at_least(n: int, floor: int = 16) -> int:
    """The smallest power of two >= n, and at least `floor`."""
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (timing runs cannot be)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def on(device: torch.device):
    """Kernels launch on the current CUDA device: make it the tensors' one (multi-GPU callers)."""
    if device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(device)


@functools.cache
def capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)  # ~20 us a call; asked on every launch


def arch(device: torch.device) -> str:
    """The tables' architecture name: "sm90" (Hopper and later), "sm80", or "interpret" (CPU interpreter)."""
    if device.type != "cuda" or _env.interpreting():
        return "interpret"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "sm90" if capability(index)[0] >= 9 else "sm80"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the GPU (a few in the interpreter, so that persistent programs loop);
    hooks.overrides(num_sms=...) replaces it."""
    if hooks.current.num_sms is not None:
        return hooks.current.num_sms
    if _env.interpreting() or device.type != "cuda":
        return 3
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count  # asked on every decode launch


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned base pointers and row strides; where they can be used,
    installs the allocator that device-side descriptors need (ensure_allocator)."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return False
    if not _env.interpreting():
        ensure_allocator()
    return True


def ensure_allocator() -> None:
    """Triton keeps its allocator in a ContextVar: each thread starts without one, and autograd runs the
    backward in a thread of its own, so this checks the calling thread's, every call (a ContextVar read),
    and installs torch's caching allocator only where none is set (a user's own allocator stays)."""
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # another triton's internals: once per thread
        if getattr(_thread_state, "allocator_set", False):
            return
    triton.set_allocator(torch_scratch)
    _thread_state.allocator_set = True


def torch_scratch(size: int, align: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


_thread_state = threading.local()
