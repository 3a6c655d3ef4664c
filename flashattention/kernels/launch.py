"""Thin launchers: allocate outputs, pick the config (autotuned, default or forced) and the grid, launch.
Entry points match flashattention.blockwise: forward_stats -> (out, stats) and attention_backward(dout, q,
k, v, out, stats); here stats is the log2-unit LSE2 the backward needs, and lse = stats * STATS_TO_LSE.
attention_forward -> (out, lse, stats) adds the LSE (tests and benchmarks/tune.py)."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import warnings

import torch
import triton
import triton.testing
from triton.compiler.errors import CompilationError, CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

from . import configs
from .bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from .fwd import attn_fwd_kernel

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

if configs.interpreting():
    from ._interpreter import patch_bf16_dot

    patch_bf16_dot()


def _poison() -> bool:
    return os.environ.get("FLASHATTN_POISON", "0") not in ("", "0")


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation; NaN-filled under FLASHATTN_POISON=1 so that an unwritten element shows."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if _poison() else t


# Plain Python on the launch path: triton.cdiv and triton.next_power_of_2 are ConstexprFunction objects
# whose calls cost ~3.5 us each on the host (measured on a CPU), several per launch.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int, floor: int = 16) -> int:
    """The smallest power of two >= n, and at least `floor`."""
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def _seqlen_buckets(seqlen_q: int, seqlen_k: int) -> int:
    """Both lengths rounded up to a power of two in [16, 16384], packed as q_bucket << 16 | k_bucket: the
    autotune key's length part (one tuning per bucket pair, not per exact length)."""
    return min(_pow2_at_least(seqlen_q), 16384) << 16 | min(_pow2_at_least(seqlen_k), 16384)


def _head_dim_pad(head_dim: int) -> int:
    return _pow2_at_least(head_dim)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32" if dtype == torch.float32 else "ieee"


def _on(device: torch.device):
    """Kernels launch on the current CUDA device: make it the tensors' one (multi-GPU callers)."""
    if device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(device)


# autotune case -> the config the tuner picked for it (see _launch); kernel name -> the config of its last
# launch (the benchmark and tune.py report it)
_best: dict[tuple, triton.Config] = {}
last_launched: dict[str, triton.Config] = {}


def _run(kernel_fn, grid, args: dict, config) -> tuple:
    """Launches `config` through Triton; returns what a plan of the launch is made from (_Plan.of, by _keep
    where a plan is kept): the kernel function, the compiled kernel, the grid, the arguments, the config."""
    if config.kwargs.get("GLUON_WS"):
        problems = _config_problems(config, args)
        if problems:
            kind = "dK/dV" if "DK" in args else "forward"
            raise ValueError(
                f"flashattention: the GLUON_WS {kind} config does not apply: " + "; ".join(problems)
            )
        # Gluon is experimental in Triton: imported late
        if "DK" in args:
            from .bwd_ws import attn_bwd_dkdv_ws_kernel as kernel_fn
        else:
            from .fwd_ws import attn_fwd_ws_kernel as kernel_fn
        if config.kwargs.get("HOST_DESC"):
            args = dict(args, **_host_descriptors(args, config.kwargs["BLOCK_N"]))
        if config.kwargs.get("WS_DYNAMIC"):  # the launch's tile counter, zero (fwd_ws.attn_fwd_ws_kernel)
            args = dict(args, TILE_COUNTER=torch.zeros(1, dtype=torch.int32, device=args["O"].device))
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    compiled = kernel_fn[grid](**args, **config.kwargs, **options)
    return kernel_fn, compiled, grid, args, config


class _Plan:
    """One launch as _run made it: the compiled kernel, its grid and its arguments in the kernel's order.
    A later call with the same key (_plan_key: shapes, strides, dtypes, pointer alignments, the scalars)
    launches the same kernel with the same arguments, its own tensors put in: no argument building, no
    config choice, no JITFunction.run (which binds and specialises ~45 arguments per launch). On the H100
    machine's host a forward call cost 250-280 us of Python with HOST_DESC, as long as the kernel at 2k
    (benchmarks/NOTES.md). The key holds everything the arguments are made of, so a hit launches exactly
    what the slow path would."""

    __slots__ = ("name", "config", "kernel", "grid", "values", "tensors", "descs", "counter")

    @classmethod
    def of(cls, name: str, kernel_fn, compiled, grid, args: dict, config):
        """The plan of a launch through Triton (name: the kernel's in last_launched, "" for none), or None
        where there is none to replay (the interpreter)."""
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata", "launch_metadata")):
            return None
        merged = dict(args, **config.kwargs) if config is not None else args
        plan = cls()
        plan.name = name
        plan.config, plan.kernel, plan.tensors, plan.descs, plan.counter = config, compiled, [], [], None
        grid = grid(merged) if callable(grid) else grid
        plan.grid = (tuple(grid) + (1, 1))[:3]
        plan.values = []
        for i, (name, param) in enumerate(kernel_fn.signature.parameters.items()):
            value = merged.get(name, param.default)
            if name == "TILE_COUNTER" and value is not None:
                plan.counter = i
            elif isinstance(value, torch.Tensor):
                plan.tensors.append((i, name))
            elif type(value).__name__ == "TensorDescriptor":  # HOST_DESC: remade around each call's tensor
                plan.descs.append((i, name, value.shape, value.strides, value.block_shape, value.layout))
            else:
                plan.values.append(value)
                continue
            plan.values.append(None)  # each call puts its own in: the plan keeps no tensor of this one alive
        return plan

    def __call__(self, device: torch.device, tensors: dict) -> None:
        """Launches on `device` with `tensors` (name -> tensor, as the kernel names them) put in."""
        values = self.values.copy()
        for i, name in self.tensors:
            values[i] = tensors[name]
        if self.descs:
            from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

            for i, name, shape, strides, box, layout in self.descs:
                values[i] = TensorDescriptor(tensors[name], shape, strides, box, layout)
        if self.counter is not None:
            values[self.counter] = torch.zeros(1, dtype=torch.int32, device=device)
        kernel, grid = self.kernel, self.grid
        with _on(device):
            _ensure_allocator()  # per thread (device-side descriptors' scratch)
            stream = triton.runtime.driver.active.get_current_stream(device.index)
            hooks = triton.knobs.runtime
            metadata = kernel.launch_metadata(grid, stream, *values)
            kernel.run(
                *grid, stream, kernel.function, kernel.packed_metadata, metadata,
                hooks.launch_enter_hook, hooks.launch_exit_hook, *values,
            )  # fmt: skip


# _plan_key -> the plans of a call's launches, in order (see _Plan); cleared when it grows past _PLANS_MAX
# (shapes seen by a long process)
_plans: dict[tuple, tuple[_Plan, ...]] = {}
_PLANS_MAX = 1024


def _plan_key(kind: str, tensors: tuple, *scalars) -> tuple | None:
    """The key of a launch: each tensor's shape, strides, dtype and pointer alignment (what Triton
    specialises on, and what decides CAN_TMA and HOST_DESC), the device, the scalars (the caller's: scale,
    window and the fp32 matmul precision, torch's global setting), and the module state that tests and
    benchmarks swap (the tuning cache, the tables, the SM count), so that a plan made under other state is
    not reused. None (no plan) in the interpreter."""
    if configs.interpreting():
        return None
    t0 = tensors[0]
    return (
        kind, t0.device, *scalars,
        *[(t.shape, t.stride(), t.dtype, t.data_ptr() & 15) for t in tensors],
        configs.autotune_enabled(), id(_best), id(configs.configs_for), id(_num_sms), id(_run),
        _HOST_DESC_MIN_WORK,
    )  # fmt: skip


def _keep(key: tuple | None, *launches: tuple | None) -> None:
    """Stores the plans of a call's launches ((name, *what _run returned) each), except where the call has
    no key or during CUDA graph capture (where an untuned case launches the table's default config, not the
    one later calls get)."""
    if key is None or None in launches or torch.cuda.is_current_stream_capturing():
        return
    plans = tuple(_Plan.of(*launch) for launch in launches)
    if None in plans:
        return
    if len(_plans) >= _PLANS_MAX:
        _plans.clear()
    _plans[key] = plans


def _replay(key: tuple | None, device: torch.device, tensors: dict) -> bool:
    """Launches the stored plans of `key` with `tensors`, if there are any."""
    plans = _plans.get(key)
    if plans is None:
        return False
    for plan in plans:
        if plan.name:
            last_launched[plan.name] = plan.config
        plan(device, tensors)
    return True


def _host_descriptors(args: dict, block_n: int) -> dict:
    """Q, K and V as [B, H, S, D] TMA descriptors made on the host (HOST_DESC: the Gluon forward then builds
    none per tile), with the boxes and layouts of host_desc_boxes."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    q = args["Q"]
    dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    boxes = host_desc_boxes(q.shape[3], block_n, dtype)
    return {
        name: TensorDescriptor(
            args[name], list(args[name].shape), list(args[name].stride()), list(box), layout
        )
        for name, (box, layout) in boxes.items()
    }


@functools.cache  # per call the layouts cost more host time than the rest of the launch (H100 host profile)
def host_desc_boxes(head_dim: int, block_n: int, dtype) -> dict:
    """name -> (box, shared layout) of the HOST_DESC descriptors: 64 query rows (a consumer's) or block_n
    keys of one (batch, head), the layout the kernel's shared tiles have. benchmarks/aot.py compiles
    against the same. Cached: the dict is shared, read it only."""
    from triton.experimental.gluon import language as gl

    boxes = {}
    for name, rows in (("Q", 64), ("K", block_n), ("V", block_n)):
        block = (1, 1, rows, head_dim)
        boxes[name] = (block, gl.NVMMASharedLayout.get_default_for(list(block), dtype))
    return boxes


def _gluon_problems(args: dict) -> list[str]:
    """Why the warp-specialised Gluon kernels (GLUON_WS configs: the forward of kernels/fwd_ws.py, the dK/dV
    of kernels/bwd_ws.py, told apart by the arguments) cannot take these arguments (empty if they can): they
    need a Hopper GPU, 16-bit inputs, head dim 64, 128 or 256 (dK/dV: 64 or 128) and TMA-aligned tensors."""
    problems = []
    q = args["Q"]
    if configs.interpreting() or q.device.type != "cuda":
        problems.append("it needs a CUDA GPU (Triton's interpreter cannot run Gluon)")
    elif configs._capability(q.device.index)[0] != 9:
        problems.append("it needs a Hopper GPU (sm_90)")
    if q.dtype not in (torch.float16, torch.bfloat16):
        problems.append(f"it takes float16/bfloat16 inputs, got {q.dtype}")
    dims = (64, 128) if "DK" in args else (64, 128, 256)
    if args["HEAD_DIM"] not in dims:
        names = ", ".join(map(str, dims[:-1])) + f" or {dims[-1]}"
        problems.append(f"it takes head dim {names}, got {args['HEAD_DIM']}")
    if not args["CAN_TMA"]:
        problems.append("Q, K and V (and dO) need 16-byte aligned base pointers and row strides (TMA)")
    if not problems and _gluon_missing():
        problems.append(f"this Triton ({triton.__version__}) lacks Gluon's Hopper API: {_gluon_missing()}")
    if _gluon_compile_error:
        problems.append(f"it failed to compile with triton {triton.__version__}: {_gluon_compile_error}")
    return problems


@functools.cache
def _gluon_missing() -> str:
    """Why kernels/fwd_ws.py or bwd_ws.py cannot be imported with this Triton (empty if they can): Gluon is
    experimental and older Triton releases lack the parts they use."""
    try:
        from . import bwd_ws, fwd_ws  # noqa: F401
    except (ImportError, AttributeError) as err:
        return str(err)
    return ""


def _host_desc_ok(args: dict) -> bool:
    """Whether HOST_DESC configs may run: no stride-0 (broadcast, e.g. expanded) dimension in Q, K or V, which
    host descriptors cannot take, and at least _HOST_DESC_MIN_WORK of work. Part of the tuning key, so a
    case tuned where they may run never hands its pick to one where they may not."""
    if any(0 in args[n].stride() for n in "QKV"):
        return False
    return (args["Q"].numel() * args["seqlen_k"]) >> args["HAS_HI"] >= _HOST_DESC_MIN_WORK


# B * H * Sq * D * Sk, halved under a causal (right) bound, below which HOST_DESC is left out: making three
# host descriptors adds 60-100 us of host time per call on the H100 machine's slow host (benchmarks/
# host_profile.py), more than it saves on the GPU below ~0.3 ms of kernel time, where the call is host-bound
# (H100 bf16 D128 causal 512: 0.45 ms per call against 0.16 without it). 2**35 (2**37 FLOPs, ~0.3 ms at 450
# TFLOP/s): at the benchmark's 16k tokens per batch, every row from 2k tokens up (where the GPU gain, +4-8%,
# was measured) and the non-causal 1k rows.
_HOST_DESC_MIN_WORK = 1 << 35


def _length_one(args: dict) -> bool:
    """Whether a sequence length is 1, which Triton specialises as a constant: Triton 3.6 crashes compiling
    the WS_OVERLAP forward then (ConvertTritonGPUToLLVM, an index assertion; seen with seqlen_q = 1 causal
    and seqlen_k = 1 unmasked, benchmarks/aot.py), so those configs do not apply. Part of the tuning key."""
    return args["seqlen_q"] == 1 or args["seqlen_k"] == 1


def _config_problems(config, args: dict) -> list[str]:
    """Why a GLUON_WS config cannot take these arguments (empty if it can, and for other configs):
    _gluon_problems, and for WS_OVERLAP a sequence length of 1 (_length_one). _run raises them for a forced
    config; _applies leaves such a config out of the tuner's choice."""
    if not config.kwargs.get("GLUON_WS"):
        return []
    problems = _gluon_problems(args)
    if config.kwargs.get("WS_OVERLAP") and _length_one(args):
        problems.append("WS_OVERLAP takes no sequence length of 1 (Triton 3.6 cannot compile it)")
    return problems


def _applies(config, args: dict) -> bool:
    if config.kwargs.get("HOST_DESC") and not _host_desc_ok(args):
        return False
    return not _config_problems(config, args)


def _tune(kernel_fn, grid, args: dict, entry: list, reset_to_zero) -> triton.Config:
    """The fastest config of `entry` for these arguments (median of triton's do_bench, L2 flushed), as
    Triton's Autotuner measures, but over configs that may launch different kernels (GLUON_WS). Configs
    that do not fit this GPU's resources or that this Triton cannot compile for it are skipped, as Triton's
    Autotuner skips them; buffers in reset_to_zero are zeroed before each run. The configs within
    _TUNE_CLOSE of the fastest are timed a second time in reverse order and ranked by the mean of both
    runs: the GPU's clocks drift while it tunes (heat), which one pass in table order turns into a bias."""

    def time_config(i):
        def call(cfg=entry[i]):
            for name in reset_to_zero:
                args[name].zero_()
            _run(kernel_fn, grid, args, cfg)

        return triton.testing.do_bench(call, return_mode="median")

    timings = {}
    for i, cfg in enumerate(entry):
        try:
            timings[i] = time_config(i)
        except (OutOfResources, CompileTimeAssertionFailure, PTXASError):  # as Triton's Autotuner skips
            continue
        except CompilationError as err:
            if not cfg.kwargs.get("GLUON_WS"):
                raise
            _warn_gluon_broken(err)
    if not timings:
        raise OutOfResources(0, 0, "shared memory or registers: no config of the table fits this GPU")
    fastest = min(timings.values())
    close = [i for i, t in timings.items() if t <= fastest * (1 + _TUNE_CLOSE)]
    if len(close) > 1:
        for i in reversed(close):
            timings[i] = (timings[i] + time_config(i)) / 2
        timings = {i: timings[i] for i in close}
    for name in reset_to_zero:
        args[name].zero_()
    return entry[min(timings, key=timings.get)]


_TUNE_CLOSE = 0.05  # configs this close to the fastest in the first pass are timed again


def _launch(
    kernel_fn, name: str, grid, args: dict, head_dim_pad: int, device, dtype, config=None, reset_to_zero=()
) -> tuple | None:
    """Launches on `device` (not whichever GPU is current) with `config` if given, else a config of the
    table entry that applies to these arguments (configs.py). Autotuning picks the fastest on the case's
    first call (_tune) and later calls launch it directly. With autotuning off: the first config that fits
    this GPU's shared memory (smaller GPUs than the table's). During CUDA graph capture a case not tuned yet
    cannot be tuned (timing runs cannot be captured): it gets the first config, with a warning. Returns the
    launch's name and what _run returned, for the caller to keep as a plan (_keep)."""
    with _on(device):
        if config is not None:
            last_launched[name] = config
            return _named(_run(kernel_fn, grid, args, config), name)
        table = configs.table_name(device, dtype)
        entry = configs.configs_for(name, table, head_dim_pad)
        tuning = configs.autotune_enabled() and len(entry) > 1
        # the key decides which configs apply (dtype, HEAD_DIM, CAN_TMA): a known case runs at once
        if tuning:
            case = {k: args.get(k) for k in configs.AUTOTUNE_KEY}
            key = (name, table, head_dim_pad, dtype, _host_desc_ok(args), _length_one(args), *case.values())
            best = _best.get(key)
            if best is not None:
                last_launched[name] = best
                return _named(_run(kernel_fn, grid, args, best), name)
        entry = [c for c in entry if _applies(c, args)]
        if tuning and len(entry) > 1:
            if not torch.cuda.is_current_stream_capturing():
                best = _best[key] = _tune(kernel_fn, grid, args, entry, reset_to_zero)
                last_launched[name] = best
                return _named(_run(kernel_fn, grid, args, best), name)
            warnings.warn(
                f"flashattention: {name} has not been tuned for this case yet ({dtype}, {case}) and cannot "
                "be tuned during CUDA graph capture; the captured graph uses the table's default config. "
                "Run the same call once before capturing to capture the tuned config.",
                stacklevel=4,
            )
        for i, cfg in enumerate(entry):
            try:
                ran = _run(kernel_fn, grid, args, cfg)
                last_launched[name] = cfg
                return _named(ran, name)
            except OutOfResources:
                if i == len(entry) - 1:
                    raise
            except CompilationError as err:
                if not cfg.kwargs.get("GLUON_WS") or i == len(entry) - 1:
                    raise
                _warn_gluon_broken(err)


def _named(ran: tuple | None, name: str) -> tuple | None:
    return None if ran is None else (name, *ran)


def _warn_gluon_broken(err: CompilationError) -> None:
    """Gluon is experimental and changes between Triton releases: a GLUON_WS config that this Triton cannot
    compile is skipped for the Triton kernel's configs, with this warning, and later calls skip every Gluon
    config at once (_gluon_problems)."""
    global _gluon_compile_error
    if not _gluon_compile_error:
        # the message; str(err) starts with the source excerpt
        text = (getattr(err, "error_message", None) or str(err)).strip()
        _gluon_compile_error = text.splitlines()[-1] if text else type(err).__name__
        warnings.warn(
            f"flashattention: a Gluon kernel (kernels/fwd_ws.py, bwd_ws.py) does not compile with triton "
            f"{triton.__version__} ({_gluon_compile_error}); the Triton kernels run instead (the forward "
            "~15-25% slower on Hopper). Install triton 3.6 for the Gluon kernels, or report the error with "
            "your triton version.",
            stacklevel=5,
        )


_gluon_compile_error = ""  # why a Gluon kernel failed to compile in this process, once one has


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned base pointers and row strides; where they can be used,
    installs the allocator that device-side descriptors need (_ensure_allocator)."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return False
    if not configs.interpreting():
        _ensure_allocator()
    return True


def _ensure_allocator() -> None:
    """Triton keeps its allocator in a ContextVar: each thread starts without one, and autograd runs the
    backward in a thread of its own, so this checks the calling thread's, every call (a ContextVar read),
    and installs torch's caching allocator only where none is set (a user's own allocator stays)."""
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # another triton's internals: once per thread
        if getattr(_thread_state, "allocator_set", False):
            return
    triton.set_allocator(_torch_scratch)
    _thread_state.allocator_set = True


def _torch_scratch(size: int, align: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


_thread_state = threading.local()


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the GPU (a few in the interpreter, so that programs loop)."""
    if configs.interpreting() or device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def _persistent_programs(tiles: int, sms: int) -> int:
    """Programs of a persistent grid: the fewest that give none more turns than one program per SM would
    (cdiv(tiles, sms)), so that all but the last take the same number of tiles. At 2k, D64 (2816 tiles on 132
    SMs) 128 programs of 22 tiles each: with common.persistent_turn's snake an even number of turns pairs
    every long causal block with a short one (H100: 0.381 ms against 0.405 on 132 programs, where some took
    21 tiles and others an unpaired long one; benchmarks/probe.py)."""
    turns = _cdiv(tiles, sms)
    return _cdiv(tiles, turns)


def _stride_unit(*tensors: torch.Tensor) -> int:
    """The largest power of two up to 16 dividing every batch, head and sequence stride of `tensors`: the
    kernels take strides in these units (common.unit_strides says why)."""
    g = math.gcd(*(stride for t in tensors for stride in t.stride()[:3]))
    return min(16, g & -g) if g else 16  # g & -g: the lowest set bit, the largest power of two dividing g


def _strides(name: str, t: torch.Tensor, seq: str, unit: int) -> dict:
    """The batch, head and sequence strides of a BHSD tensor as the kernels name them (stride_qb, ...), in
    units of `unit` elements."""
    batch, head, row = t.stride()[:3]
    names = _stride_names(name, seq)
    return {names[0]: batch // unit, names[1]: head // unit, names[2]: row // unit}


@functools.cache  # built once per tensor name (host time)
def _stride_names(name: str, seq: str) -> tuple[str, ...]:
    return tuple(f"stride_{name}{axis}" for axis in "bh" + seq)


def _shared_args(q, k, v, unit: int, softmax_scale: float, left: int, right: int) -> dict:
    """The arguments every attention kernel takes, named as the kernels name them."""
    heads, head_dim = q.shape[1], q.shape[3]
    return dict(
        Q=q,
        K=k,
        V=v,
        **_strides("q", q, "m", unit),
        **_strides("k", k, "n", unit),
        **_strides("v", v, "n", unit),
        num_heads=heads,
        group=heads // k.shape[1],
        seqlen_q=q.shape[2],
        seqlen_k=k.shape[2],
        seqlen_buckets=_seqlen_buckets(q.shape[2], k.shape[2]),
        qk_scale=softmax_scale * LOG2E,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=_head_dim_pad(head_dim),
        PRECISION=_precision(q.dtype),
        STRIDE_UNIT=unit,
        **_mask_flags(left, right),
    )


def _mask_flags(left: int, right: int) -> dict:
    return dict(window_left=max(left, 0), window_right=max(right, 0), HAS_LO=left >= 0, HAS_HI=right >= 0)


STATS_TO_LSE = LN2  # the kernels' LSE2 is in log2 units


def attention_forward(q, k, v, *, softmax_scale: float, left: int, right: int, config=None):
    """out [B, H, Sq, D] (q.dtype, contiguous), lse [B, H, Sq] float32 (natural log), lse2 = lse * log2(e)
    as the kernel computed it (saved for the backward)."""
    out, lse2 = forward_stats(q, k, v, softmax_scale=softmax_scale, left=left, right=right, config=config)
    return out, lse2 * STATS_TO_LSE, lse2


def forward_stats(q, k, v, *, softmax_scale: float, left: int, right: int, config=None):
    """(out, lse2) of attention_forward, without the natural-log LSE."""
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    out = _empty((batch, heads, seqlen_q, head_dim), q.dtype, q.device)
    lse2 = _empty((batch, heads, seqlen_q), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse2
    if seqlen_k == 0:  # no keys: every row is empty (-inf is the same in both units)
        return out.zero_(), lse2.fill_(-math.inf)
    key = None
    if config is None:
        key = _plan_key("fwd", (q, k, v, out, lse2), softmax_scale, left, right, _precision(q.dtype))
    if _replay(key, q.device, {"Q": q, "K": k, "V": v, "O": out, "LSE2": lse2}):  # this case ran before
        return out, lse2
    unit = _stride_unit(q, k, v, out)
    args = dict(
        _shared_args(q, k, v, unit, softmax_scale, left, right),
        O=out,
        LSE2=lse2,
        **_strides("o", out, "m", unit),
        batch=batch,
        CAN_TMA=_tma_ok(q, k, v),
    )

    def grid(meta):
        tiles = _cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads
        if meta.get("WS_DYNAMIC"):  # one program per SM takes tiles while there are any
            return (min(_num_sms(q.device), tiles[0] * tiles[1]),)
        if meta.get("PERSISTENT"):  # at most one program per SM loops over the tiles
            return (_persistent_programs(tiles[0] * tiles[1], _num_sms(q.device)),)
        return tiles

    _keep(key, _launch(attn_fwd_kernel, "fwd", grid, args, args["HEAD_DIM_PAD"], q.device, q.dtype, config))
    return out, lse2


def attention_backward(
    dout,
    q,
    k,
    v,
    out,
    lse2,
    *,
    softmax_scale: float,
    left: int,
    right: int,
    configs_override: dict | None = None,
    atomic_dq: bool = False,
):
    """(dq, dk, dv) in the dtypes and shapes of (q, k, v); deterministic unless atomic_dq (an experiment:
    one kernel adds dQ with float32 atomics instead of a second pass over K/V; tune.py times it)."""
    batch, heads, seqlen_q, head_dim = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    forced = configs_override or {}
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    if q.numel() == 0 or k.numel() == 0:  # nothing flows: zero grads
        return dq.zero_(), dk.zero_(), dv.zero_()
    head_dim_pad = _head_dim_pad(head_dim)
    delta = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    tensors = dict(O=out, DO=dout, DELTA=delta, Q=q, K=k, V=v, LSE2=lse2, DQ=dq, DK=dk, DV=dv)
    key = None
    if not forced and not atomic_dq:
        key = _plan_key("bwd", tuple(tensors.values()), softmax_scale, left, right, _precision(q.dtype))
    if _replay(key, q.device, tensors):  # this case ran before
        return dq, dk, dv
    pre_block = 64
    pre_args = dict(  # (strides in elements: unit 1)
        O=out,
        DO=dout,
        DELTA=delta,
        **_strides("o", out, "m", 1),
        **_strides("do", dout, "m", 1),
        num_heads=heads,
        seqlen_q=seqlen_q,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_M=pre_block,
    )
    pre_grid = (_cdiv(seqlen_q, pre_block), batch * heads)
    with _on(q.device):
        compiled = attn_bwd_preprocess_kernel[pre_grid](**pre_args)
    pre = ("", attn_bwd_preprocess_kernel, compiled, pre_grid, pre_args, None)
    unit = _stride_unit(q, k, v, dout, dq, dk, dv)
    common = dict(
        _shared_args(q, k, v, unit, softmax_scale, left, right),
        DO=dout,
        LSE2=lse2,
        DELTA=delta,
        **_strides("do", dout, "m", unit),
        softmax_scale=softmax_scale,
    )
    # atomic_dq (experimental, not deterministic): the dK/dV kernel also adds dQ into a float32 buffer
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic_dq else None
    dkdv_args = dict(
        common,
        DK=dk,
        DV=dv,
        DQ_ACC=dq_acc,
        ATOMIC_DQ=atomic_dq,
        CAN_TMA=_tma_ok(q, k, v, dout),
        num_kv_heads=kv_heads,
        **_strides("dk", dk, "n", unit),
        **_strides("dv", dv, "n", unit),
    )
    grid = lambda meta: (_cdiv(seqlen_k, meta["BLOCK_N"]), batch * kv_heads)
    dkdv = _launch(
        attn_bwd_dkdv_kernel,
        "bwd_dkdv",
        grid,
        dkdv_args,
        head_dim_pad,
        q.device,
        q.dtype,
        forced.get("bwd_dkdv"),
        reset_to_zero=("DQ_ACC",) if atomic_dq else (),
    )
    if atomic_dq:
        return dq.copy_(dq_acc), dk, dv
    dq_args = dict(common, DQ=dq, **_strides("dq", dq, "m", unit))
    grid = lambda meta: (_cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads)
    dq_launch = _launch(
        attn_bwd_dq_kernel, "bwd_dq", grid, dq_args, head_dim_pad, q.device, q.dtype, forced.get("bwd_dq")
    )
    _keep(key, pre, dkdv, dq_launch)
    return dq, dk, dv
