"""The host side of the Triton backend, on the CPU: config choice (forced, tuned, the tables' picks), Gluon
eligibility and host descriptors, the tuner, tuning picks kept on disk, launch plans and their keys, and
Triton's allocator per thread. Fake kernels stand in for compiled ones where a launch is only recorded."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import triton
import triton.language as tl
from _helpers import make_inputs

from flashattention.kernels import configs, device, gluon, hooks, launch, plans, registry, tuning


class FakeKernel:
    """kernel_fn[grid](**kwargs) records (BLOCK_M, BLOCK_N, GLUON_WS, num_warps) of each launch."""

    def __init__(self, launched: list, fail=lambda kw: None) -> None:
        self.launched, self.fail = launched, fail

    def __getitem__(self, grid):
        def launch_(**kw):
            self.fail(kw)
            self.launched.append(
                (kw.get("BLOCK_M"), kw.get("BLOCK_N"), kw.get("GLUON_WS"), kw.get("num_warps"))
            )

        return launch_


def _as(config) -> tuple:
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw.get("GLUON_WS"), config.num_warps


def _fake_args(q: torch.Tensor, **extra) -> dict:
    """What the registry reads of a forward's arguments: the tuning key's entries, Q, K, V, the lengths."""
    lengths = {"seqlen_q": q.shape[2], "seqlen_k": q.shape[2]}
    key = {k: 1 for k in configs.AUTOTUNE_KEY}
    return {**key, "HEAD_DIM_PAD": 64, "HAS_HI": False, "Q": q, "K": q, "V": q, **lengths, **extra}


@pytest.fixture
def fake_fwd(monkeypatch: pytest.MonkeyPatch):
    """The registry's forward with a recording fake in place of the Triton kernel (the Gluon one too)."""
    launched = []
    kernel = registry.Kernel("fwd", "forward", FakeKernel(launched), ("fwd_ws", "x"), (64, 128, 256))
    monkeypatch.setattr(registry.Kernel, "fn_for", lambda self, config: self.triton_fn)
    monkeypatch.setitem(registry.KERNELS, "fwd", kernel)
    return kernel, launched


def test_picks_name_configs_of_their_table_entry() -> None:
    """Every label in configs.PICKS is a config of its table entry, and configs.ordered puts it first."""
    for kernel, tables in configs.PICKS.items():
        for table, dims in tables.items():
            for dim, rows in dims.items():
                for causal, up_to, name in rows:
                    entry = configs.configs_for(kernel, table, dim)
                    pick = configs.by_label(entry, name)
                    seqlen = up_to or 1 << 20
                    ordered = configs.ordered(kernel, table, dim, causal, seqlen)
                    assert sorted(map(configs.label, ordered)) == sorted(map(configs.label, entry))
                    first_match = next(r for r in rows if r[0] == causal and (r[1] is None or seqlen <= r[1]))
                    assert ordered[0] is configs.by_label(entry, first_match[2]), (kernel, dim, causal, up_to)
                    assert pick in entry


def test_ordered_picks_by_mask_and_length() -> None:
    d64 = configs.configs_for("fwd", "sm90", 64)
    assert configs.label(configs.ordered("fwd", "sm90", 64, False, 1000)[0]) == "128x64 w4 s3"
    assert "WS_PINGPONG" in configs.label(configs.ordered("fwd", "sm90", 64, False, 4096)[0])
    assert "WS_ROWSUM_MMA" in configs.label(configs.ordered("fwd", "sm90", 64, True, 4096)[0])
    assert "WS_PINGPONG" in configs.label(configs.ordered("fwd", "sm90", 64, True, 4097)[0])
    # D 256: causal picks the persistent config, non-causal (no pick) keeps the entry's order
    assert configs.label(configs.ordered("fwd", "sm90", 256, True, 4096)[0]) == (
        "128x64 w4 s2 GLUON_WS PERSISTENT HOST_DESC"
    )
    assert list(configs.ordered("fwd", "sm90", 256, False, 4096)) == configs.configs_for("fwd", "sm90", 256)
    assert list(configs.ordered("fwd", "sm80", 64, True, 4096)) == configs.configs_for("fwd", "sm80", 64)
    assert len(configs.ordered("fwd", "sm90", 64, True, 4096)) == len(d64)


def test_varlen_takes_the_picks_twin_without_host_desc() -> None:
    """A varlen launch cannot take HOST_DESC (registry.Kernel.takes_varlen): where the pick has it, the same
    config without it goes first; where the entry has no such twin, the order is the entry's."""
    d128 = configs.ordered("fwd", "sm90", 128, False, 2048)  # pick: persistent with host descriptors
    assert configs.label(d128[0]) == "128x128 w4 s2 GLUON_WS PERSISTENT HOST_DESC"
    twin = configs.without_host_desc(d128)
    assert configs.label(twin[0]) == "128x128 w4 s2 GLUON_WS PERSISTENT"
    assert sorted(map(configs.label, twin)) == sorted(map(configs.label, d128))
    d64 = configs.ordered("fwd", "sm90", 64, True, 4096)  # its pick has no twin in the D64 entry
    assert configs.without_host_desc(d64) == d64
    plain = configs.ordered("fwd", "sm90", 64, False, 1000)  # a Triton pick stays
    assert configs.without_host_desc(plain) == plain


def test_untuned_launch_compiles_one_config_the_pick(fake_fwd) -> None:
    """Without autotuning a call launches exactly one config: the entry's pick (here the interpreter
    table's first), nothing else is compiled or timed."""
    kernel, launched = fake_fwd
    q = torch.zeros(1, 1, 16, 64)
    registry.launch("fwd", None, _fake_args(q), q.device, q.dtype)
    first = configs.configs_for("fwd", "interpret", 64)[0]
    assert launched == [_as(first)] and registry.last_launched["fwd"] is first


def test_tuned_case_is_kept_on_disk_and_capture_never_tunes(fake_fwd, tmp_path, monkeypatch) -> None:
    """With autotuning a case's first call is tuned over the entry, the pick is written to the cache
    directory, later calls (and a new process: the in-memory picks forgotten) launch it directly, also
    during CUDA graph capture; a case first seen during capture gets the table's pick, with a warning."""
    kernel, launched = fake_fwd
    monkeypatch.setenv("FLASHATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "enabled", lambda: True)  # the interpreter never tunes
    entry = configs.configs_for("fwd", "interpret", 64)
    tuned = []

    def fake_tune(run, usable, applies):
        tuned.append(len(usable))
        run(usable[1])  # a timing run
        return usable[1]

    capturing = {"on": False}
    monkeypatch.setattr(tuning, "tune", fake_tune)
    monkeypatch.setattr(device, "capturing", lambda: capturing["on"])
    q = torch.zeros(1, 1, 16, 64)
    args = _fake_args(q)
    with hooks.overrides():
        registry.launch("fwd", None, args, q.device, q.dtype)
        registry.launch("fwd", None, args, q.device, q.dtype)
        (stored,) = tmp_path.glob("tuning-cpu-*.json")
        assert list(json.loads(stored.read_text()).values()) == [configs.label(entry[1])]
        hooks.clear_caches()  # a new process
        capturing["on"] = True
        registry.launch("fwd", None, args, q.device, q.dtype)
        with pytest.warns(UserWarning, match="CUDA graph capture"):
            registry.launch("fwd", None, {**args, "seqlen_buckets": 2}, q.device, q.dtype)
    assert tuned == [len(entry)]
    assert launched == [_as(entry[1])] * 4 + [_as(entry[0])]


def test_pick_store_ignores_stale_and_torn_files(tmp_path, monkeypatch) -> None:
    """A stored label that is no longer in the entry (tables change between versions) reads as no pick; a
    torn or foreign file reads as empty; put writes a file the next process reads."""
    monkeypatch.setenv("FLASHATTN_CACHE_DIR", str(tmp_path))
    cpu, entry = torch.device("cpu"), configs.configs_for("fwd", "interpret", 64)
    store = tuning.PickStore()
    store.put(cpu, "case", entry[2])
    assert tuning.PickStore().get(cpu, "case", entry) is entry[2]
    assert tuning.PickStore().get(cpu, "case", entry[:2]) is None
    (path,) = tmp_path.glob("*.json")
    path.write_text("{not json")
    assert tuning.PickStore().get(cpu, "case", entry) is None
    path.write_text("[1, 2]")
    assert tuning.PickStore().get(cpu, "case", entry) is None


def test_gluon_configs_apply_only_where_they_can(fake_fwd) -> None:
    """A GLUON_WS config in a table entry is skipped where it does not apply (here: the CPU interpreter), and
    forcing one gives a clear error, not a wrong result."""
    kernel, launched = fake_fwd
    gluon_cfg = configs._c(128, 128, 4, 2, GLUON_WS=True)
    triton_cfg = configs.configs_for("fwd", "interpret", 64)[0]
    q = torch.zeros(1, 1, 16, 64, dtype=torch.bfloat16)
    args = _fake_args(q, HEAD_DIM=64, CAN_TMA=True)
    assert gluon.problems((64, 128, 256), args)  # the interpreter cannot run Gluon
    with hooks.overrides(configs={"fwd": [gluon_cfg, triton_cfg]}):
        registry.launch("fwd", None, args, q.device, q.dtype)
    assert launched == [_as(triton_cfg)]
    with pytest.raises(ValueError, match="GLUON_WS forward config does not apply: .*interpreter"):
        registry.launch("fwd", None, args, q.device, q.dtype, config=gluon_cfg)
    with hooks.overrides(configs={"fwd": [gluon_cfg]}), pytest.raises(ValueError, match="does not apply"):
        registry.launch("fwd", None, args, q.device, q.dtype)  # nothing forced applies: the reason
    fp32 = {**args, "Q": q.float(), "HEAD_DIM": 72, "CAN_TMA": False}
    problems = " ".join(gluon.problems((64, 128, 256), fp32))
    assert "float32" in problems and "head dim 64, 128 or 256, got 72" in problems and "TMA" in problems
    dkdv = registry.KERNELS["bwd_dkdv"]  # the Gluon dK/dV (kernels/bwd_ws.py) takes 64, 128 and 256
    assert "head dim 64, 128 or 256, got 96" in " ".join(dkdv.problems(gluon_cfg, {**args, "HEAD_DIM": 96}))
    with pytest.raises(ValueError, match="GLUON_WS dK/dV config does not apply"):
        registry.run(dkdv, None, args, gluon_cfg)
    dq = registry.KERNELS["bwd_dq"]  # the Gluon dQ (kernels/bwd_ws.py): the same head dims
    assert "head dim 64, 128 or 256, got 96" in " ".join(dq.problems(gluon_cfg, {**args, "HEAD_DIM": 96}))
    # FUSED_DQ: only with the accumulator attention_backward makes, and not at head dim 256
    fused = configs._c(64, 128, 4, 2, GLUON_WS=True, FUSED_DQ=True)
    assert "float32 accumulator" in " ".join(dkdv.problems(fused, args))
    with_acc = {**args, "DQ_ACC": torch.zeros(1, 1, 16, 64), "HEAD_DIM_PAD": 256}
    found = " ".join(dkdv.problems(fused, with_acc))
    assert "float32 accumulator" not in found and "FUSED_DQ takes head dims 64 and 128" in found
    ordered = configs._c(64, 128, 4, 2, GLUON_WS=True, DQ_ORDERED=True)  # orders FUSED_DQ's adds only
    assert "it needs FUSED_DQ" in " ".join(dkdv.problems(ordered, args))
    ordered_fused = configs._c(64, 128, 4, 2, GLUON_WS=True, FUSED_DQ=True, DQ_ORDERED=True)
    assert "needs FUSED_DQ" not in " ".join(dkdv.problems(ordered_fused, {**args, "DQ_ACC": torch.zeros(1)}))


def test_gluon_compile_failure_runs_the_triton_kernel_with_a_warning(fake_fwd, monkeypatch) -> None:
    """Gluon is experimental: where this Triton cannot compile a GLUON_WS config (faked here), the launch
    warns once, runs the entry's Triton config, and skips the Gluon configs at once afterwards, tuned or
    not. A compile error of a Triton config is a bug and propagates."""
    from triton.compiler.errors import CompilationError

    kernel, launched = fake_fwd

    def fail(kw):
        if kw.get("GLUON_WS") or kw.get("BLOCK_M") == 8:
            raise CompilationError(None, None, "unsupported layout" if kw.get("GLUON_WS") else "a bug")

    kernel.triton_fn.fail = fail
    gluon_a, gluon_b = configs._c(128, 128, 4, 2, GLUON_WS=True), configs._c(64, 128, 4, 2, GLUON_WS=True)
    triton_cfg = configs._c(32, 16, 4, 1)
    monkeypatch.setattr(
        gluon, "problems", lambda dims, args: [gluon._compile_error] if gluon._compile_error else []
    )
    monkeypatch.setattr(gluon, "_compile_error", "")
    q = torch.zeros(1, 1, 16, 64, dtype=torch.bfloat16)
    args = _fake_args(q, HEAD_DIM=64, CAN_TMA=True)
    with hooks.overrides(configs={"fwd": [gluon_a, gluon_b, triton_cfg]}):
        with pytest.warns(UserWarning, match=r"Gluon kernel .* does not compile .*unsupported layout"):
            registry.launch("fwd", None, args, q.device, q.dtype)
        assert registry.last_launched["fwd"] is triton_cfg and gluon._compile_error
        registry.launch("fwd", None, args, q.device, q.dtype)  # no second attempt
    assert registry.last_launched["fwd"] is triton_cfg
    with hooks.overrides(configs={"fwd": [configs._c(8, 16, 4, 1), triton_cfg]}):
        with pytest.raises(CompilationError, match="a bug"):
            registry.launch("fwd", None, args, q.device, q.dtype)


def test_tuner_picks_the_fastest_config_that_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """tuning.tune times every config (triton's do_bench, faked here with fixed times), skips the ones that
    do not fit the GPU and those that no longer apply, and says so clearly when no config fits."""
    from triton.runtime.errors import OutOfResources

    entry = [
        configs._c(64, 64, 4, 1),
        configs._c(32, 32, 4, 1),
        configs._c(16, 16, 4, 1),
        configs._c(8, 8, 4, 1),
    ]
    times = {64: 3.0, 32: None, 16: 2.0, 8: 1.0}  # 32x32 "does not fit"; 8x8 no longer applies
    ran = []

    def run(config):
        if times[config.kwargs["BLOCK_M"]] is None:
            raise OutOfResources(300_000, 232_448, "shared memory")
        ran.append(config.kwargs["BLOCK_M"])

    monkeypatch.setattr(tuning.triton.testing, "do_bench", lambda fn, return_mode: fn() or times[ran[-1]])
    assert tuning.tune(run, entry, lambda c: c.kwargs["BLOCK_M"] != 8) is entry[2]
    times.update({64: None, 16: None})
    with pytest.raises(OutOfResources, match="no config of the table fits"):
        tuning.tune(run, entry[:3])


def test_tuner_times_close_configs_again_in_reverse_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU that slows down while it tunes (clocks drifting with heat) makes one pass in table order favour
    the first configs. Here each timing grows by 0.02 per call: in the first pass A (1.00) reads faster
    than B (true 0.99, read 1.01); the second pass, reversed, reads B 1.03 and A 1.06, so the means rank B
    first. C (far slower) is not timed again."""
    entry = [configs._c(64, 64, 4, 1), configs._c(32, 32, 4, 1), configs._c(16, 16, 4, 1)]
    true = {64: 1.00, 32: 0.99, 16: 2.00}
    order = []
    monkeypatch.setattr(
        tuning.triton.testing,
        "do_bench",
        lambda fn, return_mode: fn() or true[order[-1]] + 0.02 * (len(order) - 1),
    )
    assert tuning.tune(lambda c: order.append(c.kwargs["BLOCK_M"]), entry) is entry[1]
    assert order == [64, 32, 16, 32, 64]


def test_every_thread_gets_the_scratch_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's allocator (device-side tensor descriptors of the Gluon kernels) lives in a ContextVar, so a
    thread that did not set it has none: autograd's backward thread, a server's worker threads. The launcher
    installs it in every thread that launches, and leaves an allocator the user set alone. (CPU: the check
    runs as on a GPU, with the interpreter's switch off; nothing is allocated.)"""
    import threading

    from triton.runtime import _allocation

    from flashattention import _env

    monkeypatch.setattr(_env, "_INTERPRETING", False)
    t = torch.zeros(4, 8, 16, 16)

    def allocator_after_check(preset=None):
        if preset is not None:
            triton.set_allocator(preset)
        assert device.tma_ok(t, t)
        return _allocation._allocator.get()

    def in_new_thread(fn):
        got = []
        thread = threading.Thread(target=lambda: got.append(fn()))
        thread.start()
        thread.join()
        return got[0]

    # one thread installs it; a fresh thread starts without one all the same, and gets its own
    assert in_new_thread(allocator_after_check) is device.torch_scratch
    assert isinstance(in_new_thread(_allocation._allocator.get), _allocation.NullAllocator)
    assert in_new_thread(allocator_after_check) is device.torch_scratch

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
    descs = gluon.host_descriptors({"Q": q, "K": k, "V": k}, 128)
    assert list(descs["Q"].shape) == [2, 4, 100, 64] and list(descs["Q"].strides) == list(q.stride())
    assert list(descs["Q"].block_shape) == [1, 1, 64, 64]
    assert list(descs["K"].block_shape) == list(descs["V"].block_shape) == [1, 1, 128, 64]
    kernel_tile = gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16)
    assert descs["Q"].layout.swizzle_byte_width == kernel_tile.swizzle_byte_width == 128

    monkeypatch.setattr(gluon, "problems", lambda dims, args: [])  # as on a Hopper GPU
    fwd = registry.KERNELS["fwd"]
    cfg = configs._c(128, 128, 4, 2, GLUON_WS=True, HOST_DESC=True)
    assert not fwd.applies(cfg, {"Q": q, "K": k, "V": k, "seqlen_k": 80, "HAS_HI": False})  # too small
    # B * H * Sq * D * Sk = 2**36: 2**35 causal, the threshold
    big = torch.empty(8, 32, 2048, 64, dtype=torch.bfloat16, device="meta")
    for causal, sk, applies in (
        (False, 2048, True),
        (True, 2048, True),
        (True, 1024, False),
        (False, 512, False),
    ):
        args = {"Q": big, "K": big, "V": big, "seqlen_k": sk, "HAS_HI": causal}
        assert fwd.applies(cfg, args) is applies, (causal, sk)  # small calls: the host cost dominates
    broadcast = torch.empty(8, 1, 2048, 64, dtype=torch.bfloat16, device="meta").expand(8, 32, 2048, 64)
    assert not fwd.applies(cfg, {"Q": big, "K": broadcast, "V": broadcast, "seqlen_k": 2048, "HAS_HI": False})
    with hooks.overrides(host_desc_min_work=0):
        assert fwd.applies(cfg, {"Q": q, "K": k, "V": k, "seqlen_k": 80, "HAS_HI": False})


def test_a_case_tuned_on_plain_tensors_never_gives_a_broadcast_one_its_host_desc_pick(
    fake_fwd, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tuning key tells broadcast (stride-0) K/V apart: a HOST_DESC config picked for plain tensors of a
    case is not launched for expanded ones of the same shape, which get a config that takes them."""
    kernel, launched = fake_fwd
    host = configs._c(128, 128, 4, 2, GLUON_WS=True, HOST_DESC=True)
    triton_cfg = configs.configs_for("fwd", "interpret", 64)[0]
    monkeypatch.setenv("FLASHATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(configs, "ordered", lambda *a: (host, triton_cfg))
    monkeypatch.setattr(tuning, "enabled", lambda: True)
    monkeypatch.setattr(gluon, "problems", lambda dims, args: [])  # as on a Hopper GPU
    monkeypatch.setattr(gluon, "host_descriptors", lambda args, block_n: {})
    monkeypatch.setattr(tuning, "tune", lambda run, usable, applies: usable[0])
    q = torch.zeros(1, 2, 16, 64, dtype=torch.bfloat16)
    plain = _fake_args(q)
    kv = torch.zeros(1, 1, 16, 64, dtype=torch.bfloat16).expand(1, 2, 16, 64)
    with hooks.overrides(host_desc_min_work=0):  # a tiny case stands for a large one
        for args in (plain, {**plain, "K": kv, "V": kv}, plain):
            registry.launch("fwd", None, args, q.device, q.dtype)
    assert launched == [_as(host), _as(triton_cfg), _as(host)]


@pytest.mark.parametrize("sms", [1, 3, 132])
def test_persistent_programs(sms: int) -> None:
    """launch.persistent_programs: never more programs than SMs, no program more turns than one program
    per SM would give, and the fewest such programs (one fewer would need another turn)."""
    for tiles in [1, 2, 5, 131, 132, 133, 2816, 10000]:
        progs = launch.persistent_programs(tiles, sms)
        turns = -(-tiles // min(sms, tiles))
        assert 1 <= progs <= min(sms, tiles)
        assert -(-tiles // progs) == turns
        assert progs == 1 or -(-tiles // (progs - 1)) > turns
    assert launch.persistent_programs(2816, 132) == 128  # 22 turns each: D64 at 2k on an H100


def test_overlap_configs_skip_length_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A WS_OVERLAP forward config does not apply where a sequence length is 1 (Triton 3.6 cannot compile
    that specialisation); others do, and the length-1 case has a tuning key of its own."""
    monkeypatch.setattr(gluon, "problems", lambda dims, args: [])  # as on a Hopper GPU
    fwd = registry.KERNELS["fwd"]
    overlap = configs._c(192, 128, 4, 2, GLUON_WS=True, WS_CONSUMERS=3, PERSISTENT=True, WS_OVERLAP=True)
    plain = configs._c(192, 128, 4, 2, GLUON_WS=True, WS_CONSUMERS=3, PERSISTENT=True)
    q = torch.zeros(1, 1, 16, 64)
    for seqlen_q, seqlen_k, applies in ((1, 777, False), (37, 1, False), (2, 2, True), (2048, 2048, True)):
        args = _fake_args(q, seqlen_q=seqlen_q, seqlen_k=seqlen_k)
        assert fwd.applies(overlap, args) is applies, (seqlen_q, seqlen_k)
        assert fwd.applies(plain, args), (seqlen_q, seqlen_k)
        assert gluon.length_one(args) is not applies
    keys = {tuning.case_key("fwd", "sm90", torch.bfloat16, _fake_args(q, seqlen_q=s)) for s in (1, 2)}
    assert len(keys) == 2


def test_a_plan_replays_its_launch_with_the_calls_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """plans.Plan, the replay of a seen call's launch, kept by PlanCache.put and launched by replay
    (GPU-only in use; here with a stand-in compiled kernel): the kernel's arguments in its signature order,
    the config's constexprs and the defaults filled in, the grid evaluated once and padded to three axes; a
    replay puts in the call's own tensors, remakes the host descriptors around them (same shape, strides,
    box and layout), passes everything else as the first launch had it, through compiled[grid](..., stream),
    and records the config as the kernel's last launched."""
    hopper = pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    import inspect
    import weakref

    def kernel(Q, K, O, n, BLOCK: tl.constexpr, FLAG: tl.constexpr = False, PROBE=None):
        pass

    launches = []

    class Compiled:  # what Triton's launch returns: compiled[grid](*args, stream=...) launches
        def run(self, *a):
            raise AssertionError("plans launch through compiled[grid]")

        def __getitem__(self, grid):
            return lambda *values, stream: launches.append((grid, stream, values))

    class Driver:  # the current stream of the device
        class active:  # noqa: N801
            get_current_stream = staticmethod(lambda index: "stream")

    monkeypatch.setattr(plans.triton.runtime, "driver", Driver)
    monkeypatch.setattr(device, "ensure_allocator", lambda: None)  # (a CUDA allocator: not on this CPU)
    monkeypatch.setattr(device, "capturing", lambda: False)
    fn = type("KernelFn", (), {"signature": inspect.signature(kernel)})()
    q, k, o = (torch.randn(1, 2, 64, 16) for _ in range(3))
    box, layout = gluon.host_desc_boxes(
        16, 32, pytest.importorskip("triton.experimental.gluon.language").float32
    )["K"]
    desc = hopper.TensorDescriptor(k, list(k.shape), list(k.stride()), list(box), layout)
    config = triton.Config({"BLOCK": 4}, num_warps=4)
    args = dict(Q=q, K=desc, O=o, n=5)
    cache, last = plans.PlanCache(), {}
    cache.put(("case",), (("fwd", fn, Compiled(), lambda meta: (meta["BLOCK"] * 2, 3), args, config),))
    (plan,) = cache.get(("case",))
    assert plan.grid == (8, 3, 1) and plan.name == "fwd"
    # the plan keeps none of the first call's tensors alive (a cache of plans would hold their memory)
    alive = weakref.ref(q), weakref.ref(k)
    del q, k, o, desc, args
    assert all(ref() is None for ref in alive)

    q2, k2, o2 = (torch.randn(1, 2, 64, 16) for _ in range(3))
    assert cache.replay(("case",), torch.device("cpu"), {"Q": q2, "K": k2, "O": o2}, last)
    assert last["fwd"] is config and not cache.replay(("other",), torch.device("cpu"), {}, last)
    (grid, stream, values) = launches[0]
    assert grid == (8, 3, 1) and stream == "stream"
    assert len(values) == 7 and values[0] is q2 and values[2] is o2
    assert values[1].base is k2 and values[1].layout is layout
    assert [list(x) for x in (values[1].shape, values[1].strides, values[1].block_shape)] == [
        list(k2.shape),
        list(k2.stride()),
        list(box),
    ]
    assert values[3:] == (5, 4, False, None)
    assert not plans.PlanCache().put(None, ()) and len(cache) == 1  # no key: nothing kept


def test_plan_keys_tell_apart_what_the_launch_arguments_depend_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch plan is replayed only for a call whose key matches (plans.key). The forward's and the
    backward's keys change with the fp32 matmul precision (torch's global setting, which decides
    PRECISION), and a key changes with a misaligned pointer, the strides, the scale and autotuning; the same
    call gets the same key; a probe's extra arguments make none."""
    from flashattention import _env

    keys = []
    monkeypatch.setattr(launch, "plan_key", lambda *a: keys.append(a))  # the launchers' keys, recorded
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

    monkeypatch.setattr(_env, "_INTERPRETING", False)  # keys are made on GPUs only
    buf = torch.randn(q.numel() + 1)

    def key(t=q, scale=0.25):
        return plans.key("fwd", (t, k), scale, -1, 0, "ieee")

    same = key()
    assert key() == same
    assert key(buf[1:].view(q.shape)) != same  # 4 bytes past a 16-byte boundary
    assert key(q.transpose(2, 3).contiguous().transpose(2, 3)) != same
    assert key(scale=0.5) != same
    with hooks.overrides(autotune=True):
        assert key() != same
    with hooks.overrides(extra_args={"fwd": {"PROBE": None}}):
        assert launch.call_key("fwd", (q, k), 0.25, -1, 0, torch.float32) is None


def test_a_forced_host_desc_config_refuses_broadcast_kv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forcing a HOST_DESC config runs it below the work threshold (a speed rule) but never on stride-0 K/V,
    which a TMA descriptor cannot describe: a clear error instead of a wrong launch."""
    monkeypatch.setattr(gluon, "problems", lambda dims, args: [])  # as on a Hopper GPU
    fwd = registry.KERNELS["fwd"]
    cfg = configs._c(128, 128, 4, 2, GLUON_WS=True, HOST_DESC=True)
    q = torch.zeros(1, 2, 16, 64, dtype=torch.bfloat16)
    kv = torch.zeros(1, 1, 16, 64, dtype=torch.bfloat16).expand(1, 2, 16, 64)
    assert fwd.problems(cfg, _fake_args(q)) == []
    assert "stride-0" in " ".join(fwd.problems(cfg, _fake_args(q, K=kv, V=kv)))
    with pytest.raises(ValueError, match="stride-0 .* in K, V"):
        registry.run(fwd, None, _fake_args(q, K=kv, V=kv), cfg)


@pytest.mark.parametrize("ordered", [False, True], ids=["any-order", "ordered"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_fused_dq_config_takes_the_accumulator_and_skips_the_dq_kernel(
    monkeypatch: pytest.MonkeyPatch, varlen: bool, ordered: bool
) -> None:
    """A forced FUSED_DQ dK/dV config (kernels/bwd_ws.py; Gluon, so a fake stands in for it here):
    attention_backward gives it a zeroed float32 accumulator of LSE2's shape with a head-dim axis, launches
    no dQ kernel, and returns dQ = accumulator * scale in dq's layout (varlen: [total, heads, D] from the
    accumulator's [heads, total, D]); the interpreter keeps no plan (the test below replays one).
    DQ_ORDERED: also zeroed int32 turn counters, one per (batch or sequence, head, query tile of BLOCK_M
    rows), after one that counts the waits that gave up."""
    seen, turns, dq_launches = [], [], []

    class FusedFake:
        def __getitem__(self, grid):
            def launch_(**kw):
                acc = kw["DQ_ACC"]
                seen.append((acc.dtype, tuple(acc.shape), bool((acc == 0).all()), kw.get("FUSED_DQ")))
                if "DQ_TURNS" in kw:
                    t = kw["DQ_TURNS"]
                    turns.append((t.dtype, t.numel(), bool((t == 0).all()), kw["dq_tiles"]))
                acc.copy_(torch.arange(acc.numel(), dtype=torch.float32).view(acc.shape))

            return launch_

    dkdv = registry.Kernel("bwd_dkdv", "dK/dV", FusedFake(), ("bwd_ws", "x"), (64, 128, 256))
    dq_kernel = registry.Kernel("bwd_dq", "dQ", FakeKernel(dq_launches), ("bwd_ws", "x"), (64, 128, 256))
    monkeypatch.setattr(registry.Kernel, "fn_for", lambda self, config: self.triton_fn)
    monkeypatch.setattr(gluon, "problems", lambda dims, args: [])  # as on a Hopper GPU
    monkeypatch.setitem(registry.KERNELS, "bwd_dkdv", dkdv)
    monkeypatch.setitem(registry.KERNELS, "bwd_dq", dq_kernel)
    flags = dict(GLUON_WS=True, FUSED_DQ=True, **({"DQ_ORDERED": True} if ordered else {}))
    fused = configs._c(4, 128, 4, 2, **flags)  # 4-row query tiles: several turn counters per head
    heads, dim, scale = 2, 16, 0.25
    if varlen:
        cu = torch.tensor([0, 5, 12], dtype=torch.int32)
        q, k, v, out, dout = (torch.randn(12, heads, dim) for _ in range(5))
        lse2 = torch.zeros(heads, 12)
        extra = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=7, max_seqlen_k=7)
    else:
        q, k, v, out, dout = (torch.randn(2, heads, 9, dim) for _ in range(5))
        lse2 = torch.zeros(2, heads, 9)
        extra = {}
    plans.PLANS.clear()
    with hooks.overrides(configs={"bwd_dkdv": [fused]}):
        dq, dk, dv = launch.attention_backward(
            dout, q, k, v, out, lse2, softmax_scale=scale, left=-1, right=-1, **extra
        )
    acc_shape = (*lse2.shape, dim)
    assert seen == [(torch.float32, acc_shape, True, True)]
    # dense: batch 2 x 2 heads x ceil(9 / 4) tiles; varlen: 2 sequences x 2 heads x ceil(max 7 / 4) tiles
    tiles = 2 if varlen else 3
    # and the count of waits that gave up first
    assert turns == ([(torch.int32, 1 + 2 * heads * tiles, True, tiles)] if ordered else [])
    assert dq_launches == [] and "bwd_dq" not in registry.last_launched
    expected = torch.arange(lse2.numel() * dim, dtype=torch.float32).view(acc_shape) * scale
    torch.testing.assert_close(dq, expected.transpose(0, 1) if varlen else expected, rtol=0, atol=0)
    assert dq.shape == q.shape and len(plans.PLANS) == 0


def test_fused_dq_compile_failure_runs_the_two_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A FUSED_DQ choice that this Triton cannot compile (faked): attention_backward warns once (gluon's
    note) and runs the dK/dV and dQ kernels instead, with no accumulator."""
    from triton.compiler.errors import CompilationError

    def fail(kw):
        if kw.get("FUSED_DQ"):
            raise CompilationError(None, None, "unsupported layout")

    dkdv_launches, dq_launches = [], []
    dkdv = registry.Kernel("bwd_dkdv", "dK/dV", FakeKernel(dkdv_launches, fail), ("bwd_ws", "x"), (64,))
    dq_kernel = registry.Kernel("bwd_dq", "dQ", FakeKernel(dq_launches), ("bwd_ws", "x"), (64,))
    monkeypatch.setattr(registry.Kernel, "fn_for", lambda self, config: self.triton_fn)
    monkeypatch.setattr(gluon, "problems", lambda dims, args: [])  # as on a Hopper GPU
    monkeypatch.setattr(gluon, "_compile_error", "")
    monkeypatch.setitem(registry.KERNELS, "bwd_dkdv", dkdv)
    monkeypatch.setitem(registry.KERNELS, "bwd_dq", dq_kernel)
    fused = configs._c(64, 128, 4, 2, GLUON_WS=True, FUSED_DQ=True, DQ_ORDERED=True)
    two = configs._c(32, 16, 4, 1)
    q, k, v, out, dout = (torch.randn(1, 2, 9, 16) for _ in range(5))
    plans.PLANS.clear()
    with hooks.overrides(configs={"bwd_dkdv": [fused, two], "bwd_dq": [two]}):
        with pytest.warns(UserWarning, match="does not compile .*unsupported layout"):
            launch.attention_backward(dout, q, k, v, out, torch.zeros(1, 2, 9), softmax_scale=0.25, left=-1,
                                      right=-1)  # fmt: skip
    assert dkdv_launches == [(32, 16, None, 4)] and dq_launches == [(32, 16, None, 4)]
    assert gluon._compile_error


@pytest.mark.parametrize("ordered", [False, True], ids=["any-order", "ordered"])
def test_fused_dq_call_keeps_a_plan_that_zeroes_afresh(
    monkeypatch: pytest.MonkeyPatch, ordered: bool
) -> None:
    """A FUSED_DQ backward keeps a launch plan (preprocess, fused dK/dV) like the two-kernel one; a replay
    gives the fused kernel a new zeroed accumulator (and turn counters), launches no dQ kernel and returns
    dQ = accumulator * scale. (CPU: plans on as on a GPU, stand-in kernels that record their launches and
    write a call number into the accumulator.)"""
    import inspect

    from flashattention import _env

    launched, zeroed = [], []

    class Compiled:  # compiled[grid](*values, stream=...) replays; run() would be Triton's slow path
        def __init__(self, name):
            self.name = name

        def run(self, *a):
            raise AssertionError("plans launch through compiled[grid]")

        def __getitem__(self, grid):
            return lambda *values, stream: self.launch(**dict(zip(SIGNATURE[self.name], values, strict=True)))

        def launch(self, **kw):
            launched.append((self.name, {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}))
            if "DQ_ACC" in kw:
                zeroed.append(
                    all(bool((kw[n] == 0).all()) for n in ("DQ_ACC", "DQ_TURNS") if kw.get(n) is not None)
                )
                kw["DQ_ACC"].fill_(float(len(launched)))

    def dkdv_fn(DQ_ACC, DQ_TURNS=None, dq_tiles=None, DK=None, DV=None, BLOCK_M=None): ...

    def pre_fn(O, DO, DELTA): ...

    SIGNATURE = {"dkdv": list(inspect.signature(dkdv_fn).parameters), "pre": ["O", "DO", "DELTA"]}

    class Fake:  # kernel_fn: [grid](**kwargs) launches and returns its Compiled
        def __init__(self, name, fn):
            self.name, self.signature = name, inspect.signature(fn)

        def __getitem__(self, grid):
            def launch_(**kw):
                compiled = Compiled(self.name)
                compiled.launch(**{k: v for k, v in kw.items() if k in SIGNATURE[self.name]})
                return compiled

            return launch_

    class Driver:
        class active:  # noqa: N801
            get_current_stream = staticmethod(lambda index: "stream")

    dq_launches = []
    monkeypatch.setattr(_env, "interpreting", lambda: False)  # plans are kept (the interpreter keeps none)
    monkeypatch.setattr(plans.triton.runtime, "driver", Driver)
    monkeypatch.setattr(device, "ensure_allocator", lambda: None)
    monkeypatch.setattr(device, "capturing", lambda: False)
    monkeypatch.setattr(launch, "attn_bwd_preprocess_kernel", Fake("pre", pre_fn))
    dkdv = registry.Kernel("bwd_dkdv", "dK/dV", Fake("dkdv", dkdv_fn), ("bwd_ws", "x"), (64,))
    monkeypatch.setitem(registry.KERNELS, "bwd_dkdv", dkdv)
    monkeypatch.setitem(
        registry.KERNELS, "bwd_dq", registry.Kernel("bwd_dq", "dQ", FakeKernel(dq_launches), None, ())
    )
    monkeypatch.setattr(registry.Kernel, "fn_for", lambda self, config: self.triton_fn)
    monkeypatch.setattr(gluon, "problems", lambda dims, args: [])  # as on a Hopper GPU
    flags = dict(GLUON_WS=True, FUSED_DQ=True, **({"DQ_ORDERED": True} if ordered else {}))
    fused = configs._c(4, 128, 4, 2, **flags)
    heads, dim, scale = 2, 16, 0.5
    plans.PLANS.clear()
    results, accs = [], []
    with hooks.overrides(configs={"bwd_dkdv": [fused]}):
        for _ in range(3):  # a launch, then two replays
            q, k, v, out, dout = (torch.randn(2, heads, 9, dim) for _ in range(5))
            results.append(launch.attention_backward(
                dout, q, k, v, out, torch.zeros(2, heads, 9), softmax_scale=scale, left=-1, right=-1
            ))  # fmt: skip
            assert len(plans.PLANS) == 1
    assert [name for name, _ in launched] == ["pre", "dkdv"] * 3 and dq_launches == []
    assert "bwd_dq" not in registry.last_launched and registry.last_launched["bwd_dkdv"] is fused
    accs = [kw["DQ_ACC"] for name, kw in launched if name == "dkdv"]
    assert len({id(a) for a in accs}) == 3 and zeroed == [True] * 3  # a new zeroed accumulator each call
    for call, (dq, _, _) in enumerate(results):
        # the fake's fill (its launch number) times the scale: the accumulator was the call's own
        torch.testing.assert_close(dq, torch.full_like(dq, 2.0 * (call + 1) * scale), rtol=0, atol=0)
    turns = [kw.get("DQ_TURNS") for name, kw in launched if name == "dkdv"]
    if ordered:  # zeroed afresh: 1 + batch 2 x 2 heads x ceil(9 / 4) tiles, one object per call
        assert all(
            t is not None and t.numel() == 1 + 2 * heads * 3 and len({id(x) for x in turns}) == 3
            for t in turns
        )
    else:
        assert turns == [None] * 3


def test_stride_unit_keeps_strides_past_int32_whole():
    """Strides reach the kernels in units of the largest power of two (up to 16) dividing them all, except
    where one is 2^31 elements or more: its quotient could fit int32 and the kernel's multiplication back
    wrap, so the unit is 1 (Triton types the stride int64 itself)."""
    from flashattention.kernels.launch import stride_unit

    small = torch.empty(2, 3, 40, 40, device="meta")  # strides 4800, 1600, 40: all divisible by 8
    assert stride_unit(small) == 8
    huge = torch.empty(2, 32, 1, 128, device="meta").as_strided((2, 32, 524288, 128), (2**31, 128, 4096, 1))
    assert stride_unit(huge) == 1 and stride_unit(small, huge) == 1


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_more_batch_heads_than_a_grid_axis_takes(varlen, device, monkeypatch):
    """More (batch, head) programs than a grid's second axis holds (65535 on CUDA; 4 here) run as one call
    a part of the batch (varlen: of the sequences, from offsets of 0): the same result as one launch,
    forward and backward, GQA and a causal mask (bottom-right per sequence)."""
    from flashattention import flash_attention, flash_attention_varlen

    torch.manual_seed(0)
    if varlen:
        lens_q, lens_k = [5, 0, 9, 3, 7], [8, 4, 9, 1, 7]
        q = torch.randn(sum(lens_q), 4, 16, device=device)
        k, v = (torch.randn(sum(lens_k), 2, 16, device=device) for _ in range(2))

        def cu(lens):
            return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)

        def run():
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = flash_attention_varlen(*leaves, cu(lens_q), cu(lens_k), 9, 9, causal=True, backend="triton")
            return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]
    else:
        q, k, v = make_inputs(3, 4, 2, 11, 13, 16, torch.float32, device)[:3]

        def run():
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = flash_attention(*leaves, causal=True, backend="triton")
            return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]

    whole = run()
    parts = []
    real = launch.grid_parts
    monkeypatch.setattr(launch, "MAX_GRID_Y", 4)
    monkeypatch.setattr(launch, "grid_parts", lambda *a: parts.append(real(*a)) or parts[-1])
    split = run()
    split_calls = [p for p in parts if p is not None]  # the parts' own calls fit: None
    assert len(split_calls) == 2 and all(len(p) >= 2 for p in split_calls)  # the forward and the backward
    for name, got, want in zip(("out", "dq", "dk", "dv"), split, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_a_config_this_gpu_cannot_launch_warns_once(monkeypatch):
    """A table config that does not fit the GPU (OutOfResources: a card with less shared memory than the
    table's) gives way to the next one with a warning, once per config, not silently."""
    from triton.runtime.errors import OutOfResources

    launched = []

    class Recorder:  # the kernel: the 128-row config needs more shared memory than there is
        def __getitem__(self, grid):
            def go(**kwargs):
                if kwargs["BLOCK_M"] == 128:
                    raise OutOfResources(232448, 101376, "shared memory")
                launched.append(kwargs["BLOCK_M"])

            return go

    monkeypatch.setitem(registry.KERNELS, "fwd", registry.Kernel("fwd", "forward", Recorder()))
    monkeypatch.setattr(registry, "_out_of_resources", set())
    big, small = configs._c(128, 128, 8, 3), configs._c(64, 64, 4, 2)
    q = torch.zeros(1, 2, 16, 64)
    args = dict(Q=q, K=q, V=q, HEAD_DIM=64, HEAD_DIM_PAD=64, HAS_HI=False, seqlen_q=16, seqlen_k=16)
    with hooks.overrides(configs={"fwd": [big, small]}), pytest.warns(UserWarning, match="does not fit") as w:
        for _ in range(2):
            registry.launch("fwd", (1,), args, q.device, q.dtype)
    assert launched == [64, 64] and len([x for x in w if "does not fit" in str(x.message)]) == 1


def test_a_triton_without_gluon_on_hopper_warns(monkeypatch):
    """On a Hopper GPU whose Triton lacks Gluon's API, the Gluon configs drop out with a warning (once): the
    slower Triton kernels run, not silently."""
    from flashattention import _env

    class CudaBf16:  # what the check reads of a CUDA bfloat16 tensor
        device = torch.device("cuda", 0)
        dtype = torch.bfloat16

    monkeypatch.setattr(_env, "interpreting", lambda: False)
    monkeypatch.setattr(device, "capability", lambda index: (9, 0))
    monkeypatch.setattr(gluon, "missing", lambda: "cannot import name 'tma'")
    gluon._warn_missing.cache_clear()
    args = dict(Q=CudaBf16(), HEAD_DIM=128, CAN_TMA=True)
    with pytest.warns(UserWarning, match="lacks Gluon's Hopper API") as w:
        for _ in range(2):
            assert any("lacks Gluon" in p for p in gluon.problems((64, 128, 256), args))
    assert len([x for x in w if "lacks Gluon" in str(x.message)]) == 1
    gluon._warn_missing.cache_clear()
