"""Every input check of the public API. Each error names the argument, what was expected, what was given
and how to fix it. Nothing here touches tensor data (no device sync)."""

from __future__ import annotations

import math

import torch

from . import _env

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256
BACKENDS = ("auto", "triton", "torch")


def check_qkv(q: object, k: object, v: object) -> None:
    """Checks types, ranks, dtypes, devices and shapes of BHSD q, k, v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention: `{name}` must be a torch.Tensor, got {type(t).__name__}.")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"flash_attention: `{name}` must have 4 dimensions (batch, heads, seqlen, head_dim), got "
                f"shape {tuple(t.shape)}. For a single sequence add a batch dimension with `{name}[None]`; "
                f"for (batch, seqlen, heads, head_dim) data pass `{name}.transpose(1, 2)` (a view, no copy)."
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"flash_attention: `{name}` has dtype {t.dtype}; supported are float16, bfloat16 and "
                f"float32. Convert with `{name}.to(torch.bfloat16)` (or float16/float32)."
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"flash_attention: q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}. "
            f"Convert them to one dtype first, e.g. `k = k.to(q.dtype)`."
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"flash_attention: q, k and v must be on one device, got q on {q.device}, k on {k.device}, "
            f"v on {v.device}. Move them with `.to(q.device)`."
        )
    batch, heads, _, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"flash_attention: k and v must have the same shape (batch, kv_heads, seqlen_k, head_dim), "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}."
        )
    if k.shape[0] != batch:
        raise ValueError(
            f"flash_attention: q and k/v must have the same batch size, got q batch={batch} and k/v "
            f"batch={k.shape[0]}."
        )
    if k.shape[3] != head_dim:
        raise ValueError(
            f"flash_attention: q and k/v must have the same head_dim, got q head_dim={head_dim} and k/v "
            f"head_dim={k.shape[3]}. Project them to one head size first."
        )
    kv_heads = k.shape[1]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"flash_attention: the number of query heads must be a multiple of the number of key/value "
            f"heads (GQA/MQA), got H={heads} and H_kv={kv_heads}. Try H_kv in "
            f"{[d for d in range(1, heads + 1) if heads % d == 0] if heads else '[...]'}."
        )
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"flash_attention: head_dim must be between {MIN_HEAD_DIM} and {MAX_HEAD_DIM}, got {head_dim}. "
            f"Pad a smaller head dim with zeros (and pass the original softmax_scale), or split a larger one."
        )


def check_scale(softmax_scale: object, head_dim: int) -> float:
    """Returns the softmax scale, 1/sqrt(head_dim) by default."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(
            f"flash_attention: `softmax_scale` must be a float or None, got {type(softmax_scale).__name__}. "
            f"Pass a Python float, e.g. `softmax_scale=float(scale)`."
        )
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(
            f"flash_attention: `softmax_scale` must be a finite number > 0, got {softmax_scale}. Use None "
            f"for the default 1/sqrt(head_dim); for a negative scale pass -q with scale -softmax_scale."
        )
    return float(softmax_scale)


def canonical_window(causal: object, window_size: object) -> tuple[int, int]:
    """Folds (causal, window_size) into one (left, right) pair, -1 meaning unbounded."""
    if not isinstance(causal, bool):
        raise TypeError(f"flash_attention: `causal` must be a bool, got {type(causal).__name__}.")
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)
    ):
        raise TypeError(
            f"flash_attention: `window_size` must be a pair of ints (left, right), -1 meaning unbounded, "
            f"got {window_size!r}."
        )
    left, right = window_size
    for name, w in (("left", left), ("right", right)):
        if w < -1:
            raise ValueError(
                f"flash_attention: window_size {name}={w} is invalid: expected -1 (unbounded) or a "
                f"non-negative number of keys."
            )
    if causal:
        if right > 0:
            raise ValueError(
                f"flash_attention: causal=True means window right=0, but window_size={tuple(window_size)} "
                f"asks for right={right}. Pass causal=False with window_size=({left}, {right}), or right=0."
            )
        right = 0
    return left, right


def pick_backend(backend: object, device: torch.device) -> str:
    """Resolves "auto" and checks that an explicit backend can run on `device`; never falls back."""
    if backend not in BACKENDS:
        raise ValueError(f"flash_attention: `backend` must be one of {BACKENDS}, got {backend!r}.")
    interpret = _env.interpreter_requested()
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        if device.type == "cpu" and not interpret:
            raise ValueError(
                "flash_attention: backend='triton' needs CUDA tensors, got tensors on cpu. Use "
                "backend='torch' (or 'auto') on the CPU, or set TRITON_INTERPRET=1 before importing triton "
                "to run the kernels in Triton's (slow) interpreter."
            )
        if device.type not in ("cuda", "cpu"):
            raise NotImplementedError(
                f"flash_attention: backend='triton' supports CUDA devices, got {device}. Use backend='torch'."
            )
        if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
            raise NotImplementedError(
                "flash_attention: backend='triton' does not run under torch.func transforms (grad, vmap, "
                "jacrev, ...): the kernels cannot take their wrapped tensors. Use backend='torch' inside "
                "the transform, or torch.autograd.grad / .backward() for gradients."
            )
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise NotImplementedError(
                "flash_attention: backend='triton' needs the `triton` package, which is not installed. "
                "Install it with `pip install triton`, or use backend='torch'."
            ) from exc
    return backend


def check_cache_dims(batch_size: object, num_heads: object, max_seq_len: object, head_dim: object) -> None:
    """Sizes given to initialize_kv_cache."""
    for name, value in (
        ("batch_size", batch_size),
        ("num_heads", num_heads),
        ("max_seq_len", max_seq_len),
        ("head_dim", head_dim),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"initialize_kv_cache: `{name}` must be a non-negative int, got {value!r}.")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"initialize_kv_cache: head_dim must be between {MIN_HEAD_DIM} and {MAX_HEAD_DIM}, "
            f"got {head_dim}."
        )


def check_cache_tensors(what: str, keys: object, values: object, like: torch.Tensor | None = None) -> None:
    """keys/values of a cache or of an append: [batch, kv_heads, seqlen, head_dim], one dtype and device;
    with `like` (the cache storage), batch, heads, head_dim, dtype and device must match it."""
    for name, t in (("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: `{name}` must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"{what}: `{name}` must have 4 dimensions (batch, kv_heads, seqlen, head_dim), got shape "
                f"{tuple(t.shape)}."
            )
    if keys.shape != values.shape or keys.dtype != values.dtype or keys.device != values.device:
        raise ValueError(
            f"{what}: keys and values must have one shape, dtype and device, got keys "
            f"{tuple(keys.shape)} {keys.dtype} on {keys.device} and values {tuple(values.shape)} "
            f"{values.dtype} on {values.device}."
        )
    if like is None:
        return
    b, h, _, d = like.shape
    if (keys.shape[0], keys.shape[1], keys.shape[3]) != (b, h, d):
        raise ValueError(
            f"{what}: new keys/values must be (batch={b}, kv_heads={h}, seqlen, head_dim={d}) to match the "
            f"cache, got {tuple(keys.shape)}."
        )
    if keys.dtype != like.dtype or keys.device != like.device:
        raise TypeError(
            f"{what}: new keys/values are {keys.dtype} on {keys.device} but the cache holds {like.dtype} on "
            f"{like.device}. Convert them with `.to(dtype=..., device=...)` or create the cache with "
            f"initialize_kv_cache(..., dtype=..., device=...)."
        )


def check_beam_idx(beam_idx: object, batch_size: int) -> None:
    """A 1-D integer tensor of length batch_size with values in [0, batch_size). Syncs once (host check)."""
    if not isinstance(beam_idx, torch.Tensor):
        raise TypeError(
            f"reorder_kv_cache: `beam_idx` must be a torch.Tensor, got {type(beam_idx).__name__}."
        )
    if beam_idx.dtype.is_floating_point or beam_idx.dtype.is_complex or beam_idx.dtype == torch.bool:
        raise TypeError(
            f"reorder_kv_cache: `beam_idx` must hold integers, got dtype {beam_idx.dtype}. Use "
            f"`beam_idx.long()`."
        )
    if beam_idx.dim() != 1 or beam_idx.numel() != batch_size:
        raise ValueError(
            f"reorder_kv_cache: `beam_idx` must be 1-D with one index per cache row (length {batch_size}), "
            f"got shape {tuple(beam_idx.shape)}."
        )
    if batch_size:
        lowest, highest = int(beam_idx.min()), int(beam_idx.max())
        if lowest < 0 or highest >= batch_size:
            raise ValueError(
                f"reorder_kv_cache: `beam_idx` values must be in [0, {batch_size}), got min {lowest} and "
                f"max {highest}."
            )
