"""GPU suite (`pytest -m gpu`, run on the device): real sizes, every dtype, 64k-token sequences, linear
peak memory, and every config of the autotune table. The oracle is float32 on the GPU (float64 for fp32
inputs); the README's pass rule through tests/_helpers.py."""

import json
import math

import pytest
import torch
from _helpers import (
    NAMES,
    ODD_HEAD_DIM,
    Case,
    case_params,
    check_attention,
    compare_to_reference,
    make_inputs,
    reference_dtype,
    run_ours,
    run_reference,
)

from flashattention import flash_attention

pytestmark = pytest.mark.gpu

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32
FULL, CAUSAL = (False, (-1, -1)), (True, (-1, -1))
WINDOW, CAUSAL_LEFT = (False, (256, 256)), (True, (1000, -1))

# Each (dtype, padded head dim, mask flags, GQA or not) compiles its own kernels (seconds each on a cold
# cache), so the matrix covers every dtype, mask and head dim without taking their full product.
GPU_CASES = [
    # every mask in bf16, two masks in fp16 and fp32, at 2k
    *(
        Case(2, 8, 8, 2048, 2048, 128, B16, causal=c, window=w)
        for c, w in (FULL, CAUSAL, WINDOW, CAUSAL_LEFT)
    ),
    *(Case(2, 8, 8, 2048, 2048, 128, dt, causal=c, window=w) for dt in (F16, F32) for c, w in (FULL, CAUSAL)),
    Case(2, 8, 8, 2048, 2048, 128, F16, window=(256, 256)),
    Case(2, 8, 8, 2048, 2048, 128, F32, causal=True, window=(1000, -1)),
    # GQA / MQA, 4k, seqlen_q != seqlen_k (both ways, with empty rows), decode-like
    Case(2, 16, 4, 2048, 2048, 128, B16, causal=True),
    Case(1, 16, 1, 2048, 2048, 64, F16, window=(512, 0)),
    Case(1, 8, 2, 4096, 4096, 128, B16, causal=True),
    Case(1, 8, 8, 4096, 4096, 64, F16),
    Case(2, 8, 2, 1000, 3000, 128, B16, causal=True),
    Case(2, 8, 2, 3000, 1000, 128, F16, causal=True),
    Case(4, 8, 8, 1, 4096, 128, B16, causal=True),
    Case(1, 4, 4, 1023, 4001, 96, F16, window=(128, 64)),
    # large scores (the softmax's running max)
    Case(2, 8, 8, 2048, 2048, 128, B16, causal=True, input_scale=8.0),
    # head dims, including padded ones
    *(Case(2, 8, 8, 1024, 1024, d, B16, causal=True) for d in (64, 72, 200, 256)),
    *(Case(2, 8, 8, 1024, 1024, d, F32, causal=True) for d in (64, 200, 256)),
    Case(1, 8, 4, 1024, 1024, 40, F16, window=(300, 100)),
]


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("case", case_params(GPU_CASES))
def test_matches_reference_gpu(case: Case, backend: str) -> None:
    q, k, v, dout = case.inputs("cuda")
    check_attention(q, k, v, dout, backend=backend, **case.mask_kwargs())


def test_forward_and_backward_in_a_new_thread() -> None:
    """Triton's scratch allocator (the Gluon kernels' device-side tensor descriptors) is per thread: a
    call from a thread that never launched before (a server's worker) passes the rule, forward and
    backward (autograd runs the backward in a thread of its own as well)."""
    import threading

    case = Case(2, 8, 2, 2048, 2048, 128, B16, causal=True)
    errors = []

    def work():
        try:
            q, k, v, dout = case.inputs("cuda")
            check_attention(q, k, v, dout, backend="triton", **case.mask_kwargs())
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("case", case_params([Case(2, 8, 2, 2048, 2048, 128, B16, causal=True)]))
def test_autotuned_public_call(case: Case, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other GPU tests launch the tables' picks; with FLASHATTN_AUTOTUNE=1 the tuner times every config
    of the table entries that applies (forward, dK/dV, dQ), launches the fastest, and the result passes the
    rule. The picks are kept on disk: a new process (here: the in-memory picks forgotten) launches them
    without tuning again."""
    from flashattention.kernels import hooks, tuning

    monkeypatch.setenv("FLASHATTN_CACHE_DIR", str(tmp_path))
    q, k, v, dout = case.inputs("cuda")
    with hooks.overrides(autotune=True):
        check_attention(q, k, v, dout, backend="triton", **case.mask_kwargs())
        (stored,) = tmp_path.glob("tuning-*.json")
        picks = json.loads(stored.read_text())
        assert {key.split("|")[0] for key in picks} == {"fwd", "bwd_dkdv", "bwd_dq"}, picks
        hooks.clear_caches()  # as in a new process
        monkeypatch.setattr(
            tuning, "tune", lambda *a: pytest.fail("tuned again: the stored pick was not used")
        )
        check_attention(q, k, v, dout, backend="triton", **case.mask_kwargs())
    assert json.loads(stored.read_text()) == picks


def test_broadcast_kv_after_a_tuned_plain_call(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """K/V expanded over the batch (stride 0) after the same case was tuned on plain tensors: the tuner's
    HOST_DESC pick (host descriptors refuse stride 0) is not reused; both calls pass the rule."""
    from flashattention.kernels import hooks

    monkeypatch.setenv("FLASHATTN_CACHE_DIR", str(tmp_path))
    case = Case(2, 8, 8, 2048, 2048, 64, B16, causal=True)
    q, k, v, dout = case.inputs("cuda")
    k1, v1 = (t[:1].expand_as(t) for t in (k, v))
    assert k1.stride(0) == 0
    with hooks.overrides(autotune=True, host_desc_min_work=0):  # this small case may take HOST_DESC too
        check_attention(q, k, v, dout, backend="triton", **case.mask_kwargs())
        check_attention(q, k1, v1, dout, backend="triton", **case.mask_kwargs())


@pytest.mark.parametrize("backend", ["torch"])
@pytest.mark.parametrize(
    "case",
    case_params(
        [
            Case(2, 8, 2, 2048, 2048, 128, B16, causal=True),
            Case(1, 8, 8, 1000, 3000, 64, F32, window=(256, 256)),
        ]
    ),
)
def test_torch_backend_on_gpu(case: Case, backend: str) -> None:
    q, k, v, dout = case.inputs("cuda")
    check_attention(q, k, v, dout, backend=backend, **case.mask_kwargs())


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_fp32_follows_matmul_precision(precision: str) -> None:
    """With tf32 allowed, the same-dtype PyTorch computation uses tf32 too, so the rule still applies."""
    torch.set_float32_matmul_precision(precision)  # restored by conftest's fixture
    q, k, v, dout = make_inputs(2, 8, 8, 2048, 2048, 128, F32, "cuda")
    check_attention(q, k, v, dout, backend="triton", causal=True)


# ----------------------------------------------------------------------------------------------------------
# 64k tokens, causal, bf16, D 128: everything compared, with the oracle computed in query chunks


def _chunked_causal_reference(q, k, v, dout, dtype: torch.dtype, chunk: int) -> dict:
    """Causal attention (bottom-right) for all rows, chunk by chunk: rows [r0, r1) see only keys
    [0, r1 + off), so each chunk is a small exact problem; dk/dv are the sums of the chunks' gradients."""
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    off = seqlen_k - seqlen_q
    outs, lses, dqs = [], [], []
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros_like(dk)
    for r0 in range(0, seqlen_q, chunk):
        r1 = min(r0 + chunk, seqlen_q)
        kend = max(0, min(seqlen_k, r1 + off))
        part = run_reference(
            q[:, :, r0:r1], k[:, :, :kend], v[:, :, :kend], dout[:, :, r0:r1], dtype=dtype, causal=True
        )
        outs.append(part["out"])
        lses.append(part["lse"])
        dqs.append(part["dq"])
        dk[:, :, :kend] += part["dk"].float()
        dv[:, :, :kend] += part["dv"].float()
        del part
    return {
        "out": torch.cat(outs, 2),
        "lse": torch.cat(lses, 2),
        "dq": torch.cat(dqs, 2),
        "dk": dk.to(dtype),
        "dv": dv.to(dtype),
    }


def test_64k_causal_bf16_forward_backward() -> None:
    seqlen = 65536
    q, k, v, dout = make_inputs(1, 8, 2, seqlen, seqlen, 128, B16, "cuda")
    ours = run_ours(q, k, v, dout, backend="triton", causal=True)
    for name in NAMES:
        assert torch.isfinite(ours[name]).all(), f"{name} has non-finite entries"
    ref = _chunked_causal_reference(q, k, v, dout, torch.float32, chunk=1024)
    same = _chunked_causal_reference(q, k, v, dout, B16, chunk=1024)
    failures = [compare_to_reference(n, ours[n], ref[n], same[n]) for n in NAMES]
    failures = [f for f in failures if f is not None]
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------------------------
# Peak memory grows linearly in the sequence length


def _extra_peak_memory(seqlen: int, backend: str) -> int:
    """Peak bytes allocated by forward+backward beyond the inputs, out and the gradients."""
    q, k, v, dout = make_inputs(1, 8, 8, seqlen, seqlen, 128, B16, "cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = flash_attention(q, k, v, causal=True, backend=backend)
    out.backward(dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    results = sum(t.numel() * t.element_size() for t in (out, q.grad, k.grad, v.grad))
    return peak - before - results


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_peak_memory_grows_linearly(backend: str) -> None:
    extra = {s: _extra_peak_memory(s, backend) for s in (4096, 8192, 16384)}
    slack = 8 << 20  # allocator granularity and small fixed buffers
    assert extra[8192] <= 2.25 * extra[4096] + slack, f"extra bytes by seqlen: {extra}"
    assert extra[16384] <= 4.5 * extra[4096] + slack, f"not linear (quadratic is 16x): {extra}"


# ----------------------------------------------------------------------------------------------------------
# Every config of this GPU's autotune table passes the correctness check


def _autotune_table_params() -> list:
    try:
        from flashattention.kernels import configs
        from flashattention.kernels.device import arch as device_arch

        arch = device_arch(torch.device("cuda")) if torch.cuda.is_available() else None
        entries = [e for e in configs.all_configs() if e[1] in (arch, f"{arch}-fp32")]
    except Exception as exc:  # collected on CPU machines too: an import error must not hide other tests
        return [pytest.param(None, exc, id="kernels-not-importable")]
    params = []
    for kernel, arch_name, head_dim_pad, config in entries:
        kw = config.kwargs
        params.append(
            pytest.param(
                (kernel, arch_name, head_dim_pad, config),
                None,
                id=f"{kernel}-{arch_name}-D{head_dim_pad}-BM{kw.get('BLOCK_M')}-BN{kw.get('BLOCK_N')}"
                f"-w{config.num_warps}-s{config.num_stages}",
            )
        )
    return params or [pytest.param(None, RuntimeError("no config for this GPU's architecture"), id="empty")]


@pytest.mark.configs
@pytest.mark.parametrize("entry, import_error", _autotune_table_params())
def test_every_autotune_config_passes(entry, import_error) -> None:
    if import_error is not None:
        pytest.fail(f"could not list the autotune configs: {import_error!r}")
    from flashattention.kernels import hooks, launch

    kernel, table, head_dim_pad, config = entry
    dtype = F32 if table.endswith("-fp32") else B16  # the fp32 tables serve fp32 inputs only
    head_dim = ODD_HEAD_DIM.get(head_dim_pad, head_dim_pad)
    if config.kwargs.get("GLUON_WS"):  # the Gluon forward takes head dims 64, 128, 256 only
        head_dim = head_dim_pad
    mask = {"causal": True, "window_size": (300, -1)}  # both bounds: masked tiles on each side, full ones
    for seqlen_q, seqlen_k in ((1000, 1000), (300, 1000), (1000, 300)):
        q, k, v, dout = make_inputs(2, 4, 2, seqlen_q, seqlen_k, head_dim, dtype, "cuda")
        scale = 1 / math.sqrt(head_dim)
        with hooks.overrides(configs={kernel: [config]}):
            out, lse, lse2 = launch.attention_forward(q, k, v, softmax_scale=scale, left=300, right=0)
            dq, dk, dv = launch.attention_backward(
                dout, q, k, v, out, lse2, softmax_scale=scale, left=300, right=0
            )
        ours = dict(zip(NAMES, (out, lse, dq, dk, dv), strict=True))
        ref = run_reference(q, k, v, dout, dtype=reference_dtype(dtype, "cuda"), **mask)
        same = run_reference(q, k, v, dout, dtype=dtype, **mask)
        failures = [compare_to_reference(n, ours[n], ref[n], same[n]) for n in NAMES]
        failures = [f for f in failures if f is not None]
        assert not failures, f"Sq={seqlen_q} Sk={seqlen_k} D={head_dim}:\n" + "\n".join(failures)


@pytest.fixture
def five_sms():
    """Persistent grids sized for 5 SMs: each program loops over many tiles (long, short and empty ones)."""
    from flashattention.kernels import hooks

    with hooks.overrides(num_sms=5):
        yield


def _gluon_cases():
    """(dtype, causal, left, right, seqlen_q, seqlen_k, input scale) of the Gluon kernels' GPU tests: every
    mask kind, seqlen_q != seqlen_k both ways, lengths that are not a multiple of the tiles, one query row,
    one and 15 keys (bf16), large scores, bf16 and fp16."""
    masks = [(False, (-1, -1)), (True, (-1, -1)), (False, (300, 200)), (True, (300, -1))]
    for dtype in (B16, F16):
        for causal, (left, right) in masks:
            shapes = ((1000, 1000, 1.0), (300, 1000, 1.0), (1000, 300, 1.0), (2048, 2048, 8.0), (1, 777, 1.0))
            tiny = ((37, 1, 1.0), (130, 15, 1.0)) if dtype == B16 else ()  # one and 15 keys
            for seqlen_q, seqlen_k, scale in shapes + tiny:
                yield dtype, causal, left, right, seqlen_q, seqlen_k, scale


def _assert_matches(inputs, ours: dict, causal: bool, window: tuple[int, int]) -> None:
    """ours (some of out, lse, dq, dk, dv) against the float32 oracle by the low-precision rule."""
    q, k, v, dout = inputs
    mask = {"causal": causal, "window_size": window}
    ref = run_reference(q, k, v, dout, dtype=reference_dtype(q.dtype, "cuda"), **mask)
    same = run_reference(q, k, v, dout, dtype=q.dtype, **mask)
    failures = [f for n, o in ours.items() if (f := compare_to_reference(n, o, ref[n], same[n])) is not None]
    assert not failures, (
        f"{q.dtype} causal={causal} window={window} Sq={q.shape[2]} Sk={k.shape[2]}:\n" + "\n".join(failures)
    )


def _gluon_params(kernel: str) -> list:
    try:
        from flashattention.kernels import configs
        from tools.tune import tables_and_candidates

        entries = [e for e in tables_and_candidates() if e[0] == kernel and e[3].kwargs.get("GLUON_WS")]
    except Exception as exc:  # collected on CPU machines too
        return [pytest.param(None, exc, id="kernels-not-importable")]
    return [
        pytest.param(e, None, id=f"D{e[2]}-{configs.label(e[3]).replace(' ', '-')}") for e in entries
    ] or [pytest.param(None, RuntimeError(f"no GLUON_WS {kernel} config listed"), id="none")]


@pytest.mark.configs
@pytest.mark.parametrize("entry, import_error", _gluon_params("fwd"))
def test_gluon_forward_matches_reference(entry, import_error, five_sms) -> None:
    """The warp-specialised Gluon forward (GLUON_WS configs, kernels/fwd_ws.py) against the float32 oracle:
    every mask kind, GQA, seqlen_q != seqlen_k both ways (rows that see no key), lengths that are not a
    multiple of the tiles, one query row, one and 15 keys, large scores, bf16 and fp16. Forward outputs and
    LSE (the backward is the Triton one). PERSISTENT configs run on a grid of 5 programs, so that each one
    loops over many tiles (long, short and empty ones) and its barrier phases run across tiles."""
    if import_error is not None:
        pytest.fail(f"could not list the configs: {import_error!r}")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward is Hopper-only")
    from flashattention.kernels import launch

    _, _, head_dim, config = entry
    for dtype, causal, left, right, seqlen_q, seqlen_k, scale in _gluon_cases():
        q, k, v, dout = make_inputs(2, 4, 2, seqlen_q, seqlen_k, head_dim, dtype, "cuda", scale)
        if config.kwargs.get("WS_OVERLAP") and 1 in (seqlen_q, seqlen_k):  # refused (gluon.length_one)
            with pytest.raises(ValueError, match="sequence length of 1"):
                launch.attention_forward(q, k, v, softmax_scale=0.125, left=left, right=right, config=config)
            continue
        out, lse, _ = launch.attention_forward(
            q,
            k,
            v,
            softmax_scale=1 / math.sqrt(head_dim),
            left=left,
            right=0 if causal else right,
            config=config,
        )
        _assert_matches((q, k, v, dout), {"out": out, "lse": lse}, causal, (left, right))


@pytest.mark.configs
@pytest.mark.parametrize("entry, import_error", _gluon_params("bwd_dkdv") + _gluon_params("bwd_dq"))
def test_gluon_backward_matches_reference(entry, import_error) -> None:
    """The warp-specialised Gluon dK/dV and dQ (GLUON_WS configs of the bwd_dkdv and bwd_dq tables and
    candidates, kernels/bwd_ws.py), each forced beside the other kernel's default, against the float32
    oracle: every mask kind, GQA (several query heads per key block), seqlen_q != seqlen_k both ways (rows
    that see no key, keys no query sees), lengths that are not a multiple of the tiles, one query row, one
    and 15 keys, large scores, bf16 and fp16; all three gradients."""
    if import_error is not None:
        pytest.fail(f"could not list the configs: {import_error!r}")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are Hopper-only")
    from flashattention.kernels import hooks, launch

    kernel, _, head_dim, config = entry
    for dtype, causal, left, right, seqlen_q, seqlen_k, scale in _gluon_cases():
        q, k, v, dout = make_inputs(2, 4, 2, seqlen_q, seqlen_k, head_dim, dtype, "cuda", scale)
        softmax_scale = 1 / math.sqrt(head_dim)
        right_ = 0 if causal else right
        out, lse, lse2 = launch.attention_forward(
            q, k, v, softmax_scale=softmax_scale, left=left, right=right_
        )
        with hooks.overrides(configs={kernel: [config]}):
            dq, dk, dv = launch.attention_backward(
                dout, q, k, v, out, lse2, softmax_scale=softmax_scale, left=left, right=right_
            )
        _assert_matches((q, k, v, dout), {"dq": dq, "dk": dk, "dv": dv}, causal, (left, right))


def _ordered_params() -> list:
    """The DQ_ORDERED dK/dV configs of the tables and candidates (fused dQ with ordered adds)."""
    return [
        p for p in _gluon_params("bwd_dkdv") if p.values[0] is None or p.values[0][3].kwargs.get("DQ_ORDERED")
    ]


@pytest.mark.configs
@pytest.mark.parametrize("entry, import_error", _ordered_params())
def test_gluon_ordered_fused_dq_is_reproducible(entry, import_error) -> None:
    """DQ_ORDERED (the fused dQ's adds in a fixed order, last key block first): no turn wait gives up, and dQ
    is bitwise the same over repeated backward calls, where 16 to 64 key blocks add into each query tile (4k
    and 8k keys, 2k queries), under a full and a causal mask, GQA, and a left window (a tile's last adding
    block is not the last block); dK and dV too."""
    if import_error is not None:
        pytest.fail(f"could not list the configs: {import_error!r}")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are Hopper-only")
    from flashattention.kernels import hooks, launch

    _, _, head_dim, config = entry
    for causal, left, seqlen_k in ((False, -1, 8192), (True, -1, 4096), (True, 1000, 4096)):
        q, k, v, dout = make_inputs(2, 8, 2, 2048, seqlen_k, head_dim, B16, "cuda", 1.0)
        scale, right = 1 / math.sqrt(head_dim), 0 if causal else -1
        out, _, lse2 = launch.attention_forward(q, k, v, softmax_scale=scale, left=left, right=right)
        # the test's own turn counters in place of the launcher's (same size), so that [0], the waits that
        # gave up (out of turn: not reproducible by construction), can be read after each call
        turns = torch.zeros(1 + 2 * 8 * math.ceil(2048 / config.kwargs["BLOCK_M"]), dtype=torch.int32)
        turns = turns.cuda()
        results = []
        with hooks.overrides(configs={"bwd_dkdv": [config]}, extra_args={"bwd_dkdv": {"DQ_TURNS": turns}}):
            for _ in range(4):
                turns.zero_()
                results.append(
                    launch.attention_backward(
                        dout, q, k, v, out, lse2, softmax_scale=scale, left=left, right=right
                    )
                )
                assert turns[0].item() == 0, (
                    f"{turns[0].item()} turn waits gave up (causal={causal}, left={left})"
                )
        for again in results[1:]:
            for name, a, b in zip(("dq", "dk", "dv"), results[0], again, strict=True):
                assert torch.equal(a, b), f"{name} differs between runs (causal={causal}, left={left})"


def _varlen_params() -> list:
    """The Gluon configs that take varlen launches (not HOST_DESC), forward, dK/dV and dQ."""
    params = []
    for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
        for p in _gluon_params(kernel):
            entry = p.values[0]
            if entry is None or not entry[3].kwargs.get("HOST_DESC"):
                params.append(pytest.param(*p.values, id=f"{kernel}-{p.id}"))
    return params


@pytest.mark.configs
@pytest.mark.parametrize("entry, import_error", _varlen_params())
def test_gluon_kernels_take_varlen(entry, import_error) -> None:
    """Each Gluon config on packed sequences (kernels/fwd_ws.py, bwd_ws.py with IS_VARLEN, launched through
    flash_attention_varlen with the config forced) against the float32 oracle per sequence: sequences
    without queries and without keys, one query row, lengths that are not a multiple of the tiles,
    seqlen_q != seqlen_k both ways, GQA, full, causal and windowed masks, bf16 and fp16. PERSISTENT
    configs run on 5 programs, so that each one loops over long, short and empty tiles of many sequences."""
    if import_error is not None:
        pytest.fail(f"could not list the configs: {import_error!r}")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are Hopper-only")
    from test_varlen import VarlenCase, test_varlen_matches_reference

    from flashattention.kernels import hooks, registry

    kernel, _, head_dim, config = entry
    lens_q, lens_k = (1000, 0, 1, 300, 517, 37), (1000, 5, 777, 0, 1300, 37)
    masks = [(B16, False, (-1, -1)), (B16, True, (-1, -1)), (F16, False, (300, 200)), (B16, True, (300, -1))]
    for dtype, causal, window in masks:
        case = VarlenCase(lens_q, lens_k, heads=8, kv_heads=2, head_dim=head_dim, dtype=dtype, causal=causal,
                          window=window)  # fmt: skip
        with hooks.overrides(num_sms=5, configs={kernel: [config]}):
            test_varlen_matches_reference(case, "triton", "cuda")
            assert registry.last_launched[kernel] is config


@pytest.mark.configs
@pytest.mark.parametrize(
    "flags",
    [dict(PERSISTENT=True), dict(PERSISTENT=True, WS_STAGES=3, WS_OVERLAP=True)],
    ids=["static", "overlap"],
)
def test_persistent_gluon_forward_in_a_cuda_graph(flags: dict, five_sms) -> None:
    """A persistent Gluon forward captured in a CUDA graph and replayed on new inputs gives what the eager
    launch gives (bit for bit: same config, same tile order per program, and with WS_DYNAMIC the launch's
    tile counter made and zeroed inside the graph, so that every replay starts from tile 0)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward is Hopper-only")
    from flashattention.kernels import configs, launch

    config = configs._c(192, 128, 4, 2, GLUON_WS=True, WS_CONSUMERS=3, HOST_DESC=True, **flags)
    kw = dict(softmax_scale=0.125, left=-1, right=0, config=config)
    static = [torch.randn(2, 4, 1000, 64, device="cuda", dtype=B16) for _ in range(3)]
    launch.forward_stats(*static, **kw)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_out, captured_lse2 = launch.forward_stats(*static, **kw)
    for _ in range(3):
        fresh = [torch.randn_like(t) for t in static]
        for dst, src in zip(static, fresh, strict=True):
            dst.copy_(src)
        graph.replay()
        out, lse2 = launch.forward_stats(*fresh, **kw)
        torch.cuda.synchronize()
        assert torch.equal(captured_out, out) and torch.equal(captured_lse2, lse2)


def _misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """The values of `t` in a view whose base pointer is one element past a 16-byte boundary, strides kept."""
    buf = torch.empty(t.numel() + 16, dtype=t.dtype, device=t.device)
    view = buf[1 : 1 + t.numel()].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 and view.stride() == t.stride()
    return view


@pytest.mark.parametrize("forward", ["triton", "gluon-host-desc", "gluon-persistent"])
def test_replayed_launches(forward: str) -> None:
    """A call whose shapes, strides, dtypes and pointer alignments were seen before launches the first
    call's kernels again with its own tensors (kernels/plans.py, no argument building or Triton dispatch).
    On fresh tensors the replayed forward and backward give what the full launch path gives on the same
    inputs, bit for bit, and pass the rule; a misaligned copy of the same shape gets a key of its own (no
    TMA, Triton's unaligned specialisation) and passes the rule; the first inputs again replay their plans."""
    from flashattention.kernels import configs, hooks, plans, registry

    gluon = forward != "triton"
    if gluon and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward is Hopper-only")
    plain = configs._c(128, 64, 4, 3)  # where TMA cannot run (misaligned)
    config = {
        "triton": configs._c(128, 64, 4, 3, USE_TMA=True),
        "gluon-host-desc": configs._c(128, 128, 4, 2, GLUON_WS=True, HOST_DESC=True),
        "gluon-persistent": configs._c(
            192, 128, 4, 2, GLUON_WS=True, WS_CONSUMERS=3, PERSISTENT=True, HOST_DESC=True, WS_STAGES=3
        ),
    }[forward]
    case = Case(2, 4, 2, 1000, 1000, 64, B16, causal=True)
    mask = case.mask_kwargs()
    first = case.inputs("cuda")
    # persistent programs loop over many tiles on 5 SMs
    with hooks.overrides(configs={"fwd": [config, plain]}, autotune=False, host_desc_min_work=0, num_sms=5):
        run_ours(*first, backend="triton", **mask)
        assert (
            len(plans.PLANS) == 2 and registry.last_launched["fwd"] is config
        )  # the forward's, the backward's
        kept = plans.PLANS.snapshot()
        fresh = [torch.randn_like(t) for t in first]
        replayed = run_ours(*fresh, backend="triton", **mask)
        assert plans.PLANS.snapshot() == kept  # replayed, none made
        plans.PLANS.clear()
        full = run_ours(*fresh, backend="triton", **mask)  # the full path, on the same inputs
        assert len(plans.PLANS) == 2
        for name, expected in full.items():
            assert torch.equal(replayed[name], expected), f"{name}: the replay differs from the full launch"
        _assert_matches(fresh, replayed, case.causal, case.window)
        misaligned = [_misaligned_copy(t) for t in first]
        ours = run_ours(*misaligned, backend="triton", **mask)
        assert len(plans.PLANS) == 4  # a key of its own
        # Gluon needs TMA, which needs 16-byte aligned pointers; the Triton config runs with CAN_TMA off
        assert registry.last_launched["fwd"] is (plain if gluon else config)
        _assert_matches(first, ours, case.causal, case.window)
        again = run_ours(*first, backend="triton", **mask)
        assert len(plans.PLANS) == 4
        _assert_matches(first, again, case.causal, case.window)
