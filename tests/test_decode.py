"""Split-KV decode (kernels/launch_decode.decode_forward) against the float64 oracle with the tolerance rule
of the README's pass rule, and metamorphic checks: any split count gives the same result, decode == the last
rows of prefill, per-sequence lengths == per-row calls, cache views == contiguous copies. On a CPU-only
machine the kernels run in Triton's interpreter (conftest), so shapes stay small.

K/V entries that the kernel must never read (past a row's length, or tiles before a sliding window) are
NaN: a read of one shows up as NaN in the output, which never passes."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import DTYPE_NAMES, Case, assert_close_to_reference, assert_same_result, case_params

from flashattention.kernels import configs, hooks, plans
from flashattention.kernels.launch_decode import decode_forward, num_splits_heuristic
from flashattention.reference import attention_reference

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32
SPLITS = (1, 2, 3, 7, 40)  # 40: the combine's 64-split tile, most splits empty


def _tile_align(device: torch.device) -> int:
    """Tiles before a sliding window are never read: keys below the window's start rounded down to this many
    (a multiple of every BLOCK_N the launcher uses on the device) are NaN in the window tests."""
    if device.type != "cuda":
        return configs.DECODE_INTERPRETED.kwargs["BLOCK_N"]
    return max(c.kwargs["BLOCK_N"] for dims in configs.DECODE.values() for c in dims.values())


def _left_right(case: Case) -> tuple[int, int]:
    """(causal, window) canonicalised as the API does: causal is right = 0."""
    left, right = case.window
    return left, 0 if case.causal else right


def _decode(case: Case, q, k, v, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    left, right = _left_right(case)
    out, lse = decode_forward(q, k, v, softmax_scale=case.head_dim**-0.5, left=left, right=right, **kwargs)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    return out, lse


def _reference(case: Case, q, k, v, upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_reference(q, k, v, upcast=upcast, **case.mask_kwargs())


def _check(case: Case, ours: tuple, q, k, v) -> None:
    """The pass rule on out and lse, against the oracle on (q, k, v)."""
    ref = _reference(case, q, k, v, upcast=True)
    same = _reference(case, q, k, v, upcast=False)
    for name, o, r, s in zip(("out", "lse"), ours, ref, same, strict=True):
        assert_close_to_reference(f"{case.id} {name}", o, r, s)


def _poison_before_window(case: Case, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of k and v with NaN in the whole tiles before every query's window."""
    left, _ = _left_right(case)
    k, v = k.clone(), v.clone()
    if left >= 0:
        first_visible = max(case.seqlen_k - case.seqlen_q - left, 0)
        align = _tile_align(k.device)
        k[:, :, : first_visible // align * align] = math.nan
        v[:, :, : first_visible // align * align] = math.nan
    return k, v


# Every feature at small shapes: seqlen_q 1 / 3 / 16, GQA 4:1, 1:1 and MQA, head dims 64, 40, 128 (and the
# ends, 8 and 256), causal, sliding window and full, each dtype.
CASES = [
    *(Case(2, 8, 2, 1, 37, 64, dt, causal=True) for dt in (F16, B16, F32)),
    Case(2, 8, 2, 3, 70, 40, B16, causal=True),
    Case(1, 4, 4, 16, 70, 64, F16, causal=True),
    Case(2, 8, 1, 16, 50, 64, F32, causal=True),  # MQA: 128 packed rows, two row blocks
    Case(1, 8, 2, 3, 113, 128, F16),
    Case(1, 6, 6, 1, 90, 128, F32),
    Case(2, 4, 1, 1, 113, 40, B16, causal=True, window=(5, -1)),
    Case(1, 8, 2, 16, 113, 64, F32, causal=True, window=(5, -1)),
    Case(1, 4, 4, 3, 200, 128, F16, window=(5, -1)),  # the window only: the first 192 keys are NaN
    Case(1, 8, 2, 3, 200, 40, B16, causal=True, window=(5, -1)),
    Case(1, 8, 2, 3, 37, 64, F32, window=(2, 1)),  # queries see past the diagonal
    Case(1, 4, 1, 16, 40, 40, F16),
    Case(2, 4, 2, 1, 1, 64, F16, causal=True),  # one key
    Case(1, 4, 2, 16, 5, 64, B16, causal=True),  # seqlen_q > seqlen_k: the first 11 queries see no key
    Case(1, 4, 2, 3, 60, 8, F16, causal=True),
    Case(1, 2, 1, 3, 40, 256, B16, causal=True),
    Case(1, 8, 2, 1, 70, 64, F16, causal=True, input_scale=10.0),  # large scores: the running max matters
    # 96 rows: the second row block starts inside a head, with query 1, but holds query 0 (whose window
    # starts on the key before a 16-key tile)
    Case(1, 32, 1, 3, 55, 40, F16, causal=True, window=(5, -1)),
    Case(1, 2, 2, 100, 130, 64, F32, causal=True, window=(5, -1)),  # row blocks inside one head's queries
]


@pytest.mark.parametrize("case", case_params(CASES))
def test_decode_matches_reference(case: Case, device):
    q, k, v, _ = case.inputs(device)
    ours = _decode(case, q, *_poison_before_window(case, k, v))
    _check(case, ours, q, k, v)


SPLIT_CASES = [
    Case(1, 8, 2, 1, 113, 64, F16, causal=True),
    Case(1, 4, 1, 3, 90, 40, F32),
    Case(1, 8, 2, 16, 70, 128, B16, causal=True, window=(5, -1)),
    Case(1, 4, 2, 16, 5, 64, F32, causal=True),  # empty rows, and splits that get no tile at all
]


@pytest.mark.parametrize("case", case_params(SPLIT_CASES))
def test_any_split_count_gives_the_same_result(case: Case, device):
    """Every split count passes the rule, and all agree with one split within rounding."""
    q, k, v, _ = case.inputs(device)
    k_poisoned, v_poisoned = _poison_before_window(case, k, v)
    results = {n: _decode(case, q, k_poisoned, v_poisoned, num_splits=n) for n in SPLITS}
    for n, ours in results.items():
        _check(case, ours, q, k, v)
        for name, o, expected in zip(("out", "lse"), ours, results[1], strict=True):
            assert_same_result(f"{case.id} {name} splits={n} vs 1", o, expected)


MASKS = {"causal": dict(causal=True), "causal-left5": dict(causal=True, window=(5, -1)), "full": dict()}
# one parameter at a time varied around (fp16, causal, Sq3, automatic split count)
SEQLENS_PARAMS = [
    (F16, "causal", 3, None),
    (B16, "causal", 3, None),
    (F32, "causal", 3, None),
    (F16, "causal-left5", 3, None),
    (F16, "full", 3, None),
    (F16, "causal", 1, None),
    (F16, "causal", 16, None),
    (F16, "causal", 3, 3),
    (F32, "causal-left5", 16, 7),
]


@pytest.mark.parametrize(
    ("dtype", "mask", "seqlen_q", "num_splits"),
    [
        pytest.param(*p, id=f"{DTYPE_NAMES[p[0]]}-{p[1]}-Sq{p[2]}-splits{p[3] or 'auto'}")
        for p in SEQLENS_PARAMS
    ],
)
def test_cache_seqlens_match_per_row_reference(dtype, mask, seqlen_q, num_splits, device):
    """Each batch row attends over its own cache_seqlens[b] keys (0 and 1 included) of a larger cache whose
    tail is NaN; == the oracle on that row's sliced K/V."""
    mask = MASKS[mask]
    seqlens = [0, 1, 23, 37, 64]
    capacity = 70
    case = Case(len(seqlens), 8, 2, seqlen_q, capacity, 64, dtype, **mask)
    q, k, v, _ = case.inputs(device)
    for b, n in enumerate(seqlens):
        k[b, :, n:] = math.nan
        v[b, :, n:] = math.nan
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device=device)
    out, lse = _decode(case, q, k, v, cache_seqlens=cache_seqlens, num_splits=num_splits)
    for b, n in enumerate(seqlens):
        row = Case(1, 8, 2, seqlen_q, n, 64, dtype, **mask)
        qb, kb, vb = q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n]
        _check(row, (out[b : b + 1], lse[b : b + 1]), qb, kb, vb)


PREFILL_CASES = [
    Case(2, 8, 2, 1, 45, 64, F16, causal=True),
    Case(1, 4, 1, 3, 45, 40, B16, causal=True),
    Case(1, 4, 4, 16, 45, 64, F32, causal=True),
    Case(1, 8, 2, 16, 80, 128, F16, causal=True, window=(5, -1)),
]


@pytest.mark.parametrize("case", case_params(PREFILL_CASES))
def test_decode_is_the_last_rows_of_prefill(case: Case, device):
    """The last seqlen_q queries of a causal prefill of seqlen_k tokens, decoded against the whole cache,
    == those rows of the prefill's oracle (and of its same-dtype computation, for the bound)."""
    full = Case(case.batch, case.heads, case.kv_heads, case.seqlen_k, case.seqlen_k, case.head_dim,
                case.dtype, causal=case.causal, window=case.window)  # fmt: skip
    q, k, v, _ = full.inputs(device)
    out, lse = _decode(case, q[:, :, -case.seqlen_q :], k, v)
    ref = _reference(full, q, k, v, upcast=True)
    same = _reference(full, q, k, v, upcast=False)
    rows = slice(case.seqlen_k - case.seqlen_q, None)
    assert_close_to_reference(f"{case.id} out", out, ref[0][:, :, rows], same[0][:, :, rows])
    assert_close_to_reference(f"{case.id} lse", lse, ref[1][:, :, rows], same[1][:, :, rows])


VIEW_CASES = [
    Case(2, 8, 2, 1, 37, 64, F16, causal=True),
    Case(2, 4, 1, 3, 50, 40, F32, causal=True, window=(5, -1)),
    Case(1, 4, 4, 16, 30, 128, B16),
]


@pytest.mark.parametrize("num_splits", [1, 3], ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("case", case_params(VIEW_CASES))
def test_cache_views_of_a_larger_buffer(case: Case, num_splits, device):
    """K/V as the first seqlen_k positions of a [batch, capacity, kv_heads, head_dim] buffer (NaN past them:
    strides not contiguous over the sequence), q a view of a [batch, seqlen_q, heads, head_dim + 8] buffer:
    the same result as contiguous inputs, and within the rule of the oracle."""
    q, k, v, _ = case.inputs(device)
    capacity = case.seqlen_k + 19
    views = []
    for t in (k, v):
        buf = torch.full((case.batch, capacity, case.kv_heads, case.head_dim), math.nan, dtype=t.dtype)
        buf = buf.to(device)
        buf[:, : case.seqlen_k] = t.transpose(1, 2)
        views.append(buf.transpose(1, 2)[:, :, : case.seqlen_k])
    q_buf = torch.full((case.batch, case.seqlen_q, case.heads, case.head_dim + 8), math.nan, dtype=q.dtype)
    q_buf = q_buf.to(device)
    q_buf[..., : case.head_dim] = q.transpose(1, 2)
    q_view = q_buf.transpose(1, 2)[..., : case.head_dim]
    assert not views[0].is_contiguous() and not q_view.is_contiguous()
    ours = _decode(case, q_view, *views, num_splits=num_splits)
    _check(case, ours, q, k, v)
    for name, o, expected in zip(
        ("out", "lse"), ours, _decode(case, q, k, v, num_splits=num_splits), strict=True
    ):
        assert_same_result(f"{case.id} {name} views vs contiguous", o, expected)


def test_no_keys_at_all(device):
    """An empty cache (seqlen_k 0): output 0 and LSE -inf, never NaN."""
    q = torch.randn(2, 4, 3, 64, device=device, dtype=F16)
    k = torch.randn(2, 2, 0, 64, device=device, dtype=F16)
    out, lse = decode_forward(q, k, k, softmax_scale=0.125, left=-1, right=0)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, -math.inf))


def test_split_heuristic():
    sms = 132
    assert num_splits_heuristic(64 * 8, 8192, sms, 256) == 1  # batch * kv_heads fills the GPU
    assert num_splits_heuristic(132, 8192, sms, 256) == 1
    assert num_splits_heuristic(8, 8192, sms, 256) == 16  # batch 1, 8 kv heads: 128 programs, one wave
    assert num_splits_heuristic(8, 4096, sms, 512) == 8  # at least 512 keys a split
    assert num_splits_heuristic(1, 1 << 20, sms, 256) == 128  # capped
    assert num_splits_heuristic(8, 1000, sms, 256) == 3  # at least 256 keys a split
    assert num_splits_heuristic(64, 8192, sms, 512) == 2  # batch 8: 128 programs, not a partial 2nd wave
    assert num_splits_heuristic(67, 8192, sms, 512) == 1  # two splits would need 134 SMs
    assert num_splits_heuristic(8, 100, sms, 256) == 1
    for programs in range(1, sms):  # never more programs than one wave
        assert programs * num_splits_heuristic(programs, 1 << 20, sms, 256) <= sms


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "with-grad"])
def test_flash_attention_runs_decode_for_inference_calls(grad: bool, device, monkeypatch) -> None:
    """flash_attention on the triton backend sends an inference call with few queries to the decode kernel
    (same result, by the rule), and a call that records gradients to the forward kernel (which has a
    backward); more than DECODE_MAX_QUERIES queries never take the decode kernel."""
    from flashattention import api, flash_attention
    from flashattention.kernels import launch_decode

    calls = []
    real = launch_decode.decode_forward
    monkeypatch.setattr(launch_decode, "decode_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    case = Case(2, 8, 2, 3, 70, 64, B16, causal=True)
    q, k, v, _ = case.inputs(device)
    q.requires_grad_(grad)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True, backend="triton")
    assert calls == ([] if grad else [1])
    _check(case, (out.detach(), lse), q.detach(), k, v)
    if grad:
        out.float().sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()
    long = Case(1, 2, 2, api.DECODE_MAX_QUERIES + 1, 40, 64, B16, causal=True).inputs(device)[:3]
    with torch.no_grad():
        flash_attention(*long, causal=True, backend="triton")
    assert calls == ([] if grad else [1])


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", (1, 4), ids=("unsplit", "split4"))
def test_replayed_decode_launches(num_splits: int) -> None:
    """A decode call seen before replays its compiled launches (kernels/plans.py) with its own tensors: on
    fresh inputs the replay gives what the full launch path gives, bit for bit, and passes the rule."""
    case = Case(3, 8, 2, 2, 700, 128, B16, causal=True)
    lengths = torch.tensor([700, 1, 333], dtype=torch.int32, device="cuda")
    with hooks.overrides(autotune=False):
        _decode(case, *case.inputs("cuda")[:3], cache_seqlens=lengths, num_splits=num_splits)
        kept = plans.PLANS.snapshot()
        assert len(kept) == 1
        q, k, v = case.inputs("cuda")[:3]
        replayed = _decode(case, q, k, v, cache_seqlens=lengths, num_splits=num_splits)
        assert plans.PLANS.snapshot() == kept  # replayed, none made
        plans.PLANS.clear()
        full = _decode(case, q, k, v, cache_seqlens=lengths, num_splits=num_splits)
    for name, ours, expected in zip(("out", "lse"), replayed, full, strict=True):
        assert torch.equal(ours, expected), f"{name}: the replay differs from the full launch"
    for b, n in enumerate(lengths.tolist()):
        row = Case(1, 8, 2, 2, n, 128, B16, causal=True)
        _check(
            row,
            (replayed[0][b : b + 1], replayed[1][b : b + 1]),
            q[b : b + 1],
            k[b : b + 1, :, :n],
            v[b : b + 1, :, :n],
        )
