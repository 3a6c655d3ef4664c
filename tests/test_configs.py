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

from flashattention.kernels import configs, hooks, launch
from flashattention.kernels.common import persistent_count, persistent_tile, persistent_turn, round_tf32
from tools.tune import tables_and_candidates


def _entries() -> list:
    seen, params = set(), []
    for kernel, table, head_dim_pad, config in tables_and_candidates():
        kw = config.kwargs
        if kw.get("GLUON_WS"):  # Gluon kernels do not run in the interpreter: tests/test_gpu.py checks them
            continue
        dtype = torch.float32 if table.endswith("-fp32") else torch.bfloat16
        flags = tuple(f for f in ("USE_TMA", "PERSISTENT", "ONE_LOOP") if kw.get(f))
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
    with hooks.overrides(configs={kernel: [config]}):
        out, lse, lse2 = launch.attention_forward(q, k, v, softmax_scale=scale, left=left, right=right)
        dq, dk, dv = launch.attention_backward(
            dout, q, k, v, out, lse2, softmax_scale=scale, left=left, right=right
        )
    mask = {"causal": True, "window_size": (left, -1)}
    ref = run_reference(q, k, v, dout, dtype=reference_dtype(dtype, device), **mask)
    same = run_reference(q, k, v, dout, dtype=dtype, **mask)
    ours = dict(zip(NAMES, (out, lse, dq, dk, dv), strict=True))
    failures = [f for n in NAMES if (f := compare_to_reference(n, ours[n], ref[n], same[n])) is not None]
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

    only_in = {"CAN_TMA": attn_fwd_kernel}  # one kernel's flags
    for kernel in (attn_fwd_kernel, attn_bwd_dkdv_kernel, attn_bwd_dq_kernel):
        expected = {name for name in configs.AUTOTUNE_KEY if only_in.get(name, kernel) is kernel}
        missing = expected - set(kernel.arg_names)
        assert not missing, f"{kernel.__name__}: {missing}"


def test_seqlen_buckets_group_lengths_by_power_of_two() -> None:
    buckets = launch.seqlen_buckets
    assert buckets(1000, 1000) == buckets(600, 1024)  # both (1024, 1024)
    assert buckets(1000, 1000) != buckets(1025, 1000)  # q moves to 2048
    assert buckets(1000, 1000) != buckets(1000, 2000)  # k moves to 2048
    assert buckets(1, 5) == buckets(16, 16)  # decode-sized lengths share the smallest bucket
    assert buckets(20000, 70000) == buckets(16384, 16384)  # long lengths share the largest
    assert buckets(0, 0) == buckets(1, 1)
