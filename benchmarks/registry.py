"""Shapes and providers of the attention benchmark.

A provider turns one shape into a function `fn(q, k, v) -> out` (BHSD in, BHSD out) that is ready to time:
anything expensive and shape-specific (compiling, building a block mask) happens in `make`, outside timing.

Only square shapes (seqlen_q == seqlen_k) are benchmarked: SDPA's `is_causal` and FlexAttention's
`q_idx >= kv_idx` are top-left aligned, ours bottom-right; the two agree exactly when the query and key
lengths are equal.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
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


def _package(module: str):
    """Our package, or ("flashattention_prev") an earlier commit's, copied and renamed by
    tools/prev_package.sh (on the path: .prev/)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if module == "flashattention":
            raise
        raise RuntimeError(
            f"no {module} on the path: run `bash tools/prev_package.sh COMMIT` and add .prev to PYTHONPATH"
        ) from err


def _make_ours_prev(shape: Shape, device: torch.device) -> AttentionFn:
    """An earlier commit's package (_package)."""
    flash_attention = _package("flashattention_prev").flash_attention
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


def _fa4_installed() -> bool:
    """FlashAttention-4 (`pip install flash-attn-4`: flash_attn.cute, CuTe DSL kernels) is importable."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:  # a flash_attn package without the cute subpackage
        return False


def _make_fa4(shape: Shape, device: torch.device) -> AttentionFn:
    """FlashAttention-4's flash_attn_func on BSHD views of our BHSD tensors (no copy; it returns out, lse)."""
    if not _fa4_installed():
        raise RuntimeError("FlashAttention-4 is not installed: pip install flash-attn-4")
    from flash_attn.cute import flash_attn_func

    causal = shape.causal

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        res = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return (res[0] if isinstance(res, tuple) else res).transpose(1, 2)

    return fn


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
        Provider("fa4", "FlashAttention-4 (flash-attn-4, CuTe DSL) on BSHD views", _make_fa4),
        Provider("sdpa-math", "SDPA, MATH backend (plain PyTorch; materialises the scores)", _sdpa("MATH")),
        Provider(
            "sdpa", "SDPA, its default backend choice (on the CPU: its flash kernel)", _make_sdpa_default
        ),
    )
}
# FA4 joins the default GPU set where it is installed (the strongest peer on Hopper and Blackwell)
GPU_PROVIDERS = ("ours", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex") + (
    ("fa4",) if _fa4_installed() else ()
)
# on the CPU, auto runs SDPA itself on these square shapes: ours-torch shows the blockwise backend's speed
CPU_PROVIDERS = ("ours", "ours-torch", "sdpa")
# Peers that serve as the correctness reference for "ours", first that runs wins.
REFERENCE_CHAIN = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")


# ----------------------------------------------------------------------------------------------------------
# Decode (`--suite decode`): one new query token per sequence over a cache of keys/values, GQA 32/8, D 128.

DECODE_HEADS, DECODE_KV_HEADS, DECODE_HEAD_DIM = 32, 8, 128
# (batch, cache length): batch 1 up to 128k tokens, and batches of 8k caches; the 1k rows are cheap.
DECODE_SHAPES = ((1, 1024), (8, 1024), (1, 8192), (1, 65536), (1, 131072), (8, 8192), (64, 8192))
DECODE_GPU_PROVIDERS = ("ours", "sdpa-flash", "sdpa-cudnn", "flex")
DECODE_CPU_PROVIDERS = ("ours", "sdpa-math")


@dataclass(frozen=True)
class DecodeShape:
    """q: [batch, heads, 1, head_dim] over k, v: [batch, kv_heads, cache, head_dim]."""

    batch: int
    cache: int
    heads: int = DECODE_HEADS
    kv_heads: int = DECODE_KV_HEADS
    head_dim: int = DECODE_HEAD_DIM

    def kv_bytes(self, element_size: int) -> int:
        """The K and V bytes one call must read: 2 * batch * kv_heads * cache * head_dim * element size."""
        return 2 * self.batch * self.kv_heads * self.cache * self.head_dim * element_size

    def label(self) -> str:
        return (
            f"{self.batch}x{self.cache // 1024}k" if self.cache % 1024 == 0 else f"{self.batch}x{self.cache}"
        )


# How a decode provider read K/V: "gqa" (the kv heads as they are) or "expanded" (repeated to the query
# heads beforehand, as a user of a backend without GQA would store them, so it reads heads/kv_heads times
# the bytes that the GB/s column counts).
DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DecodeProvider:
    name: str
    description: str
    make: Callable[[DecodeShape, torch.Tensor, torch.Tensor, torch.Tensor, str], tuple[DecodeFn, str]]


def _decode_ours(shape: DecodeShape, q, k, v, backend: str, module: str = "flashattention"):
    """module "flashattention_prev": an earlier commit's package (_package)."""
    flash_attention = _package(module).flash_attention

    def fn(q_, k_, v_):
        with torch.no_grad():  # an inference call of <= 16 queries: the split-KV decode kernel on triton
            return flash_attention(q_, k_, v_, backend=backend)

    return fn, "gqa"


def _decode_sdpa(backend_name: str):
    def make(shape: DecodeShape, q, k, v, backend: str) -> tuple[DecodeFn, str]:
        """enable_gqa=True where the backend takes it (tried once here), else K/V expanded to the query
        heads once, outside timing: what a user of that backend would keep in the cache."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention

        sdpa_backend = getattr(SDPBackend, backend_name)

        def gqa(q_, k_, v_):
            with sdpa_kernel(sdpa_backend):
                return scaled_dot_product_attention(q_, k_, v_, enable_gqa=True)

        try:
            gqa(q, k, v)
            return gqa, "gqa"
        except RuntimeError:
            pass
        group = shape.heads // shape.kv_heads
        k_exp, v_exp = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

        def expanded(q_, k_, v_):
            with sdpa_kernel(sdpa_backend):
                return scaled_dot_product_attention(q_, k_exp, v_exp)

        return expanded, "expanded"

    return make


def _decode_flex(shape: DecodeShape, q, k, v, backend: str) -> tuple[DecodeFn, str]:
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()  # one compile per shape, under dynamo's recompile limit (as _make_flex)
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return lambda q_, k_, v_: compiled(q_, k_, v_, enable_gqa=True), "gqa"


DECODE_PROVIDERS: dict[str, DecodeProvider] = {
    p.name: p
    for p in (
        DecodeProvider(
            "ours", "flash_attention, seqlen_q 1, no grad (incremental_attention's path)", _decode_ours
        ),
        DecodeProvider(
            "ours-prev",
            "an earlier commit of ours (tools/prev_package.sh), as ours",
            functools.partial(_decode_ours, module="flashattention_prev"),
        ),
        DecodeProvider("sdpa-flash", "SDPA, FLASH_ATTENTION backend", _decode_sdpa("FLASH_ATTENTION")),
        DecodeProvider("sdpa-cudnn", "SDPA, CUDNN_ATTENTION backend", _decode_sdpa("CUDNN_ATTENTION")),
        DecodeProvider(
            "sdpa-efficient", "SDPA, EFFICIENT_ATTENTION backend", _decode_sdpa("EFFICIENT_ATTENTION")
        ),
        DecodeProvider("flex", "FlexAttention, torch.compile'd once per shape, enable_gqa", _decode_flex),
        DecodeProvider("sdpa-math", "SDPA, MATH backend (plain PyTorch)", _decode_sdpa("MATH")),
    )
}
DECODE_REFERENCE_CHAIN = ("sdpa-flash", "sdpa-math")
