"""Where the warp-specialised Gluon kernels (kernels/fwd_ws.py, bwd_ws.py) may run, and the TMA descriptors
the host makes for them (HOST_DESC configs)."""

from __future__ import annotations

import functools
import warnings

import torch
import triton

from .. import _env
from . import device as dev
from . import hooks

# B * H * Sq * D * Sk, halved under a causal (right) bound, below which HOST_DESC is left out: making three
# host descriptors costs more host time than it saves on the GPU under ~0.3 ms of kernel time
HOST_DESC_MIN_WORK = 1 << 35

_compile_error = ""  # why a Gluon kernel failed to compile in this process, once one has


def problems(dims: tuple[int, ...], args: dict) -> list[str]:
    """Why a Gluon kernel taking head dims `dims` cannot take these arguments (empty if it can): it needs a
    Hopper GPU, 16-bit inputs, one of those head dims and TMA-aligned tensors."""
    found = []
    q = args["Q"]
    if _env.interpreting() or q.device.type != "cuda":
        found.append("it needs a CUDA GPU (Triton's interpreter cannot run Gluon)")
    elif dev.capability(q.device.index)[0] != 9:
        found.append("it needs a Hopper GPU (sm_90)")
    if q.dtype not in (torch.float16, torch.bfloat16):
        found.append(f"it takes float16/bfloat16 inputs, got {q.dtype}")
    if args["HEAD_DIM"] not in dims:
        names = ", ".join(map(str, dims[:-1])) + f" or {dims[-1]}"
        found.append(f"it takes head dim {names}, got {args['HEAD_DIM']}")
    if not args["CAN_TMA"]:
        found.append("Q, K and V (and dO) need 16-byte aligned base pointers and row strides (TMA)")
    if not found and missing():
        found.append(f"this Triton ({triton.__version__}) lacks Gluon's Hopper API: {missing()}")
        _warn_missing()
    if _compile_error:
        found.append(f"it failed to compile with triton {triton.__version__}: {_compile_error}")
    return found


@functools.cache
def missing() -> str:
    """Why kernels/fwd_ws.py or bwd_ws.py cannot be imported with this Triton (empty if they can): Gluon is
    experimental and older Triton releases lack the parts they use."""
    try:
        from . import bwd_ws, fwd_ws  # noqa: F401
    except (ImportError, AttributeError) as err:
        return str(err)
    return ""


@functools.cache
def _warn_missing() -> None:
    """On a Hopper GPU whose Triton lacks Gluon's API: warn once that the slower Triton kernels run."""
    warnings.warn(
        f"flashattention: this Triton ({triton.__version__}) lacks Gluon's Hopper API ({missing()}), so the "
        "Triton kernels run instead of the Gluon ones (slower on Hopper: benchmarks/NOTES.md). Install "
        "triton 3.6 for them.",
        stacklevel=7,
    )


def note_compile_error(err: Exception) -> None:
    """A Gluon config this Triton cannot compile: warn once; later calls skip all Gluon configs (problems)."""
    global _compile_error
    if _compile_error:
        return
    text = (getattr(err, "error_message", None) or str(err)).strip()  # str(err) starts with the source
    _compile_error = text.splitlines()[-1] if text else type(err).__name__
    warnings.warn(
        f"flashattention: a Gluon kernel (kernels/fwd_ws.py, bwd_ws.py) does not compile with triton "
        f"{triton.__version__} ({_compile_error}); the Triton kernels run instead (the forward ~15-25% "
        "slower on Hopper). Install triton 3.6 for the Gluon kernels, or report the error with your "
        "triton version.",
        stacklevel=6,
    )


def host_desc_ok(args: dict) -> bool:
    """Whether HOST_DESC configs may run: no stride-0 (broadcast) dimension in Q, K or V, which host
    descriptors cannot take, and enough work to pay for making them (HOST_DESC_MIN_WORK, or the hook's).
    Part of the tuning key, so a pick made where they may run never reaches a case where they may not."""
    if host_desc_problems(args):
        return False
    threshold = hooks.current.host_desc_min_work
    threshold = HOST_DESC_MIN_WORK if threshold is None else threshold
    return (args["Q"].numel() * args["seqlen_k"]) >> args["HAS_HI"] >= threshold


def host_desc_problems(args: dict) -> list[str]:
    """Why host-made descriptors cannot describe Q, K and V (empty if they can): a stride-0 (broadcast)
    dimension, which a TMA descriptor cannot have."""
    broadcast = ", ".join(n for n in "QKV" if 0 in args[n].stride())
    return [f"HOST_DESC takes no stride-0 (broadcast) dimension, got one in {broadcast}"] if broadcast else []


def length_one(args: dict) -> bool:
    """Whether a sequence length is 1, which Triton specialises as a constant: Triton 3.6 cannot compile the
    WS_OVERLAP forward then, so those configs do not apply. Part of the tuning key."""
    return args["seqlen_q"] == 1 or args["seqlen_k"] == 1


def host_descriptors(args: dict, block_n: int) -> dict:
    """Q, K and V as [B, H, S, D] TMA descriptors made on the host (host_desc_boxes: boxes and layouts)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    q = args["Q"]
    dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    return {
        name: TensorDescriptor(
            args[name], list(args[name].shape), list(args[name].stride()), list(box), layout
        )
        for name, (box, layout) in host_desc_boxes(q.shape[3], block_n, dtype).items()
    }


@functools.cache  # the layouts cost more host time than the rest of a launch
def host_desc_boxes(head_dim: int, block_n: int, dtype) -> dict:
    """name -> (box, shared layout) of the HOST_DESC descriptors: 64 query rows (a consumer's) or block_n
    keys of one (batch, head), in the layout the kernel's shared tiles have. Shared: read it only."""
    from triton.experimental.gluon import language as gl

    boxes = {}
    for name, rows in (("Q", 64), ("K", block_n), ("V", block_n)):
        block = (1, 1, rows, head_dim)
        boxes[name] = (block, gl.NVMMASharedLayout.get_default_for(list(block), dtype))
    return boxes
