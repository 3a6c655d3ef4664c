"""The seed's first example (the README's seed API), verbatim except for the device: on a machine without
a CUDA GPU it runs on the CPU, with seq_len 128."""

import torch

from flashattention.flash_attention_v3 import flash_attention

device = "cuda" if torch.cuda.is_available() else "cpu"

batch_size, num_heads, seq_len, head_dim = 2, 8, 1024, 64
if device == "cpu":
    seq_len = 128
q = torch.randn(batch_size, num_heads, seq_len, head_dim, device=device)
k = torch.randn(batch_size, num_heads, seq_len, head_dim, device=device)
v = torch.randn(batch_size, num_heads, seq_len, head_dim, device=device)
output = flash_attention(q, k, v, causal=True)  # note: float32 inputs

print(f"output: {tuple(output.shape)}, {output.dtype}, on {output.device}")
