"""Plain PyTorch attention: the test oracle. Materialises the full score matrix; shares no code with the
kernels or the blockwise backend. Use float64 on the CPU (or float32 on the GPU) for reference values."""

from __future__ import annotations

import math

import torch


def visible_mask(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool,
    window_size: tuple[int, int],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[seqlen_q, seqlen_k] bool: True where query i may see key j (bottom-right aligned)."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diag = i + (seqlen_k - seqlen_q)
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= diag - left
    if right >= 0:
        mask &= j <= diag + right
    return mask


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    causal: bool = False, softmax_scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns (out, lse) for BHSD inputs, computed in float64 when upcast (else in the input dtype).

    Query rows that see no key give out 0 and lse -inf. K/V heads are repeated for GQA (fine for an oracle).
    """
    dtype = torch.float64 if upcast else q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    group = q.shape[1] // k.shape[1]
    kk = k.to(dtype).repeat_interleave(group, dim=1)
    vv = v.to(dtype).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(dtype), kk.transpose(-1, -2)) * scale
    mask = visible_mask(q.shape[2], k.shape[2], causal, window_size, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.float() if not upcast else scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key: softmax of all -inf is NaN
    out = torch.matmul(probs, vv)
    return out, lse
