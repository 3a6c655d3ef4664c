"""Work that the first kernel launch of a process would otherwise do inside the caller's first call, started
at `import flashattention` in a daemon thread so that it overlaps the caller's own setup (model, data, CUDA
context): import triton and the launch layer (the Gluon modules too), compute Triton's cache key (a hash of
Triton's own files and its several-hundred-MB libtriton, once per process, at the first compile or cache
lookup), and run `ptxas --version` for the GPU's arch (a subprocess that Triton's backend hash runs at the
first lookup; it caches the answer per arch). Only our own first-launch work: torch's imports (sympy, at a
backward given an explicit gradient) stay where torch makes them, as for any other kernel.

Triton's key depends only on those files, so the thread keeps it on disk (FLASHATTN_CACHE_DIR), under a
fingerprint of the path, size and mtime of every file under the folders it hashes (a superset of what it
reads): a process whose Triton files are unchanged takes the kept key and skips the hash; any change to them
gives another fingerprint and a fresh hash. Triton looks its key up through `triton.runtime.cache.triton_key`
at each compile or cache lookup; the thread points that name at the kept value (once the value is known, so
every caller sees the same key).

Only where torch is built for CUDA and a GPU is visible (counted through NVML by torch: no CUDA context is
made), not under TRITON_INTERPRET, and not with FLASHATTN_WARMUP=0. Nothing here creates a CUDA context or
changes a result: the thread only imports modules and hands Triton the key it would compute; an error in it is
logged at debug level and dropped. The launchers call wait() before their first compile, so that they take
the thread's key instead of hashing the same files again beside it."""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import tempfile
import threading
from pathlib import Path

import torch

from . import _env

log = logging.getLogger(__name__)

THREAD_NAME = "flashattention-prefetch"
# modules the first launch imports (the Gluon kernels' only on Hopper, where they may run; importing them
# elsewhere is harmless), in import order
MODULES = (
    "triton",
    "flashattention.kernels.launch",
    "flashattention.kernels.launch_decode",
    "triton.experimental.gluon",
    "flashattention.kernels.fwd_ws",
    "flashattention.kernels.bwd_ws",
)
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
        use_kept_key(_env.cache_dir())
    except BaseException as err:  # noqa: BLE001 (an optimisation: never the caller's error)
        log.debug("flashattention: prefetching Triton's cache key failed: %r", err)
        return
    finally:
        _key_done.set()
    for name in MODULES[1:]:
        try:
            _import(name)
        except BaseException as err:  # noqa: BLE001
            log.debug("flashattention: prefetching %s failed: %r", name, err)
    try:
        ptxas_version(gpu_arch())
    except BaseException as err:  # noqa: BLE001
        log.debug("flashattention: prefetching ptxas's version failed: %r", err)


def gpu_arch() -> int | None:
    """The compute capability of the first visible GPU as Triton's arch number (9.0 -> 90), read through
    NVML (no CUDA context); None where NVML cannot say. CUDA_VISIBLE_DEVICES by index is followed (NVML
    counts every GPU); by UUID, the first GPU is assumed (a wrong guess costs one background subprocess)."""
    import ctypes

    nvml = ctypes.CDLL("libnvidia-ml.so.1")
    if nvml.nvmlInit_v2() != 0:
        return None
    handle, major, minor = ctypes.c_void_p(), ctypes.c_int(), ctypes.c_int()
    try:
        if nvml.nvmlDeviceGetHandleByIndex_v2(_env.first_visible_gpu(), ctypes.byref(handle)):
            return None
        if nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)):
            return None
        return major.value * 10 + minor.value
    finally:
        nvml.nvmlShutdown()  # NVML counts its inits: this one's only


def ptxas_version(arch: int | None) -> str | None:
    """Fills Triton's per-arch cache of `ptxas --version` (its NVIDIA backend's hash reads it)."""
    if arch is None:
        return None
    from triton.backends.nvidia import compiler

    return compiler.get_ptxas_version(arch)


def pending() -> bool:
    """Whether the thread is still computing Triton's key."""
    return not _key_done.is_set()


def wait() -> None:
    """Blocks until the thread has Triton's key (at once if it has, or never started, or failed): the
    first launch then takes the thread's key instead of hashing the same files a second time."""
    if not _key_done.is_set():
        _key_done.wait()


# what triton_key reads, relative to triton's folder: cache.py, three folders' modules, libtriton
KEY_FOLDERS = ("compiler", "backends", "language")
KEY_FILES = ("runtime/cache.py",)


def fingerprint(triton_dir: Path, version: str) -> str:
    """A hash of Triton's version and the path, size and mtime of every file under the folders its key
    hashes and of its extension libraries (no file's content is read)."""
    paths = [triton_dir / f for f in KEY_FILES] + list((triton_dir / "_C").glob("libtriton*"))
    for folder in KEY_FOLDERS:
        for root, _, names in os.walk(triton_dir / folder):
            paths += [Path(root) / name for name in names]
    digest = hashlib.sha256(f"{version}\0{triton_dir}".encode())
    for path in sorted(paths):
        st = path.stat()
        digest.update(f"\0{path.relative_to(triton_dir)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def kept_key(compute, triton_dir: Path, version: str, cache_dir: Path) -> str:
    """Triton's key as kept on disk for this fingerprint, else compute() (then kept; a failed write only
    means hashing again next time)."""
    path = cache_dir / f"triton-key-{fingerprint(triton_dir, version)}.txt"
    try:
        key = path.read_text()
        if key.startswith(version):  # a torn or foreign file is ignored
            return key
    except OSError:
        pass
    key = compute()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache_dir, delete=False, suffix=".tmp") as f:
            f.write(key)
        os.replace(f.name, path)
    except OSError as err:
        log.debug("flashattention: Triton's key not kept in %s: %r", cache_dir, err)
    return key


def use_kept_key(cache_dir: Path) -> str:
    """Points Triton's key lookups (triton.runtime.cache and the autotuner's binding) at the kept key."""
    import triton
    from triton.runtime import autotuner, cache

    original = cache.triton_key
    key = kept_key(original, Path(triton.__file__).parent, triton.__version__, cache_dir)

    def triton_key() -> str:
        return key

    triton_key.original = original
    cache.triton_key = triton_key
    if getattr(autotuner, "triton_key", None) is original:
        autotuner.triton_key = triton_key
    return key


def finish() -> None:
    """Blocks until the thread has ended (at once if none runs): for benchmarks, whose timings its imports
    would disturb (they take the GIL in turns with the caller)."""
    thread = _thread
    if thread is not None and thread is not threading.current_thread():
        thread.join()


def _import(name: str) -> None:
    importlib.import_module(name)


def _before_fork() -> None:
    """A child made while the thread imports would inherit import locks that no thread of it releases."""
    thread = _thread
    if thread is not None and thread.is_alive() and thread is not threading.current_thread():
        thread.join(FORK_JOIN_S)
