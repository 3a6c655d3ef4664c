"""Hugging Face transformers: this package's attention as an `attn_implementation`.

```python
import flashattention.integrations.transformers as fa_hf

name = fa_hf.register()  # "fa_triton"
model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=name)
```

The name: the issue asked for "flashattention", but transformers (>= 5) treats every `attn_implementation`
that contains "flash" as a request for the flash-attn package or a flash kernel from the Hub
(`transformers.utils.generic.is_flash_attention_requested` is `"flash" in name`): model construction then
tries to import or download that kernel and raises ("Could not find the currently requested flash attention
implementation at `flashattention`"), and generation and masking take flash-specific paths. So the name is
"fa_triton" (flashattention's Triton kernels; on the CPU its PyTorch backend runs them).

`register()` registers two things under the name: the attention function (`flashattention_forward`) in
transformers' AttentionInterface, and transformers' own `sdpa_mask` in its AttentionMaskInterface (a custom
name without a mask function would get no mask at all, which would silently ignore padding). transformers
then calls the attention with BHSD query [batch, heads, seqlen_q, head_dim] and key/value [batch, kv_heads,
seqlen_k, head_dim] (the cache included) and the mask SDPA would get; it returns (out [batch, seqlen_q,
heads, head_dim], None). Masks:

- None (no padding; transformers skips the mask where SDPA's is_causal expresses it): causal attention, as
  SDPA computes it (its top-left is_causal; with seqlen_q == seqlen_k or one query, our bottom-right rule
  is the same; a prefill into a longer static cache reads only its first seqlen_q keys, as SDPA does).
- A 4-D mask that is exactly, per batch row b, "keys [start_b, end_b), causal bottom-right at end_b (or not
  causal for a bidirectional module), sliding window of `sliding_window` keys" (left padding from
  `generate`, a static cache's unused tail, sliding windows; a mask of batch 1 applies to every row, as
  SDPA broadcasts it): our kernels, one call when every row is
  [0, seqlen_k), else one varlen call (each row's queries, its key range gathered into packed K/V: one
  gather of K and of V, ~the cost of reading them once more). The mask is compared element for element with
  that pattern (one device sync per distinct mask; the layers of one forward share it).
- Any other mask (right padding, whose causal diagonal starts at key 0 rather than ending at the row's
  last key; packed sequences, custom masks, float biases): routed to transformers' SDPA attention, which
  computes it exactly, with a one-time warning. Nothing is approximated.

output_attentions=True gets no attention weights (a one-time warning says so), as with transformers' SDPA.

Unsupported (NotImplementedError): dropout > 0 (train with attention_dropout=0.0), softcap, s_aux (sinks),
position_bias.
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref

import torch

from .. import _validation_compat as _vc
from .._validation.varlen import cacheable
from ..api import flash_attention, flash_attention_varlen

ATTN_IMPLEMENTATION = "fa_triton"

__all__ = ["ATTN_IMPLEMENTATION", "flashattention_forward", "register"]


def register(name: str = ATTN_IMPLEMENTATION, *, backend: str = "auto") -> str:
    """Registers the attention (with `backend`, "auto" | "triton" | "torch") and transformers' SDPA mask
    function under `name` (default "fa_triton"; a name containing "flash" raises ValueError, see the module
    docstring). Returns the name, for `attn_implementation=`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if "flash" in name:
        raise ValueError(
            f"register: transformers treats an attn_implementation containing 'flash' ({name!r}) as a "
            f"request for the flash-attn package or a Hub kernel and fails to load it; pick a name without "
            f"'flash' "
            f"(default {ATTN_IMPLEMENTATION!r})."
        )
    _vc.check_backend_name("register", backend)
    AttentionInterface.register(name, functools.partial(flashattention_forward, backend=backend))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def flashattention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    *,
    backend: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The AttentionInterface function: query [batch, heads, seqlen_q, head_dim], key/value [batch, kv_heads,
    seqlen_k, head_dim], the mask transformers' sdpa_mask made (see the module docstring). Returns (out
    [batch, seqlen_q, heads, head_dim] (a transposed view), None). Other keyword arguments that transformers
    passes along (position_ids, cache details, output_attentions) are not used by the attention."""
    what = "flashattention_forward"
    _vc.check_unsupported(
        what,
        dropout=dropout,
        softcap=softcap,
        s_aux=kwargs.get("s_aux"),
        position_bias=kwargs.get("position_bias"),
    )
    if kwargs.get("output_attentions"):
        _warn_no_weights()
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, _, seqlen_q, _ = query.shape
    seqlen_k = key.shape[2]
    _vc.check_hf_mask(what, attention_mask, batch, seqlen_q, seqlen_k)
    left = sliding_window - 1 if sliding_window else -1
    call = dict(softmax_scale=scaling, backend=backend)
    if attention_mask is None:
        # SDPA's rule: causal only with several queries, top-left aligned (keys past seqlen_q unread)
        causal = bool(is_causal) and seqlen_q > 1
        if causal and seqlen_k > seqlen_q:
            key, value = key[:, :, :seqlen_q], value[:, :, :seqlen_q]
        out = flash_attention(query, key, value, causal=causal, **call)
        return out.transpose(1, 2), None
    rows = _mask_rows(attention_mask, bool(is_causal), left)
    if rows is None:
        _warn_fallback()
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal
        )
    window = (left, 0 if is_causal else -1)
    starts, ends = rows
    if len(starts) == 1 and batch > 1:  # a mask of batch 1 applies to every row, as SDPA broadcasts it
        starts, ends = starts * batch, ends * batch
    if all(s == 0 for s in starts) and all(e == seqlen_k for e in ends):
        out = flash_attention(query, key, value, window_size=window, **call)
        return out.transpose(1, 2), None
    return _ranges_as_varlen(query, key, value, starts, ends, window, call), None


def _ranges_as_varlen(query, key, value, starts, ends, window, call) -> torch.Tensor:
    """Row b's queries over its keys [starts[b], ends[b]) (bottom-right at ends[b]) for every row in one
    varlen call: each row's seqlen_q queries as one sequence (a view of BSHD-laid query, else one copy), its
    key range gathered into packed K/V (one gather each). Returns out [batch, seqlen_q, heads, head_dim]."""
    batch, heads, seqlen_q, head_dim = query.shape
    lengths = [e - s for s, e in zip(starts, ends, strict=True)]
    device, total = query.device, sum(lengths)
    cu_seqlens_k = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    # packed key i belongs to row rows[i], at position starts[row] + (i - cu_seqlens_k[row]) (no host loop)
    count = torch.tensor(lengths, device=device)
    rows = torch.repeat_interleave(torch.arange(batch, device=device), count, output_size=total)
    first = torch.tensor(starts, device=device) - cu_seqlens_k[:-1]
    positions = torch.arange(total, device=device) + first[rows]
    k, v = key[rows, :, positions], value[rows, :, positions]  # [total_k, kv_heads, head_dim]
    cu_seqlens_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=device)
    q = query.transpose(1, 2).reshape(batch * seqlen_q, heads, head_dim)
    out = flash_attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, seqlen_q, max(max(lengths), 1), window_size=window, **call
    )
    return out.view(batch, seqlen_q, heads, head_dim)


# The last mask seen and its rows: every layer of a forward gets the same mask tensor.
_LAST: dict = {}


def _mask_rows(mask: torch.Tensor, causal: bool, left: int) -> tuple[list[int], list[int]] | None:
    """(starts, ends) when `mask` [batch, 1 or heads, seqlen_q, seqlen_k] is exactly, per row b, keys
    [start_b, end_b), causal bottom-right at end_b when `causal`, within `left` keys before the diagonal
    when left >= 0; None when it is anything else. One device sync, cached for the same unchanged device
    mask (as the varlen offsets' read: not for CPU or inference tensors)."""
    if not cacheable(mask):
        return _infer_rows(mask, causal, left)
    key = (mask.data_ptr(), mask._version, tuple(mask.shape), mask.dtype, causal, left)
    ref = _LAST.get("mask")
    if ref is not None and ref() is mask and _LAST.get("key") == key:
        return _LAST["rows"]
    rows = _infer_rows(mask, causal, left)
    _LAST.update(mask=weakref.ref(mask), key=key, rows=rows)
    return rows


def _infer_rows(mask: torch.Tensor, causal: bool, left: int) -> tuple[list[int], list[int]] | None:
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        # additive masks: 0 = attend; anything else must be a "never" value (-inf or the dtype's min)
        never = (mask == float("-inf")) | (mask <= torch.finfo(mask.dtype).min / 2)
        if not bool(((mask == 0) | never).all()):
            return None
        allowed = mask == 0
    else:
        return None
    if allowed.shape[1] != 1:
        if not bool((allowed == allowed[:, :1]).all()):
            return None
    allowed = allowed[:, 0]  # [batch, seqlen_q, seqlen_k]
    batch, seqlen_q, seqlen_k = allowed.shape
    columns = torch.arange(seqlen_k, device=allowed.device)
    any_row = allowed.any(dim=1)  # [batch, seqlen_k]: keys some query sees
    starts = torch.where(any_row, columns, seqlen_k).amin(dim=1)
    ends = torch.where(any_row, columns + 1, 0).amax(dim=1)
    ends = torch.maximum(ends, starts)  # a row that sees nothing: [seqlen_k, seqlen_k)
    j = columns[None, None, :]
    diagonal = torch.arange(seqlen_q, device=allowed.device)[None, :, None] + (ends - seqlen_q)[:, None, None]
    pattern = (j >= starts[:, None, None]) & (j < ends[:, None, None]) & torch.ones_like(allowed)
    if causal:
        pattern &= j <= diagonal
    if left >= 0:
        pattern &= j >= diagonal - left
    if not torch.equal(pattern, allowed):
        return None
    bounds = torch.stack([starts, ends]).tolist()
    return bounds[0], bounds[1]


@functools.cache
def _warn_fallback() -> None:
    warnings.warn(
        "flashattention (transformers integration): an attention mask that is not per-row key ranges with a "
        "causal/sliding-window pattern (e.g. packed sequences) runs on transformers' SDPA attention instead "
        "(exact). This warning is shown once.",
        stacklevel=3,
    )


@functools.cache
def _warn_no_weights() -> None:
    warnings.warn(
        "flashattention (transformers integration): output_attentions=True returns no attention weights (the "
        "kernels never form them); load the model with attn_implementation='eager' to get them. This warning "
        "is shown once.",
        stacklevel=3,
    )
