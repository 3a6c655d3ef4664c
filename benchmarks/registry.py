"""Shapes and providers of the attention benchmark.

A provider turns one shape into a function `fn(q, k, v) -> out` (BHSD in, BHSD out) that is ready to time:
anything expensive and shape-specific (compiling, building a block mask) happens in `make`, outside timing.

Only square shapes (seqlen_q == seqlen_k) are benchmarked: SDPA's `is_causal` and FlexAttention's
`q_idx >= kv_idx` are top-left aligned, ours bottom-right; the two agree exactly when the query and key
lengths are equal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# The FlashAttention-3 paper's shapes: 16k tokens per batch, hidden size 2048.
STANDARD_TOKENS = 16384
STANDARD_HIDDEN = 2048
STANDARD_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
STANDARD_HEAD_DIMS = (64, 128, 256)
PASSES = ("fwd", "bwd")
BACKWARD_FLOP_FACTOR = 2.5  # backward: 5 matmuls (S recomputed, dP, dV, dQ, dK) against the forward's 2

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    """One square attention problem: q, k, v are [batch, heads, seqlen, head_dim]."""

    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool

    def flops(self, pass_: str) -> float:
        """Matmul FLOPs: forward 4*B*H*S*S*D (two matmuls), halved for causal; backward 2.5x that."""
        fwd = 4.0 * self.batch * self.heads * self.seqlen * self.seqlen * self.head_dim
        if self.causal:
            fwd /= 2
        return fwd * BACKWARD_FLOP_FACTOR if pass_ == "bwd" else fwd

    def label(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"B{self.batch}-H{self.heads}-S{self.seqlen}-D{self.head_dim}-{mask}"


def standard_shapes(
    head_dims: tuple[int, ...],
    seqlens: tuple[int, ...],
    causals: tuple[bool, ...],
    tokens: int = STANDARD_TOKENS,
    hidden: int = STANDARD_HIDDEN,
) -> list[Shape]:
    """Fixed tokens per batch (B = tokens // S) and hidden size (H = hidden // D), so every shape has the
    same memory footprint and (non-causal) FLOPs grow linearly in S."""
    shapes = []
    for head_dim in head_dims:
        for causal in causals:
            for seqlen in seqlens:
                batch, heads = max(1, tokens // seqlen), max(1, hidden // head_dim)
                shapes.append(Shape(batch, heads, seqlen, head_dim, causal))
    return shapes


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    make: Callable[[Shape, torch.device], AttentionFn]


def _make_ours(shape: Shape, device: torch.device) -> AttentionFn:
    from flashattention import flash_attention

    causal = shape.causal
    return lambda q, k, v: flash_attention(q, k, v, causal=causal)


def _make_ours_torch(shape: Shape, device: torch.device) -> AttentionFn:
    from flashattention import flash_attention

    causal = shape.causal
    return lambda q, k, v: flash_attention(q, k, v, causal=causal, backend="torch")


def _make_sdpa_default(shape: Shape, device: torch.device) -> AttentionFn:
    """SDPA as a user calls it: PyTorch picks the backend (on the CPU, its flash kernel)."""
    from torch.nn.functional import scaled_dot_product_attention

    causal = shape.causal
    return lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=causal)


def _make_ours_prev(shape: Shape, device: torch.device) -> AttentionFn:
    """An earlier commit's package, copied and renamed by tools/prev_package.sh (on the path: .prev/)."""
    try:
        from flashattention_prev import flash_attention
    except ImportError as err:
        raise RuntimeError(
            "no flashattention_prev on the path: run `bash tools/prev_package.sh COMMIT` and add .prev to "
            "PYTHONPATH"
        ) from err
    causal = shape.causal
    return lambda q, k, v: flash_attention(q, k, v, causal=causal)


def _sdpa(backend_name: str) -> Callable[[Shape, torch.device], AttentionFn]:
    def make(shape: Shape, device: torch.device) -> AttentionFn:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention

        backend = getattr(SDPBackend, backend_name)
        causal = shape.causal

        def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # The backend is chosen in the forward; the backward follows it without the context.
            with sdpa_kernel(backend):
                return scaled_dot_product_attention(q, k, v, is_causal=causal)

        return fn

    return make


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _make_flex(shape: Shape, device: torch.device) -> AttentionFn:
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # One compile per shape (dynamic=False specialises on it). Resetting first keeps dynamo under its
    # recompile limit, past which it would silently run flex_attention eagerly (materialising the scores).
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    block_mask = None
    if shape.causal:
        seqlen = shape.seqlen
        block_mask = create_block_mask(_causal_mask_mod, None, None, seqlen, seqlen, device=device)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("ours", "flashattention.flash_attention (backend auto)", _make_ours),
        Provider(
            "ours-torch",
            "flashattention.flash_attention, backend torch (blockwise PyTorch)",
            _make_ours_torch,
        ),
        Provider(
            "ours-prev",
            "an earlier commit of ours (tools/prev_package.sh), defaults as it had them",
            _make_ours_prev,
        ),
        Provider("sdpa-flash", "SDPA, FLASH_ATTENTION backend (FlashAttention-2)", _sdpa("FLASH_ATTENTION")),
        Provider("sdpa-cudnn", "SDPA, CUDNN_ATTENTION backend", _sdpa("CUDNN_ATTENTION")),
        Provider("sdpa-efficient", "SDPA, EFFICIENT_ATTENTION backend", _sdpa("EFFICIENT_ATTENTION")),
        Provider("flex", "FlexAttention, torch.compile'd once per shape, causal block mask", _make_flex),
        Provider("sdpa-math", "SDPA, MATH backend (plain PyTorch; materialises the scores)", _sdpa("MATH")),
        Provider(
            "sdpa", "SDPA, its default backend choice (on the CPU: its flash kernel)", _make_sdpa_default
        ),
    )
}
GPU_PROVIDERS = ("ours", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex")
# on the CPU, auto runs SDPA itself on these square shapes: ours-torch shows the blockwise backend's speed
CPU_PROVIDERS = ("ours", "ours-torch", "sdpa")
# Peers that serve as the correctness reference for "ours", first that runs wins.
REFERENCE_CHAIN = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")
