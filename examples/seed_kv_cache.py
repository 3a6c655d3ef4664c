"""The seed's KV-cache and beam-search examples (the README's seed API), verbatim except for the device: on a
machine without a CUDA GPU they run on the CPU, with seq_len 128."""

import torch

from flashattention.flash_attention_v3 import (
    KVCache,
    flash_attention_with_kv_cache,
    incremental_attention,
    initialize_kv_cache,
    reorder_kv_cache,
    update_kv_cache,
)

device = "cuda" if torch.cuda.is_available() else "cpu"
batch_size, num_heads, seq_len, head_dim = 2, 8, 1024 if device == "cuda" else 128, 64

# Incremental decoding: a cache, one appended token, attention of one new query over it.
max_seq_len = 1024
kv_cache = initialize_kv_cache(batch_size, num_heads, max_seq_len, head_dim)
k_first = torch.randn(batch_size, num_heads, 1, head_dim, device=device)
v_first = torch.randn(batch_size, num_heads, 1, head_dim, device=device)
update_kv_cache(kv_cache, k_first, v_first)  # appends in place
q = torch.randn(batch_size, num_heads, 1, head_dim, device=device)
output = incremental_attention(q, kv_cache, causal=True)
print(f"incremental: output {tuple(output.shape)}, cache holds {kv_cache.length} of {kv_cache.capacity}")

# Prefill into a new cache, then expand it for beam search and reorder the beams.
q = torch.randn(batch_size, num_heads, seq_len, head_dim, device=device)
k = torch.randn(batch_size, num_heads, seq_len, head_dim, device=device)
v = torch.randn(batch_size, num_heads, seq_len, head_dim, device=device)
output, kv_cache = flash_attention_with_kv_cache(q, k, v, kv_cache=None, causal=True)

beam_size = 3
expanded_keys = kv_cache.keys.repeat_interleave(beam_size, dim=0)
expanded_values = kv_cache.values.repeat_interleave(beam_size, dim=0)
kv_cache = KVCache(expanded_keys, expanded_values)
beam_idx = torch.tensor([1, 0, 2, 5, 3, 4], device=device)
reorder_kv_cache(kv_cache, beam_idx)  # in place
print(f"beam search: output {tuple(output.shape)}, cache {kv_cache}")
