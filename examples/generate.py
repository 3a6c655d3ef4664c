"""Text generation through the KV cache: a small decoder-only transformer with random weights (RMSNorm, rotary
positions, GQA attention through flashattention, a SwiGLU MLP), greedy decoding and beam search, prompts of
different lengths in one batch (the cache keeps each row's own length).

    python examples/generate.py                                      # CUDA + triton on a GPU, else torch
    python examples/generate.py --cache paged --block-size 16        # a PagedKVCache per layer
    TRITON_INTERPRET=1 python examples/generate.py --backend triton  # the kernels on the CPU (interpreter)

Prefill runs causal attention over the right-padded prompts without a cache (a real token never sees the
padding after it) and stores their keys/values; each decode step appends one token per row at that row's
position and attends over the row's own tokens (flash_attention_with_kv_cache). The model reaches the cache
only through `LayerCaches`: `DenseCaches` (one KVCache per layer) or `PagedCaches` (one PagedKVCache per
layer: beam search then reorders block tables and shares blocks instead of copying rows).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from flashattention import (
    KVCache,
    PagedKVCache,
    flash_attention,
    flash_attention_with_kv_cache,
    reorder_kv_cache,
)

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Config:
    vocab: int = 97
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    mlp: int = 128
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


class LayerCaches(Protocol):
    """What generation needs from a KV cache that holds every layer's keys and values for `batch` rows.

    DenseCaches implements it with one KVCache per layer. A paged cache (blocks of a shared pool and a block
    table per row, e.g. a `PagedKVCache`) is another implementation of these four members, passed to
    `greedy` / `beam_search` as their `make_caches` argument; the model does not change."""

    @property
    def seqlens(self) -> torch.Tensor:
        """int32 [batch]: the tokens each row holds, i.e. the position of its next token."""

    def store_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> None:
        """Keeps a layer's keys/values of right-padded prompts, k, v [batch, kv_heads, padded_len, head_dim],
        of which row b's first lengths[b] (int32 [batch]) positions are real."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Appends one token per row (k, v [batch, kv_heads, 1, head_dim]) to the layer's cache and returns
        the attention of q [batch, heads, 1, head_dim] over each row's tokens, the new one included."""

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Row b of every layer becomes old row beam_idx[b] (beam search)."""


MakeCaches = Callable[..., LayerCaches]


class _PerLayer:
    """What DenseCaches and PagedCaches share: one cache per layer in self.layers, used through the seed
    API's functions (which take a KVCache or a PagedKVCache alike)."""

    layers: list
    backend: str

    @property
    def seqlens(self) -> torch.Tensor:
        return self.layers[0].cache_seqlens

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, _ = flash_attention_with_kv_cache(q, k, v, self.layers[layer], backend=self.backend)
        return out

    def reorder(self, beam_idx: torch.Tensor) -> None:
        for cache in self.layers:
            reorder_kv_cache(cache, beam_idx)


class DenseCaches(_PerLayer):
    """One KVCache per layer, [batch, kv_heads, capacity, head_dim] storage with per-row lengths: room for
    the longest prompt and every new token, so appends never grow it."""

    def __init__(self, cfg: Config, batch: int, capacity: int, dtype: torch.dtype, device, backend: str):
        self.cfg, self.batch, self.capacity = cfg, batch, capacity
        self.dtype, self.device, self.backend = dtype, device, backend
        self.layers: list[KVCache | None] = [None] * cfg.layers

    def store_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> None:
        shape = (self.batch, self.cfg.kv_heads, self.capacity, self.cfg.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        keys[:, :, : k.shape[2]], values[:, :, : v.shape[2]] = k, v
        self.layers[layer] = KVCache(keys, values, cache_seqlens=lengths)


class PagedCaches(_PerLayer):
    """One PagedKVCache per layer (blocks of block_size tokens): the prompts are appended with per-row
    counts, beam reorders share blocks (a shared partly filled tail is copied on the next append)."""

    def __init__(
        self,
        cfg: Config,
        batch: int,
        capacity: int,
        dtype: torch.dtype,
        device,
        backend: str,
        block_size: int = 16,
    ):
        self.backend = backend
        per_row = -(-capacity // block_size)
        # every row holding capacity tokens in blocks of its own is the most a generation can take
        self.layers = [
            PagedKVCache(
                batch,
                cfg.kv_heads,
                cfg.head_dim,
                num_blocks=batch * per_row,
                block_size=block_size,
                max_blocks_per_seq=per_row,
                dtype=dtype,
                device=device,
            )
            for _ in range(cfg.layers)
        ]

    def store_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> None:
        self.layers[layer].append(k, v, num_new=lengths.tolist())


def paged(block_size: int) -> MakeCaches:
    """make_caches for greedy / beam_search: PagedCaches with blocks of block_size tokens."""
    return lambda *args: PagedCaches(*args, block_size=block_size)


class TinyDecoder(torch.nn.Module):
    """Decoder-only transformer, pre-norm: x += attn(norm(x)); x += mlp(norm(x)); logits = head(norm(x))."""

    def __init__(self, cfg: Config, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)

        def weight(rows: int, cols: int) -> torch.nn.Parameter:  # variance-preserving random init
            return torch.nn.Parameter(torch.randn(rows, cols, generator=gen) / math.sqrt(rows))

        d, h, hkv = cfg.head_dim, cfg.heads, cfg.kv_heads
        self.embed = torch.nn.Parameter(torch.randn(cfg.vocab, cfg.hidden, generator=gen))
        self.blocks = torch.nn.ModuleList()
        for _ in range(cfg.layers):
            block = torch.nn.ParameterDict(
                {
                    "attn_norm": torch.nn.Parameter(1 + 0.1 * torch.randn(cfg.hidden, generator=gen)),
                    "wqkv": weight(cfg.hidden, (h + 2 * hkv) * d),
                    "wo": weight(h * d, cfg.hidden),
                    "mlp_norm": torch.nn.Parameter(1 + 0.1 * torch.randn(cfg.hidden, generator=gen)),
                    "w_gate": weight(cfg.hidden, cfg.mlp),
                    "w_up": weight(cfg.hidden, cfg.mlp),
                    "w_down": weight(cfg.mlp, cfg.hidden),
                }
            )
            self.blocks.append(block)
        self.final_norm = torch.nn.Parameter(torch.ones(cfg.hidden))
        self.head = weight(cfg.hidden, cfg.vocab)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """tokens, positions: int [batch, seq]; attend(layer, q, k, v) does the attention (q [batch, heads,
        seq, head_dim], k, v [batch, kv_heads, seq, head_dim], rotary applied). Returns float32 logits
        [batch, seq, vocab]."""
        cfg = self.cfg
        dtype = self.embed.dtype
        x = self.embed[tokens]  # [batch, seq, hidden]
        cos, sin = _rotary(positions, cfg.head_dim, cfg.rope_base, dtype)
        for layer, block in enumerate(self.blocks):
            qkv = _rms_norm(x, block["attn_norm"]) @ block["wqkv"]
            qkv = qkv.unflatten(-1, (cfg.heads + 2 * cfg.kv_heads, cfg.head_dim)).transpose(1, 2)
            q, k, v = qkv.split([cfg.heads, cfg.kv_heads, cfg.kv_heads], dim=1)  # BHSD views
            out = attend(layer, _rotate(q, cos, sin), _rotate(k, cos, sin), v.contiguous())
            x = x + out.transpose(1, 2).flatten(2) @ block["wo"]
            y = _rms_norm(x, block["mlp_norm"])
            x = x + (F.silu(y @ block["w_gate"]) * (y @ block["w_up"])) @ block["w_down"]
        return (_rms_norm(x, self.final_norm) @ self.head).float()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _rotary(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos, sin [batch, 1, seq, head_dim // 2] of the rotation angles position * base^(-2i / head_dim)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device) / head_dim)
    angles = positions[:, None, :, None].float() * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [batch, heads, seq, head_dim]: pairs (x_i, x_{i + head_dim/2}) rotated."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _causal(backend: str) -> Attend:
    """Attention without a cache: each query sees the keys at and before its position."""
    return lambda layer, q, k, v: flash_attention(q, k, v, causal=True, backend=backend)


@dataclass
class Trace:
    """Every step of a generation: sequences[s][r] is row r's tokens (prompt and generated) after step s,
    logits[s][r] the model's next-token logits after them (float32 [vocab]), computed through the cache."""

    sequences: list[list[list[int]]]
    logits: list[torch.Tensor]

    def record(self, rows: list[list[int]], logits: torch.Tensor) -> None:
        self.sequences.append([list(r) for r in rows])
        self.logits.append(logits.detach().cpu())


def _prefill(model: TinyDecoder, prompts: list[list[int]], caches: LayerCaches, backend: str) -> torch.Tensor:
    """Stores the prompts' keys/values in `caches`; returns the logits after each prompt [batch, vocab]."""
    device = model.embed.device
    padded = max(map(len, prompts))
    tokens = torch.tensor([p + [0] * (padded - len(p)) for p in prompts], device=device)  # right-padded
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=device)
    positions = torch.arange(padded, device=device).expand(len(prompts), -1)
    causal = _causal(backend)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        caches.store_prompt(layer, k, v, lengths)
        return causal(layer, q, k, v)

    logits = model(tokens, positions, attend)
    return logits[torch.arange(len(prompts), device=device), lengths.long() - 1]


def _decode_step(model: TinyDecoder, tokens: torch.Tensor, caches: LayerCaches) -> torch.Tensor:
    """Appends tokens (int [batch], one per row) through the cache; returns the next logits [batch, vocab]."""
    positions = caches.seqlens.long()[:, None]  # a copy: the cache's lengths advance in place
    return model(tokens[:, None], positions, caches.attend)[:, 0]


def greedy(
    model: TinyDecoder,
    prompts: list[list[int]],
    new_tokens: int,
    backend: str = "auto",
    make_caches: MakeCaches = DenseCaches,
) -> Trace:
    """Greedy decoding of every prompt (different lengths allowed) for new_tokens tokens, in one batch."""
    device, dtype = model.embed.device, model.embed.dtype
    caches = make_caches(model.cfg, len(prompts), max(map(len, prompts)) + new_tokens, dtype, device, backend)
    trace, rows = Trace([], []), [list(p) for p in prompts]
    with torch.no_grad():
        logits = _prefill(model, prompts, caches, backend)
        trace.record(rows, logits)
        for _ in range(new_tokens):
            tokens = logits.argmax(-1)
            for row, token in zip(rows, tokens.tolist(), strict=True):
                row.append(token)
            logits = _decode_step(model, tokens, caches)
            trace.record(rows, logits)
    return trace


def beam_search(
    model: TinyDecoder,
    prompts: list[list[int]],
    beams: int,
    new_tokens: int,
    backend: str = "auto",
    make_caches: MakeCaches = DenseCaches,
) -> tuple[Trace, list[list[int]]]:
    """Beam search with `beams` beams per prompt (row p * beams + j is beam j of prompt p), scored by the
    sum of log-probabilities. Returns the trace and each prompt's best sequence."""
    device, dtype = model.embed.device, model.embed.dtype
    batch, vocab = len(prompts), model.cfg.vocab
    rows = [list(p) for p in prompts for _ in range(beams)]
    caches = make_caches(model.cfg, len(rows), max(map(len, prompts)) + new_tokens, dtype, device, backend)
    # beams of a prompt start identical: only beam 0 competes at the first step
    scores = torch.full((batch, beams), -math.inf, device=device)
    scores[:, 0] = 0.0
    trace = Trace([], [])
    with torch.no_grad():
        logits = _prefill(model, rows, caches, backend)
        trace.record(rows, logits)
        for _ in range(new_tokens):
            total = scores[:, :, None] + logits.log_softmax(-1).view(batch, beams, vocab)
            scores, best = total.flatten(1).topk(beams, dim=-1)  # [batch, beams]
            parents = (torch.arange(batch, device=device)[:, None] * beams + best // vocab).flatten()
            tokens = (best % vocab).flatten()
            caches.reorder(parents)
            rows = [rows[p] + [t] for p, t in zip(parents.tolist(), tokens.tolist(), strict=True)]
            logits = _decode_step(model, tokens, caches)
            trace.record(rows, logits)
    winners = scores.argmax(-1).tolist()
    return trace, [rows[p * beams + j] for p, j in enumerate(winners)]


def recompute(model: TinyDecoder, rows: list[list[int]], backend: str) -> torch.Tensor:
    """The next-token logits after each row [rows, vocab], from the whole sequences without a cache (one
    causal forward over the right-padded rows)."""
    device = model.embed.device
    padded = max(map(len, rows))
    tokens = torch.tensor([r + [0] * (padded - len(r)) for r in rows], device=device)
    positions = torch.arange(padded, device=device).expand(len(rows), -1)
    with torch.no_grad():
        logits = model(tokens, positions, _causal(backend))
    last = torch.tensor([len(r) - 1 for r in rows], device=device)
    return logits[torch.arange(len(rows), device=device), last]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--cache", default="dense", choices=["dense", "paged"])
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block of the paged cache")
    args = parser.parse_args()
    make_caches = DenseCaches if args.cache == "dense" else paged(args.block_size)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = TinyDecoder(Config()).to(device=args.device, dtype=dtype)
    prompts = [[5, 17, 42, 8, 1], [63], [9, 9, 30]]
    print(f"TinyDecoder {Config()}, {dtype}, {args.device}, backend {args.backend}, {args.cache} cache")
    trace = greedy(model, prompts, args.new_tokens, args.backend, make_caches)
    for prompt, row in zip(prompts, trace.sequences[-1], strict=True):
        print(f"greedy  {prompt} -> {row[len(prompt) :]}")
    _, best = beam_search(model, prompts, args.beams, args.new_tokens, args.backend, make_caches)
    for prompt, row in zip(prompts, best, strict=True):
        print(f"beam {args.beams}  {prompt} -> {row[len(prompt) :]}")
    drift = (trace.logits[-1] - recompute(model, trace.sequences[-1], args.backend).cpu()).abs().max()
    print(f"last greedy step: max |cached - recomputed| logits = {drift.item():.3g}")


if __name__ == "__main__":
    main()
