"""The "torch" backend: blockwise attention with an online softmax in plain PyTorch, forward and backward.

Runs on any device, in O(seqlen) extra memory (one [block_q, block_k] score tile per head at a time), and
skips key tiles that the mask hides entirely. Math in float32 (float64 inputs are not accepted by the API).
GQA is a broadcast over a [batch, kv_heads, group, ...] view, never a copy of K/V.
Varlen (packed sequences, cu_seqlens): one call per sequence on its slices (one host read of the offsets).
"""

from __future__ import annotations

import math

import torch

BLOCK_Q = 128
BLOCK_K = 256


def _key_range(q0: int, q1: int, seqlen_q: int, seqlen_k: int, left: int, right: int) -> tuple[int, int]:
    """Keys [lo, hi) that any query in [q0, q1) may see."""
    off = seqlen_k - seqlen_q
    lo = max(0, q0 + off - left) if left >= 0 else 0
    hi = min(seqlen_k, q1 - 1 + off + right + 1) if right >= 0 else seqlen_k
    return lo, max(lo, hi)


def _tile_mask(
    q0: int,
    q1: int,
    k0: int,
    k1: int,
    seqlen_q: int,
    seqlen_k: int,
    left: int,
    right: int,
    device: torch.device,
) -> torch.Tensor | None:
    """[q1-q0, k1-k0] bool visibility of a tile, or None when every pair is visible."""
    off = seqlen_k - seqlen_q
    if (left < 0 or k0 >= q1 - 1 + off - left) and (right < 0 or k1 - 1 <= q0 + off + right):
        return None
    i = torch.arange(q0, q1, device=device)[:, None] + off
    j = torch.arange(k0, k1, device=device)[None, :]
    mask = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, ...] -> [B, H_kv, group, ...], a view (splitting one dimension never needs a copy)."""
    return x.unflatten(1, (kv_heads, x.shape[1] // kv_heads))


def _matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


STATS_TO_LSE = 1.0  # the stats are the LSE


def forward_stats(q, k, v, *, softmax_scale: float, left: int, right: int, **varlen):
    """(out [B, H, Sq, D] in q.dtype, stats [B, H, Sq] float32): the stats the backward takes are the
    natural-log LSE itself. varlen (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k): packed q, k, v
    [total, heads, D], out [total_q, H, D], stats [H, total_q]."""
    if varlen:
        return _forward_varlen(q, k, v, softmax_scale, left, right, **varlen)
    b, h, seqlen_q, d = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    g = h // kv_heads
    acc_dtype = _matmul_dtype(q.dtype)
    out = torch.empty(b, kv_heads, g, seqlen_q, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, kv_heads, g, seqlen_q, dtype=torch.float32, device=q.device)
    qg = _grouped(q, kv_heads)
    kg, vg = k.unsqueeze(2), v.unsqueeze(2)  # [B, Hkv, 1, Sk, D]
    for q0 in range(0, seqlen_q, BLOCK_Q):
        q1 = min(q0 + BLOCK_Q, seqlen_q)
        qb = qg[:, :, :, q0:q1].to(acc_dtype) * softmax_scale
        m = torch.full(qb.shape[:-1], float("-inf"), dtype=acc_dtype, device=q.device)
        row_sum = torch.zeros_like(m)
        acc = torch.zeros(qb.shape, dtype=acc_dtype, device=q.device)
        lo, hi = _key_range(q0, q1, seqlen_q, seqlen_k, left, right)
        for k0 in range(lo, hi, BLOCK_K):
            k1 = min(k0 + BLOCK_K, hi)
            s = torch.matmul(qb, kg[:, :, :, k0:k1].to(acc_dtype).transpose(-1, -2))
            mask = _tile_mask(q0, q1, k0, k1, seqlen_q, seqlen_k, left, right, q.device)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            row_sum = row_sum * alpha + p.sum(dim=-1)
            acc = acc * alpha[..., None] + torch.matmul(p, vg[:, :, :, k0:k1].to(acc_dtype))
            m = m_new
        empty = row_sum == 0  # rows that see no key: output 0, lse -inf
        denom = torch.where(empty, torch.ones_like(row_sum), row_sum)
        out[:, :, :, q0:q1] = (acc / denom[..., None]).to(q.dtype)
        lse[:, :, :, q0:q1] = torch.where(empty, float("-inf"), m + torch.log(denom)).float()
    return out.view(b, h, seqlen_q, d), lse.view(b, h, seqlen_q)


def attention_backward(dout, q, k, v, out, lse, *, softmax_scale: float, left: int, right: int, **varlen):
    """Returns (dq, dk, dv), recomputing probabilities tile by tile from the saved lse (varlen: packed, as
    forward_stats')."""
    if varlen:
        return _backward_varlen(dout, q, k, v, out, lse, softmax_scale, left, right, **varlen)
    b, h, seqlen_q, d = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    acc_dtype = _matmul_dtype(q.dtype)
    qg, dog = _grouped(q, kv_heads), _grouped(dout, kv_heads)
    delta = (dout.to(acc_dtype) * out.to(acc_dtype)).sum(dim=-1)
    deltag = _grouped(delta.unsqueeze(-1), kv_heads).squeeze(-1)
    lseg = _grouped(lse.unsqueeze(-1), kv_heads).squeeze(-1)
    lseg = torch.where(torch.isinf(lseg), torch.full_like(lseg, math.inf), lseg)  # empty rows: p = 0
    dq = torch.zeros(qg.shape, dtype=acc_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
    for q0 in range(0, seqlen_q, BLOCK_Q):
        q1 = min(q0 + BLOCK_Q, seqlen_q)
        qb = qg[:, :, :, q0:q1].to(acc_dtype)
        # the scores rounded as the forward made them (scale first): at huge scores another rounding would
        # push exp(s - lse) past float range
        qb_scaled = qb * softmax_scale
        dob = dog[:, :, :, q0:q1].to(acc_dtype)
        lse_b = lseg[:, :, :, q0:q1, None].to(acc_dtype)
        delta_b = deltag[:, :, :, q0:q1, None]
        lo, hi = _key_range(q0, q1, seqlen_q, seqlen_k, left, right)
        for k0 in range(lo, hi, BLOCK_K):
            k1 = min(k0 + BLOCK_K, hi)
            kb = k[:, :, None, k0:k1].to(acc_dtype)
            vb = v[:, :, None, k0:k1].to(acc_dtype)
            s = torch.matmul(qb_scaled, kb.transpose(-1, -2))
            mask = _tile_mask(q0, q1, k0, k1, seqlen_q, seqlen_k, left, right, q.device)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            p = torch.exp(s - lse_b)  # [B, Hkv, G, bq, bk]
            dp = torch.matmul(dob, vb.transpose(-1, -2))
            ds = p * (dp - delta_b) * softmax_scale
            dq[:, :, :, q0:q1] += torch.matmul(ds, kb)
            dk[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qb).sum(dim=2)
            dv[:, :, k0:k1] += torch.matmul(p.transpose(-1, -2), dob).sum(dim=2)
    return dq.view(b, h, seqlen_q, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _sequences(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(q0, q1, k0, k1): each packed sequence's query and key rows (one host read of both offsets)."""
    qs, ks = torch.stack([cu_seqlens_q, cu_seqlens_k]).tolist()
    return [(qs[b], qs[b + 1], ks[b], ks[b + 1]) for b in range(len(qs) - 1)]


def _bhsd(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of a packed [total, heads, D] tensor as a [1, heads, end - start, D] view."""
    return t[start:end].transpose(0, 1).unsqueeze(0)


def _forward_varlen(q, k, v, softmax_scale, left, right, *, cu_seqlens_q, cu_seqlens_k, **_max_seqlens):
    total_q, h, d = q.shape
    out = torch.zeros(total_q, h, d, dtype=q.dtype, device=q.device)
    lse = torch.full((h, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    for q0, q1, k0, k1 in _sequences(cu_seqlens_q, cu_seqlens_k):
        if q1 > q0:
            o, stats = forward_stats(
                _bhsd(q, q0, q1), _bhsd(k, k0, k1), _bhsd(v, k0, k1),
                softmax_scale=softmax_scale, left=left, right=right,
            )  # fmt: skip
            out[q0:q1] = o[0].transpose(0, 1)
            lse[:, q0:q1] = stats[0]
    return out, lse


def _backward_varlen(
    dout, q, k, v, out, lse, softmax_scale, left, right, *, cu_seqlens_q, cu_seqlens_k, **_max_seqlens
):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for q0, q1, k0, k1 in _sequences(cu_seqlens_q, cu_seqlens_k):
        if q1 > q0 and k1 > k0:
            grads = attention_backward(
                _bhsd(dout, q0, q1), _bhsd(q, q0, q1), _bhsd(k, k0, k1), _bhsd(v, k0, k1),
                _bhsd(out, q0, q1), lse[None, :, q0:q1],
                softmax_scale=softmax_scale, left=left, right=right,
            )  # fmt: skip
            for full, grad, start, end in zip((dq, dk, dv), grads, (q0, k0, k0), (q1, k1, k1), strict=True):
                full[start:end] = grad[0].transpose(0, 1)
    return dq, dk, dv
