"""A decode step over a cache with per-row lengths (append each row's new token at its own position, then
attention over each row's own tokens) is capturable in a CUDA graph: it never syncs with the host, and a
replay appends at the device lengths and advances them. On the CPU: the step makes no host sync (the
interpreter runs the kernels), and what an append does while a capture is under way (simulated) on the host.
On the GPU: a captured step replayed N times == the same step run eagerly on a twin cache, and == the oracle.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import Case, assert_close_to_reference, assert_same_result

from flashattention import (
    KVCache,
    _env,
    flash_attention_with_kv_cache,
    incremental_attention,
    update_kv_cache,
)
from flashattention import kv_cache as kv_cache_module
from flashattention.reference import attention_reference

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32
# Tensor methods that read device values on the host (each a sync on a GPU)
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def _lengths(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor(lengths, dtype=torch.int32, device=device)


def _check_row(name: str, out_row, q_row, k_row, v_row, **mask) -> None:
    """The pass rule on one row's output [1, heads, seqlen_q, head_dim] against the oracle on (q, k, v)."""
    ref, _ = attention_reference(q_row, k_row, v_row, upcast=True, **mask)
    same, _ = attention_reference(q_row, k_row, v_row, upcast=False, **mask)
    assert_close_to_reference(name, out_row, ref, same)


def _no_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def host_read(*args, **kwargs):
        raise AssertionError("the decode step read a tensor's value on the host (a device sync)")

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, host_read)


def test_decode_step_reads_nothing_on_the_host(monkeypatch, device):
    """flash_attention_with_kv_cache on a cache with per-row lengths (backend triton) with every Tensor
    method that reads a value on the host made to raise (and, on a GPU, torch's sync debug mode set to
    error): it runs, and its output == the oracle on each row's tokens."""
    case = Case(3, 4, 2, 1, 24, 40, F16, causal=True)
    q, k, v, _ = case.inputs(device)
    lengths = [5, 0, 17]
    keys, values = k.clone(), v.clone()
    cache = KVCache(keys, values, cache_seqlens=_lengths(lengths, device))
    k_new, v_new = torch.randn_like(k[:, :, :1]), torch.randn_like(v[:, :, :1])
    with monkeypatch.context() as patch, torch.no_grad():
        _no_host_reads(patch)
        with pytest.raises(AssertionError, match="host"):  # the patch is in force
            torch.zeros(1).tolist()
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            out, _ = flash_attention_with_kv_cache(q, k_new, v_new, cache, backend="triton")
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    assert cache.cache_seqlens.tolist() == [n + 1 for n in lengths]
    for b, n in enumerate(lengths):
        sl = slice(b, b + 1)
        k_row = torch.cat([k[sl, :, :n], k_new[sl]], dim=2)
        v_row = torch.cat([v[sl, :, :n], v_new[sl]], dim=2)
        _check_row(f"row {b} (length {n} + 1)", out[sl], q[sl], k_row, v_row, causal=True)


def test_append_while_capturing(monkeypatch):
    """An append made while a capture is under way (simulated on the CPU, where it also runs): a uniform
    cache (host position) raises NotImplementedError and one that would grow raises ValueError, both before
    any write; a per-row cache appends in place and hands its lengths to the device: `length` then reads
    them there, attention reads each row to its device length, and later eager appends (past the capacity:
    growth) use those lengths."""
    monkeypatch.setattr(kv_cache_module, "_capturing", lambda storage: True)
    k_new = torch.randn(2, 2, 1, 16)
    uniform = KVCache(torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16), length=3)
    before = uniform._keys.clone()
    with pytest.raises(NotImplementedError, match="cache_seqlens"):
        update_kv_cache(uniform, k_new, k_new)
    assert uniform.length == 3 and torch.equal(uniform._keys, before)
    full = KVCache(torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16), cache_seqlens=torch.tensor([4, 1]))
    before = full._keys.clone()
    with pytest.raises(ValueError, match="cannot grow inside a CUDA graph"):
        update_kv_cache(full, k_new, k_new)
    assert full.cache_seqlens.tolist() == [4, 1] and torch.equal(full._keys, before)

    keys, values = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16)
    for t in (keys, values):  # past each row's tokens: NaN, which a read would carry into the output
        t[0, :, 2:], t[1] = float("nan"), float("nan")
    cache = KVCache(keys.clone(), values.clone(), cache_seqlens=torch.tensor([2, 0]))
    storage = cache._keys.data_ptr()
    update_kv_cache(cache, k_new, k_new)
    assert cache._keys.data_ptr() == storage and "length=on the device" in repr(cache)
    assert cache.cache_seqlens.tolist() == [3, 1] and cache.length == 3
    q = torch.randn(2, 4, 1, 16)
    # the triton kernel reads the whole storage, rows to their length; on CPU tensors only the interpreter
    # runs it (the GPU suite runs this CPU test without it: the torch backend there)
    backend = "triton" if _env.interpreting() else "torch"
    with torch.no_grad():
        out = incremental_attention(q, cache, backend=backend)
    for b, n in enumerate([3, 1]):
        sl = slice(b, b + 1)
        _check_row(f"row {b}", out[sl], q[sl], cache._keys[sl, :, :n], cache._values[sl, :, :n], causal=True)
    cache._cache_seqlens += 1  # what a replay does: the host is not told
    assert cache.length == 4

    monkeypatch.setattr(kv_cache_module, "_capturing", lambda storage: False)
    k_more = torch.randn(2, 2, 1, 16)
    update_kv_cache(cache, k_more, k_more)  # row 0 holds 4 of 4: grows
    assert cache.capacity >= 8 and cache.cache_seqlens.tolist() == [5, 3] and cache.length == 5
    assert torch.equal(cache._keys[0, :, :2], keys[0, :, :2])
    assert torch.equal(cache._keys[0, :, 2], k_new[0, :, 0]) and torch.equal(
        cache._keys[0, :, 4], k_more[0, :, 0]
    )
    assert torch.equal(cache._keys[1, :, 2], k_more[1, :, 0])


# Case.seqlen_k is the capacity, with room for REPLAYS more tokens in every row; lengths 0 and 1 in every
# case; the first one's capacity makes the launcher split the keys (the combine kernel is captured too).
REPLAYS = 6
GRAPH_CASES = [
    (Case(4, 8, 2, 1, 1100, 64, B16, causal=True), [5, 0, 1017, 41]),
    (Case(3, 32, 8, 1, 300, 128, F16, causal=True, window=(37, -1)), [1, 290, 0]),
    (Case(2, 4, 4, 1, 40, 72, F32, causal=True), [33, 1]),
]


def _graph_params() -> list:
    return [
        pytest.param(case, lengths, id=f"{case.id}-lens{'.'.join(map(str, lengths))}", marks=pytest.mark.gpu)
        for case, lengths in GRAPH_CASES
    ]


@pytest.mark.parametrize(("case", "lengths"), _graph_params())
def test_captured_decode_step_replays_like_eager(case: Case, lengths):
    """One decode step (flash_attention_with_kv_cache: append + attention, backend triton) captured in a
    CUDA graph on a cache with per-row lengths, replayed REPLAYS times with new q/k/v copied into the static
    inputs: each replay's output == the eager step on a twin cache (same result) and == the oracle on each
    row's tokens so far; the lengths advance on the device and both caches hold the same tokens."""
    device, mask = "cuda", case.mask_kwargs()
    q, k, v, _ = case.inputs(device)
    seqlens = _lengths(lengths, device)
    rows = [[t[b : b + 1, :, :n].clone() for b, n in enumerate(lengths)] for t in (k, v)]
    for b, n in enumerate(lengths):  # a read past a row's tokens shows as NaN
        k[b, :, n:], v[b, :, n:] = float("nan"), float("nan")
    cache = KVCache(k.clone(), v.clone(), cache_seqlens=seqlens)
    twin = KVCache(k.clone(), v.clone(), cache_seqlens=seqlens)
    static = [q[:, :, :1].clone(), torch.randn_like(k[:, :, :1]), torch.randn_like(v[:, :, :1])]

    def step(kv_cache: KVCache) -> torch.Tensor:
        with torch.no_grad():
            out, _ = flash_attention_with_kv_cache(
                *static, kv_cache, window_size=case.window, backend="triton"
            )
        return out

    side = torch.cuda.Stream()  # warm-up (compiles the kernels) on a scratch cache, off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(KVCache(k.clone(), v.clone(), cache_seqlens=seqlens))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = step(cache)
    assert cache.cache_seqlens.tolist() == lengths  # captured, not run

    for replay in range(REPLAYS):
        new = [torch.randn_like(t) for t in static]
        for buffer, t in zip(static, new, strict=True):
            buffer.copy_(t)
        graph.replay()
        eager = step(twin)
        assert_same_result(f"replay {replay}: graph vs eager", out_static, eager)
        q_new, k_new, v_new = new
        rows = [
            [torch.cat([r, t[b : b + 1]], dim=2) for b, r in enumerate(s)]
            for s, t in zip(rows, (k_new, v_new), strict=True)
        ]
        for b in range(case.batch):
            sl = slice(b, b + 1)
            _check_row(f"replay {replay}, row {b}", out_static[sl], q_new[sl], rows[0][b], rows[1][b], **mask)
    grown = [n + REPLAYS for n in lengths]
    assert cache.cache_seqlens.tolist() == twin.cache_seqlens.tolist() == grown
    assert cache.length == max(grown)
    for b, n in enumerate(grown):
        assert torch.equal(cache._keys[b, :, :n], twin._keys[b, :, :n])
        assert torch.equal(cache._values[b, :, :n], twin._values[b, :, :n])


@pytest.mark.gpu
def test_capture_refuses_what_it_cannot_replay():
    """Inside a capture: an append to a uniform cache (a host position) raises NotImplementedError, one that
    would grow the storage raises ValueError, and per-row attention on backend torch (host lengths) raises
    NotImplementedError; each before anything is recorded or written."""
    device = "cuda"
    k_new = torch.randn(2, 2, 1, 16, device=device)
    q = torch.randn(2, 4, 1, 16, device=device)
    keys = torch.randn(2, 2, 8, 16, device=device)
    uniform = KVCache(keys, keys.clone(), length=3)
    per_row = KVCache(
        torch.randn(2, 2, 4, 16, device=device),
        torch.randn(2, 2, 4, 16, device=device),
        cache_seqlens=_lengths([4, 2], device),
    )
    attempts = [
        (NotImplementedError, "cache_seqlens", lambda: update_kv_cache(uniform, k_new, k_new)),
        (ValueError, "cannot grow", lambda: update_kv_cache(per_row, k_new, k_new)),
        (NotImplementedError, "host", lambda: incremental_attention(q, per_row, backend="torch")),
    ]
    for error, fragment, attempt in attempts:
        with pytest.raises(error, match=fragment), torch.no_grad(), torch.cuda.graph(torch.cuda.CUDAGraph()):
            attempt()
    assert uniform.length == 3 and per_row.cache_seqlens.tolist() == [4, 2] and per_row.length == 4
