"""flashattention.compat: flash-attn 2's functions (BSHD, packed qkv/kv, its causal/window rule, return
values, flash_attn_with_kvcache with per-row lengths, cache_batch_idx, cache_leftpad, rotary, in-place
appends and paged block tables) against the float64 oracle with the tolerance rule, no copies of K/V,
and NotImplementedError for what we lack. flash_attn_varlen_func: tests/test_compat_varlen.py."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import NAMES, compare_to_reference, reference_dtype

from flashattention import compat
from flashattention.compat import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)
from flashattention.kernels import launch_decode
from flashattention.reference import attention_reference

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32
BACKENDS = ["torch", "triton"]


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _randn(*shape, dtype=F32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, device=device).to(dtype)


def _check(results: dict, q, k, v, dout=None, **mask) -> None:
    """results (BHSD out, lse[, dq, dk, dv]) against the oracle and the same-dtype computation on BHSD
    q, k, v with `mask` (causal, window_size, softmax_scale), by the tolerance rule."""
    expected = {}
    for key, dtype in (("ref", reference_dtype(q.dtype, q.device)), ("same", q.dtype)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = attention_reference(*leaves, upcast=dtype == torch.float64, **mask)
        if dout is not None:
            out.backward(dout.to(dtype))
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
        expected[key] = dict(zip(NAMES, (out.detach(), lse.detach(), *grads), strict=True))
    failures = [compare_to_reference(n, results[n], expected["ref"][n], expected["same"][n]) for n in results]
    failures = [f for f in failures if f is not None]
    assert not failures, f"{mask}:\n  " + "\n  ".join(failures)


# ----------------------------------------------------------------------------------------------------------
# flash_attn_func, qkvpacked, kvpacked

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, window_size given to flash-attn,
#  (causal, window_size) of the same mask in flash_attention's terms)
CASES = [
    pytest.param(2, 17, 33, 4, 2, 32, True, (-1, -1), (True, (-1, -1)), id="Sq17-Sk33-GQA-causal"),
    pytest.param(1, 29, 29, 2, 2, 40, False, (5, 3), (False, (5, 3)), id="Sq29-window5,3"),
    # causal with a right bound: flash-attn sets right = 0 (we would raise for this in flash_attention)
    pytest.param(2, 24, 31, 3, 1, 16, True, (4, 7), (True, (4, 0)), id="MQA-causal-window4,7->4,0"),
    # a left bound with right -1: flash-attn uses right = seqlen_k (hides keys when seqlen_q > seqlen_k+1)
    pytest.param(1, 13, 5, 2, 1, 16, False, (2, -1), (False, (2, 5)), id="Sq13-Sk5-window2,-1->2,Sk"),
    # negative bounds are unbounded; a bound >= seqlen_k too
    pytest.param(1, 9, 12, 2, 2, 24, False, (-7, 40), (False, (-1, -1)), id="window-7,40->full"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch, sq, sk, heads, kv_heads, d, causal, window, expected_mask", CASES)
def test_flash_attn_func(batch, sq, sk, heads, kv_heads, d, causal, window, expected_mask, backend, device):
    """BSHD in and out, (out, lse, None) with return_attn_probs, gradients in BSHD; == the oracle with the
    mask flash-attn means."""
    q, k, v, dout = (
        _randn(batch, s, h, d, device=device)
        for s, h in ((sq, heads), (sk, kv_heads), (sk, kv_heads), (sq, heads))
    )
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, probs = flash_attn_func(
        *leaves, causal=causal, window_size=window, return_attn_probs=True, backend=backend
    )
    assert probs is None
    assert out.shape == (batch, sq, heads, d) and lse.shape == (batch, heads, sq)
    out.backward(dout)
    results = dict(
        out=_bhsd(out), lse=lse, **{n: _bhsd(t.grad) for n, t in zip(("dq", "dk", "dv"), leaves, strict=True)}
    )
    c, w = expected_mask
    _check(results, _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(dout), causal=c, window_size=w)


@pytest.mark.parametrize("dtype", [F16, B16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_func_low_precision(dtype, backend, device):
    q, k, v = (_randn(2, 21, 4, 64, dtype=dtype, device=device) for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True, softmax_scale=0.3, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    _, lse, _ = flash_attn_func(
        q, k, v, causal=True, softmax_scale=0.3, return_attn_probs=True, backend=backend
    )
    _check(dict(out=_bhsd(out), lse=lse), _bhsd(q), _bhsd(k), _bhsd(v), causal=True, softmax_scale=0.3)


def _record_flash_attention(monkeypatch) -> list:
    """The q, k, v that compat hands to flash_attention's work (api.dense_attention; to check that they
    are views of the inputs)."""
    seen = []
    real = compat.api.dense_attention

    def spy(q, k, v, *args):
        seen.append((q, k, v))
        return real(q, k, v, *args)

    monkeypatch.setattr(compat.api, "dense_attention", spy)
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_qkvpacked(backend, device, monkeypatch):
    """qkv [B, S, 3, H, D]: q, k, v reach flash_attention as views of qkv (no copy), the gradient lands in
    qkv, and the result is flash_attn_func's on the unbound tensors."""
    seen = _record_flash_attention(monkeypatch)
    qkv = _randn(2, 19, 3, 4, 32, device=device).requires_grad_()
    dout = _randn(2, 19, 4, 32, device=device)
    out, lse, _ = flash_attn_qkvpacked_func(
        qkv, causal=True, window_size=(6, -1), return_attn_probs=True, backend=backend
    )
    out.backward(dout)
    ((q_seen, k_seen, v_seen),) = seen
    for i, t in enumerate((q_seen, k_seen, v_seen)):
        assert t.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
        assert t.data_ptr() == qkv[:, :, i].data_ptr()
    q, k, v = (_bhsd(t) for t in qkv.detach().unbind(2))
    grads = [_bhsd(g) for g in qkv.grad.unbind(2)]
    results = dict(out=_bhsd(out), lse=lse, dq=grads[0], dk=grads[1], dv=grads[2])
    _check(results, q, k, v, _bhsd(dout), causal=True, window_size=(6, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvpacked(backend, device, monkeypatch):
    """kv [B, Sk, 2, Hkv, D] with GQA and seqlen_q < seqlen_k (bottom-right causal): views, gradients."""
    seen = _record_flash_attention(monkeypatch)
    q = _randn(2, 7, 6, 16, device=device).requires_grad_()
    kv = _randn(2, 23, 2, 2, 16, device=device).requires_grad_()
    dout = _randn(2, 7, 6, 16, device=device)
    out = flash_attn_kvpacked_func(q, kv, causal=True, backend=backend)
    out.backward(dout)
    ((q_seen, k_seen, v_seen),) = seen
    assert q_seen is q and k_seen.data_ptr() == kv.data_ptr() and v_seen.data_ptr() == kv[:, :, 1].data_ptr()
    k, v = (_bhsd(t) for t in kv.detach().unbind(2))
    dk, dv = (_bhsd(g) for g in kv.grad.unbind(2))
    _check(
        dict(out=_bhsd(out), dq=_bhsd(q.grad), dk=dk, dv=dv),
        _bhsd(q.detach()),
        k,
        v,
        _bhsd(dout),
        causal=True,
    )


def test_deterministic_accepted_and_bitwise_reproducible(device):
    """deterministic=True is accepted: our backward writes each gradient element once (no atomics)."""
    q, k, v, dout = (_randn(1, 33, 2, 16, device=device) for _ in range(4))
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        flash_attn_func(*leaves, causal=True, deterministic=True, backend="triton").backward(dout)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "fn, kwargs, name",
    [
        (flash_attn_func, dict(dropout_p=0.1), "dropout_p"),
        (flash_attn_func, dict(softcap=30.0), "softcap"),
        (flash_attn_func, dict(alibi_slopes=torch.ones(2)), "alibi_slopes"),
        (flash_attn_qkvpacked_func, dict(dropout_p=0.5), "dropout_p"),
        (flash_attn_kvpacked_func, dict(softcap=1.0), "softcap"),
        (flash_attn_with_kvcache, dict(softcap=5.0), "softcap"),
        (flash_attn_with_kvcache, dict(alibi_slopes=torch.ones(2)), "alibi_slopes"),
    ],
    ids=lambda x: x if isinstance(x, str) else getattr(x, "__name__", ""),
)
def test_unsupported_features_raise(fn, kwargs, name):
    q = torch.randn(1, 4, 2, 16)
    if fn is flash_attn_qkvpacked_func:
        args = (torch.randn(1, 4, 3, 2, 16),)
    elif fn is flash_attn_kvpacked_func:
        args = (q, torch.randn(1, 4, 2, 2, 16))
    else:
        args = (q, q.clone(), q.clone())
    with pytest.raises(NotImplementedError, match=name):
        fn(*args, **kwargs)


def test_varlen_block_table_raises():
    q = torch.randn(4, 2, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="block_table"):
        flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, block_table=torch.zeros(1, 1, dtype=torch.int32))


def test_bad_input_raises():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="qkv"):
        flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 16))
    with pytest.raises(TypeError, match="window_size"):
        flash_attn_func(q, q, q, window_size=(1.5, 0))
    with pytest.raises(TypeError, match="causal"):
        flash_attn_func(q, q, q, causal=None)
    with pytest.raises(ValueError, match="heads"):
        flash_attn_func(torch.randn(1, 4, 3, 16), q, q)
    # flags are bools, not truthy objects; sparse tensors are refused by name
    for fn, args in (
        (flash_attn_func, (q, q, q)),
        (flash_attn_qkvpacked_func, (torch.randn(1, 4, 3, 2, 16),)),
        (flash_attn_kvpacked_func, (q, torch.randn(1, 4, 2, 2, 16))),
    ):
        with pytest.raises(TypeError, match=f"^{fn.__name__}: `return_attn_probs` must be a bool, got str"):
            fn(*args, return_attn_probs="no")
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="^flash_attn_varlen_func: `return_attn_probs` must be a bool"):
        flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 4, 4, return_attn_probs="no")
    with pytest.raises(TypeError, match="`max_seqlen_k` must be an int >= 0, got float"):
        flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 4, 4.0)
    with pytest.raises(TypeError, match=r"`q` must be a dense \(strided\) tensor.*to_dense"):
        flash_attn_func(q.to_sparse(), q, q)
    with pytest.raises(TypeError, match=r"`qkv` must be a dense \(strided\) tensor"):
        flash_attn_qkvpacked_func(torch.randn(1, 4, 3, 2, 16).to_sparse())


# ----------------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache


def _rotate(x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [seqlen, heads, head_dim] (float64) rotated by angles [seqlen, rotary_dim / 2], as complex
    multiplication of the pairs (2i, 2i+1) or (i, i + rotary_dim / 2)."""
    half = angles.shape[1]
    rot = x[..., : 2 * half]
    if interleaved:
        pairs = torch.complex(rot[..., 0::2], rot[..., 1::2])
    else:
        pairs = torch.complex(rot[..., :half], rot[..., half:])
    angles = angles.to(x.device)  # the test's angles live on the CPU, x where the kernel ran
    turned = pairs * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    if interleaved:
        rot = torch.stack((turned.real, turned.imag), dim=-1).flatten(-2)
    else:
        rot = torch.cat((turned.real, turned.imag), dim=-1)
    return torch.cat((rot, x[..., 2 * half :]), dim=-1)


def _expected_kvcache(
    q,
    k_cache,
    v_cache,
    k,
    v,
    seqlens,
    batch_idx,
    leftpad,
    angles,
    interleaved,
    causal,
    window_size,
    rows_of=None,
):
    """The oracle's view of a call: the cache after the append (float tensors in the cache's layout,
    [batch_cache, capacity, kv_heads, head_dim] per row `rows_of(r)`), and per row b the BHSD (q, k, v) it
    attends and the mask, in flash_attention's terms."""
    batch, seqlen_q = q.shape[:2]
    new = 0 if k is None else k.shape[1]
    k_after, v_after = k_cache.clone(), v_cache.clone()
    problems = []
    capacity = k_cache.shape[1]
    for b in range(batch):
        row = b if batch_idx is None else int(batch_idx[b])
        start = 0 if leftpad is None else int(leftpad[b])
        length = capacity if seqlens is None else int(seqlens[b])
        qb, kb = q[b].double(), None if k is None else k[b].double()
        if angles is not None:
            steps = causal or window_size != (-1, -1)
            q_pos = torch.arange(seqlen_q) + length if steps else torch.full((seqlen_q,), length)
            qb = _rotate(qb, angles[q_pos], interleaved)
            kb = _rotate(kb, angles[torch.arange(new) + length], interleaved)
        if k is not None:
            k_after[row, length : length + new] = kb.to(k_cache.dtype)
            v_after[row, length : length + new] = v[b]
        problems.append((qb, k_after[row, start : length + new], v_after[row, start : length + new]))
    return k_after, v_after, problems


def _check_rows(out, lse, problems, dtype, causal, window_size):
    for b, (qb, kb, vb) in enumerate(problems):
        q4, k4, v4 = (t[None].transpose(1, 2) for t in (qb, kb.double(), vb.double()))
        mask = dict(causal=causal, window_size=window_size)
        ref = attention_reference(q4, k4, v4, upcast=True, **mask)
        same = attention_reference(*(t.to(dtype) for t in (q4, k4, v4)), upcast=False, **mask)
        for name, ours, r, s in (
            ("out", _bhsd(out[b : b + 1]), ref[0], same[0]),
            ("lse", lse[b : b + 1], *[x[1] for x in (ref, same)]),
        ):
            message = compare_to_reference(f"row {b} {name}", ours, r, s)
            assert message is None, message


KVCASES = [
    # batch, seqlen_q, new, heads, kv_heads, head_dim, capacity, batch_cache, seqlens, batch_idx, leftpad
    pytest.param(3, 1, 1, 4, 2, 32, 40, 3, [5, 0, 39], None, None, id="decode-per-row-GQA"),
    pytest.param(2, 3, 3, 2, 2, 16, 25, 2, [0, 9], None, None, id="append3-chunk"),
    pytest.param(2, 20, 20, 4, 1, 16, 50, 2, [7, 30], None, None, id="prefill20-MQA"),
    pytest.param(2, 2, 2, 2, 1, 24, 30, 4, [3, 11], [3, 1], None, id="batch_idx"),
    pytest.param(3, 2, 1, 2, 2, 16, 30, 3, [6, 20, 3], None, [2, 0, 3], id="leftpad"),
    pytest.param(2, 1, 1, 4, 2, 16, 30, 5, [12, 8], [4, 0], [5, 8], id="batch_idx-leftpad"),
    pytest.param(2, 4, 0, 2, 2, 16, 21, 2, [21, 6], None, None, id="no-append"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "batch, sq, new, heads, kv_heads, d, capacity, bc, seqlens, batch_idx, leftpad", KVCASES
)
def test_kvcache(
    batch, sq, new, heads, kv_heads, d, capacity, bc, seqlens, batch_idx, leftpad, backend, device
):
    """Append in place at each row's cache_seqlens (into cache row cache_batch_idx[b]), then attend over the
    row's tokens [cache_leftpad[b], cache_seqlens[b] + new), causal bottom-right per row: the cache holds
    exactly the expected tokens (every other position untouched) and out/lse match the oracle."""
    q = _randn(batch, sq, heads, d, device=device)
    k_cache, v_cache = (_randn(bc, capacity, kv_heads, d, device=device) for _ in range(2))
    k, v = (_randn(batch, new, kv_heads, d, device=device) for _ in range(2)) if new else (None, None)
    idx = lambda x: None if x is None else torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    k_after, v_after, problems = _expected_kvcache(
        q, k_cache, v_cache, k, v, seqlens, batch_idx, leftpad, None, True, True, (-1, -1)
    )
    k_ptr = k_cache.data_ptr()
    out, lse = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k,
        v,
        cache_seqlens=idx(seqlens),
        cache_batch_idx=idx(batch_idx),
        cache_leftpad=idx(leftpad),
        causal=True,
        return_softmax_lse=True,
        backend=backend,
    )
    assert k_cache.data_ptr() == k_ptr
    assert torch.equal(k_cache, k_after) and torch.equal(v_cache, v_after)
    assert out.shape == q.shape and lse.shape == (batch, heads, sq)
    _check_rows(out, lse, problems, F32, True, (-1, -1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize(
    "causal, window",
    [(True, (-1, -1)), (False, (-1, -1)), (False, (3, 1))],
    ids=["causal", "full", "window3,1"],
)
def test_kvcache_rotary(interleaved, causal, window, backend, device):
    """rotary_cos/sin rotate the new k at its cache positions and q at cache_seqlens + i (causal or local)
    or at cache_seqlens for every query (neither), over the first rotary_dim of head_dim 32."""
    batch, sq, heads, kv_heads, d, capacity, rotary_dim = 2, 3, 4, 2, 32, 24, 16
    q = _randn(batch, sq, heads, d, device=device)
    k_cache, v_cache = (_randn(batch, capacity, kv_heads, d, device=device) for _ in range(2))
    k, v = (_randn(batch, sq, kv_heads, d, device=device) for _ in range(2))
    seqlens = torch.tensor([4, 17], dtype=torch.int32, device=device)
    angles = torch.rand(capacity, rotary_dim // 2, dtype=torch.float64) * 2 * math.pi
    k_after, v_after, problems = _expected_kvcache(
        q, k_cache, v_cache, k, v, seqlens.tolist(), None, None, angles, interleaved, causal, window
    )
    out, lse = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k,
        v,
        rotary_cos=angles.cos().float().to(device),
        rotary_sin=angles.sin().float().to(device),
        cache_seqlens=seqlens,
        causal=causal,
        window_size=window,
        rotary_interleaved=interleaved,
        return_softmax_lse=True,
        backend=backend,
    )
    torch.testing.assert_close(k_cache, k_after, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache, v_after)
    _check_rows(out, lse, problems, F32, causal, window)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_int_seqlens_window_fp16(backend, device):
    """cache_seqlens as an int (every row), a causal sliding window, fp16."""
    q = _randn(2, 2, 4, 16, dtype=F16, device=device)
    k_cache, v_cache = (_randn(2, 30, 2, 16, dtype=F16, device=device) for _ in range(2))
    k, v = (_randn(2, 2, 2, 16, dtype=F16, device=device) for _ in range(2))
    _, _, problems = _expected_kvcache(
        q, k_cache, v_cache, k, v, [13, 13], None, None, None, True, True, (4, 2)
    )
    out, lse = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k,
        v,
        cache_seqlens=13,
        causal=True,
        window_size=(4, 2),
        return_softmax_lse=True,
        backend=backend,
    )
    _check_rows(out, lse, problems, F16, True, (4, 0))


def _paged(dense: torch.Tensor, block_size: int, order: torch.Tensor | None = None, extra_blocks: int = 3):
    """dense [batch, capacity, kv_heads, D] laid out in a pool [num_blocks, block_size, kv_heads, D]
    through a random block table (or `order`'s); returns (pool, table)."""
    batch, capacity = dense.shape[:2]
    per_row = -(-capacity // block_size)
    num_blocks = batch * per_row + extra_blocks
    if order is None:
        order = torch.randperm(num_blocks)[: batch * per_row].view(batch, per_row)
    order = order.long().cpu()
    pool = torch.randn(num_blocks, block_size, *dense.shape[2:], device=dense.device).to(dense.dtype)
    padded = torch.zeros(
        batch, per_row * block_size, *dense.shape[2:], dtype=dense.dtype, device=dense.device
    )
    padded[:, :capacity] = dense
    pool[order.flatten()] = padded.view(batch * per_row, block_size, *dense.shape[2:])
    return pool, order.to(device=dense.device, dtype=torch.int32)


def _unpage(pool: torch.Tensor, table: torch.Tensor, capacity: int) -> torch.Tensor:
    return pool[table.long()].flatten(1, 2)[:, :capacity]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [16, 5])
def test_kvcache_paged(block_size, backend, device, monkeypatch):
    """block_table: pools [num_blocks, block_size, kv_heads, D] in a random order; the append lands in the
    right blocks (across a block boundary), the attention equals the dense oracle, and the kernel reads the
    caller's pools as views (triton: decode_forward gets the pools' own storage)."""
    batch, sq, heads, kv_heads, d, capacity = 3, 2, 4, 2, 16, 2 * 16
    dense_k, dense_v = (_randn(batch, capacity, kv_heads, d, device=device) for _ in range(2))
    k_pool, table = _paged(dense_k, block_size)
    v_pool, _ = _paged(dense_v, block_size, table)
    q = _randn(batch, sq, heads, d, device=device)
    k, v = (_randn(batch, sq, kv_heads, d, device=device) for _ in range(2))
    seqlens = [4, 15, 30]  # row 1 crosses a block boundary of 5 and of 16
    cap = table.shape[1] * block_size
    k_after, v_after, problems = _expected_kvcache(
        q,
        _unpage(k_pool, table, cap),
        _unpage(v_pool, table, cap),
        k,
        v,
        seqlens,
        None,
        None,
        None,
        True,
        True,
        (-1, -1),
    )
    seen = []
    real = launch_decode.decode_forward
    monkeypatch.setattr(launch_decode, "decode_forward", lambda *a, **kw: seen.append(a) or real(*a, **kw))
    out, lse = flash_attn_with_kvcache(
        q,
        k_pool,
        v_pool,
        k,
        v,
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device),
        block_table=table,
        causal=True,
        return_softmax_lse=True,
        backend=backend,
    )
    assert torch.equal(_unpage(k_pool, table, cap), k_after)
    assert torch.equal(_unpage(v_pool, table, cap), v_after)
    _check_rows(out, lse, problems, F32, True, (-1, -1))
    if backend == "triton":
        ((_, k_seen, v_seen),) = seen
        assert k_seen.data_ptr() == k_pool.data_ptr() and v_seen.data_ptr() == v_pool.data_ptr()
        assert k_seen.shape == (k_pool.shape[0], kv_heads, block_size, d)


@pytest.mark.parametrize("case", ["dense", "batch_idx", "leftpad"])
def test_kvcache_no_copy(case, device, monkeypatch):
    """On triton the decode kernel reads the caller's k_cache storage itself (a transposed view, a page per
    cache row for cache_batch_idx, one-token pages for cache_leftpad)."""
    seen = []
    real = launch_decode.decode_forward
    monkeypatch.setattr(
        launch_decode, "decode_forward", lambda *a, **kw: seen.append((a, kw)) or real(*a, **kw)
    )
    q = _randn(2, 1, 2, 16, device=device)
    k_cache, v_cache = (_randn(3, 20, 2, 16, device=device) for _ in range(2))
    extra = dict(
        dense={},
        batch_idx=dict(cache_batch_idx=torch.tensor([2, 0])),
        leftpad=dict(cache_leftpad=torch.tensor([1, 3])),
    )[case]
    flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=torch.tensor([5, 9]), backend="triton", **extra
    )
    ((args, kwargs),) = seen
    assert args[1].data_ptr() == k_cache.data_ptr() and args[2].data_ptr() == v_cache.data_ptr()
    assert args[1].untyped_storage().data_ptr() == k_cache.untyped_storage().data_ptr()
    assert (kwargs["block_table"] is None) == (case == "dense")


def test_kvcache_bad_input_raises_before_writing(device):
    q = _randn(2, 1, 2, 16, device=device)
    k_cache, v_cache = (_randn(2, 10, 2, 16, device=device) for _ in range(2))
    k, v = (_randn(2, 3, 2, 16, device=device) for _ in range(2))
    before = k_cache.clone()
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    with pytest.raises(ValueError, match="capacity"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=i32([2, 8]))
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v)
    with pytest.raises(ValueError, match="cache_batch_idx"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=1, cache_batch_idx=i32([0, 2]))
    with pytest.raises(ValueError, match="one cache row for two batch rows"):  # both would write row 1
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=1, cache_batch_idx=i32([1, 1]))
    with pytest.raises(ValueError, match="cache_leftpad"):
        flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, cache_seqlens=i32([1, 4]), cache_leftpad=i32([0, 5])
        )
    with pytest.raises(ValueError, match="rotary"):
        flash_attn_with_kvcache(
            q, k_cache, v_cache, rotary_cos=torch.ones(10, 4), rotary_sin=torch.ones(10, 4)
        )
    with pytest.raises(NotImplementedError, match="cache_batch_idx"):
        flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=1, cache_batch_idx=i32([0, 1]), block_table=i32([[0], [1]])
        )
    with pytest.raises(ValueError, match="block_table"):  # an entry outside the pool
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=1, block_table=i32([[0], [7]]))
    # an int cache_seqlens past int32 is checked against the capacity before a tensor is made of it; a
    # negative one says the lengths must be >= 0 (not "a larger cache")
    with pytest.raises(ValueError, match=r"`cache_seqlens` \+ the 3 new token\(s\) must lie in \[0, 10\]"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=2**40)
    for negative in (-1, i32([0, -2])):
        with pytest.raises(ValueError, match="`cache_seqlens` .* must be >= 0, got values in") as info:
            flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=negative)
        assert "larger cache" not in str(info.value)
    with pytest.raises(TypeError, match="`num_splits` must be an int >= 0, got float"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=1, num_splits=1.0)
    with pytest.raises(TypeError, match="^flash_attn_with_kvcache: `return_softmax_lse` must be a bool"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=1, return_softmax_lse="no")
    # another device is a ValueError (README "Errors"), another dtype a TypeError
    with pytest.raises(ValueError, match=r"q must match the cache .* got torch.float32 on meta"):
        flash_attn_with_kvcache(q.to("meta"), k_cache, v_cache, k, v, cache_seqlens=1)
    with pytest.raises(TypeError, match=r"q must match the cache .* got torch.float16"):
        flash_attn_with_kvcache(q.half(), k_cache, v_cache, k, v, cache_seqlens=1)
    with pytest.raises(TypeError, match=r"`k_cache` must be a dense \(strided\) tensor"):
        flash_attn_with_kvcache(q, k_cache.to_sparse(), v_cache.to_sparse(), k, v, cache_seqlens=1)
    # paged pools [num_blocks, block_size, kv_heads, head_dim]: block_size >= 1; the table's type first
    empty = k_cache[:, :0]
    with pytest.raises(
        ValueError, match=r"`k_cache`/`v_cache` \[num_blocks, block_size, kv_heads.*block_size=0"
    ):
        flash_attn_with_kvcache(q, empty, empty, cache_seqlens=0, block_table=i32([[0, 1], [2, 3]]))
    with pytest.raises(TypeError, match="`block_table` must be a torch.Tensor.*got list"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=1, block_table=[[0], [1]])
    with pytest.raises(NotImplementedError, match="inference only"):
        flash_attn_with_kvcache(q.requires_grad_(), k_cache, v_cache, cache_seqlens=1)
    assert torch.equal(k_cache, before)
    # cache_leftpad on triton over rows 3 elements apart past their tokens (batch stride 323, sequence
    # stride 32): not one-token pages, refused before k and v are written
    padded = torch.zeros(2 * (10 * 32 + 3), device=device).as_strided((2, 10, 2, 16), (323, 32, 16, 1))
    before = padded.clone()
    with pytest.raises(NotImplementedError, match="multiple of its sequence stride"):
        flash_attn_with_kvcache(
            q.detach(), padded, padded.clone(), k, v, cache_seqlens=1, cache_leftpad=i32([0, 1]),
            backend="triton",
        )  # fmt: skip
    assert torch.equal(padded, before)


def test_errors_name_the_compat_function(device):
    """flash-attn's functions check through flash_attention's checks, under their own names."""
    q = _randn(1, 4, 2, 16, device=device)
    with pytest.raises(ValueError, match="^flash_attn_func: `softmax_scale`"):
        flash_attn_func(q, q, q, softmax_scale=-1.0)
    with pytest.raises(TypeError, match="^flash_attn_func: `q` has dtype"):
        flash_attn_func(q.double(), q.double(), q.double())
