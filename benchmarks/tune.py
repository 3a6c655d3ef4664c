"""Checks and times every config of the autotune tables on this GPU (one call of the device tool).

For each (head dim, causal) it checks every config against a float32 reference with the tolerance rule
(max|ours - ref| <= 2 * max|sdpa_bf16 - ref| + floor) and times it beside SDPA flash and cuDNN.
Usage: PYTHONPATH=. python -m benchmarks.tune [--seqlen 4096] [--dims 64,128,256] [--kernels fwd,bwd_dkdv,bwd_dq]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from flashattention.kernels import configs, launch


def _tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def _sdpa(backend, q, k, v, causal):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--kernels", default="fwd,bwd_dkdv,bwd_dq")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    arch = configs.arch(dev)
    seqlen = args.seqlen
    rows = []
    for head_dim in [int(d) for d in args.dims.split(",")]:
        batch, heads = max(1, 16384 // seqlen), 2048 // head_dim
        for causal in (False, True):
            torch.manual_seed(0)
            q, k, v, do = (torch.randn(batch, heads, seqlen, head_dim, device=dev, dtype=torch.bfloat16)
                           for _ in range(4))
            qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
            with sdpa_kernel(SDPBackend.MATH):
                ref = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal)
            ref_grads = torch.autograd.grad(ref, (qf, kf, vf), do.float())
            qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
            peer = _sdpa(SDPBackend.FLASH_ATTENTION, qb, kb, vb, causal)
            peer_grads = torch.autograd.grad(peer, (qb, kb, vb), do)
            peer_err = [(peer.float() - ref).abs().max().item()] + [
                (a.float() - b).abs().max().item() for a, b in zip(peer_grads, ref_grads)]
            fl = 4 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
            scale = head_dim ** -0.5
            right = 0 if causal else -1
            pad = max(16, 1 << (head_dim - 1).bit_length())
            peers = {}
            for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    peers[name + "_fwd"] = _tflops(fl, do_bench(lambda: _sdpa(be, q, k, v, causal),
                                                                 warmup=25, rep=100))
                    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
                    o = _sdpa(be, qr, kr, vr, causal)
                    peers[name + "_bwd"] = _tflops(2.5 * fl, do_bench(
                        lambda: torch.autograd.grad(o, (qr, kr, vr), do, retain_graph=True), warmup=25, rep=100))
                except RuntimeError as exc:
                    print(f"peer {name} failed: {exc}")
            out, _, lse2 = launch.attention_forward(q, k, v, softmax_scale=scale, left=-1, right=right,
                                               config=configs.configs_for("fwd", arch, pad)[0])
            for kern in args.kernels.split(","):
                for cfg in configs.configs_for(kern, arch, pad):
                    flags = "".join(f" {f}" for f in ("USE_TMA", "WARP_SPECIALIZE") if cfg.kwargs.get(f))
                    label = (f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} "
                             f"s{cfg.num_stages}{flags.replace('USE_', '').replace('WARP_SPECIALIZE', 'WS')}")
                    try:
                        if kern == "fwd":
                            run = lambda: launch.attention_forward(q, k, v, softmax_scale=scale, left=-1,
                                                                   right=right, config=cfg)
                            o2, _, _ = run()
                            errs = [(o2.float() - ref).abs().max().item()]
                            bound = [2 * peer_err[0] + 1e-3]
                            flops = fl
                        else:
                            run = lambda: launch.attention_backward(do, q, k, v, out, lse2, softmax_scale=scale,
                                                                    left=-1, right=right,
                                                                    configs_override={kern: cfg})
                            grads = run()
                            errs = [(a.float() - b).abs().max().item() for a, b in zip(grads, ref_grads)]
                            bound = [2 * e + 1e-3 for e in peer_err[1:]]
                            flops = 2.5 * fl
                        ok = all(e <= b for e, b in zip(errs, bound)) and all(e == e for e in errs)
                        ms = do_bench(run, warmup=25, rep=100)
                        rows.append(dict(D=head_dim, causal=causal, S=seqlen, kernel=kern, config=label,
                                         ok=ok, tflops=_tflops(flops, ms), ms=ms, errs=errs, bound=bound,
                                         **peers))
                    except Exception as exc:  # a config that fails to compile is reported, not fatal
                        rows.append(dict(D=head_dim, causal=causal, S=seqlen, kernel=kern, config=label,
                                         ok=False, tflops=0.0, ms=0.0, error=str(exc)[:200], **peers))
                    r = rows[-1]
                    print(f"D{head_dim} causal={causal} {kern:9s} {label:20s} ok={r['ok']} "
                          f"{r['tflops']:6.1f} TFLOP/s {r.get('error', '')}", flush=True)
            del q, k, v, do, qf, kf, vf, ref, ref_grads, qb, kb, vb, peer, peer_grads, out, lse
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\n{torch.cuda.get_device_name()}  S={seqlen} bf16  (bwd kernels timed as the whole backward "
          f"with that kernel's config)")
    print("| D | causal | kernel | config | ok | TFLOP/s | flash fwd/bwd | cudnn fwd/bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['D']} | {r['causal']} | {r['kernel']} | {r['config']} | {r['ok']} | {r['tflops']:.0f} | "
              f"{r.get('flash_fwd', 0):.0f}/{r.get('flash_bwd', 0):.0f} | "
              f"{r.get('cudnn_fwd', 0):.0f}/{r.get('cudnn_bwd', 0):.0f} |")


if __name__ == "__main__":
    main()
