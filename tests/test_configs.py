"""Every block shape of every autotune table and candidate, run through the kernels (the interpreter on
CPU): the tile ranges and masks must be right for each (BLOCK_M, BLOCK_N) pair, not only for the default
config. Whether a config compiles and fits a real GPU is tests/test_gpu.py's job."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from _helpers import NAMES, ODD_HEAD_DIM, compare_to_reference, make_inputs, reference_dtype, run_reference

from flashattention.kernels import configs, launch
from flashattention.kernels.common import persistent_count, persistent_tile, persistent_turn, round_tf32


def _entries() -> list:
    seen, params = set(), []
    for kernel, table, head_dim_pad, config in configs.all_configs(candidates=True):
        kw = config.kwargs
        if kw.get("GLUON_WS"):  # Gluon kernels do not run in the interpreter: tests/test_gpu.py checks them
            continue
        dtype = torch.float32 if table.endswith("-fp32") else torch.bfloat16
        flags = tuple(
            f for f in ("USE_TMA", "PERSISTENT", "LAZY_RESCALE", "ONE_LOOP", "POLY_EXP2") if kw.get(f)
        )
        key = (kernel, head_dim_pad, kw["BLOCK_M"], kw["BLOCK_N"], flags, dtype)
        if key in seen:
            continue
        seen.add(key)
        params.append(
            pytest.param(
                kernel,
                head_dim_pad,
                config,
                dtype,
                id=f"{kernel}-D{head_dim_pad}-BM{kw['BLOCK_M']}-BN{kw['BLOCK_N']}"
                f"{''.join('-' + f.lower() for f in flags)}-{str(dtype)[6:]}",
            )
        )
    return params


@pytest.mark.parametrize("kernel, head_dim_pad, config, dtype", _entries())
def test_config_block_shapes(kernel, head_dim_pad, config, dtype, device) -> None:
    head_dim = ODD_HEAD_DIM[head_dim_pad] if device == "cuda" else min(ODD_HEAD_DIM[head_dim_pad], 40)
    left, right = 50, 0  # causal + window: masked tiles on both sides and full ones between
    seqlen_q, seqlen_k = 150, 230
    q, k, v, dout = make_inputs(1, 2, 1, seqlen_q, seqlen_k, head_dim, dtype, device)
    scale = 1 / math.sqrt(head_dim)
    out, lse, lse2 = launch.attention_forward(
        q, k, v, softmax_scale=scale, left=left, right=right, config=config if kernel == "fwd" else None
    )
    dq, dk, dv = launch.attention_backward(
        dout,
        q,
        k,
        v,
        out,
        lse2,
        softmax_scale=scale,
        left=left,
        right=right,
        configs_override={kernel: config},
    )
    mask = {"causal": True, "window_size": (left, -1)}
    ref = run_reference(q, k, v, dout, dtype=reference_dtype(dtype, device), **mask)
    same = run_reference(q, k, v, dout, dtype=dtype, **mask)
    ours = dict(zip(NAMES, (out, lse, dq, dk, dv), strict=True))
    failures = [f for n in NAMES if (f := compare_to_reference(n, ours[n], ref[n], same[n])) is not None]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    "heads, kv_heads, seqlen_q, seqlen_k, head_dim, left, right",
    [(4, 2, 70, 130, 40, -1, 0), (2, 2, 100, 100, 64, 20, 5), (2, 1, 33, 17, 16, -1, 0)],
    ids=["GQA-causal", "window", "MQA-causal-empty-rows"],
)
def test_atomic_dq_backward(
    heads, kv_heads, seqlen_q, seqlen_k, head_dim, left, right, dtype, device
) -> None:
    """The experimental one-pass backward (dQ added with atomics by the dK/dV kernel) meets the same rule."""
    q, k, v, dout = make_inputs(2, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, device)
    scale = 1 / math.sqrt(head_dim)
    out, lse, lse2 = launch.attention_forward(q, k, v, softmax_scale=scale, left=left, right=right)
    dq, dk, dv = launch.attention_backward(
        dout, q, k, v, out, lse2, softmax_scale=scale, left=left, right=right, atomic_dq=True
    )
    mask = {"causal": False, "window_size": (left, right)}
    ref = run_reference(q, k, v, dout, dtype=reference_dtype(dtype, device), **mask)
    same = run_reference(q, k, v, dout, dtype=dtype, **mask)
    ours = {"dq": dq, "dk": dk, "dv": dv}
    failures = [f for n in ours if (f := compare_to_reference(n, ours[n], ref[n], same[n])) is not None]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_lazy_rescale_with_growing_scores(dtype, device) -> None:
    """LAZY_RESCALE keeps a stale row max until it grows by > 8 (log2 units): keys whose scale grows along
    the sequence make it rescale several times mid-row, and stay below the threshold in between."""
    config = next(c for c in configs.TABLES["fwd"]["interpret"][256] if c.kwargs.get("LAZY_RESCALE"))
    q, k, v, dout = make_inputs(1, 2, 2, 40, 200, 32, dtype, device)
    growth = torch.linspace(1.0, 2.0, 200, device=device)[None, None, :, None]
    k = (k.float() * growth).to(dtype)
    # precondition: in some row block the max grows by > 8 on later key tiles (a rescale) and by less on
    # others (the stale max is kept), as the kernel decides per block of BLOCK_M rows and BLOCK_N keys
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double())[0] * 0.5 * math.log2(math.e)

    def rescales(rows: torch.Tensor) -> int:
        m, count = torch.full((rows.shape[0],), -math.inf, dtype=rows.dtype, device=rows.device), 0
        for j in range(0, rows.shape[1], block_n):
            m_new = torch.maximum(m, rows[:, j : j + block_n].max(1).values)
            if (m_new - m).max() > 8:
                m, count = m_new, count + 1
        return count

    counts = [rescales(scores[h, r : r + block_m]) for h in range(2) for r in range(0, 40, block_m)]
    assert any(1 < c < math.ceil(200 / block_n) for c in counts), counts
    out, lse, lse2 = launch.attention_forward(q, k, v, softmax_scale=0.5, left=-1, right=-1, config=config)
    ref = run_reference(q, k, v, dout, dtype=reference_dtype(dtype, device), softmax_scale=0.5)
    same = run_reference(q, k, v, dout, dtype=dtype, softmax_scale=0.5)
    failures = [
        f
        for n, x in (("out", out), ("lse", lse))
        if (f := compare_to_reference(n, x, ref[n], same[n])) is not None
    ]
    assert not failures, "\n".join(failures)


@triton.jit
def _round_tf32_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """Applies kernels.common.round_tf32 to one block."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, round_tf32(x), mask=offs < n)


def test_round_tf32_is_round_to_nearest_ties_away() -> None:
    """The kernels' tf32 operand rounding (kernels.common.round_tf32) against the rounding worked out in
    float64: the tf32 grid at |x| in [2^e, 2^(e+1)) has spacing 2^(e-10); ties go away from zero."""
    mantissa_ties = torch.tensor([1 + (2 * i + 1) * 2.0**-11 for i in range(8)])  # exactly halfway
    x = torch.cat([torch.randn(992) * 10.0 ** torch.randint(-3, 4, (992,)), mantissa_ties, -mantissa_ties])
    x = x.float()
    y = torch.empty_like(x)
    _round_tf32_kernel[(1,)](x, y, x.numel(), BLOCK=1024)

    x64 = x.double()
    spacing = torch.exp2(torch.floor(torch.log2(x64.abs())) - 10)
    steps = x64.abs() / spacing
    expected = torch.sign(x64) * torch.floor(steps + 0.5) * spacing  # half away from zero
    assert torch.equal(y.double(), expected), (y.double() - expected).abs().max()
    assert not torch.equal(y, x)  # the low bits did change


@triton.jit
def _persistent_tile_kernel(out_ptr, num_m, BLOCK_M: tl.constexpr):
    tile = tl.program_id(0)
    off_bh, start_m = persistent_tile(tile, num_m, BLOCK_M)
    tl.store(out_ptr + 2 * tile, off_bh)
    tl.store(out_ptr + 2 * tile + 1, start_m)


@pytest.mark.parametrize("num_m, num_bh", [(5, 7), (1, 3), (6, 1)])
def test_persistent_tile_order(num_m: int, num_bh: int) -> None:
    """kernels.common.persistent_tile (the persistent forwards' schedule) visits every (head, query block)
    once, head by head, each head's blocks longest-first (the last query block first)."""
    tiles = num_m * num_bh
    out = torch.full((tiles, 2), -1, dtype=torch.int32)
    _persistent_tile_kernel[(tiles,)](out, num_m, BLOCK_M=16)
    got = [(int(bh), int(m) // 16) for bh, m in out]
    assert got == [(bh, m) for bh in range(num_bh) for m in reversed(range(num_m))], got


@triton.jit
def _persistent_turn_kernel(out_ptr, tiles, TURNS: tl.constexpr):
    prog, progs = tl.program_id(0), tl.num_programs(0)
    count = persistent_count(prog, progs, tiles)
    tl.store(out_ptr + prog * (TURNS + 1), count)
    for j in range(0, count):
        tl.store(out_ptr + prog * (TURNS + 1) + 1 + j, persistent_turn(j, prog, progs))


@pytest.mark.parametrize("progs, num_m, num_bh", [(132, 11, 256), (7, 5, 3), (4, 1, 2), (5, 3, 1)])
def test_persistent_turn_order(progs: int, num_m: int, num_bh: int) -> None:
    """kernels.common.persistent_turn / persistent_count (the persistent forwards' tile order): the programs
    together take every tile once, each its tiles in increasing order, and under a causal mask (block b of a
    head sees b + 1 key blocks) their work is balanced: at 2k on 132 SMs (11 query blocks of 192 rows per
    head, 256 heads), dealing every round forward gives programs from 1 to 16 key blocks a round."""
    tiles = num_m * num_bh
    turns = -(-tiles // progs)
    out = torch.full((progs, turns + 1), -1, dtype=torch.int32)
    _persistent_turn_kernel[(progs,)](out, tiles, TURNS=turns)
    taken = [[int(t) for t in row[1 : 1 + int(row[0])]] for row in out]
    assert sorted(t for row in taken for t in row) == list(range(tiles))
    assert all(row == sorted(row) for row in taken)
    assert all(int(row[0]) in (tiles // progs, turns) for row in out)
    if progs == 132:  # persistent_tile: tile t is query block num_m - 1 - t % num_m (longest first)
        work = [sum(num_m - t % num_m for t in row) for row in taken]
        full = [w for w, row in zip(work, taken, strict=True) if len(row) == turns]
        assert max(full) <= 1.1 * min(full), (min(full), max(full))


def test_autotune_key_names_are_kernel_arguments() -> None:
    """The launcher reads the key's values from the kernel's arguments (args.get): a name that is not an
    argument would read None for every case and make configs tuned for one case serve another."""
    from flashattention.kernels.bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
    from flashattention.kernels.fwd import attn_fwd_kernel

    only_in = {"CAN_TMA": attn_fwd_kernel, "ATOMIC_DQ": attn_bwd_dkdv_kernel}  # one kernel's flags
    for kernel in (attn_fwd_kernel, attn_bwd_dkdv_kernel, attn_bwd_dq_kernel):
        expected = {name for name in configs.AUTOTUNE_KEY if only_in.get(name, kernel) is kernel}
        missing = expected - set(kernel.arg_names)
        assert not missing, f"{kernel.__name__}: {missing}"


def test_seqlen_buckets_group_lengths_by_power_of_two() -> None:
    buckets = launch._seqlen_buckets
    assert buckets(1000, 1000) == buckets(600, 1024)  # both (1024, 1024)
    assert buckets(1000, 1000) != buckets(1025, 1000)  # q moves to 2048
    assert buckets(1000, 1000) != buckets(1000, 2000)  # k moves to 2048
    assert buckets(1, 5) == buckets(16, 16)  # decode-sized lengths share the smallest bucket
    assert buckets(20000, 70000) == buckets(16384, 16384)  # long lengths share the largest
    assert buckets(0, 0) == buckets(1, 1)


def _fake_launch_args(q: torch.Tensor, **extra) -> dict:
    """What _launch reads of a forward's arguments, for a fake launch: the tuning key's entries (all 1),
    Q, K and V (one tensor), seqlen_q and seqlen_k."""
    lengths = {"seqlen_q": q.shape[2], "seqlen_k": q.shape[2]}
    return {**{k: 1 for k in configs.AUTOTUNE_KEY}, "Q": q, "K": q, "V": q, **lengths, **extra}


def test_autotuned_case_launches_its_config_directly_and_capture_never_autotunes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A case's first call is tuned; later calls launch the config picked for it directly, also during
    CUDA graph capture. Tuning times kernels, which a capture cannot hold: a case first seen during capture
    gets the table's first config (with a warning)."""
    calls = []
    entry = configs.configs_for("fwd", "interpret", 64)
    assert len(entry) > 1
    picked, first = entry[1], entry[0]
    assert picked.kwargs != first.kwargs

    class FakeKernel:  # kernel_fn[grid](**kwargs) records the launch
        def __getitem__(self, grid):
            return lambda **kw: calls.append(
                ("direct", kw.get("BLOCK_M"), kw.get("BLOCK_N"), kw.get("num_warps"))
            )

    def fake_tune(kernel_fn, grid, args, tuned_entry, reset_to_zero):
        calls.append(("tune", len(tuned_entry)))
        return picked

    def direct(cfg):
        return ("direct", cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps)

    capturing = {"on": False}
    monkeypatch.setattr(configs, "autotune_enabled", lambda: True)
    monkeypatch.setattr(launch, "_tune", fake_tune)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["on"])
    monkeypatch.setattr(launch, "_best", {})
    args = _fake_launch_args(torch.zeros(1, 1, 16, 64))
    cpu, dt = torch.device("cpu"), torch.bfloat16

    def run(**changes):
        launch._launch(FakeKernel(), "fwd", None, {**args, **changes}, 64, cpu, dt)

    run()  # first call of the case: tuned over the whole entry, then its pick launched
    run()  # tuned: the pick, launched directly
    capturing["on"] = True
    run()  # capturing a tuned case: the same
    with pytest.warns(UserWarning, match="CUDA graph capture"):
        run(seqlen_buckets=2)  # capturing a new case: the first config, launched directly
    assert calls == [("tune", len(entry)), direct(picked), direct(picked), direct(picked), direct(first)]
    assert launch.last_launched["fwd"] is first  # the last launch


def test_gluon_configs_apply_only_where_they_can(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GLUON_WS config (Hopper, 16-bit, head dim 64/128/256, TMA-aligned) in a table entry is skipped where
    it does not apply (here: the CPU interpreter), and forcing one gives a clear error, not a wrong result."""
    gluon = configs._c(128, 128, 4, 2, GLUON_WS=True)
    triton_cfg = configs.configs_for("fwd", "interpret", 64)[0]
    monkeypatch.setattr(configs, "configs_for", lambda *a: [gluon, triton_cfg])
    launched = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda **kw: launched.append((kw.get("BLOCK_M"), kw.get("BLOCK_N"), kw.get("GLUON_WS")))

    q = torch.zeros(1, 1, 16, 64, dtype=torch.bfloat16)
    args = _fake_launch_args(q, HEAD_DIM=64, CAN_TMA=True)
    assert launch._gluon_problems(args)  # the interpreter cannot run Gluon
    launch._launch(FakeKernel(), "fwd", None, args, 64, q.device, q.dtype)
    assert launched == [(triton_cfg.kwargs["BLOCK_M"], triton_cfg.kwargs["BLOCK_N"], None)]
    with pytest.raises(ValueError, match="GLUON_WS forward config does not apply: .*interpreter"):
        launch._launch(FakeKernel(), "fwd", None, args, 64, q.device, q.dtype, config=gluon)
    fp32 = {**args, "Q": q.float(), "HEAD_DIM": 72, "CAN_TMA": False}
    problems = " ".join(launch._gluon_problems(fp32))
    assert "float32" in problems and "head dim 64, 128 or 256, got 72" in problems and "TMA" in problems
    dkdv = {**args, "DK": q, "HEAD_DIM": 256}  # the dK/dV kernel (kernels/bwd_ws.py) stops at 128
    assert "head dim 64 or 128, got 256" in " ".join(launch._gluon_problems(dkdv))
    with pytest.raises(ValueError, match="GLUON_WS dK/dV config does not apply"):
        launch._run(FakeKernel(), None, dkdv, gluon)


def test_tuner_picks_the_fastest_config_that_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """launch._tune times every config (triton's do_bench, faked here with fixed times), skips the ones that
    do not fit the GPU, zeroes the atomic buffers before each timed run and before the real one, and says
    so clearly when no config fits."""
    from triton.runtime.errors import OutOfResources

    entry = [configs._c(64, 64, 4, 1), configs._c(32, 32, 4, 1), configs._c(16, 16, 4, 1)]
    times = {64: 3.0, 32: None, 16: 2.0}  # 32x32 "does not fit"
    buf = torch.ones(4)

    class FakeKernel:
        def __getitem__(self, grid):
            def launch(**kw):
                if times[kw["BLOCK_M"]] is None:
                    raise OutOfResources(300_000, 232_448, "shared memory")
                assert torch.all(buf == 0), "an atomic buffer was not zeroed before the run"
                buf.fill_(kw["BLOCK_M"])  # what an atomic kernel leaves behind

            return launch

    def fake_bench(fn, return_mode):
        fn()
        assert return_mode == "median"
        return times[int(buf[0])]

    monkeypatch.setattr(launch.triton.testing, "do_bench", fake_bench)
    args = {"DQ_ACC": buf}
    best = launch._tune(FakeKernel(), None, args, entry, ("DQ_ACC",))
    assert best is entry[2]
    assert torch.all(buf == 0)  # zeroed again after the last timed run
    times.update({64: None, 16: None})
    with pytest.raises(OutOfResources, match="no config of the table fits"):
        launch._tune(FakeKernel(), None, args, entry, ())


def test_tuner_times_close_configs_again_in_reverse_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU that slows down while it tunes (clocks drifting with heat) makes one pass in table order favour
    the first configs. Here each timing grows by 0.02 per call: in the first pass A (1.00) reads faster
    than B (true 0.99, read 1.01); the second pass, reversed, reads B 1.03 and A 1.06, so the means rank B
    first. C (far slower) is not timed again."""
    entry = [configs._c(64, 64, 4, 1), configs._c(32, 32, 4, 1), configs._c(16, 16, 4, 1)]
    true = {64: 1.00, 32: 0.99, 16: 2.00}
    order = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda **kw: order.append(kw["BLOCK_M"])

    def fake_bench(fn, return_mode):
        fn()
        return true[order[-1]] + 0.02 * (len(order) - 1)

    monkeypatch.setattr(launch.triton.testing, "do_bench", fake_bench)
    best = launch._tune(FakeKernel(), None, {}, entry, ())
    assert order == [64, 32, 16, 32, 64]
    assert best is entry[1]


def test_gluon_compile_failure_runs_the_triton_kernel_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gluon is experimental: where this Triton cannot compile a GLUON_WS config (faked here), the launcher
    warns once, runs the table's Triton config, and skips the Gluon configs at once afterwards, tuned or not.
    A compile error of a Triton config is a bug and propagates."""
    from triton.compiler.errors import CompilationError

    gluon, triton_cfg = configs._c(128, 128, 4, 2, GLUON_WS=True), configs._c(32, 16, 4, 1)
    monkeypatch.setattr(configs, "configs_for", lambda *a: [gluon, triton_cfg])
    real_problems = launch._gluon_problems  # all but the interpreter's "needs a CUDA GPU"
    monkeypatch.setattr(
        launch, "_gluon_problems", lambda args: [p for p in real_problems(args) if "CUDA GPU" not in p]
    )
    monkeypatch.setattr(launch, "_gluon_compile_error", "")
    launched = []

    def fake_run(kernel_fn, grid, args, cfg):
        launched.append("gluon" if cfg.kwargs.get("GLUON_WS") else "triton")
        if cfg.kwargs.get("GLUON_WS"):
            raise CompilationError(None, None, "unsupported layout")

    monkeypatch.setattr(launch, "_run", fake_run)
    q = torch.zeros(1, 1, 16, 64, dtype=torch.bfloat16)
    args = _fake_launch_args(q, HEAD_DIM=64, CAN_TMA=True)
    assert launch._gluon_problems(args) == []  # it applies until it fails to compile
    with pytest.warns(UserWarning, match=r"Gluon kernel .* does not compile .*unsupported layout"):
        launch._launch(None, "fwd", None, args, 64, q.device, q.dtype)  # autotuning off: first that runs
    assert launched == ["gluon", "triton"]
    assert "failed to compile" in " ".join(launch._gluon_problems(args))
    launch._launch(None, "fwd", None, args, 64, q.device, q.dtype)
    assert launched == ["gluon", "triton", "triton"]  # no second attempt

    # tuned: the failing Gluon config is skipped in the timing runs (with the warning), the Triton one wins
    monkeypatch.setattr(launch, "_gluon_compile_error", "")
    monkeypatch.setattr(configs, "autotune_enabled", lambda: True)
    monkeypatch.setattr(launch, "_best", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(launch.triton.testing, "do_bench", lambda fn, return_mode: fn() or 1.0)
    launched.clear()
    with pytest.warns(UserWarning, match="does not compile"):
        launch._launch(None, "fwd", None, args, 64, q.device, q.dtype)
    assert launched == ["gluon", "triton", "triton"] and launch.last_launched["fwd"] is triton_cfg

    def broken(kernel_fn, grid, args, cfg):
        raise CompilationError(None, None, "a bug in a Triton kernel")

    monkeypatch.setattr(launch, "_run", broken)
    monkeypatch.setattr(configs, "autotune_enabled", lambda: False)
    monkeypatch.setattr(configs, "configs_for", lambda *a: [triton_cfg, configs._c(16, 16, 4, 1)])
    with pytest.raises(CompilationError, match="a bug in a Triton kernel"):
        launch._launch(None, "fwd", None, args, 64, q.device, q.dtype)


def test_every_thread_gets_the_scratch_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's allocator (device-side tensor descriptors of the Gluon kernels) lives in a ContextVar, so a
    thread that did not set it has none: autograd's backward thread, a server's worker threads. The launcher
    installs it in every thread that launches, and leaves an allocator the user set alone. (CPU: the check
    runs as on a GPU, with the interpreter's switch off; nothing is allocated.)"""
    from triton.runtime import _allocation

    monkeypatch.setattr(configs, "interpreting", lambda: False)
    t = torch.zeros(4, 8, 16, 16)

    def allocator_after_check(preset=None):
        if preset is not None:
            triton.set_allocator(preset)
        assert launch._tma_ok(t, t)
        return _allocation._allocator.get()

    def in_new_thread(fn):
        import threading

        got = []
        thread = threading.Thread(target=lambda: got.append(fn()))
        thread.start()
        thread.join()
        return got[0]

    # one thread installs it; a fresh thread starts without one all the same, and gets its own
    assert in_new_thread(allocator_after_check) is launch._torch_scratch
    assert isinstance(in_new_thread(_allocation._allocator.get), _allocation.NullAllocator)
    assert in_new_thread(allocator_after_check) is launch._torch_scratch

    def users(size, align, stream):
        raise AssertionError("not called here")

    assert in_new_thread(lambda: allocator_after_check(users)) is users


def test_host_descriptors_cover_every_head_and_skip_broadcasts(monkeypatch: pytest.MonkeyPatch) -> None:
    """HOST_DESC (Gluon forward): Q, K and V become [B, H, S, D] descriptors over the tensors' own strides
    (a BSHD view included), with a consumer's 64 query rows or block_n keys per box and the swizzle of the
    kernel's shared tiles; a broadcast (stride-0) K or V leaves the config out rather than failing later, and
    so does a call too small for the descriptors' host time to pay off."""
    gl = pytest.importorskip("triton.experimental.gluon.language")
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    q = torch.zeros(2, 100, 4, 64, dtype=torch.bfloat16).transpose(1, 2)  # BSHD storage, BHSD view
    k = torch.zeros(2, 2, 80, 64, dtype=torch.bfloat16)
    descs = launch._host_descriptors({"Q": q, "K": k, "V": k}, 128)
    assert list(descs["Q"].shape) == [2, 4, 100, 64] and list(descs["Q"].strides) == list(q.stride())
    assert list(descs["Q"].block_shape) == [1, 1, 64, 64]
    assert list(descs["K"].block_shape) == list(descs["V"].block_shape) == [1, 1, 128, 64]
    kernel_tile = gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16)
    assert descs["Q"].layout.swizzle_byte_width == kernel_tile.swizzle_byte_width == 128

    monkeypatch.setattr(launch, "_gluon_problems", lambda args: [])  # as on a Hopper GPU
    cfg = configs._c(128, 128, 4, 2, GLUON_WS=True, HOST_DESC=True)
    assert not launch._applies(cfg, {"Q": q, "K": k, "V": k, "seqlen_k": 80, "HAS_HI": False})  # too small
    # B * H * Sq * D * Sk = 2**36: 2**35 causal, the threshold
    big = torch.empty(8, 32, 2048, 64, dtype=torch.bfloat16, device="meta")
    for causal, sk, applies in (
        (False, 2048, True),
        (True, 2048, True),
        (True, 1024, False),
        (False, 512, False),
    ):
        args = {"Q": big, "K": big, "V": big, "seqlen_k": sk, "HAS_HI": causal}
        assert launch._applies(cfg, args) is applies, (causal, sk)  # small calls: the host cost dominates
    broadcast = torch.empty(8, 1, 2048, 64, dtype=torch.bfloat16, device="meta").expand(8, 32, 2048, 64)
    assert not launch._applies(
        cfg, {"Q": big, "K": broadcast, "V": broadcast, "seqlen_k": 2048, "HAS_HI": False}
    )


def test_a_case_tuned_on_plain_tensors_never_gives_a_broadcast_one_its_host_desc_pick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tuning key tells broadcast (stride-0) K/V apart: a HOST_DESC config picked for plain tensors of a
    case is not launched for expanded ones of the same shape, which get a config that takes them."""
    host = configs._c(128, 128, 4, 2, GLUON_WS=True, HOST_DESC=True)
    triton_cfg = configs.configs_for("fwd", "interpret", 64)[0]
    launched = []
    monkeypatch.setattr(configs, "configs_for", lambda *a: [host, triton_cfg])
    monkeypatch.setattr(configs, "autotune_enabled", lambda: True)
    monkeypatch.setattr(launch, "_gluon_problems", lambda args: [])  # as on a Hopper GPU
    monkeypatch.setattr(launch, "_tune", lambda kernel_fn, grid, args, entry, reset: entry[0])
    monkeypatch.setattr(launch, "_run", lambda kernel_fn, grid, args, cfg: launched.append(cfg))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(launch, "_best", {})
    monkeypatch.setattr(launch, "_HOST_DESC_MIN_WORK", 0)  # a tiny case stands for a large one
    q = torch.zeros(1, 2, 16, 64, dtype=torch.bfloat16)
    plain = _fake_launch_args(q, HAS_HI=False)
    kv = torch.zeros(1, 1, 16, 64, dtype=torch.bfloat16).expand(1, 2, 16, 64)
    for args in (plain, {**plain, "K": kv, "V": kv}, plain):
        launch._launch(None, "fwd", None, args, 64, q.device, q.dtype)
    assert launched == [host, triton_cfg, host]


@pytest.mark.parametrize("sms", [1, 3, 132])
def test_persistent_programs(sms: int) -> None:
    """launch._persistent_programs: never more programs than SMs, no program more turns than one program
    per SM would give, and the fewest such programs (one fewer would need another turn)."""
    from flashattention.kernels.launch import _persistent_programs

    for tiles in [1, 2, 5, 131, 132, 133, 2816, 10000]:
        progs = _persistent_programs(tiles, sms)
        turns = -(-tiles // min(sms, tiles))
        assert 1 <= progs <= min(sms, tiles)
        assert -(-tiles // progs) == turns
        assert progs == 1 or -(-tiles // (progs - 1)) > turns
    assert _persistent_programs(2816, 132) == 128  # 22 turns each: D64 at 2k on an H100


def test_overlap_configs_skip_length_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A WS_OVERLAP forward config does not apply where a sequence length is 1 (Triton 3.6 cannot compile
    that specialisation); others do, and the length-1 case has a tuning key of its own."""
    monkeypatch.setattr(launch, "_gluon_problems", lambda args: [])  # as on a Hopper GPU
    overlap = configs._c(192, 128, 4, 2, GLUON_WS=True, WS_CONSUMERS=3, PERSISTENT=True, WS_OVERLAP=True)
    plain = configs._c(192, 128, 4, 2, GLUON_WS=True, WS_CONSUMERS=3, PERSISTENT=True)
    for seqlen_q, seqlen_k, applies in ((1, 777, False), (37, 1, False), (2, 2, True), (2048, 2048, True)):
        args = {"seqlen_q": seqlen_q, "seqlen_k": seqlen_k}
        assert launch._applies(overlap, args) is applies, (seqlen_q, seqlen_k)
        assert launch._applies(plain, args), (seqlen_q, seqlen_k)
        assert launch._length_one(args) is not applies


def test_a_plan_replays_its_launch_with_the_calls_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """launch._Plan, the replay of a seen call's launch, kept by _keep and launched by _replay (GPU-only
    in use; here with a stand-in compiled kernel): the kernel's arguments in its signature order, the
    config's constexprs and the defaults filled in, the grid evaluated once and padded to three axes; a
    replay puts in the call's own tensors, remakes the host descriptors around them (same shape, strides,
    box and layout), makes a fresh zero tile counter, passes everything else as the first launch had it,
    and records the config as the kernel's last launched."""
    hopper = pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    import inspect
    import weakref

    def kernel(Q, K, O, n, BLOCK: tl.constexpr, FLAG: tl.constexpr = False, TILE_COUNTER=None, PROBE=None):
        pass

    launches = []

    class Compiled:  # what Triton's launch returns: the launcher and its handles
        function, packed_metadata = "function", "metadata"

        def launch_metadata(self, grid, stream, *values):
            return None

        def run(self, *a):
            launches.append(a)

    class Driver:  # the current stream of the device
        class active:  # noqa: N801
            get_current_stream = staticmethod(lambda index: "stream")

    monkeypatch.setattr(launch.triton.runtime, "driver", Driver)
    monkeypatch.setattr(launch, "_ensure_allocator", lambda: None)  # (a CUDA allocator: not on this CPU)
    fn = type("KernelFn", (), {"signature": inspect.signature(kernel)})()
    q, k, o = (torch.randn(1, 2, 64, 16) for _ in range(3))
    boxes = launch.host_desc_boxes(16, 32, pytest.importorskip("triton.experimental.gluon.language").float32)
    box, layout = boxes["K"]
    desc = hopper.TensorDescriptor(k, list(k.shape), list(k.stride()), list(box), layout)
    config = triton.Config({"BLOCK": 4, "WS_DYNAMIC": True}, num_warps=4)
    args = dict(Q=q, K=desc, O=o, n=5, TILE_COUNTER=torch.zeros(1, dtype=torch.int32))
    monkeypatch.setattr(launch, "_plans", {})
    monkeypatch.setattr(launch, "last_launched", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    launch._keep(("case",), ("fwd", fn, Compiled(), lambda meta: (meta["BLOCK"] * 2, 3), args, config))
    (plan,) = launch._plans[("case",)]
    assert plan.grid == (8, 3, 1) and plan.name == "fwd"
    # the plan keeps none of the first call's tensors alive (a cache of plans would hold their memory)
    alive = weakref.ref(q), weakref.ref(k), weakref.ref(args["TILE_COUNTER"])
    del q, k, o, desc, args
    assert all(ref() is None for ref in alive)

    q2, k2, o2 = (torch.randn(1, 2, 64, 16) for _ in range(3))
    assert launch._replay(("case",), torch.device("cpu"), {"Q": q2, "K": k2, "O": o2})
    assert launch.last_launched["fwd"] is config and not launch._replay(("other",), torch.device("cpu"), {})
    grid, stream, function, metadata = launches[0][:3], launches[0][3], launches[0][4], launches[0][5]
    assert (grid, stream, function, metadata) == ((8, 3, 1), "stream", "function", "metadata")
    values = launches[0][9:]
    assert len(values) == 8 and values[0] is q2 and values[2] is o2
    assert values[1].base is k2 and values[1].layout is layout
    assert [list(x) for x in (values[1].shape, values[1].strides, values[1].block_shape)] == [
        list(k2.shape),
        list(k2.stride()),
        list(box),
    ]
    assert values[3:6] == (5, 4, False)
    assert values[6].tolist() == [0]
    assert values[7] is None


def test_plan_keys_tell_apart_what_the_launch_arguments_depend_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch plan is replayed only for a call whose key matches (launch._plan_key). The forward's and
    the backward's keys change with the fp32 matmul precision (torch's global setting, which decides
    PRECISION), and a key changes with a misaligned pointer, the strides, the scale and the tuning state;
    the same call gets the same key."""
    keys = []
    real_key = launch._plan_key
    monkeypatch.setattr(launch, "_plan_key", lambda *a: keys.append(a))  # the launchers' keys, recorded
    q, k, v, dout = make_inputs(1, 2, 2, 32, 32, 16, torch.float32, "cpu")
    before = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            out, _, lse2 = launch.attention_forward(q, k, v, softmax_scale=0.25, left=-1, right=0)
            launch.attention_backward(dout, q, k, v, out, lse2, softmax_scale=0.25, left=-1, right=0)
    finally:
        torch.set_float32_matmul_precision(before)
    (fwd_exact, bwd_exact, fwd_tf32, bwd_tf32) = [a[0:1] + a[2:] for a in keys]  # (tensors left out)
    assert fwd_exact != fwd_tf32 and bwd_exact != bwd_tf32, keys

    monkeypatch.setattr(launch, "_plan_key", real_key)
    monkeypatch.setattr(configs, "interpreting", lambda: False)  # keys are made on GPUs only
    buf = torch.randn(q.numel() + 1)

    def key(t=q, scale=0.25):
        return launch._plan_key("fwd", (t, k), scale, -1, 0, "ieee")

    same = key()
    assert key() == same
    assert key(buf[1:].view(q.shape)) != same  # 4 bytes past a 16-byte boundary
    assert key(q.transpose(2, 3).contiguous().transpose(2, 3)) != same
    assert key(scale=0.5) != same
    monkeypatch.setattr(launch, "_best", {})  # another tuning cache (as tests swap it)
    assert key() != same
