"""Work ahead of the first call: the import-time thread (flashattention/_prefetch.py: where it starts, what it
does, FLASHATTN_WARMUP) and the backward compiles started at the first forward with gradients
(kernels/warmup.py: which kernels, with which arguments and config, and that a failure or a slow compile
changes no result). On the CPU the compiles are recorded through hooks.overrides(warmup_compile=...); the
GPU tests run a fresh process end to end."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from _helpers import make_inputs

from flashattention import _env, _prefetch, flash_attention
from flashattention.kernels import hooks, launch, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fresh_process(code: str, **env) -> str:
    """stdout of `code` run by a new interpreter with the package importable and `env` set (None: unset)."""
    environ = dict(os.environ, PYTHONPATH=ROOT)
    for name, value in env.items():
        environ.pop(name, None) if value is None else environ.__setitem__(name, value)
    result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


STARTED = "import threading, flashattention as fa; print(fa._prefetch._thread is not None)"


# ---- the import-time thread ----------------------------------------------------------------------------


def test_env_flag(monkeypatch):
    monkeypatch.delenv("FLASHATTN_WARMUP", raising=False)
    assert _env.warmup()
    monkeypatch.setenv("FLASHATTN_WARMUP", "0")
    assert not _env.warmup()
    assert not _prefetch.should_start(cuda_built=True)


def test_should_start_needs_cuda_and_no_interpreter(monkeypatch):
    monkeypatch.delenv("FLASHATTN_WARMUP", raising=False)
    assert not _prefetch.should_start(cuda_built=False)
    if _env.interpreting():
        assert not _prefetch.should_start(cuda_built=True)


@pytest.mark.parametrize(
    "env", [{"TRITON_INTERPRET": "1"}, {"FLASHATTN_WARMUP": "0"}], ids=["interpret", "off"]
)
def test_no_thread_when_off_or_interpreting(env):
    assert _fresh_process(STARTED, **env) == "False"


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CPU-only build of torch")
def test_no_thread_without_cuda_build():
    assert _fresh_process(STARTED, TRITON_INTERPRET=None, FLASHATTN_WARMUP=None) == "False"


@pytest.fixture
def triton_key_restored(monkeypatch, tmp_path):
    """Triton's key lookup as it was after the test, and FLASHATTN_CACHE_DIR in tmp_path."""
    from triton.runtime import autotuner, cache

    monkeypatch.setattr(cache, "triton_key", cache.triton_key)
    monkeypatch.setattr(autotuner, "triton_key", autotuner.triton_key)
    monkeypatch.setenv("FLASHATTN_CACHE_DIR", str(tmp_path / "cache"))
    return cache


def test_work_hands_triton_its_key_and_imports(triton_key_restored):
    """The thread's work, run here with a GPU pretended: Triton's lookups return the key Triton computes,
    kept on disk; the launch layer is imported after, and sympy (torch's import, not ours) is not."""
    cache = triton_key_restored
    original = getattr(cache.triton_key, "original", cache.triton_key)
    modules_before = set(sys.modules)
    _prefetch.work(has_gpu=lambda: True)
    assert not _prefetch.pending()
    assert cache.triton_key is not original and cache.triton_key() == original()
    from triton.runtime import autotuner

    assert autotuner.triton_key is cache.triton_key
    assert len(list((_env.cache_dir()).glob("triton-key-*.txt"))) == 1
    assert "flashattention.kernels.launch" in sys.modules and "triton" in sys.modules
    assert "sympy" not in sys.modules or "sympy" in modules_before


def _fake_triton(root):
    """A folder shaped like Triton's, for the fingerprint: files its key reads and one it does not."""
    for rel in (
        "runtime/cache.py",
        "compiler/code.py",
        "backends/nvidia/driver.py",
        "language/core.py",
        "_C/libtriton.so",
        "tools/unrelated.py",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


def test_kept_key_is_reused_until_a_hashed_file_changes(tmp_path):
    triton_dir, cache_dir = _fake_triton(tmp_path / "triton"), tmp_path / "cache"
    computed = []

    def compute():
        computed.append(1)
        return f"9.9.9-key{len(computed)}"

    assert _prefetch.kept_key(compute, triton_dir, "9.9.9", cache_dir) == "9.9.9-key1"
    assert _prefetch.kept_key(compute, triton_dir, "9.9.9", cache_dir) == "9.9.9-key1"  # from disk
    assert len(computed) == 1
    (triton_dir / "tools/unrelated.py").write_text("not hashed by Triton")
    assert _prefetch.kept_key(compute, triton_dir, "9.9.9", cache_dir) == "9.9.9-key1"
    for rel in ("compiler/code.py", "_C/libtriton.so", "language/core.py", "runtime/cache.py"):
        before = len(computed)
        path = triton_dir / rel
        path.write_text(path.read_text() + " edited")  # another size (and mtime)
        assert _prefetch.kept_key(compute, triton_dir, "9.9.9", cache_dir) == f"9.9.9-key{before + 1}", rel
    assert _prefetch.kept_key(compute, triton_dir, "9.9.10", cache_dir).startswith("9.9.9-key")
    assert len(computed) == 6  # another version: another fingerprint


def test_kept_key_ignores_torn_files_and_unwritable_folders(tmp_path):
    triton_dir = _fake_triton(tmp_path / "triton")
    cache_dir = tmp_path / "cache"
    _prefetch.kept_key(lambda: "1.0-a", triton_dir, "1.0", cache_dir)
    (kept,) = cache_dir.glob("triton-key-*.txt")
    kept.write_text("")  # torn
    assert _prefetch.kept_key(lambda: "1.0-b", triton_dir, "1.0", cache_dir) == "1.0-b"
    blocked = tmp_path / "file"
    blocked.write_text("a file where the folder would be")
    assert _prefetch.kept_key(lambda: "1.0-c", triton_dir, "1.0", blocked / "sub") == "1.0-c"


def test_work_without_gpu_or_failing_ends_quietly():
    _prefetch.work(has_gpu=lambda: False)
    assert not _prefetch.pending()

    def broken():
        raise RuntimeError("no NVML here")

    _prefetch.work(has_gpu=broken)  # swallowed (debug log)
    assert not _prefetch.pending()
    _prefetch.wait()  # returns at once


# ---- backward compiles ahead ---------------------------------------------------------------------------


class Recorder:
    """Stands in for the compile a warm-up thread runs: records (name, kernel_fn, grid, kwargs, device,
    thread name)."""

    def __init__(self, fail: bool = False, delay: float = 0.0) -> None:
        self.calls, self.fail, self.delay = [], fail, delay

    def __call__(self, name, fn, grid, kwargs, device):
        time.sleep(self.delay)
        self.calls.append((name, fn, grid, kwargs, device, threading.current_thread().name))
        if self.fail:
            raise RuntimeError("compile failed in the background")


def _inputs(device, head_dim=40, kv_heads=1, dtype=torch.float16):
    q, k, v, dout = make_inputs(1, 2, kv_heads, 33, 47, head_dim, dtype, device)
    return [t.requires_grad_() for t in (q, k, v)], dout


def _fwd_bwd(q, k, v, dout, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, backend="triton", **kw)
    out.backward(dout)
    return out, q.grad, k.grad, v.grad


def _spec(value):
    """What Triton specialises a launch argument on (tensors and stand-ins alike), plus shape and strides."""
    if hasattr(value, "data_ptr"):
        return ("tensor", value.dtype, tuple(value.shape), tuple(value.stride()), value.data_ptr() % 16 == 0)
    return value


def _expected(q, k, v, dout, scale, left, right):
    """name -> (kernel_fn, kwargs) of the launches the backward makes for these real tensors."""
    out, lse2 = launch.forward_stats(
        q.detach(), k.detach(), v.detach(), softmax_scale=scale, left=left, right=right
    )
    tensors = dict(
        O=out, DO=dout, DELTA=torch.empty(lse2.shape), Q=q, K=k, V=v, LSE2=lse2,
        DQ=torch.empty(q.shape, dtype=q.dtype), DK=torch.empty(k.shape, dtype=k.dtype),
        DV=torch.empty(v.shape, dtype=v.dtype),
    )  # fmt: skip
    expected = {}
    for name, (args, grid) in launch.backward_launches(tensors, scale, left, right).items():
        if name == "pre":
            expected[name] = (None, args, grid)
            continue
        config = registry.first_choice(name, args, q.device, q.dtype)
        fn, args = registry.launch_args(registry.KERNELS[name], config, args)
        meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        expected[name] = (fn, dict(args, **meta), grid)
    return expected


@pytest.mark.parametrize(
    "head_dim,kv_heads,causal", [(40, 1, True), (64, 2, False)], ids=["D40-MQA-causal", "D64-H2-full"]
)
def test_compiles_requested_with_the_backward_arguments(device, head_dim, kv_heads, causal):
    (q, k, v), dout = _inputs(device, head_dim, kv_heads)
    recorder = Recorder()
    with hooks.overrides(warmup=True, warmup_compile=recorder):
        _fwd_bwd(q, k, v, dout, causal=True if causal else False)
        calls = {
            name: (fn, kwargs, grid, dev, thread) for name, fn, grid, kwargs, dev, thread in recorder.calls
        }
        assert sorted(calls) == ["bwd_dkdv", "bwd_dq", "pre"]
        scale = head_dim**-0.5
        left, right = (-1, 0) if causal else (-1, -1)
        for name, (fn, kwargs, grid) in _expected(q, k, v, dout, scale, left, right).items():
            got_fn, got_kwargs, got_grid, got_device, thread = calls[name]
            assert thread.startswith("flashattention-compile-")
            assert got_device == q.device
            if fn is not None:
                assert got_fn is fn
            assert sorted(got_kwargs) == sorted(kwargs), name
            for arg, value in kwargs.items():
                assert _spec(got_kwargs[arg]) == _spec(value), (name, arg)
            if callable(grid):
                assert got_grid(got_kwargs) == grid(kwargs)
            else:
                assert got_grid == grid


def test_specialisation_as_triton_sees_it(device):
    """Triton's own binder (for an sm_90 target, no GPU needed) specialises the stand-ins as the real
    tensors: the launch finds the compiled kernel in the cache."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as err:
        pytest.skip(f"this Triton's internals differ: {err}")
    (q, k, v), dout = _inputs(device)
    recorder = Recorder()
    with hooks.overrides(warmup=True, warmup_compile=recorder):
        _fwd_bwd(q, k, v, dout, causal=True)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    expected = _expected(q, k, v, dout, 40**-0.5, -1, 0)
    for name, fn, _, kwargs, _, _ in recorder.calls:
        raw = getattr(fn, "fn", fn)
        jit = JITFunction(
            raw, **{k: v for k, v in getattr(fn, "kwargs", {}).items() if k == "do_not_specialize"}
        )
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        strip = lambda kw: {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}  # noqa: E731
        assert binder(**strip(kwargs))[1] == binder(**strip(expected[name][1]))[1], name


def test_once_per_process_and_rearmed_by_hooks(device):
    (q, k, v), dout = _inputs(device)
    recorder = Recorder()
    with hooks.overrides(warmup=True, warmup_compile=recorder):
        _fwd_bwd(q, k, v, dout)
        _fwd_bwd(q, k, v, dout, causal=True)
        assert len(recorder.calls) == 3
    with hooks.overrides(warmup=True, warmup_compile=recorder):
        _fwd_bwd(q, k, v, dout)
        assert len(recorder.calls) == 6


def test_varlen_call_leaves_the_turn_to_a_dense_one(device):
    """A varlen forward with gradients compiles nothing ahead (its launches are not the dense backward's)
    and does not use up the once-per-process turn: the next dense forward with gradients still takes it."""
    from flashattention import flash_attention_varlen

    (q, k, v), dout = _inputs(device)
    packed = [t.detach()[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v)]
    cu_q = torch.tensor([0, q.shape[2]], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, k.shape[2]], dtype=torch.int32, device=device)
    recorder = Recorder()
    with hooks.overrides(warmup=True, warmup_compile=recorder):
        out = flash_attention_varlen(*packed, cu_q, cu_k, q.shape[2], k.shape[2], backend="triton")
        out.sum().backward()
        assert recorder.calls == []
        _fwd_bwd(q, k, v, dout)
        assert len(recorder.calls) == 3


def test_nothing_without_gradients_or_when_off(device):
    (q, k, v), dout = _inputs(device)
    recorder = Recorder()
    with hooks.overrides(warmup=True, warmup_compile=recorder):
        with torch.no_grad():
            flash_attention(q, k, v, backend="triton")
        flash_attention(q.detach(), k.detach(), v.detach(), backend="triton")
        assert recorder.calls == []
    with hooks.overrides(warmup=False, warmup_compile=recorder):
        _fwd_bwd(q, k, v, dout)
    with hooks.overrides(warmup_compile=recorder):  # default: CUDA only, never the interpreter
        _fwd_bwd(q, k, v, dout)
        if device == "cpu":
            assert recorder.calls == []


@pytest.mark.parametrize("recorder", [Recorder(fail=True), Recorder(delay=0.2)], ids=["failing", "slow"])
def test_results_identical(device, recorder):
    """A compile that fails in its thread, or one the backward has to wait for, changes nothing."""
    (q, k, v), dout = _inputs(device)
    with hooks.overrides(warmup=False):
        off = _fwd_bwd(q, k, v, dout, causal=True)
    with hooks.overrides(warmup=True, warmup_compile=recorder):
        on = _fwd_bwd(q, k, v, dout, causal=True)
        assert len(recorder.calls) == 3
    for a, b in zip(off, on, strict=True):
        assert torch.equal(a, b)


# ---- on the GPU: a fresh process end to end ------------------------------------------------------------

FRESH_FWD_BWD = """
import torch, triton
from flashattention import _prefetch, flash_attention
from flashattention.kernels import warmup
from flashattention.reference import attention_reference
from flashattention.testing import compare_to_reference
started = _prefetch._thread is not None
compiles = []  # Triton calls the hook at each in-memory cache miss, before compiling (or loading from disk)
triton.knobs.runtime.jit_cache_hook = lambda *args, **kwargs: compiles.append(1) and False
torch.manual_seed(0)
shape = (2, 4, 300, D)
q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
dout = torch.randn_like(q)
out = flash_attention(q, k, v, causal=True)
warmup.wait()
before = len(compiles)
out.backward(dout)
in_backward = len(compiles) - before
failures = []
for dtype in (torch.float32, torch.bfloat16):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    ref, _ = attention_reference(*leaves, causal=True, upcast=dtype == torch.float32)
    ref.backward(dout.to(dtype))
    if dtype == torch.float32:
        refs = [ref] + [t.grad for t in leaves]
    else:
        same = [ref] + [t.grad for t in leaves]
for name, ours, r, s in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), refs, same):
    message = compare_to_reference(name, ours.float(), r, s.float())
    if message:
        failures.append(message)
print(started, in_backward, not failures, failures)
"""


def _run_fresh(tmp_path, head_dim, warmup_env):
    env = dict(TRITON_CACHE_DIR=str(tmp_path / "triton"), FLASHATTN_WARMUP=warmup_env, TRITON_INTERPRET=None)
    started, in_backward, passed, failures = _fresh_process(f"D = {head_dim}\n" + FRESH_FWD_BWD, **env).split(
        " ", 3
    )
    assert passed == "True", failures
    return started == "True", int(in_backward)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fresh_process_forward_backward(tmp_path, head_dim):
    """Warm-up on (default), empty Triton cache: the import-time thread started, the backward compiled
    nothing itself (its kernels came from the compiles ahead), and the results pass the rule."""
    started, in_backward = _run_fresh(tmp_path, head_dim, None)
    assert started
    assert in_backward == 0


@pytest.mark.gpu
def test_fresh_process_warmup_off(tmp_path):
    started, in_backward = _run_fresh(tmp_path, 64, "0")
    assert not started
    assert in_backward >= 2  # dK/dV and dQ (and the preprocess) compile in the backward


def test_finish_waits_for_the_thread(monkeypatch):
    """_prefetch.finish() (what the benchmarks' timers call) returns once the import-time thread has ended."""
    release = threading.Event()
    thread = threading.Thread(target=release.wait, daemon=True)
    thread.start()
    monkeypatch.setattr(_prefetch, "_thread", thread)
    finisher = threading.Thread(target=_prefetch.finish, daemon=True)
    finisher.start()
    finisher.join(0.2)
    assert finisher.is_alive(), "finish() returned while the thread ran"
    release.set()
    finisher.join(5)
    assert not finisher.is_alive() and not thread.is_alive()
    monkeypatch.setattr(_prefetch, "_thread", None)
    _prefetch.finish()  # no thread: at once


@pytest.mark.parametrize("ordered", [False, True], ids=["any-order", "ordered"])
def test_fused_dq_choice_compiles_no_dq_kernel(monkeypatch, device, ordered):
    """Where the dK/dV choice is a FUSED_DQ config (forced here; Gluon's checks pass as on a Hopper GPU), the
    jobs are the preprocess and that dK/dV kernel, with stand-ins for the accumulator and (DQ_ORDERED) the
    turn counters as attention_backward allocates them: float32 [batch, heads, seqlen_q, D], int32 one per
    (batch, head, query tile) after the count of waits that gave up."""
    from flashattention.kernels import configs, gluon, warmup

    monkeypatch.setattr(gluon, "problems", lambda dims, args: [])
    flags = dict(GLUON_WS=True, FUSED_DQ=True, **({"DQ_ORDERED": True} if ordered else {}))
    fused = configs._c(16, 128, 4, 2, **flags)
    (q, k, v), _ = _inputs(device, head_dim=64, kv_heads=2)  # batch 1, 2 heads, 33 queries
    with hooks.overrides(configs={"bwd_dkdv": [fused]}):
        jobs = warmup.backward_jobs(q, k, v, 0.125, -1, -1)
    assert [name for name, *_ in jobs] == ["pre", "bwd_dkdv"]
    kwargs = jobs[1][3]
    assert kwargs["FUSED_DQ"] is True
    acc = kwargs["DQ_ACC"]
    assert (acc.dtype, tuple(acc.shape)) == (torch.float32, (1, 2, 33, 64))
    if ordered:
        turns = kwargs["DQ_TURNS"]
        assert (turns.dtype, turns.numel(), kwargs["dq_tiles"]) == (torch.int32, 1 + 6, 3)
    else:
        assert "DQ_TURNS" not in kwargs


def test_wait_from_two_threads_at_once(monkeypatch):
    """Two threads waiting at once (autograd's per-device backward threads) that both see the last pending
    compile: both block until it ends, and neither fails (each popped it before: the second pop raised)."""
    import concurrent.futures
    import threading

    from flashattention.kernels import warmup

    both_looked = threading.Barrier(2)

    class Pending(list):  # both threads see one compile pending before either takes it
        def __bool__(self):
            seen = len(self) > 0
            if seen:
                with contextlib.suppress(threading.BrokenBarrierError):
                    both_looked.wait(timeout=1)
            return seen

    compile_done = concurrent.futures.Future()
    monkeypatch.setattr(warmup, "_pending", Pending([compile_done]))
    monkeypatch.setattr(warmup._prefetch, "wait", lambda: None)
    errors, returned = [], []

    def backward_thread():
        try:
            warmup.wait()
            returned.append(compile_done.done())
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=backward_thread) for _ in range(2)]
    for t in threads:
        t.start()
    threading.Timer(0.2, compile_done.set_result, (None,)).start()
    for t in threads:
        t.join(timeout=10)
    assert errors == [] and returned == [True, True] and not warmup._pending
