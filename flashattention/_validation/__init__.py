"""Every input check of the public API. Each error names the argument, what was expected, what was given
and how to fix it. A check that reads tensor data on the host (beam indices, lengths, cu_seqlens) says so:
one device sync. The KV-cache checks live in _validation/cache.py and the varlen checks in
_validation/varlen.py, both re-exported at the end."""

from __future__ import annotations

import difflib
import math

import torch

from .. import _env

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256
BACKENDS = ("auto", "triton", "torch")


LAYOUTS = ("bhsd", "bshd")
# flash_attention's keywords, in the order of its signature (a test keeps the two in step)
FLASH_ATTENTION_KEYWORDS = ("causal", "softmax_scale", "window_size", "return_lse", "backend", "layout")
# torch.nn.functional.scaled_dot_product_attention's keywords -> what flash_attention takes instead
SDPA_KEYWORDS = {
    "is_causal": "pass causal=True instead. Ours is bottom-right aligned (query i sees keys j <= i + "
    "seqlen_k - seqlen_q): the same as SDPA's top-left is_causal when seqlen_q == seqlen_k",
    "attn_mask": "arbitrary masks are not supported; the masks are causal=True and window_size=(left, "
    "right) (a sliding window, -1 = unbounded). For other masks use torch.nn.functional."
    "scaled_dot_product_attention or FlexAttention",
    "dropout_p": "dropout is not supported: flash_attention computes attention without dropout (SDPA's "
    "dropout_p=0.0). Leave it out, or apply dropout elsewhere",
    "scale": "pass softmax_scale= instead (the same factor on q.k, default 1/sqrt(head_dim))",
    "enable_gqa": "leave it out: GQA/MQA is automatic when k and v have fewer heads than q (heads % "
    "kv_heads == 0), without copying K/V",
}


def check_keywords(unknown: dict) -> None:
    """flash_attention takes no keyword beyond FLASH_ATTENTION_KEYWORDS: SDPA's names get what to pass
    instead, any other name Python's wording, the closest valid name and the list of valid ones."""
    if not unknown:
        return
    valid = ", ".join(FLASH_ATTENTION_KEYWORDS)
    lines = []
    for name in unknown:
        if name in SDPA_KEYWORDS:
            lines.append(f"flash_attention() got SDPA's keyword argument {name!r}: {SDPA_KEYWORDS[name]}.")
        else:
            close = difflib.get_close_matches(name, FLASH_ATTENTION_KEYWORDS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            lines.append(f"flash_attention() got an unexpected keyword argument {name!r}.{hint}")
    raise TypeError("\n".join(lines) + f"\nValid keyword arguments: {valid}.")


def check_layout(layout: object) -> None:
    """`layout` names the order of q, k, v's dimensions: "bhsd" or "bshd"."""
    if layout not in LAYOUTS:
        raise ValueError(
            f"flash_attention: `layout` must be 'bhsd' ([batch, heads, seqlen, head_dim], as SDPA) or 'bshd' "
            f"([batch, seqlen, heads, head_dim], as flash-attn), got {layout!r}."
        )


def _axes(layout: str, heads: str, seqlen: str) -> str:
    """The dimension names of a q/k/v tensor in `layout`, e.g. (batch, heads, seqlen, head_dim)."""
    middle = (heads, seqlen) if layout == "bhsd" else (seqlen, heads)
    return f"(batch, {middle[0]}, {middle[1]}, head_dim)"


def check_dtype(what: str, name: str, t: torch.Tensor) -> None:
    """`t` (argument `name` of `what`) holds one of SUPPORTED_DTYPES."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{what}: `{name}` has dtype {t.dtype}; supported are float16, bfloat16 and float32. Convert "
            f"with `{name}.to(torch.bfloat16)` (or float16/float32)."
        )


def check_tensors(what: str, **tensors: object) -> None:
    """Each keyword argument (its name as the caller spells it) is a dense (strided) torch.Tensor."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: `{name}` must be a torch.Tensor, got {type(t).__name__}.")
        if t.layout != torch.strided:
            raise TypeError(
                f"{what}: `{name}` must be a dense (strided) tensor, got layout {t.layout}. Convert it with "
                f"`{name}.to_dense()`."
            )


def check_twins(what: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    """a and b (keys and values) have one shape, dtype and device."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"{what}: {a_name} and {b_name} must have one shape, dtype and device, got {a_name} "
            f"{tuple(a.shape)} {a.dtype} on {a.device} and {b_name} {tuple(b.shape)} {b.dtype} on {b.device}."
        )


def check_same_place(what: str, name: str, t: torch.Tensor, other: str, like: torch.Tensor, fix: str) -> None:
    """`t` (named `name`) has the dtype and device of `like` (described as `other`), else TypeError (another
    dtype) or ValueError (another device), with `fix`."""
    if t.dtype != like.dtype or t.device != like.device:
        error = TypeError if t.dtype != like.dtype else ValueError
        raise error(
            f"{what}: {name} must match {other} ({like.dtype} on {like.device}), got {t.dtype} on "
            f"{t.device}. {fix}"
        )


def check_one_dtype_and_device(what: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k and v share one dtype and one device."""
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"{what}: q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}. Convert "
            f"them to one dtype first, e.g. `k = k.to(q.dtype)`."
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{what}: q, k and v must be on one device, got q on {q.device}, k on {k.device}, v on "
            f"{v.device}. Move them with `.to(q.device)`."
        )


def check_qkv(q: object, k: object, v: object, layout: str = "bhsd", what: str = "flash_attention") -> None:
    """Checks types, ranks, dtypes, devices and shapes of q, k, v in `layout` (BHSD or BSHD); errors name
    `what` (the public function called)."""
    check_tensors(what, q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            other = (
                "for (batch, seqlen, heads, head_dim) data pass layout='bshd'"
                if layout == "bhsd"
                else "for (batch, heads, seqlen, head_dim) data leave layout='bhsd'"
            )
            raise ValueError(
                f"{what}: `{name}` must have 4 dimensions {_axes(layout, 'heads', 'seqlen')} "
                f"(layout={layout!r}), got shape {tuple(t.shape)}. For a single sequence add a batch "
                f"dimension with `{name}[None]`; {other}."
            )
        check_dtype(what, name, t)
    check_one_dtype_and_device(what, q, k, v)
    heads_axis = 1 if layout == "bhsd" else 2
    batch, heads, head_dim = q.shape[0], q.shape[heads_axis], q.shape[3]
    if k.shape != v.shape:
        raise ValueError(
            f"{what}: k and v must have the same shape {_axes(layout, 'kv_heads', 'seqlen_k')}, "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}."
        )
    if k.shape[0] != batch:
        raise ValueError(
            f"{what}: q and k/v must have the same batch size, got q batch={batch} and k/v "
            f"batch={k.shape[0]}."
        )
    if k.shape[3] != head_dim:
        raise ValueError(
            f"{what}: q and k/v must have the same head_dim, got q head_dim={head_dim} and k/v "
            f"head_dim={k.shape[3]}. Project them to one head size first."
        )
    kv_heads = k.shape[heads_axis]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"{what}: the number of query heads must be a multiple of the number of key/value "
            f"heads (GQA/MQA), got H={heads} and H_kv={kv_heads} (dimension {heads_axis} with "
            f"layout={layout!r}). Try H_kv in "
            f"{[d for d in range(1, heads + 1) if heads % d == 0] if heads else '[...]'}."
        )
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"{what}: head_dim must be between {MIN_HEAD_DIM} and {MAX_HEAD_DIM}, got {head_dim}. "
            f"Pad a smaller head dim with zeros (and pass the original softmax_scale), or split a larger one."
        )


# softmax_scale's range: softmax_scale * log2(e) a normal float32 (the kernels' score scale)
SCALE_MIN = 2.0**-126
SCALE_MAX = 3.4028234663852886e38 / math.log2(math.e)


def check_scale(softmax_scale: object, head_dim: int, what: str = "flash_attention") -> float:
    """Returns the softmax scale, 1/sqrt(head_dim) by default."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(
            f"{what}: `softmax_scale` must be a float or None, got {type(softmax_scale).__name__}. "
            f"Pass a Python float, e.g. `softmax_scale=float(scale)`."
        )
    try:
        scale = float(softmax_scale)
    except OverflowError:  # an int past float range
        scale = math.inf
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"{what}: `softmax_scale` must be a finite number > 0, got {softmax_scale}. Use None "
            f"for the default 1/sqrt(head_dim); for a negative scale pass -q with scale -softmax_scale."
        )
    if not SCALE_MIN <= scale <= SCALE_MAX:
        raise ValueError(
            f"{what}: `softmax_scale` must be between {SCALE_MIN:.3g} and {SCALE_MAX:.3g} (the "
            f"kernels scale the scores by softmax_scale * log2(e) in float32, which must be a normal float32 "
            f"number), got {softmax_scale}. Scale q instead (q * s with softmax_scale=1.0 is the same "
            f"attention)."
        )
    return scale


def check_mask_types(what: str, causal: object, window_size: object) -> None:
    """causal a bool and window_size a pair of ints (flash_attention's and flash-attn's functions alike)."""
    if not isinstance(causal, bool):
        raise TypeError(f"{what}: `causal` must be a bool, got {type(causal).__name__}.")
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)
    ):
        raise TypeError(
            f"{what}: `window_size` must be a pair of ints (left, right), -1 meaning unbounded, got "
            f"{window_size!r}."
        )


def check_int(what: str, name: str, value: object, least: int = 0) -> int:
    """An int (not a bool; TypeError) >= least (ValueError)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{what}: `{name}` must be an int >= {least}, got {type(value).__name__} {value!r}. Pass a "
            f"Python int, e.g. `{name}=int(...)`."
        )
    if value < least:
        raise ValueError(f"{what}: `{name}` must be an int >= {least}, got {value!r}.")
    return value


def check_bool(what: str, name: str, value: object) -> None:
    """A flag: a bool (True or False), not any truthy object."""
    if not isinstance(value, bool):
        raise TypeError(f"{what}: `{name}` must be a bool, got {type(value).__name__} {value!r}.")


def canonical_window(causal: object, window_size: object, what: str = "flash_attention") -> tuple[int, int]:
    """Folds (causal, window_size) into one (left, right) pair, -1 meaning unbounded."""
    check_mask_types(what, causal, window_size)
    left, right = window_size
    for name, w in (("left", left), ("right", right)):
        if w < -1:
            raise ValueError(
                f"{what}: window_size {name}={w} is invalid: expected -1 (unbounded) or a "
                f"non-negative number of keys."
            )
    if causal:
        if right > 0:
            raise ValueError(
                f"{what}: causal=True means window right=0, but window_size={tuple(window_size)} "
                f"asks for right={right}. Pass causal=False with window_size=({left}, {right}), or right=0."
            )
        right = 0
    return left, right


def check_functorch(what: str) -> None:
    """No torch.func transform but grad is active: the attention Function has no vmap rule nor forward-mode
    formula (called in the backward too, which jacrev runs under vmap)."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    unsupported = {
        TransformType.Vmap: "vmap (which jacrev and hessian use)",
        TransformType.Jvp: "jvp / jacfwd",
    }
    found = [unsupported[i.key()] for i in retrieve_all_functorch_interpreters() if i.key() in unsupported]
    if found:
        raise NotImplementedError(
            f"{what}: torch.func.{found[0]} is not supported (the attention has no batching rule nor "
            f"forward-mode derivative); torch.func.grad works, with backend='torch'. For a batch of problems "
            f"use the batch dimension, or loop over them."
        )


def pick_backend(backend: object, device: torch.device, what: str = "flash_attention") -> str:
    """Resolves "auto" and checks that an explicit backend can run on `device`; never falls back."""
    if backend not in BACKENDS:
        raise ValueError(f"{what}: `backend` must be one of {BACKENDS}, got {backend!r}.")
    check_functorch(what)
    interpret = _env.interpreter_requested()
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        if device.type == "cpu" and not interpret:
            raise ValueError(
                f"{what}: backend='triton' needs CUDA tensors, got tensors on cpu. Use "
                "backend='torch' (or 'auto') on the CPU, or set TRITON_INTERPRET=1 before importing triton "
                "to run the kernels in Triton's (slow) interpreter."
            )
        if device.type not in ("cuda", "cpu"):
            raise NotImplementedError(
                f"{what}: backend='triton' supports CUDA devices, got {device}. Use backend='torch'."
            )
        if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
            raise NotImplementedError(
                f"{what}: backend='triton' does not run under torch.func transforms (grad, vmap, "
                "jacrev, ...): the kernels cannot take their wrapped tensors. Use backend='torch' under "
                "torch.func.grad (vmap, jvp, jacrev and jacfwd run on neither backend), or "
                "torch.autograd.grad / .backward() for gradients."
            )
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise NotImplementedError(
                f"{what}: backend='triton' needs the `triton` package, which is not installed. "
                "Install it with `pip install triton`, or use backend='torch'."
            ) from exc
    return backend


INDEX_DTYPES = (torch.int32, torch.int64)
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_row_values(
    what: str,
    name: str,
    t: object,
    batch_size: int,
    device: torch.device,
    meaning: str,
    dtypes: tuple[torch.dtype, ...] = INDEX_DTYPES,
) -> torch.Tensor:
    """`t`: a 1-D tensor of batch_size values (`meaning`, e.g. "token counts") of `dtypes`, on `device` (the
    cache's) or the CPU. Returns it unchanged; the caller checks the values' range."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{what}: `{name}` must be a torch.Tensor of {meaning}, one per cache row, got "
            f"{type(t).__name__}. Use `torch.tensor(values, dtype=torch.int32)`."
        )
    check_tensors(what, **{name: t})  # dense
    if t.dtype not in dtypes:
        kinds = "int32 or int64" if dtypes == INDEX_DTYPES else "integer"
        raise TypeError(
            f"{what}: `{name}` must hold {kinds} {meaning}, got dtype {t.dtype}. Use "
            f"`{name}.to(torch.int32)`."
        )
    if t.dim() != 1 or t.numel() != batch_size:
        raise ValueError(
            f"{what}: `{name}` must be 1-D with one value per cache row (shape ({batch_size},)), got shape "
            f"{tuple(t.shape)}."
        )
    if t.device not in (device, torch.device("cpu")):
        raise ValueError(
            f"{what}: `{name}` must be on the cache's device ({device}) or the CPU, got {t.device}. Move it "
            f"with `{name}.to({str(device)!r})`."
        )
    return t


def check_value_range(what: str, name: str, t: torch.Tensor, low: int, high: int, why: str = "") -> int:
    """Every value of `t` in [low, high] (one device sync); returns the largest (low - 1 when empty)."""
    if t.numel() == 0:
        return low - 1
    lowest, highest = torch.stack([t.min(), t.max()]).tolist()
    if lowest < low or highest > high:
        raise ValueError(
            f"{what}: `{name}` values must be in [{low}, {high}]{why}, got min {lowest} and max {highest}."
        )
    return highest


# ----------------------------------------------------------------------------------------------------------
# KV caches: _validation/cache.py
from .cache import check_beam_idx as check_beam_idx  # noqa: E402
from .cache import check_block_table as check_block_table  # noqa: E402
from .cache import check_block_table_tensor as check_block_table_tensor  # noqa: E402
from .cache import check_cache_dims as check_cache_dims  # noqa: E402
from .cache import check_cache_length as check_cache_length  # noqa: E402
from .cache import check_cache_seqlens as check_cache_seqlens  # noqa: E402
from .cache import check_cache_storage as check_cache_storage  # noqa: E402
from .cache import check_cache_tensors as check_cache_tensors  # noqa: E402
from .cache import check_captured_append as check_captured_append  # noqa: E402
from .cache import check_distinct_storage as check_distinct_storage  # noqa: E402
from .cache import check_fork as check_fork  # noqa: E402
from .cache import check_index as check_index  # noqa: E402
from .cache import check_kv_cache as check_kv_cache  # noqa: E402
from .cache import check_new_cache_seqlens as check_new_cache_seqlens  # noqa: E402
from .cache import check_num_new as check_num_new  # noqa: E402
from .cache import check_paged_backend as check_paged_backend  # noqa: E402
from .cache import check_paged_dims as check_paged_dims  # noqa: E402
from .cache import check_paged_grad as check_paged_grad  # noqa: E402
from .cache import check_pool_room as check_pool_room  # noqa: E402
from .cache import check_pools as check_pools  # noqa: E402
from .cache import check_prompt_queries as check_prompt_queries  # noqa: E402
from .cache import check_row_room as check_row_room  # noqa: E402
from .cache import check_rows as check_rows  # noqa: E402
from .cache import check_seqlens_backend as check_seqlens_backend  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# Varlen (packed sequences): _validation/varlen.py
from .varlen import check_cu_seqlens as check_cu_seqlens  # noqa: E402
from .varlen import check_varlen_qkv as check_varlen_qkv  # noqa: E402
