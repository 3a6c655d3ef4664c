"""Test set-up: interpreter on CPU-only machines, no autotuning (the tables' picks), a private tuning
cache, seeds, NaN-poisoned allocations, the `gpu` marker and CUDA OOM -> skip.

The environment variables must be set before triton (or flashattention, which imports it lazily) is
imported, so they come first; torch itself may be imported before them.
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    # Run the Triton kernels on the CPU through Triton's interpreter (read when triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tables' picks, no tuning (tests that tune or sweep every config say so explicitly).
os.environ.setdefault("FLASHATTN_AUTOTUNE", "0")
# The kernels' launchers fill their outputs with NaN before launching (see also `_poison_empty`).
os.environ.setdefault("FLASHATTN_POISON", "1")
# Tuning picks of tests that tune go to a directory of this run, never to the user's cache.
os.environ.setdefault("FLASHATTN_CACHE_DIR", tempfile.mkdtemp(prefix="flashattention-test-cache-"))

import zlib  # noqa: E402

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """On the GPU only, a CUDA out-of-memory error skips the test (the card is too small), never on CPU."""
    if not HAS_CUDA:
        return (yield)
    try:
        return (yield)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        pytest.skip(f"CUDA out of memory on {torch.cuda.get_device_name()}: {str(exc).splitlines()[0]}")


@pytest.fixture(autouse=True)
def _release_cuda_cache():
    """On the GPU, gives cached blocks back to the driver after each test: the GPU suite runs in parallel
    processes on one card (tools/pytest_shards.py), and memory one process keeps cached is memory
    another's kernels cannot get (a launch of a kernel that spills needs local memory: CUDA out of memory
    at launch was seen with 14 processes)."""
    yield
    if HAS_CUDA:
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """A reproducible seed per test (derived from its id), so tests do not depend on their order."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _fp32_highest_precision():
    """IEEE fp32 matmuls everywhere (tf32 would loosen the fp32 comparisons on the GPU)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


_NAN = float("nan")


def _poisoned(fn):
    def wrapper(*args, **kwargs):
        t = fn(*args, **kwargs)
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            with torch.no_grad():
                t.fill_(_NAN)
        return t

    return wrapper


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uninitialised float allocations made from Python (torch.empty & co., as launchers use for outputs)
    are filled with NaN, so an output element that a backend forgets to write shows up as NaN (which the
    tolerance helper never passes) instead of as stale memory that happens to look right."""
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))


@pytest.fixture
def device() -> str:
    """ "cuda" when a GPU is present, else "cpu" (where backend="triton" runs in the interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"
