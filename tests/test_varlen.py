"""flash_attention_varlen: packed sequences of different lengths (cu_seqlens), forward and backward.

Oracle: the float64 reference run sequence by sequence and packed, with the tolerance rule (the README's
pass rule) (tests/_helpers.py); metamorphic: varlen == one flash_attention call per sequence. Sequences of
length 0 (queries or keys), seqlen_q != seqlen_k per sequence, causal and windows with each sequence's own
bottom-right offset, GQA/MQA, LSE, three dtypes, both backends (triton in the interpreter on the CPU).
Bad cu_seqlens / max_seqlen raise before any kernel runs."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import triton
from _helpers import DTYPE_NAMES, NAMES, assert_same_result, compare_to_reference, reference_dtype

import flashattention
from flashattention import api, flash_attention, flash_attention_varlen
from flashattention.kernels import hooks, registry
from flashattention.reference import attention_reference

BACKENDS = ("triton", "torch")


@dataclasses.dataclass(frozen=True)
class VarlenCase:
    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...]
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 40
    dtype: torch.dtype = torch.float16
    causal: bool = False
    window: tuple[int, int] = (-1, -1)

    @property
    def id(self) -> str:
        parts = [
            f"B{len(self.lens_q)}",
            f"H{self.heads}",
            f"Hkv{self.kv_heads}",
            "q" + ",".join(map(str, self.lens_q)),
            "k" + ",".join(map(str, self.lens_k)),
            f"D{self.head_dim}",
        ]
        parts += ["causal"] if self.causal else []
        parts += [f"left{self.window[0]}"] if self.window[0] != -1 else []
        parts += [f"right{self.window[1]}"] if self.window[1] != -1 else []
        return "-".join(parts + [DTYPE_NAMES[self.dtype]])

    def mask_kwargs(self) -> dict:
        return {"causal": self.causal, "window_size": self.window}

    def inputs(self, device):
        """(q, k, v, dout, cu_seqlens_q, cu_seqlens_k), packed, drawn in float32."""
        total_q, total_k = sum(self.lens_q), sum(self.lens_k)

        def randn(*shape):
            return torch.randn(*shape, device=device).to(self.dtype)

        q = randn(total_q, self.heads, self.head_dim)
        k = randn(total_k, self.kv_heads, self.head_dim)
        v = randn(total_k, self.kv_heads, self.head_dim)
        dout = randn(total_q, self.heads, self.head_dim)
        return q, k, v, dout, cu_seqlens(self.lens_q, device), cu_seqlens(self.lens_k, device)


def cu_seqlens(lengths, device) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
CASES = [
    VarlenCase((5, 17, 3), (5, 17, 3), dtype=F32),  # self-attention, equal lengths per sequence
    VarlenCase((5, 0, 17, 3), (9, 4, 0, 20), dtype=F32, causal=True),  # empty q / empty k sequences
    VarlenCase((7, 1, 33), (30, 1, 12), dtype=F16, causal=True),  # Sq < Sk and Sq > Sk (rows without keys)
    VarlenCase((13, 40), (29, 40), dtype=BF16, window=(6, 3)),
    VarlenCase((19, 2, 11), (19, 35, 11), dtype=F16, causal=True, window=(5, -1)),  # causal sliding window
    VarlenCase((9, 21), (33, 7), heads=4, kv_heads=1, head_dim=24, dtype=F32, window=(-1, 2)),  # MQA
    VarlenCase((17, 6), (17, 6), heads=3, kv_heads=3, head_dim=72, dtype=BF16, causal=True),  # MHA, D 72
    VarlenCase((0, 0), (4, 0), dtype=F32),  # no queries at all
]


def packed_reference(q, k, v, cq, ck, *, upcast: bool, **mask):
    """(out [total_q, H, D], lse [H, total_q]): attention_reference per sequence, packed."""
    outs, lses = [], []
    for b in range(cq.numel() - 1):
        qs, ks = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
        qb, kb, vb = (t[s].transpose(0, 1)[None] for t, s in ((q, qs), (k, ks), (v, ks)))
        out, lse = attention_reference(qb, kb, vb, upcast=upcast, **mask)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].float() if not upcast else lse[0])
    return torch.cat(outs).to(q.dtype if not upcast else torch.float64), torch.cat(lses, dim=1)


def run_varlen(fn, q, k, v, dout, dtype) -> dict:
    """{"out", "lse", "dq", "dk", "dv"} of fn(q, k, v) -> (out, lse) and out.backward(dout), in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    out.backward(dout.to(out.dtype))
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return dict(zip(NAMES, (out.detach(), lse.detach(), *grads), strict=True))


def run_ours(case: VarlenCase, q, k, v, dout, cq, ck, backend: str) -> dict:
    def fn(q_, k_, v_):
        max_q, max_k = max(case.lens_q, default=0), max(case.lens_k, default=0)
        return flash_attention_varlen(
            q_, k_, v_, cq, ck, max_q, max_k, return_lse=True, backend=backend, **case.mask_kwargs()
        )

    return run_varlen(fn, q, k, v, dout, q.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_varlen_matches_reference(case: VarlenCase, backend: str, device) -> None:
    """out, lse, dq, dk, dv against the float64 oracle (per sequence, packed), tolerance rule."""
    q, k, v, dout, cq, ck = case.inputs(device)
    ours = run_ours(case, q, k, v, dout, cq, ck, backend)
    assert ours["out"].shape == q.shape and ours["lse"].shape == (case.heads, q.shape[0])
    assert ours["out"].dtype == q.dtype and ours["lse"].dtype == torch.float32

    def reference(dtype, upcast):
        return run_varlen(
            lambda *t: packed_reference(*t, cq, ck, upcast=upcast, **case.mask_kwargs()), q, k, v, dout, dtype
        )

    ref = reference(reference_dtype(case.dtype, device), True)
    same = reference(case.dtype, False)
    failures = [compare_to_reference(n, ours[n], ref[n], same[n]) for n in NAMES]
    failures = [f for f in failures if f is not None]
    assert not failures, f"backend={backend}:\n  " + "\n  ".join(failures)


METAMORPHIC = [
    VarlenCase((5, 0, 17, 3), (9, 4, 0, 20), dtype=F32, causal=True),
    VarlenCase((11, 23), (30, 9), heads=4, kv_heads=1, dtype=BF16, window=(4, 1)),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in METAMORPHIC])
def test_varlen_equals_per_sequence_calls(case: VarlenCase, device) -> None:
    """Varlen (triton) == flash_attention (triton) on each sequence alone, forward and backward."""
    q, k, v, dout, cq, ck = case.inputs(device)
    ours = run_ours(case, q, k, v, dout, cq, ck, "triton")

    def per_sequence(q_, k_, v_):
        outs, lses = [], []
        for b in range(len(case.lens_q)):
            qs, ks = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
            qb, kb, vb = (t[s].transpose(0, 1)[None] for t, s in ((q_, qs), (k_, ks), (v_, ks)))
            out, lse = flash_attention(qb, kb, vb, return_lse=True, backend="triton", **case.mask_kwargs())
            outs.append(out[0].transpose(0, 1))
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=1)

    expected = run_varlen(per_sequence, q, k, v, dout, q.dtype)
    for name in NAMES:
        assert_same_result(name, ours[name], expected[name])


def test_persistent_forward_and_packed_views(device) -> None:
    """The forward's PERSISTENT schedule (forced) under IS_VARLEN, on q, k, v that are strided views of one
    packed qkv tensor (no copy), equals the default config's result."""
    case = VarlenCase((9, 0, 30, 4), (9, 0, 30, 4), heads=2, kv_heads=2, head_dim=32, dtype=F32, causal=True)
    qkv = torch.randn(sum(case.lens_q), 3, 2, 32, device=device)
    q, k, v = qkv.unbind(1)
    cq = cu_seqlens(case.lens_q, device)
    expected = flash_attention_varlen(q, k, v, cq, cq, 30, 30, causal=True, return_lse=True, backend="triton")
    persistent = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "PERSISTENT": True}, num_warps=4, num_stages=1)
    with hooks.overrides(configs={"fwd": [persistent]}, num_sms=3):
        got = flash_attention_varlen(q, k, v, cq, cq, 30, 30, causal=True, return_lse=True, backend="triton")
    for name, a, b in zip(("out", "lse"), got, expected, strict=True):
        assert_same_result(name, a, b)


def test_auto_backend_and_export(device) -> None:
    assert "flash_attention_varlen" in flashattention.__all__
    case = VarlenCase((3, 8), (5, 8), dtype=F32, causal=True)
    q, k, v, _, cq, ck = case.inputs(device)
    auto = flash_attention_varlen(q, k, v, cq, ck, 8, 8, causal=True)
    explicit = flash_attention_varlen(
        q, k, v, cq, ck, 8, 8, causal=True, backend="triton" if device == "cuda" else "torch"
    )
    assert_same_result("out", auto, explicit)


def test_host_desc_configs_do_not_take_varlen() -> None:
    """The registry says which configs accept IS_VARLEN: every one but HOST_DESC's (whose descriptors span
    whole tensors, not one sequence); such a config does not apply to a varlen launch and says why, so
    varlen runs the entry's other configs."""
    host = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GLUON_WS": True, "HOST_DESC": True}, num_warps=4)
    gluon = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GLUON_WS": True}, num_warps=4)
    plain = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4)
    for kernel in registry.KERNELS.values():
        assert kernel.takes_varlen(plain) and kernel.takes_varlen(gluon) and not kernel.takes_varlen(host)
        assert kernel.problems(plain, {"IS_VARLEN": True}) == []
    problems = registry.KERNELS["fwd"].problems(host, {"IS_VARLEN": True})
    assert problems and "varlen" in problems[0] and "HOST_DESC" in problems[0]


# ----------------------------------------------------------------------------------------------------------
# Bad input: every error raised before any kernel runs


def _good(device):
    q = torch.randn(12, 4, 16, device=device)
    k = torch.randn(10, 2, 16, device=device)
    cq = cu_seqlens((5, 7), device)
    ck = cu_seqlens((4, 6), device)
    return dict(q=q, k=k, v=k.clone(), cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=7, max_seqlen_k=6)


BAD = {
    "cu-int64": (lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].long()), TypeError, "int32"),
    "cu-2d": (lambda a: dict(cu_seqlens_k=a["cu_seqlens_k"][None]), ValueError, "1-D"),
    "cu-not-tensor": (lambda a: dict(cu_seqlens_q=[0, 5, 12]), TypeError, "torch.Tensor"),
    "cu-start-1": (lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"] + 1), ValueError, "start at 0"),
    "cu-decreasing": (
        lambda a: dict(
            cu_seqlens_k=torch.tensor([0, 6, 4, 10], dtype=torch.int32, device=a["q"].device),
            cu_seqlens_q=torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=a["q"].device),
        ),
        ValueError,
        "non-decreasing",
    ),  # fmt: skip
    "cu-last-not-total": (lambda a: dict(q=a["q"][:11]), ValueError, "last offset"),
    "cu-batch-mismatch": (lambda a: dict(cu_seqlens_k=a["cu_seqlens_k"][:2]), ValueError, "batch \\+ 1"),
    "max-seqlen-q-small": (lambda a: dict(max_seqlen_q=6), ValueError, "max_seqlen_q"),
    "max-seqlen-k-small": (lambda a: dict(max_seqlen_k=5), ValueError, "max_seqlen_k"),
    "max-seqlen-float": (lambda a: dict(max_seqlen_k=6.0), TypeError, "max_seqlen_k"),
    "max-seqlen-negative": (
        lambda a: dict(max_seqlen_q=-1),
        ValueError,
        "`max_seqlen_q` must be a non-negative",
    ),
    "max-seqlen-numpy": (lambda a: dict(max_seqlen_q=np.int64(7)), TypeError, "`max_seqlen_q`.*int64"),
    "q-sparse": (lambda a: dict(q=a["q"].to_sparse()), TypeError, "`q` must be a dense.*to_dense"),
    "window-left-minus3": (
        lambda a: dict(window_size=(-3, 0)),
        ValueError,
        "^flash_attention_varlen: window_size left=-3",
    ),
    "return-lse-str": (
        lambda a: dict(return_lse="False"),
        TypeError,
        "flash_attention_varlen: `return_lse`.*bool",
    ),
    "q-rank-4": (lambda a: dict(q=a["q"][None]), ValueError, "3 dimensions"),
    "heads-not-multiple": (
        lambda a: dict(q=torch.randn(12, 3, 16, device=a["q"].device)),
        ValueError,
        "H_kv",
    ),
    "kv-shape": (lambda a: dict(v=a["v"][:, :1]), ValueError, "same shape"),
    "dtype-mix": (lambda a: dict(k=a["k"].half()), TypeError, "one dtype"),
    "head-dim-4": (
        lambda a: dict(q=a["q"][..., :4], k=a["k"][..., :4], v=a["v"][..., :4]),
        ValueError,
        "head_dim",
    ),  # fmt: skip
}
if torch.cuda.is_available():
    BAD["cu-on-cpu"] = (lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].cpu()), ValueError, "device")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_before_any_kernel(name: str, backend: str, device, monkeypatch) -> None:
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was checked")

    monkeypatch.setattr(api, "attention", no_kernel)
    args = _good(device)
    change, error, match = BAD[name]
    args.update(change(args))
    keywords = {key: args.pop(key) for key in ("window_size", "return_lse") if key in args}
    with pytest.raises(error, match=match):
        flash_attention_varlen(
            args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"], args["max_seqlen_q"],
            args["max_seqlen_k"], backend=backend, **keywords,
        )  # fmt: skip


def test_offsets_are_read_once_per_unmodified_tensor(device, monkeypatch) -> None:
    """The offsets' host read (a device sync) is kept for the same, unmodified device cu_seqlens tensors, as
    a model's layers pass them; an in-place write to either one (a new version) or other tensors of equal
    values are read again, so a stale read never validates changed offsets. (CPU tensors stand in for
    device ones here: the policy's `cacheable` is replaced.)"""
    from flashattention._validation import varlen as checks

    reads = []
    stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **kw: reads.append(1) or stack(*a, **kw))
    monkeypatch.setattr(checks, "_last_read", ())
    monkeypatch.setattr(checks, "cacheable", lambda t: not t.is_inference())
    args = _good(device)

    def check():
        return checks.check_cu_seqlens(
            args["cu_seqlens_q"], args["cu_seqlens_k"], args["max_seqlen_q"], args["max_seqlen_k"], args["q"],
            args["k"],
        )  # fmt: skip

    assert [check() for _ in range(3)] == [(7, 6)] * 3
    assert len(reads) == 1
    args["cu_seqlens_q"][1] = 13  # out of order now: must be seen
    with pytest.raises(ValueError, match="non-decreasing"):
        check()
    assert len(reads) == 2
    args["cu_seqlens_q"][1] = 5
    args["cu_seqlens_k"] = args["cu_seqlens_k"].clone()  # equal values, another tensor
    assert check() == (7, 6)
    assert len(reads) == 3
    args["cu_seqlens_k"][1:] = torch.tensor([3, 10], dtype=torch.int32)  # a longer sequence: 7 keys
    with pytest.raises(ValueError, match="max_seqlen_k"):
        check()
    assert len(reads) == 4


def test_cpu_offsets_are_read_every_call() -> None:
    """CPU offsets are read afresh on every call (no sync to save): a write through a numpy view, which
    PyTorch's version counter does not see, is caught as any other."""
    args = _good("cpu")
    flash_attention_varlen(*args.values(), backend="torch")
    args["cu_seqlens_q"].numpy()[1] = 9  # sequence 1 has 3 queries now, sequence 0 has 9 > max_seqlen_q 7
    with pytest.raises(ValueError, match="max_seqlen_q"):
        flash_attention_varlen(*args.values(), backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_offsets(backend: str, device) -> None:
    """Offsets made under torch.inference_mode (tensors without a version counter) are read on every call:
    the call works, and a change made in place under inference mode is seen."""
    with torch.inference_mode():
        args = _good(device)
        out = flash_attention_varlen(*args.values(), backend=backend)
        expected = flash_attention_varlen(*{**args, "cu_seqlens_q": args["cu_seqlens_q"].clone()}.values(),
                                          backend=backend)  # fmt: skip
        assert_same_result("out", out, expected)
        args["cu_seqlens_q"][1] = 9
        with pytest.raises(ValueError, match="max_seqlen_q"):
            flash_attention_varlen(*args.values(), backend=backend)


def test_offsets_changed_unseen_stay_inside_the_tensors(device, monkeypatch) -> None:
    """Offsets written after their check without PyTorch seeing it (as a custom kernel writes a device
    tensor; here through `.data`, which keeps the version counter, with the cached read kept on the CPU
    too) never take a kernel outside the packed rows: each range is clamped into [0, total). q, k and v lie
    in NaN-filled buffers, so a read past their rows would show as NaN; the last offset pushed 4 rows past
    the end reads as the end, giving exactly the result of the valid offsets, forward and backward."""
    from flashattention._validation import varlen as checks

    monkeypatch.setattr(checks, "_last_read", ())
    monkeypatch.setattr(checks, "cacheable", lambda t: True)
    torch.manual_seed(0)
    total, guard = 8, 4

    def guarded(heads):  # [total, heads, 16] rows of a NaN buffer with `guard` more rows after them
        buffer = torch.full((total + guard, heads, 16), float("nan"), device=device)
        buffer[:total] = torch.randn(total, heads, 16, device=device)
        return buffer[:total].requires_grad_()

    q, k, v = guarded(4), guarded(2), guarded(2)
    cu = cu_seqlens((3, 5), device)

    def run():
        out = flash_attention_varlen(q, k, v, cu, cu, 5, 5, causal=True, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return (out, *grads)

    expected = run()
    version = cu._version
    cu.data[2] = total + guard
    assert cu._version == version  # unseen: the check's cached read is kept
    for name, got, want in zip(("out", "dq", "dk", "dv"), run(), expected, strict=True):
        assert not got.isnan().any(), f"{name}: NaN, a read past the packed rows"
        assert_same_result(name, got, want)


def test_larger_max_seqlen_is_accepted(device) -> None:
    """max_seqlen above the longest sequence (a padded bound, as servers pass) gives the same result."""
    args = _good(device)
    tight = flash_attention_varlen(*args.values(), causal=True, backend="triton")
    loose = flash_attention_varlen(*list(args.values())[:5], 100, 2**40, causal=True, backend="triton")
    assert_same_result("out", loose, tight)


# ----------------------------------------------------------------------------------------------------------
# GPU: realistic sizes (skipped on the CPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_varlen_realistic(dtype, causal) -> None:
    """16 sequences of 1..2k tokens (one empty), GQA 32/8, D 128, against the float32 oracle per sequence."""
    generator = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 2048, (16,), generator=generator).tolist()
    lens[3] = 0
    case = VarlenCase(
        tuple(lens), tuple(lens), heads=32, kv_heads=8, head_dim=128, dtype=dtype, causal=causal
    )
    test_varlen_matches_reference(case, "triton", "cuda")


@pytest.mark.gpu
def test_gpu_varlen_equals_per_sequence_with_window() -> None:
    """Sliding window, seqlen_q != seqlen_k per sequence, D 64, bf16: varlen == per-sequence calls."""
    case = VarlenCase((1000, 17, 3000, 1), (1500, 17, 3000, 700), heads=16, kv_heads=4, head_dim=64,
                      dtype=BF16, causal=True, window=(256, -1))  # fmt: skip
    test_varlen_equals_per_sequence_calls(case, "cuda")


@pytest.mark.gpu
def test_gpu_varlen_replayed_launches() -> None:
    """A second call of the same shapes replays the first one's launches (kernels/plans.py) with its own
    packed tensors standing for the kernels' [1, heads, total, head_dim] views: forward and backward equal
    the full launch path's (plans off) on the same inputs."""
    from flashattention.kernels.plans import PLANS

    case = VarlenCase((300, 0, 517), (300, 5, 1300), heads=8, kv_heads=2, head_dim=128, dtype=BF16,
                      causal=True)  # fmt: skip
    q, k, v, dout, cq, ck = case.inputs("cuda")
    PLANS.clear()
    run_ours(case, q, k, v, dout, cq, ck, "triton")
    assert len(PLANS) >= 2  # the forward's and the backward's, at least
    q, k, v, dout = (torch.randn_like(t) for t in (q, k, v, dout))
    replayed = run_ours(case, q, k, v, dout, cq, ck, "triton")
    with hooks.overrides(plans=False):
        full = run_ours(case, q, k, v, dout, cq, ck, "triton")
    for name in NAMES:
        assert_same_result(name, replayed[name], full[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_varlen(backend: str, device) -> None:
    """The custom op's registrations (fake, autograd) are consistent for varlen arguments too."""
    from flashattention._autograd import attention_forward

    case = VarlenCase((5, 0, 11), (7, 3, 11), dtype=F32)
    q, k, v, _, cq, ck = case.inputs(device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(attention_forward, (q, k, v, 0.25, 4, 0, backend, cq, ck, 11, 11))
