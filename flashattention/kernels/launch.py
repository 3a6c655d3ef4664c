"""Thin launchers of the attention kernels: allocate outputs, build the kernels' arguments and grids, launch
through the registry (kernels/registry.py chooses the config) and keep a plan of the call (kernels/plans.py)
so that the next call of the same key replays it.

Entry points match flashattention.blockwise: forward_stats -> (out, stats) and attention_backward(dout, q,
k, v, out, stats); here stats is the log2-unit LSE2 the backward needs, and lse = stats * STATS_TO_LSE.
attention_forward -> (out, lse, stats) adds the LSE (tests and tools). With cu_seqlens_q (varlen), q, k, v,
out are packed [total, heads, head_dim] and stats [heads, total_q]: the same kernels with IS_VARLEN."""

from __future__ import annotations

import functools
import math

import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import PTXASError

from .. import _env
from . import device as dev
from . import gluon, hooks, registry, warmup
from .bwd import attn_bwd_preprocess_kernel
from .plans import PLANS
from .plans import key as plan_key

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
STATS_TO_LSE = LN2  # the kernels' LSE2 is in log2 units

if _env.interpreting():
    from ._interpreter import patch_bf16_dot

    patch_bf16_dot()


def seqlen_buckets(seqlen_q: int, seqlen_k: int) -> int:
    """Both lengths rounded up to a power of two in [16, 16384], packed as q_bucket << 16 | k_bucket: the
    autotune key's length part (one tuning per bucket pair, not per exact length)."""
    return min(dev.pow2_at_least(seqlen_q), 16384) << 16 | min(dev.pow2_at_least(seqlen_k), 16384)


def precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def persistent_programs(tiles: int, sms: int) -> int:
    """Programs of a persistent grid: the fewest that give none more turns than one program per SM would
    (cdiv(tiles, sms)), so that all but the last take the same number of tiles (with common.persistent_turn's
    snake, an even number of turns pairs every long causal block with a short one)."""
    turns = dev.cdiv(tiles, sms)
    return dev.cdiv(tiles, turns)


def stride_unit(*tensors: torch.Tensor) -> int:
    """The largest power of two up to 16 dividing every batch, head and sequence stride of `tensors`: the
    kernels take strides in these units (common.unit_strides says why). 1 where a stride reaches 2^31
    elements: Triton types such an argument int64, but its quotient by the unit could fit int32, and the
    kernel's multiplication back would then wrap."""
    all_strides = [stride for t in tensors for stride in t.stride()[:3]]
    if max(all_strides, default=0) >= 2**31:
        return 1
    g = math.gcd(*all_strides)
    return min(16, g & -g) if g else 16  # g & -g: the lowest set bit, the largest power of two dividing g


def strides(name: str, t: torch.Tensor, unit: int) -> dict:
    """The (batch, head, sequence) strides of a BHSD tensor as the kernels take them: one tuple argument
    named for the tensor (q_strides, ...), in units of `unit` elements (common.unit_strides)."""
    batch, head, row = t.stride()[:3]
    return {f"{name}_strides": (batch // unit, head // unit, row // unit)}


def _shared_args(q, k, v, unit: int, softmax_scale: float, left: int, right: int) -> dict:
    """The arguments every attention kernel takes, named as the kernels name them."""
    heads, head_dim = q.shape[1], q.shape[3]
    return dict(
        Q=q,
        K=k,
        V=v,
        **strides("q", q, unit),
        **strides("k", k, unit),
        **strides("v", v, unit),
        num_heads=heads,
        group=heads // k.shape[1],
        seqlen_q=q.shape[2],
        seqlen_k=k.shape[2],
        seqlen_buckets=seqlen_buckets(q.shape[2], k.shape[2]),
        qk_scale=softmax_scale * LOG2E,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=dev.pow2_at_least(head_dim),
        PRECISION=precision(q.dtype),
        STRIDE_UNIT=unit,
        **mask_args(left, right),
    )


def mask_args(left: int, right: int) -> dict:
    """The window bounds as the kernels take them: non-negative ints and whether each applies."""
    return dict(window_left=max(left, 0), window_right=max(right, 0), HAS_LO=left >= 0, HAS_HI=right >= 0)


def call_key(kind: str, tensors, softmax_scale: float, left: int, right: int, dtype) -> tuple | None:
    """The call's plan key, or None where it makes no plan (a probe's extra arguments, plans turned off)."""
    if hooks.current.extra_args or not hooks.current.plans:
        return None
    return plan_key(kind, tensors, softmax_scale, left, right, precision(dtype))


def attention_forward(q, k, v, *, softmax_scale: float, left: int, right: int, config=None):
    """out [B, H, Sq, D] (q.dtype, contiguous), lse [B, H, Sq] float32 (natural log), lse2 = lse * log2(e)
    as the kernel computed it (saved for the backward). config: launch exactly this one."""
    out, lse2 = forward_stats(q, k, v, softmax_scale=softmax_scale, left=left, right=right, config=config)
    return out, lse2 * STATS_TO_LSE, lse2


def forward_stats(
    q, k, v, *, softmax_scale: float, left: int, right: int, config=None, cu_seqlens_q=None,
    cu_seqlens_k=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
):  # fmt: skip
    """(out, lse2) of attention_forward, without the natural-log LSE. Varlen (cu_seqlens_q given): q [total_q,
    heads, head_dim], k, v [total_k, kv_heads, head_dim] packed; sequence b is rows cu_seqlens_q[b] to
    cu_seqlens_q[b + 1] of q (likewise k, v; int32 [batch + 1], checked), max_seqlen_q/k bound every
    sequence's lengths (the grid covers max_seqlen_q); out [total_q, heads, head_dim], lse2 [heads, total_q];
    masks per sequence. A forced config makes no plan."""
    varlen = cu_seqlens_q is not None
    out = dev.empty(q.shape, q.dtype, q.device)
    lse2 = dev.empty((q.shape[1], q.shape[0]) if varlen else q.shape[:3], torch.float32, q.device)
    if out.numel() == 0:
        return out, lse2
    if k.shape[0 if varlen else 2] == 0:  # no keys: every row is empty (-inf is the same in both units)
        return out.zero_(), lse2.fill_(-math.inf)
    parts = grid_parts(q, cu_seqlens_q, cu_seqlens_k)
    if parts is not None:  # more (batch, head) programs than a grid's second axis takes: one call a part
        varlen_args = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                           max_seqlen_k=max_seqlen_k)  # fmt: skip
        for rows, part in parts:
            q_, k_, v_, part_args = _part_inputs(rows, part, (q, k, v), varlen_args)
            out_, lse2_ = forward_stats(q_, k_, v_, softmax_scale=softmax_scale, left=left, right=right,
                                        config=config, **part_args)  # fmt: skip
            out[rows[0]] = out_
            lse2[(slice(None), rows[0]) if varlen else rows[0]] = lse2_
        return out, lse2
    tensors = dict(Q=q, K=k, V=v, O=out, LSE2=lse2)
    if varlen:
        tensors.update(CU_SEQLENS_Q=cu_seqlens_q, CU_SEQLENS_K=cu_seqlens_k)
    key = None
    if config is None:  # a forced config makes no plan
        kind = ("fwd_varlen", max_seqlen_q, max_seqlen_k) if varlen else "fwd"
        key = call_key(kind, tuple(tensors.values()), softmax_scale, left, right, q.dtype)
    # a replay takes the packed tensors for the kernels' views of them (the same pointers)
    if PLANS.replay(key, q.device, tensors, registry.last_launched):
        return out, lse2
    if varlen:  # the kernels see [1, heads, total, head_dim] views
        tensors.update(zip("QKVO", _bhsd(q, k, v, out), strict=True))
    q, k, v, out4 = (tensors[name] for name in "QKVO")
    batch, heads, seqlen_q = q.shape[:3]
    unit = stride_unit(q, k, v, out4)
    args = dict(
        _shared_args(q, k, v, unit, softmax_scale, left, right),
        O=out4,
        LSE2=lse2,
        **strides("o", out4, unit),
        batch=batch,
        CAN_TMA=dev.tma_ok(q, k, v),
    )
    if varlen:  # one program row per sequence, the longest one's query blocks
        batch, seqlen_q = cu_seqlens_q.shape[0] - 1, max_seqlen_q
        args.update(_varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
        args.update(batch=batch, max_seqlen_q=max_seqlen_q)

    def grid(meta):
        tiles = dev.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads
        if meta.get("PERSISTENT"):  # at most one program per SM loops over the tiles
            return (persistent_programs(tiles[0] * tiles[1], dev.num_sms(q.device)),)
        return tiles

    seqlen_k = max_seqlen_k if varlen else None
    PLANS.put(key, (registry.launch("fwd", grid, args, q.device, q.dtype, config, seqlen_k=seqlen_k),))
    return out, lse2


def attention_backward(
    dout, q, k, v, out, lse2, *, softmax_scale: float, left: int, right: int, cu_seqlens_q=None,
    cu_seqlens_k=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
):  # fmt: skip
    """(dq, dk, dv) in the dtypes and shapes of (q, k, v); deterministic: a preprocess for delta = rowsum(dO
    * O), then either the dK/dV and dQ kernels (each gradient element written by one program) or a FUSED_DQ
    dK/dV config, which adds dQ into a float32 accumulator by TMA reductions, in a fixed order with
    DQ_ORDERED, else in none (no table holds one yet: tools.tune's candidates force them). Autotuning
    would time the two-kernel configs only (a fused one does the dQ kernel's work as well).
    Varlen: as forward_stats' (delta is per packed row, [heads, total_q], like lse2)."""
    varlen = cu_seqlens_q is not None
    dq = dev.empty(q.shape, q.dtype, q.device)
    dk = dev.empty(k.shape, k.dtype, k.device)
    dv = dev.empty(v.shape, v.dtype, v.device)
    if q.numel() == 0 or k.numel() == 0:  # nothing flows: zero grads
        return dq.zero_(), dk.zero_(), dv.zero_()
    varlen_args = {}
    if varlen:
        varlen_args = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                           max_seqlen_k=max_seqlen_k)  # fmt: skip
    parts = grid_parts(q, cu_seqlens_q, cu_seqlens_k)
    if parts is not None:  # as forward_stats: one call a part of the batch (or of the sequences)
        for (q_rows, k_rows), part in parts:
            q_, k_, v_, part_args = _part_inputs((q_rows, k_rows), part, (q, k, v), varlen_args)
            lse2_ = lse2[:, q_rows].contiguous() if varlen else lse2[q_rows]
            grads = attention_backward(
                dout[q_rows], q_, k_, v_, out[q_rows], lse2_, softmax_scale=softmax_scale, left=left,
                right=right, **part_args,
            )  # fmt: skip
            for grad, part_grad, rows in zip((dq, dk, dv), grads, (q_rows, k_rows, k_rows), strict=True):
                grad[rows] = part_grad
        return dq, dk, dv
    delta = torch.empty(lse2.shape, dtype=torch.float32, device=q.device)
    tensors = dict(O=out, DO=dout, DELTA=delta, Q=q, K=k, V=v, LSE2=lse2, DQ=dq, DK=dk, DV=dv)
    if varlen:
        tensors.update(CU_SEQLENS_Q=cu_seqlens_q, CU_SEQLENS_K=cu_seqlens_k)
    kind = ("bwd_varlen", max_seqlen_q, max_seqlen_k) if varlen else "bwd"
    key = call_key(kind, tuple(tensors.values()), softmax_scale, left, right, q.dtype)
    # FUSED_DQ's zeroed accumulator (and turn counters), for its launch or a replay of it
    zeros = lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=q.device)  # noqa: E731
    sequences = cu_seqlens_q.numel() - 1 if varlen else lse2.shape[0]
    rows = max_seqlen_q if varlen else lse2.shape[-1]
    fused_args = functools.partial(fused_dq_args, lse2_shape=lse2.shape, head_dim=q.shape[-1],
                                   sequences=sequences, rows=rows, zeros=zeros)  # fmt: skip
    planned = next(
        (p.config for p in PLANS.get(key) or () if p.config and p.config.kwargs.get("FUSED_DQ")), None
    )
    dq_acc, extra = fused_args(planned) if planned is not None else (None, {})
    # a replay takes the packed tensors for the kernels' views of them (the same pointers)
    if PLANS.replay(key, q.device, dict(tensors, **extra), registry.last_launched):
        if planned is not None:
            _fused_dq_out(dq, dq_acc, softmax_scale, varlen)
        return dq, dk, dv
    if varlen:  # the kernels see [1, heads, total, head_dim] views
        names = ("O", "DO", "Q", "K", "V", "DQ", "DK", "DV")
        tensors.update(zip(names, _bhsd(*(tensors[n] for n in names)), strict=True))
    warmup.wait()  # the compiles kernels/warmup.py started at the first forward with grad, if any run
    launches = backward_launches(tensors, softmax_scale, left, right, **varlen_args)
    (pre_args, pre_grid), (dkdv_args, dkdv_grid), (dq_args, dq_grid) = launches.values()
    with dev.on(q.device):
        compiled = attn_bwd_preprocess_kernel[pre_grid](**pre_args)
    pre = ("", attn_bwd_preprocess_kernel, compiled, pre_grid, pre_args, None)
    seqlen_k = max_seqlen_k if varlen else None
    fused = dkdv_choice(dkdv_args, lse2, q.device, q.dtype, seqlen_k=seqlen_k)
    if fused is not None and fused.kwargs.get("FUSED_DQ"):  # dQ inside the dK/dV kernel (TMA reductions)
        dq_acc, extra = fused_args(fused)
        try:
            dkdv = registry.launch(
                "bwd_dkdv", dkdv_grid, dict(dkdv_args, **extra), q.device, q.dtype, config=fused
            )
        except (CompilationError, PTXASError) as err:  # this Triton cannot build it: warn once, two kernels
            gluon.note_compile_error(err)
        else:
            _fused_dq_out(dq, dq_acc, softmax_scale, varlen)
            PLANS.put(key, (pre, dkdv))  # a replay allocates its own zeroed accumulator (above)
            return dq, dk, dv
    dkdv = registry.launch("bwd_dkdv", dkdv_grid, dkdv_args, q.device, q.dtype, seqlen_k=seqlen_k)
    dq_launch = registry.launch("bwd_dq", dq_grid, dq_args, q.device, q.dtype, seqlen_k=seqlen_k)
    PLANS.put(key, (pre, dkdv, dq_launch))
    return dq, dk, dv


MAX_GRID_Y = 65535  # CUDA's bound on a grid's second axis, which holds the (batch, head) programs


def grid_parts(q, cu_seqlens_q=None, cu_seqlens_k=None) -> list | None:
    """None where one launch's grid holds every (batch, head) program (batch * heads <= MAX_GRID_Y), else
    the parts of at most MAX_GRID_Y // heads batch rows (varlen: sequences) each, as ((q rows, k rows) as
    slices, (first, end) batch rows or sequences). Varlen reads the offsets on the host (one sync)."""
    varlen = cu_seqlens_q is not None
    batch, heads = (cu_seqlens_q.shape[0] - 1, q.shape[1]) if varlen else q.shape[:2]
    if batch * heads <= MAX_GRID_Y:
        return None
    per = max(1, MAX_GRID_Y // heads)
    bounds = [(b, min(b + per, batch)) for b in range(0, batch, per)]
    if not varlen:
        return [((slice(b0, b1), slice(b0, b1)), (b0, b1)) for b0, b1 in bounds]
    offsets_q, offsets_k = torch.stack([cu_seqlens_q, cu_seqlens_k]).tolist()
    return [
        ((slice(offsets_q[b0], offsets_q[b1]), slice(offsets_k[b0], offsets_k[b1])), (b0, b1))
        for b0, b1 in bounds
    ]


def _part_inputs(rows, part, qkv, varlen_args: dict) -> tuple:
    """q, k, v of one grid part (grid_parts) and its varlen keywords: the part's sequences' offsets from 0."""
    (q_rows, k_rows), (b0, b1) = rows, part
    q, k, v = qkv
    if varlen_args.get("cu_seqlens_q") is None:
        return q[q_rows], k[k_rows], v[k_rows], varlen_args
    cu_q, cu_k = varlen_args["cu_seqlens_q"], varlen_args["cu_seqlens_k"]
    part_args = dict(
        varlen_args,
        cu_seqlens_q=cu_q[b0 : b1 + 1] - q_rows.start,
        cu_seqlens_k=cu_k[b0 : b1 + 1] - k_rows.start,
    )
    return q[q_rows], k[k_rows], v[k_rows], part_args


PRE_BLOCK = 64  # query rows per program of the backward's preprocess


def _fused_dq_out(dq, dq_acc, softmax_scale: float, varlen: bool) -> None:
    """A FUSED_DQ launch's dQ: the accumulator scaled and rounded into dq in one pass (varlen: [heads,
    total, D] into [total, heads, D]); no dQ kernel ran."""
    registry.last_launched.pop("bwd_dq", None)
    torch.mul(dq_acc.transpose(0, 1) if varlen else dq_acc, softmax_scale, out=dq)


def dkdv_choice(args: dict, lse2, device, dtype, seqlen_k=None):
    """The dK/dV config a backward tries first (registry.first_choice), FUSED_DQ ones included: lse2 stands
    in for the accumulator that only such a config is given (fused_dq_args)."""
    return registry.first_choice("bwd_dkdv", dict(args, DQ_ACC=lse2), device, dtype, seqlen_k=seqlen_k)


def fused_dq_args(config, lse2_shape, head_dim: int, sequences: int, rows: int, zeros) -> tuple:
    """(DQ_ACC, the dK/dV arguments) of a FUSED_DQ config: the float32 accumulator in LSE2's shape with a
    head-dim axis and, with DQ_ORDERED, the count of turn waits that gave up, then a turn counter per (batch
    or sequence, head, query tile of the longest sequence's `rows`); zeros(shape, dtype) allocates them
    zeroed (the warm-up: stand-ins)."""
    dq_acc = zeros((*lse2_shape, head_dim), torch.float32)
    extra = dict(DQ_ACC=dq_acc)
    if config.kwargs.get("DQ_ORDERED"):
        tiles = -(-rows // config.kwargs["BLOCK_M"])
        turns = zeros((1 + sequences * lse2_shape[-2] * tiles,), torch.int32)
        extra.update(DQ_TURNS=turns, dq_tiles=tiles)
    return dq_acc, extra


def backward_launches(
    tensors: dict, softmax_scale: float, left: int, right: int, *, cu_seqlens_q=None, cu_seqlens_k=None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> dict:  # fmt: skip
    """name -> (arguments, grid) of the backward's three launches ("pre": the preprocess, "bwd_dkdv",
    "bwd_dq"), from `tensors` as the kernels name them (O, DO, DELTA, Q, K, V, LSE2, DQ, DK, DV; BHSD, for
    varlen the [1, heads, total, head_dim] views). The backward launches them; kernels/warmup.py compiles
    them ahead with stand-ins for the tensors that do not exist yet, which only their shapes, strides, dtypes
    and alignment reach through this function. Varlen: the preprocess runs over the packed rows as one
    sequence (delta is per row); the dK/dV and dQ grids cover the longest sequence."""
    q, k, v, out, dout = (tensors[name] for name in ("Q", "K", "V", "O", "DO"))
    dq, dk, dv = (tensors[name] for name in ("DQ", "DK", "DV"))
    batch, heads, seqlen_q, head_dim = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    pre_args = dict(  # (strides in elements: unit 1)
        O=out,
        DO=dout,
        DELTA=tensors["DELTA"],
        **strides("o", out, 1),
        **strides("do", dout, 1),
        num_heads=heads,
        seqlen_q=seqlen_q,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=dev.pow2_at_least(head_dim),
        BLOCK_M=PRE_BLOCK,
    )
    pre_grid = (dev.cdiv(seqlen_q, PRE_BLOCK), batch * heads)
    unit = stride_unit(q, k, v, dout, dq, dk, dv)
    common = dict(
        _shared_args(q, k, v, unit, softmax_scale, left, right),
        DO=dout,
        LSE2=tensors["LSE2"],
        DELTA=tensors["DELTA"],
        **strides("do", dout, unit),
        softmax_scale=softmax_scale,
    )
    can_tma = dev.tma_ok(q, k, v, dout)
    if cu_seqlens_q is not None:  # one program row per sequence
        common.update(_varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
        batch, seqlen_q, seqlen_k = cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k
    dkdv_args = dict(
        common,
        DK=dk,
        DV=dv,
        CAN_TMA=can_tma,
        num_kv_heads=kv_heads,
        **strides("dk", dk, unit),
        **strides("dv", dv, unit),
    )
    dq_args = dict(common, DQ=dq, CAN_TMA=can_tma, **strides("dq", dq, unit))
    return {
        "pre": (pre_args, pre_grid),
        "bwd_dkdv": (dkdv_args, lambda meta: (dev.cdiv(seqlen_k, meta["BLOCK_N"]), batch * kv_heads)),
        "bwd_dq": (dq_args, lambda meta: (dev.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads)),
    }


# ----------------------------------------------------------------------------------------------------------
# Varlen: packed sequences through the same kernels (IS_VARLEN)


def _bhsd(*packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Packed [total, heads, head_dim] tensors as the kernels' [1, heads, total, head_dim] views (no copy)."""
    return tuple(t.transpose(0, 1).unsqueeze(0) for t in packed)


def _varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int) -> dict:
    """The varlen kernels' extra arguments; the autotune key's lengths are the longest sequences'."""
    return dict(
        CU_SEQLENS_Q=cu_seqlens_q,
        CU_SEQLENS_K=cu_seqlens_k,
        IS_VARLEN=True,
        seqlen_buckets=seqlen_buckets(max_seqlen_q, max_seqlen_k),
    )
