"""Checks of flash_attention_varlen's packed inputs: q, k, v [total, heads, head_dim] and the cu_seqlens
offsets with their max_seqlen bounds. The offsets are read on the host (one device sync): a kernel
indexing with a bad offset would read or write outside its tensors. The read is kept for the offset tensors
it came from while they stay unmodified (same objects, same version counters): a model passes one
cu_seqlens to every layer, and each read would leave the GPU idle while the host launches what follows."""

from __future__ import annotations

import weakref

import torch

WHAT = "flash_attention_varlen"


def check_varlen_qkv(q: object, k: object, v: object) -> None:
    """Types, ranks, dtypes, devices and shapes of packed q [total_q, heads, head_dim] and k, v [total_k,
    kv_heads, head_dim]."""
    from . import MAX_HEAD_DIM, MIN_HEAD_DIM, check_dtype, check_one_dtype_and_device, check_tensors

    check_tensors(WHAT, q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(
                f"{WHAT}: `{name}` must be packed with 3 dimensions (total_tokens, heads, head_dim), got "
                f"shape {tuple(t.shape)}. Pack [batch, seqlen, heads, head_dim] sequences with "
                f"`{name}.flatten(0, 1)` (and cu_seqlens at multiples of seqlen), or use flash_attention for "
                f"padded batches."
            )
        check_dtype(WHAT, name, t)
    check_one_dtype_and_device(WHAT, q, k, v)
    if k.shape != v.shape:
        raise ValueError(
            f"{WHAT}: k and v must have the same shape (total_k, kv_heads, head_dim), got k {tuple(k.shape)} "
            f"and v {tuple(v.shape)}."
        )
    heads, head_dim = q.shape[1], q.shape[2]
    if k.shape[2] != head_dim:
        raise ValueError(
            f"{WHAT}: q and k/v must have the same head_dim, got q head_dim={head_dim} and k/v "
            f"head_dim={k.shape[2]}. Project them to one head size first."
        )
    kv_heads = k.shape[1]
    if kv_heads == 0 or heads % kv_heads != 0:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0] if heads else "[...]"
        raise ValueError(
            f"{WHAT}: the number of query heads must be a multiple of the number of key/value heads "
            f"(GQA/MQA), got H={heads} (q.shape[1]) and H_kv={kv_heads} (k.shape[1]). Try H_kv in {divisors}."
        )
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"{WHAT}: head_dim must be between {MIN_HEAD_DIM} and {MAX_HEAD_DIM}, got {head_dim}. Pad a "
            f"smaller head dim with zeros (and pass the original softmax_scale), or split a larger one."
        )


def _check_offsets_tensor(name: str, cu_seqlens: object, device: torch.device) -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(
            f"{WHAT}: `{name}` must be a torch.Tensor of int32 offsets, got {type(cu_seqlens).__name__}. Use "
            f"`torch.tensor([0, len_0, len_0 + len_1, ...], dtype=torch.int32, device=q.device)`."
        )
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(
            f"{WHAT}: `{name}` must be int32 (flash-attn's layout), got dtype {cu_seqlens.dtype}. Use "
            f"`{name}.to(torch.int32)`."
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
        raise ValueError(
            f"{WHAT}: `{name}` must be 1-D with batch + 1 offsets (at least [0]), got shape "
            f"{tuple(cu_seqlens.shape)}."
        )
    if cu_seqlens.device != device:
        raise ValueError(
            f"{WHAT}: `{name}` must be on q's device ({device}), got {cu_seqlens.device}. Move it with "
            f"`{name}.to({str(device)!r})`."
        )


def _check_offsets(name: str, offsets: list[int], total: int, tensor: str) -> int:
    """offsets (the host copy): start at 0, non-decreasing, end at total; returns the longest sequence."""
    if offsets[0] != 0:
        raise ValueError(f"{WHAT}: `{name}` must start at 0, got {name}[0] = {offsets[0]}. Prepend a 0.")
    lengths = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    bad = next((i for i, n in enumerate(lengths) if n < 0), None)
    if bad is not None:
        raise ValueError(
            f"{WHAT}: `{name}` must be non-decreasing (sequence b is rows {name}[b] to {name}[b + 1]), got "
            f"{name}[{bad}] = {offsets[bad]} > {name}[{bad + 1}] = {offsets[bad + 1]}. Build it with "
            f"`torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)`."
        )
    if offsets[-1] != total:
        raise ValueError(
            f"{WHAT}: the last offset of `{name}` must be the number of packed tokens of {tensor} "
            f"({tensor}.shape[0] = {total}), got {name}[-1] = {offsets[-1]}."
        )
    return max(lengths, default=0)


def check_cu_seqlens(
    cu_seqlens_q: object,
    cu_seqlens_k: object,
    max_seqlen_q: object,
    max_seqlen_k: object,
    q: torch.Tensor,
    k: torch.Tensor,
) -> tuple[int, int]:
    """cu_seqlens_q/k: int32 [batch + 1] on q's device, from 0, non-decreasing, ending at total_q / total_k;
    max_seqlen_q/k: ints at least the longest sequence's query / key count. Reads both offsets on the host
    (one sync). Returns the longest sequence's (query count, key count)."""
    _check_offsets_tensor("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_offsets_tensor("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"{WHAT}: cu_seqlens_q and cu_seqlens_k must both hold batch + 1 offsets (one batch), got "
            f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}. A sequence without queries or keys is an "
            f"empty range (two equal offsets)."
        )
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"{WHAT}: `{name}` must be a non-negative int (the longest sequence's length), got "
                f"{type(value).__name__} {value!r}. Pass a Python int, e.g. `int(...)`."
            )
        if value < 0:
            raise ValueError(
                f"{WHAT}: `{name}` must be a non-negative int (the longest sequence's length), got {value}. "
                f"Pass `int((cu[1:] - cu[:-1]).max())`."
            )
    offsets_q, offsets_k = _host_offsets(cu_seqlens_q, cu_seqlens_k)
    longest_q = _check_offsets("cu_seqlens_q", offsets_q, q.shape[0], "q")
    longest_k = _check_offsets("cu_seqlens_k", offsets_k, k.shape[0], "k")
    for name, value, longest in (
        ("max_seqlen_q", max_seqlen_q, longest_q),
        ("max_seqlen_k", max_seqlen_k, longest_k),
    ):
        if value < longest:
            raise ValueError(
                f"{WHAT}: `{name}` must be at least the longest sequence's length, {longest} (from "
                f"cu_seqlens), got {value}. Pass `int((cu[1:] - cu[:-1]).max())`."
            )
    return longest_q, longest_k


# the last offsets read: (weak references to the two tensors, their versions) and the host lists
_last_read: tuple = ()


def cacheable(t: torch.Tensor) -> bool:
    """Whether a read of t is kept: a device tensor (a CPU read costs no sync, and numpy views write CPU
    tensors without a new version) with a version counter (inference tensors have none)."""
    return t.device.type != "cpu" and not t.is_inference()


def _host_offsets(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> tuple[list[int], list[int]]:
    """Both offset tensors as host lists: read (one sync), or the last read where it came from these very
    device tensors and neither has been written since (an in-place write bumps a tensor's version counter;
    a write that bypasses PyTorch, such as a custom kernel's, does not: the kernels keep every sequence
    inside the packed tensors whatever the offsets, README "Varlen")."""
    global _last_read
    if not (cacheable(cu_seqlens_q) and cacheable(cu_seqlens_k)):
        return tuple(torch.stack([cu_seqlens_q, cu_seqlens_k]).tolist())
    versions = (cu_seqlens_q._version, cu_seqlens_k._version)
    if _last_read:
        ref_q, ref_k, last_versions, offsets = _last_read
        if ref_q() is cu_seqlens_q and ref_k() is cu_seqlens_k and last_versions == versions:
            return offsets
    offsets = tuple(torch.stack([cu_seqlens_q, cu_seqlens_k]).tolist())
    _last_read = (weakref.ref(cu_seqlens_q), weakref.ref(cu_seqlens_k), versions, offsets)
    return offsets
