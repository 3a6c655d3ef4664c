"""Config tables per architecture, keyed by padded head dim, and the measured pick per case.

A table entry lists the configs a kernel may launch with for one (architecture, head dim); every config in
it passed the GPU correctness test (tests/test_gpu.py runs each one). Without autotuning a launch takes the
entry's measured pick for its mask kind and key length (PICKS: the tuner's winners on the card, recorded in
benchmarks/NOTES.md), else the entry's first config that applies; FLASHATTN_AUTOTUNE=1 times the entry
instead (kernels/tuning.py). fp32 inputs have their own, smaller tiles ("-fp32" tables). Configs not yet
measured wait in tools/tune.py's CANDIDATES.
"""

from __future__ import annotations

import functools

import torch
import triton

from . import device as dev

KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")
# What changes the compiled code, plus power-of-two buckets of the two lengths (a pick made at 512 tokens
# does not serve 16k); never exact lengths or batch.
AUTOTUNE_KEY = [
    "seqlen_buckets",
    "HEAD_DIM",
    "HEAD_DIM_PAD",
    "HAS_LO",
    "HAS_HI",
    "PRECISION",
    "group",
    "CAN_TMA",
    "STRIDE_UNIT",
]


def _c(block_m: int, block_n: int, warps: int, stages: int, **flags: bool | int) -> triton.Config:
    """flags of the forward: USE_TMA (tensor-descriptor loads), PERSISTENT (one program per SM looping over
    the tiles); of the dK/dV kernel: ONE_LOOP (one masked pass instead of three loops). GLUON_WS: the
    warp-specialised Gluon kernel (forward: kernels/fwd_ws.py, Hopper, 16-bit, head dim 64/128/256, BLOCK_M =
    64 * WS_CONSUMERS, WS_STAGES K/V buffers; dK/dV and dQ: kernels/bwd_ws.py, head dim 64/128/256) with
    WS_PINGPONG (consumers' matmuls in turns), HOST_DESC (TMA descriptors made on the host), WS_OVERLAP (a
    tile's stores under the next tile's first Q K^T), WS_ROWSUM_MMA (softmax row sums on the tensor cores);
    FUSED_DQ (Gluon dK/dV, head dim 64/128): dQ by float32 TMA bulk reductions in the dK/dV kernel, no dQ
    kernel; DQ_ORDERED (with FUSED_DQ): the key blocks' dQ adds into each query tile in a fixed order (last
    key block first), so that dQ is reproducible."""
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, **flags}, num_warps=warps, num_stages=stages
    )


_WS3 = dict(GLUON_WS=True, WS_CONSUMERS=3)  # the D64 Gluon forward: three consumers of 64 rows
_D64_PERSISTENT = dict(_WS3, PERSISTENT=True, HOST_DESC=True)

# kernel -> table -> largest padded head dim -> configs (the first is the default where no pick applies)
TABLES: dict[str, dict[str, dict[int, list[triton.Config]]]] = {
    "fwd": {
        "sm90": {
            64: [
                _c(192, 128, 4, 2, **_WS3, HOST_DESC=True),
                _c(192, 128, 4, 2, **_WS3, HOST_DESC=True, WS_PINGPONG=True),  # non-causal from 2k
                _c(192, 128, 4, 2, **_D64_PERSISTENT, WS_STAGES=3, WS_OVERLAP=True, WS_ROWSUM_MMA=True),
                _c(192, 128, 4, 2, **_D64_PERSISTENT, WS_STAGES=3),
                _c(192, 128, 4, 2, **_WS3),  # for broadcast (stride-0) K/V, which host descriptors refuse
                _c(128, 128, 4, 3, USE_TMA=True),
                _c(128, 64, 4, 3),  # short sequences
                _c(128, 64, 4, 3, USE_TMA=True),
                _c(64, 64, 4, 3, USE_TMA=True),
            ],
            128: [
                _c(128, 128, 4, 2, GLUON_WS=True, HOST_DESC=True),
                _c(128, 128, 4, 2, GLUON_WS=True, PERSISTENT=True, HOST_DESC=True),  # 1k-8k
                _c(128, 128, 4, 2, GLUON_WS=True),
                _c(128, 128, 4, 2, GLUON_WS=True, WS_PINGPONG=True),
                _c(128, 128, 4, 2, GLUON_WS=True, PERSISTENT=True),
                _c(128, 128, 8, 3),
                _c(128, 64, 8, 3),
                _c(128, 64, 8, 4),
                _c(64, 64, 4, 3),  # causal 512
            ],
            256: [
                _c(128, 64, 4, 2, GLUON_WS=True),
                _c(128, 64, 4, 2, GLUON_WS=True, PERSISTENT=True, HOST_DESC=True),  # causal
                _c(128, 64, 8, 2),
                _c(64, 64, 4, 2),
            ],
        },
        "sm80": {
            64: [_c(128, 64, 4, 3), _c(128, 128, 8, 3)],
            128: [_c(128, 64, 8, 3), _c(64, 64, 4, 3)],
            256: [_c(64, 64, 4, 2), _c(64, 32, 4, 2)],
        },
        # small blocks exercise partial tiles and BLOCK_M != BLOCK_N on small CPU tests
        "interpret": {
            256: [_c(32, 16, 4, 1), _c(16, 32, 4, 1, USE_TMA=True), _c(16, 16, 4, 1, PERSISTENT=True)]
        },
    },
    "bwd_dkdv": {
        "sm90": {
            64: [
                _c(64, 128, 4, 2, GLUON_WS=True, WS_STAGES=3),
                _c(64, 128, 4, 2, GLUON_WS=True),
                _c(32, 128, 4, 3),  # non-causal to 2k
                _c(64, 64, 4, 3),
                _c(32, 128, 4, 3, ONE_LOOP=True),  # causal to 2k
                _c(64, 64, 4, 3, ONE_LOOP=True),
            ],
            128: [
                _c(64, 128, 4, 2, GLUON_WS=True),
                _c(64, 128, 8, 3),
                _c(64, 64, 4, 2),  # non-causal 512
                _c(64, 128, 8, 3, ONE_LOOP=True),  # causal 512
            ],
            256: [
                _c(64, 64, 4, 2, GLUON_WS=True),  # 64-key blocks, the consumers splitting the head dim
                _c(64, 64, 8, 2, ONE_LOOP=True),
                _c(32, 64, 8, 2, ONE_LOOP=True),
                _c(32, 32, 4, 2),
            ],
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
            128: [
                _c(128, 128, 4, 2, GLUON_WS=True),  # the Gluon dQ (kernels/bwd_ws.py)
                _c(128, 64, 4, 2, GLUON_WS=True, WS_STAGES=3),
                _c(128, 64, 8, 3),
                _c(128, 128, 8, 2),
            ],
            256: [_c(128, 32, 4, 2, GLUON_WS=True), _c(128, 32, 8, 3), _c(128, 32, 8, 2), _c(64, 32, 4, 2)],
        },
        "sm80": {
            64: [_c(128, 32, 4, 3), _c(64, 64, 4, 3)],
            128: [_c(128, 32, 4, 3), _c(64, 64, 4, 2)],
            256: [_c(64, 32, 4, 2), _c(32, 32, 4, 2)],
        },
        "interpret": {256: [_c(32, 16, 4, 1)]},
    },
}

# fp32 operands take twice the shared memory of bf16 tiles: (num_stages + 1) K/V (or Q/dO) buffers plus
# the resident tiles stay under ~227 KB. Sized to fit, not yet timed.
_FP32 = {
    "fwd": {
        64: [_c(128, 64, 8, 2), _c(64, 64, 4, 2), _c(64, 32, 4, 1)],
        128: [_c(128, 32, 8, 2), _c(64, 32, 4, 2), _c(32, 32, 4, 1)],
        # 32x16 first: ptxas serializes the wgmma of 64x32 and 64x16 here, and they spill (NOTES.md)
        256: [_c(32, 16, 4, 1), _c(64, 32, 4, 1), _c(64, 16, 4, 2)],
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

_PING = "192x128 w4 s2 GLUON_WS WS_CONSUMERS=3 HOST_DESC WS_PINGPONG"
_ROWSUM = "192x128 w4 s2 GLUON_WS WS_CONSUMERS=3 PERSISTENT HOST_DESC WS_STAGES=3 WS_OVERLAP WS_ROWSUM_MMA"
_P128 = "128x128 w4 s2 GLUON_WS PERSISTENT HOST_DESC"
# kernel -> table -> padded head dim -> (causal, up to seqlen_k, config label): the tuner's pick on the
# card for lengths up to that one (None: any longer); the first row that matches the case wins. A pick that
# does not apply to a call (e.g. HOST_DESC below its work threshold) gives way to the entry's order.
PICKS: dict[str, dict[str, dict[int, list[tuple[bool, int | None, str]]]]] = {
    "fwd": {
        "sm90": {
            64: [
                (False, 1024, "128x64 w4 s3"),
                (False, None, _PING),
                (True, 1024, "128x64 w4 s3"),
                (True, 4096, _ROWSUM),
                (True, None, _PING),
            ],
            128: [
                (False, 512, "128x128 w4 s2 GLUON_WS PERSISTENT"),
                (False, 2048, _P128),
                (False, 4096, "128x128 w4 s2 GLUON_WS HOST_DESC"),
                (False, 8192, _P128),
                (False, None, "128x128 w4 s2 GLUON_WS WS_PINGPONG"),
                (True, 512, "64x64 w4 s3"),
                (True, 1024, "128x128 w4 s2 GLUON_WS"),
                (True, 8192, _P128),
                (True, None, "128x128 w4 s2 GLUON_WS HOST_DESC"),
            ],
            256: [(True, None, "128x64 w4 s2 GLUON_WS PERSISTENT HOST_DESC")],
        }
    },
    "bwd_dkdv": {
        "sm90": {
            64: [(False, 2048, "32x128 w4 s3"), (True, 2048, "32x128 w4 s3 ONE_LOOP")],
            128: [(False, 512, "64x64 w4 s2"), (True, 512, "64x128 w8 s3 ONE_LOOP")],
        }
    },
    "bwd_dq": {"sm90": {64: [(False, None, "64x64 w4 s3"), (True, None, "64x64 w4 s3")]}},
}


# The split-KV decode (kernels/decode.py): (splits the keys, largest padded head dim) -> config for 16-bit
# inputs; an unsplit launch (many batch rows) streams whole rows with wider tiles. fp32 inputs take half-size
# tiles, two stages (shared memory). Measured winners (benchmarks/NOTES.md); the interpreter: 16-key tiles.
DECODE: dict[bool, dict[int, triton.Config]] = {
    True: {128: triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
           256: triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2)},
    False: {128: triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
            256: triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2)},
}  # fmt: skip
DECODE_FP32 = triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2)
DECODE_INTERPRETED = triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)


def decode_config(split: bool, head_dim_pad: int, dtype: torch.dtype, paged: bool = False) -> triton.Config:
    """The decode kernel's config (DECODE) for a launch that splits its keys or not. A paged launch takes
    2 * stages - 1 stages: Triton's pipeliner gives a load that depends on another load (K/V rows on the
    block table) (num_stages - 1) // 2 stages of lead, so this keeps as many K/V tiles in flight as dense."""
    if dtype == torch.float32:
        config = DECODE_FP32
    else:
        dims = DECODE[split]
        config = dims[min((d for d in dims if d >= head_dim_pad), default=max(dims))]
    if not paged:
        return config
    return triton.Config(config.kwargs, num_warps=config.num_warps, num_stages=2 * config.num_stages - 1)


def label(config: triton.Config) -> str:
    """A config as the reports print it: "128x64 w8 s3" plus its flags that are on (e.g. " USE_TMA")."""
    kw = config.kwargs
    flags = "".join(
        f" {k}" if v is True else f" {k}={v}" for k, v in kw.items() if k not in ("BLOCK_M", "BLOCK_N") and v
    )
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{config.num_warps} s{config.num_stages}{flags}"


def table_name(device: torch.device, dtype: torch.dtype) -> str:
    """The table for this device and input dtype: the architecture's, or its fp32 variant."""
    name = dev.arch(device)
    return f"{name}-fp32" if dtype == torch.float32 and name != "interpret" else name


def configs_for(kernel: str, table: str, head_dim_pad: int) -> list[triton.Config]:
    """The configs of `kernel` for one table and padded head dim (the smallest table entry >= it)."""
    dims = TABLES[kernel][table]
    return dims[min(d for d in dims if d >= head_dim_pad)]


@functools.lru_cache(maxsize=4096)
def ordered(kernel: str, table: str, head_dim_pad: int, causal: bool, seqlen_k: int) -> tuple:
    """The entry of configs_for with the case's measured pick (PICKS) first, the rest in table order (cached
    per exact length, up to a bound: a server sees many lengths)."""
    entry = configs_for(kernel, table, head_dim_pad)
    dims = PICKS.get(kernel, {}).get(table, {})
    rows = dims.get(min((d for d in dims if d >= head_dim_pad), default=-1), [])
    for row_causal, up_to, name in rows:
        if row_causal == causal and (up_to is None or seqlen_k <= up_to):
            pick = by_label(entry, name)
            return (pick, *(c for c in entry if c is not pick))
    return tuple(entry)


def without_host_desc(entry: tuple) -> tuple:
    """The entry for a launch that makes its descriptors on the device (varlen: one per sequence): where
    its first config (the pick) has HOST_DESC, the same config without it goes first."""
    if not entry or not entry[0].kwargs.get("HOST_DESC"):
        return entry
    name = label(entry[0]).replace(" HOST_DESC", "")
    twin = next((c for c in entry if label(c) == name), None)
    return entry if twin is None else (twin, *(c for c in entry if c is not twin))


def by_label(entry, name: str) -> triton.Config:
    """The config of `entry` whose label is `name`."""
    for config in entry:
        if label(config) == name:
            return config
    raise KeyError(f"no config labelled {name!r} in {[label(c) for c in entry]}")


def all_configs() -> list[tuple[str, str, int, triton.Config]]:
    """Every (kernel, table, head_dim_pad, config) of the tables (the GPU tests run each one)."""
    return [
        (kernel, table, dim, config)
        for kernel, tables in TABLES.items()
        for table, dims in tables.items()
        for dim, entry in dims.items()
        for config in entry
    ]
