"""Autotune tables per architecture, keyed by padded head dim. The first config of each list is the
default (used when FLASHATTN_AUTOTUNE=0 and in the interpreter). Every config listed here must pass the
GPU correctness test (tests/test_gpu.py runs each one) before it enters a table; CANDIDATES wait there until
benchmarks/tune.py has checked and timed them. fp32 inputs have their own, smaller tiles ("-fp32" tables).

Autotune keys hold what changes the compiled code (head dim, mask flags, precision, GQA group, TMA
eligibility, the atomic-dQ mode, the stride unit and, added by Triton, the dtypes) and power-of-two buckets
of the two sequence lengths; never exact lengths or batch.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")
# seqlen_buckets: the launcher's power-of-two buckets of seqlen_q and seqlen_k, so that each range of lengths
# is tuned on its own (a config picked at 512 tokens does not serve 16k), without retuning per exact length.
AUTOTUNE_KEY = [
    "seqlen_buckets",
    "HEAD_DIM",
    "HEAD_DIM_PAD",
    "HAS_LO",
    "HAS_HI",
    "PRECISION",
    "group",
    "CAN_TMA",
    "ATOMIC_DQ",
    "STRIDE_UNIT",
]


def _c(block_m: int, block_n: int, warps: int, stages: int, **flags: bool | int) -> triton.Config:
    """flags of the forward: USE_TMA (tensor-descriptor loads), WARP_SPECIALIZE (tl.range warp roles),
    PERSISTENT (one program per SM looping over the tiles), LAZY_RESCALE (rescale the accumulator only when
    a row's max grows by > 2^8), POLY_EXP2 (16-bit inputs: half of the exponentials of unmasked tiles by a
    polynomial on the FMA units, FlashAttention-4's offload of the MUFU unit); of the dK/dV kernel: ONE_LOOP
    (one masked pass instead of three loops). GLUON_WS (forward, Hopper, 16-bit, head dim 64/128/256): the
    warp-specialised Gluon kernel of kernels/fwd_ws.py instead of the Triton one (num_stages unused: it
    keeps WS_STAGES K/V buffers, default 2; WS_CONSUMERS consumer partitions of num_warps = 4, 64 rows
    each, default 2, so BLOCK_M = 64 * WS_CONSUMERS), with WS_PINGPONG their matmuls in turns, with HOST_DESC
    [B, H, S, D] TMA descriptors made on the host instead of per tile on the device. GLUON_WS in
    a dK/dV table: kernels/bwd_ws.py (BLOCK_N = 128 keys, two consumers of 64; WS_STAGES Q/dO buffers)."""
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, **flags}, num_warps=warps, num_stages=stages
    )


# kernel -> arch -> largest padded head dim -> configs (first = default)
# the persistent D64 Gluon forward of the sm90 table (192 rows of three consumers, host descriptors)
_D64_PERSISTENT = dict(GLUON_WS=True, WS_CONSUMERS=3, PERSISTENT=True, HOST_DESC=True)

TABLES: dict[str, dict[str, dict[int, list[triton.Config]]]] = {
    "fwd": {
        # H100 bf16 S=8k (benchmarks/NOTES.md): 128x128/8 warps best at D128 (515 TFLOP/s); TMA loads +1-3%
        # at D64 only; 256-row tiles and warp_specialize (compiler crash) lost.
        "sm90": {
            # GLUON_WS (kernels/fwd_ws.py) first: the default on Hopper where it applies (16-bit, TMA-aligned,
            # exact head dim), the Triton kernel otherwise. 2026-11-26, H100 bf16, against the Triton tables'
            # tuned pick: D64 three consumers 473 vs 392 non-causal 8k (+21%), 414 vs 374 causal; D128 583 vs
            # 474 (+23%), 523 vs 423 causal; D256 597 vs 488, 516 vs 465 causal. At 2k causal D64 the Triton
            # 64x64 tile still wins (314 vs 283): the tuner picks per length bucket.
            # HOST_DESC (host-made [B, H, S, D] descriptors, none built per tile; 2026-11-26, H100 bf16, one
            # run): D64 three consumers 455 vs 430 non-causal 2k, 324 vs 307 causal 2k, 472 vs 456 causal 8k;
            # D128 persistent 602 vs 558-577 non-causal 2k, 651 vs 633 8k; plain D128 +3-5% non-causal, a tie
            # causal. The configs without it stay for broadcast (stride-0) K/V, which host descriptors refuse.
            64: [
                _c(192, 128, 4, 2, GLUON_WS=True, WS_CONSUMERS=3, HOST_DESC=True),
                # the three consumers in ping-pong turns (2026-11-26, H100, one tune run): non-causal 2k 454 /
                # 442 vs 437 / 435, 4k 482 / 473 vs 468 / 465, a tie at 8k; causal -1% to -4% (its turns
                # leave out the per-consumer key ranges), so the tuner picks it per case
                _c(192, 128, 4, 2, GLUON_WS=True, WS_CONSUMERS=3, HOST_DESC=True, WS_PINGPONG=True),
                # persistent, tiles in common.persistent_turn's snake order, two Q buffers (2026-11-27, H100,
                # benchmarks/probe.py, ms against the first config): non-causal 2k 0.584 vs 0.621, causal 4k
                # 0.609 vs 0.643; causal 2k 0.405 vs 0.397 (its programs end 329-384 us apart). With three
                # K/V buffers, and with each tile's stores under the next tile's first Q K^T (WS_OVERLAP;
                # 2026-11-27, H100, probe.py, ms against two buffers without it, 0.382 / 0.602 / 0.577):
                # causal 2k 0.370 / 0.351, causal 4k 0.589 / 0.576, non-causal 2k 0.577 / 0.587. The row sums
                # on the tensor cores (WS_ROWSUM_MMA; 2026-11-27, H100, probe.py, ms against WS_OVERLAP alone
                # and three buffers alone): causal 2k 0.340 vs 0.354 / 0.365, causal 4k 0.584 vs 0.609 /
                # 0.596, non-causal 2k 0.637 vs 0.620 / 0.577 (three buffers alone stay for it)
                _c(192, 128, 4, 2, **_D64_PERSISTENT, WS_STAGES=3, WS_OVERLAP=True, WS_ROWSUM_MMA=True),
                _c(192, 128, 4, 2, **_D64_PERSISTENT, WS_STAGES=3),
                _c(192, 128, 4, 2, GLUON_WS=True, WS_CONSUMERS=3),
                _c(128, 128, 4, 3, USE_TMA=True),
                _c(128, 64, 4, 3),
                _c(128, 64, 4, 3, USE_TMA=True),
                # 2026-11-26: one warpgroup per program ties the default at 8k causal (378 vs 377)
                _c(64, 64, 4, 3, USE_TMA=True),
            ],
            # 2026-11-26 (NOTES.md): 64x64/4 warps/3 stages best at S 1k (causal 306 vs 271), 128x64/4
            # stages best at 8k in that run (486 vs 470 at 3 stages); ping-pong Gluon best at 2k non-causal
            128: [
                _c(128, 128, 4, 2, GLUON_WS=True, HOST_DESC=True),
                _c(128, 128, 4, 2, GLUON_WS=True, PERSISTENT=True, HOST_DESC=True),
                _c(128, 128, 4, 2, GLUON_WS=True),
                _c(128, 128, 4, 2, GLUON_WS=True, WS_PINGPONG=True),
                # persistent: +4-6% at 2k non-causal (552 / 549 vs 520 / 527, H100), a tie at 8k
                _c(128, 128, 4, 2, GLUON_WS=True, PERSISTENT=True),
                _c(128, 128, 8, 3),
                _c(128, 64, 8, 3),
                _c(128, 64, 8, 4),
                _c(64, 64, 4, 3),
            ],
            256: [_c(128, 64, 4, 2, GLUON_WS=True), _c(128, 64, 8, 2), _c(64, 64, 4, 2)],
        },
        "sm80": {
            64: [_c(128, 64, 4, 3), _c(128, 128, 8, 3)],
            128: [_c(128, 64, 8, 3), _c(64, 64, 4, 3)],
            256: [_c(64, 64, 4, 2), _c(64, 32, 4, 2)],
        },
        # small blocks exercise partial tiles and BLOCK_M != BLOCK_N on small CPU tests
        "interpret": {
            256: [
                _c(32, 16, 4, 1),
                _c(16, 32, 4, 1, USE_TMA=True, POLY_EXP2=True),
                _c(16, 16, 4, 1, PERSISTENT=True, LAZY_RESCALE=True),
            ]
        },
    },
    "bwd_dkdv": {
        "sm90": {
            # GLUON_WS (kernels/bwd_ws.py) first (2026-11-26, H100, 2k/8k): D64 +2% / +9% non-causal, 0 / +7%
            # causal over the best Triton config; D128 64x128 (248 B of spill) +4% / +5%, +5% / +7% causal.
            # ONE_LOOP (2026-11-26, NOTES.md): +4% causal 8k at D64, +2% at D128; 64x128/4 warps dropped
            # (129 TFLOP/s non-causal: spills)
            64: [
                _c(64, 128, 4, 2, GLUON_WS=True, WS_STAGES=3),
                _c(64, 128, 4, 2, GLUON_WS=True),
                _c(32, 128, 4, 3),
                _c(64, 64, 4, 3),
                _c(32, 128, 4, 3, ONE_LOOP=True),
                _c(64, 64, 4, 3, ONE_LOOP=True),
            ],
            128: [
                _c(64, 128, 4, 2, GLUON_WS=True),
                _c(64, 128, 8, 3),
                _c(64, 64, 4, 2),
                _c(64, 128, 8, 3, ONE_LOOP=True),
            ],
            # D256 (2026-11-26, H200, S 4k): 64x64/8/2 ONE_LOOP 225 / 203 causal vs 174 / 93 for the old
            # default (64x64/8 warps/1 stage, now dropped)
            256: [_c(64, 64, 8, 2, ONE_LOOP=True), _c(32, 64, 8, 2, ONE_LOOP=True), _c(32, 32, 4, 2)],
        },
        "sm80": {
            64: [_c(32, 128, 4, 3), _c(64, 64, 4, 3)],
            128: [_c(32, 128, 4, 3), _c(64, 64, 4, 2)],
            256: [_c(32, 64, 4, 2), _c(32, 32, 4, 2)],
        },
        "interpret": {256: [_c(16, 32, 4, 1), _c(32, 16, 4, 1, ONE_LOOP=True)]},
    },
    "bwd_dq": {
        "sm90": {
            64: [_c(128, 64, 4, 3), _c(64, 64, 4, 3), _c(128, 128, 8, 3)],
            128: [_c(128, 64, 8, 3), _c(128, 128, 8, 2)],
            256: [_c(128, 32, 8, 2), _c(64, 32, 4, 2)],  # 128x32/8/2: +5-7% (2026-11-26, H200)
        },
        "sm80": {
            64: [_c(128, 32, 4, 3), _c(64, 64, 4, 3)],
            128: [_c(128, 32, 4, 3), _c(64, 64, 4, 2)],
            256: [_c(64, 32, 4, 2), _c(32, 32, 4, 2)],
        },
        "interpret": {256: [_c(32, 16, 4, 1)]},
    },
}

# fp32 operands take twice the shared memory of bf16 tiles, so they get their own, smaller tiles; sized so
# that (num_stages + 1) K/V (or Q/dO) buffers plus the resident tiles stay under ~227 KB. Every one passes
# tests/test_gpu.py on an H100 (2026-11-25); they are sized to fit, not yet timed.
_FP32 = {
    "fwd": {
        64: [_c(128, 64, 8, 2), _c(64, 64, 4, 2), _c(64, 32, 4, 1)],
        128: [_c(128, 32, 8, 2), _c(64, 32, 4, 2), _c(32, 32, 4, 1)],
        256: [_c(64, 32, 4, 1), _c(64, 16, 4, 2), _c(32, 16, 4, 1)],
    },
    "bwd_dkdv": {
        64: [_c(64, 64, 4, 2), _c(32, 64, 4, 2), _c(16, 32, 4, 1)],
        128: [_c(32, 64, 4, 2), _c(32, 32, 4, 2), _c(16, 32, 4, 1)],
        256: [_c(16, 32, 4, 2), _c(32, 32, 4, 1), _c(16, 16, 4, 1)],
    },
    "bwd_dq": {
        64: [_c(64, 64, 4, 2), _c(64, 32, 4, 2), _c(32, 16, 4, 1)],
        128: [_c(64, 32, 4, 2), _c(32, 32, 4, 2), _c(32, 16, 4, 1)],
        256: [_c(32, 16, 4, 2), _c(32, 32, 4, 1), _c(16, 16, 4, 1)],
    },
}
for _kernel, _dims in _FP32.items():
    TABLES[_kernel]["sm90-fp32"] = _dims
    TABLES[_kernel]["sm80-fp32"] = _dims


# Configs to measure before they may enter a table: benchmarks/tune.py checks and times them beside it.
CANDIDATES: dict[str, dict[str, dict[int, list[triton.Config]]]] = {
    "fwd": {
        "sm90": {
            # Gluon variants that lost to the table's Gluon configs (2026-11-26, H100 bf16 2k/8k): D64 two
            # consumers (419-421 vs 473 for three at 8k), ping-pong at D64/D256 (-1 to -6%), D256 32-key tiles
            # (-15 to -20%). Kept as candidates for other cards (H200) and other Tritons.
            # PERSISTENT with GLUON_WS (2026-11-26, H100, 2k/8k): ties or loses but at D128 non-causal 2k (in
            # the table). Causal: -3% to -34%, measured when programs took every 132nd tile (the same query
            # block of every head at D64 2k); common.persistent_turn deals them in a snake now
            64: [
                _c(192, 128, 4, 2, GLUON_WS=True, WS_CONSUMERS=3, PERSISTENT=True),
                # tiles from a counter, programs that run faster take more (2026-11-27, H100, probe.py, ms
                # against the static persistent config): non-causal 2k 0.577 vs 0.598, causal 2k 0.414 vs
                # 0.410, causal 4k 0.639 vs 0.597, with tiles claimed two turns ahead of the consumers; now
                # claimed once the tile's Q buffer is free (not yet run on a GPU)
                _c(
                    192,
                    128,
                    4,
                    2,
                    GLUON_WS=True,
                    WS_CONSUMERS=3,
                    PERSISTENT=True,
                    HOST_DESC=True,
                    WS_DYNAMIC=True,
                ),
                # the counter's tiles longest-first within groups of 32 heads (K and V of a group in L2),
                # up to 4 tiles above an even share (probe.py, H100, ms against the static order: causal 2k
                # 0.372 vs 0.382, causal 4k 0.625 vs 0.602; with up to 6: 0.420 and 0.639)
                _c(192, 128, 4, 2, **_D64_PERSISTENT, WS_DYNAMIC=32, WS_SLACK=4),
                # the table's WS_OVERLAP config before its row sums went to the tensor cores
                _c(192, 128, 4, 2, **_D64_PERSISTENT, WS_STAGES=3, WS_OVERLAP=True),
                # the table's persistent config before (two K/V buffers)
                _c(192, 128, 4, 2, **_D64_PERSISTENT),
                _c(128, 128, 4, 2, GLUON_WS=True),
                _c(128, 128, 4, 2, GLUON_WS=True, WS_PINGPONG=True),
                _c(128, 128, 4, 2, GLUON_WS=True, WS_STAGES=3),  # 3 K/V buffers fit at D64 (130 KB)
            ],
            128: [_c(128, 128, 4, 2, GLUON_WS=True, WS_PINGPONG=True, PERSISTENT=True)],
            256: [
                _c(128, 64, 4, 2, GLUON_WS=True, PERSISTENT=True),
                _c(128, 64, 8, 2, PERSISTENT=True),
                _c(128, 64, 4, 2, GLUON_WS=True, WS_PINGPONG=True),
                _c(128, 32, 4, 2, GLUON_WS=True),
                _c(128, 64, 4, 2, GLUON_WS=True, HOST_DESC=True),  # not yet timed
            ],
        }
    },
}
# Measured and left out (H100 and H200, NOTES.md): PERSISTENT at D 64/128 (-6% to -50%), LAZY_RESCALE (-3%
# to -8%), POLY_EXP2 (-3% to -15%), D64 128x128 with 8 warps (-13%), 64x128/4 warps at D64, 32x64/8 warps
# ONE_LOOP dK/dV at D128 (-45%), 64x64/4 warps/2 stages (behind 3 stages everywhere), the atomic-dQ
# backward (no faster than the dQ kernel), D256 dK/dV 32x64/8/2 and 32x32/4/2 ONE_LOOP, D256 dQ 64x64/8/2.
# Spill-free Triton dK/dV tiles (2026-11-26, H100, 2k/8k): 64x64/8/2 ONE_LOOP -45% to -50% at D64 and D128,
# 64x128/8/2 and 32x128/8/3 ONE_LOOP -8% to -15% at D64; the spills are not what holds the Triton dK/dV back.
# Gluon dK/dV 32x128 at D128 (two or three stages): -1% to -7% against 64x128. Spill-free dQ tiles (same run):
# D64 128x64/8/2 +2% non-causal 8k but -18% causal; 128x32, 64x64/8/3 (D64) and 64x64/4/3 (D128) -2% to -30%.
# TILE_GROUPS (persistent forwards longest-first across groups of heads sized to L2; 2026-11-26, H100, 2k/8k,
# removed): ties non-causal, -4% to -12% causal at 8k against the non-persistent Gluon configs.
# Gluon forward D64 three consumers with a third K/V buffer (WS_STAGES=3) or 64-key tiles (2026-11-26, H100,
# 2k/8k): ties to -4% and -2% to -16% against 192x128 with two buffers.
# WS_OVERLAP (each tile's stores under the next tile's first Q K^T; 2026-11-27, H100, probe.py, ms): D128
# persistent HOST_DESC causal 2k 0.288 vs 0.248, non-causal 2k 0.494 vs 0.419; D64 persistent with two K/V
# buffers causal 2k 0.357, causal 4k 0.588, non-causal 2k 0.601, behind three buffers with it (table).
# Gluon forward, removed after their runs (2026-11-27, H100, 2k-8k, D 64/128, NOTES.md; code in commits
# b555e19 and 6836966): a dynamic tile order for PERSISTENT programs (an atomic tile counter; fixed the static
# order's causal loss but tied or lost -2% to -5% against the non-persistent HOST_DESC configs; D64 spills
# ~1 KB) and POLY_EXP2 in the Gluon softmax (one exponential in 4: -5% to -23%; one in 2: -20% to -34%).


def candidates_for(kernel: str, arch_name: str, head_dim_pad: int) -> list[triton.Config]:
    """The untested configs of CANDIDATES for exactly this padded head dim (empty when there are none)."""
    return CANDIDATES.get(kernel, {}).get(arch_name, {}).get(head_dim_pad, [])


# Triton reads TRITON_INTERPRET when the kernels are defined (import), so it is read once here too: a change
# later in the process would not switch Triton's mode (and the lookup cost host time on every launch).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    return _INTERPRETING


def autotune_enabled() -> bool:
    return os.environ.get("FLASHATTN_AUTOTUNE", "1") not in ("", "0") and not interpreting()


def arch(device: torch.device) -> str:
    if device.type != "cuda" or interpreting():
        return "interpret"
    major, _ = _capability(device.index if device.index is not None else torch.cuda.current_device())
    return "sm90" if major >= 9 else "sm80"


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)  # ~20 us a call; asked on every launch


def table_name(device: torch.device, dtype: torch.dtype) -> str:
    """The table for this device and input dtype: the architecture's, or its fp32 variant."""
    name = arch(device)
    return f"{name}-fp32" if dtype == torch.float32 and name != "interpret" else name


def label(config: triton.Config) -> str:
    """A config as the reports print it: "128x64 w8 s3" plus its flags that are on (e.g. " USE_TMA")."""
    kw = config.kwargs
    flags = "".join(
        f" {k}" if v is True else f" {k}={v}" for k, v in kw.items() if k not in ("BLOCK_M", "BLOCK_N") and v
    )
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{config.num_warps} s{config.num_stages}{flags}"


def configs_for(kernel: str, arch_name: str, head_dim_pad: int) -> list[triton.Config]:
    """The configs of `kernel` for one table (see table_name) and padded head dim (the smallest table entry
    >= it)."""
    table = TABLES[kernel][arch_name]
    return table[min(d for d in table if d >= head_dim_pad)]


def all_configs(candidates: bool = False) -> list[tuple[str, str, int, triton.Config]]:
    """Every (kernel, arch, head_dim_pad, config) in the tables (the GPU tests run each one), and with
    candidates=True those of CANDIDATES too (the interpreter tests check their block shapes)."""
    sources = (TABLES, CANDIDATES) if candidates else (TABLES,)
    return [
        (kern, a, d, c)
        for source in sources
        for kern, archs in source.items()
        for a, dims in archs.items()
        for d, cs in dims.items()
        for c in cs
    ]
