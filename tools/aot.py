"""Compiles every kernel config of the autotune tables (and the candidates) for Hopper (sm_90a) on a machine
without a GPU, and reports what the compiler says: shared memory, registers and spills (ptxas -v), and the
count of wgmma / ex2 / cp.async (pipelined loads) instructions in the PTX. Pointers and strides are
specialised as divisible by 16, as a launch with aligned tensors is. Run it with the device's triton
version. Costs no device time; catches configs that cannot fit before they reach a GPU.

Usage: python -m tools.aot [--tables sm90,sm90-fp32] [--dims 64,128,256] [--kernels fwd,bwd_dkdv,bwd_dq]
       [--candidates] [--defaults] [--varlen]
Exit code 1 when a config does not compile or does not fit shared memory (spills are reported, not failed).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flashattention.kernels import configs, registry
from tools.tune import candidates_for

SHARED_LIMIT = 232448  # bytes a block may use on an H100 (227 KB)
SM_SHARED, SM_REGS, SM_WARPS = 233472, 65536, 64  # what one H100 SM has (228 KB; 1 KB more per block)


def blocks_per_sm(shared: int, regs: int, warps: int) -> int:
    """Resident blocks (programs) per SM, by shared memory, registers (given per warp in units of 256) and
    warps: with 1, nothing hides one program's prologue (first loads) and epilogue (stores)."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    return min(SM_SHARED // (shared + 1024), SM_REGS // (regs_per_warp * warps), SM_WARPS // warps)


FP32_POINTERS = {"LSE2", "DELTA", "DQ_ACC"}
INT32_POINTERS = {"CU_SEQLENS_Q", "CU_SEQLENS_K", "DQ_TURNS"}
VARLEN_ARGS = {"CU_SEQLENS_Q", "CU_SEQLENS_K", "max_seqlen_q"}  # None (constexpr) in a dense launch
FLOAT_SCALARS = {"qk_scale", "softmax_scale"}


def _ptxas_report(ptx: str) -> tuple[int, int, bool]:
    """(registers, spill bytes, serialized) from ptxas -v on the PTX; serialized: ptxas made every wgmma wait
    for the one before it (its C7512 warning, e.g. for want of registers to keep several in flight)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", path, "-o", os.devnull], capture_output=True, text=True, check=True
        )
    regs = re.search(r"Used (\d+) registers", result.stderr)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr)]
    serialized = "wgmma.mma_async instructions are serialized" in result.stderr
    return (int(regs.group(1)) if regs else -1), sum(spills), serialized


def _compile_sm90(fn, signature: dict, constexprs: dict, config, aligned_scalars=(), source_type=ASTSource):
    """Compiles fn for sm_90a as a launch with 16-byte aligned tensors and strides specialises it: every
    pointer, each stride of the tuple arguments and the scalars named in aligned_scalars divisible by 16
    (without it Triton can neither vectorise the loads nor pipeline them)."""
    index = {name: i for i, name in enumerate(fn.arg_names)}
    aligned = [(index[n],) for n, ty in signature.items() if isinstance(ty, str) and ty.startswith("*")]
    aligned += [(index[n], j) for n, ty in signature.items() if isinstance(ty, tuple) for j in range(len(ty))]
    aligned += [(index[n],) for n in aligned_scalars]
    src = source_type(
        fn=fn,
        signature=signature,
        constexprs={(index[k],): v for k, v in constexprs.items()},
        attrs={path: [["tt.divisibility", 16]] for path in aligned},
    )
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_config(
    kernel: str,
    config: triton.Config,
    head_dim_pad: int,
    fp32: bool,
    mask: str = "hi",
    aligned_lengths=False,
    fp16=False,
    varlen=False,
) -> dict:
    """Compiles `config` for sm_90a as a launch with 16-byte aligned tensors would specialise it: `mask` "hi"
    (causal), "none", "lo" or "lo+hi" (a window), sequence lengths divisible by 16 or (default) not, 16-bit
    inputs in bfloat16 or (fp16) float16; varlen: IS_VARLEN with cu_seqlens."""
    gluon = bool(config.kwargs.get("GLUON_WS"))
    fn = registry.KERNELS[kernel].fn_for(config)
    element = "*fp32" if fp32 else ("*fp16" if fp16 else "*bf16")
    constexprs = dict(
        HEAD_DIM=head_dim_pad,
        HEAD_DIM_PAD=head_dim_pad,
        HAS_LO="lo" in mask,
        HAS_HI="hi" in mask,
        PRECISION="tf32" if fp32 else "ieee",
        **config.kwargs,
    )
    if kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
        constexprs["CAN_TMA"] = True  # aligned tensors (the Triton kernels read varlen K/V through pointers)
    if varlen:
        constexprs["IS_VARLEN"] = True
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_strides"):  # a tensor's (batch, head, row) strides: one tuple argument
            signature[name] = ("i32", "i32", "i32")
        elif name[0].isupper():  # tensors are named in capitals
            signature[name] = (
                "*fp32" if name in FP32_POINTERS else "*i32" if name in INT32_POINTERS else element
            )
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    for param in fn.params:  # defaults of constexprs the config leaves out, and of optional pointers (None)
        if varlen and param.name in VARLEN_ARGS:
            continue
        if param.name == "DQ_ACC" and config.kwargs.get("FUSED_DQ"):  # the dQ accumulator it adds into
            continue
        if param.name in ("DQ_TURNS", "dq_tiles") and config.kwargs.get("DQ_ORDERED"):  # the adds' turns
            continue
        if (param.is_constexpr or param.default is None) and param.name not in constexprs:
            constexprs[param.name] = param.default
            signature[param.name] = "constexpr"
    if config.kwargs.get("HOST_DESC"):  # Q, K and V arrive as [B, H, S, D] TMA descriptors (registry.run)
        from triton.experimental.gluon import language as gl

        from flashattention.kernels.gluon import host_desc_boxes

        boxes = host_desc_boxes(head_dim_pad, config.kwargs["BLOCK_N"], gl.float16 if fp16 else gl.bfloat16)
        for name, (block, layout) in boxes.items():
            signature[name] = f"tensordesc<{element[1:]}[{', '.join(map(str, block))}],{layout!r}>"
    lengths = [n for n in fn.arg_names if n.startswith("seqlen_") and signature[n] == "i32"]
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as source_type

        constexprs["num_warps"] = config.num_warps
        signature["num_warps"] = "constexpr"
    else:
        source_type = ASTSource
    compiled = _compile_sm90(
        fn, signature, constexprs, config, lengths if aligned_lengths else (), source_type
    )
    ptx = compiled.asm["ptx"]
    regs, spills, serialized = _ptxas_report(ptx)
    return dict(
        shared=compiled.metadata.shared,
        regs=regs,
        spills=spills,
        serialized=serialized,
        wgmma=ptx.count("wgmma.mma_async"),
        ex2=ptx.count("ex2.approx"),
        cp_async=ptx.count("cp.async"),
    )


def compile_decode(split: bool, page_size: int | None, head_dim: int = 128, block_m: int = 16):
    """The split-KV decode kernel (kernels/decode.py) compiled for sm_90a with the config its launcher
    takes (configs.decode_config), bf16, per-row lengths, dense (page_size None) or paged, as a launch with
    16-byte aligned tensors and strides specialises it (_compile_sm90). Returns Triton's compiled kernel."""
    import torch

    from flashattention.kernels.decode import attn_decode_kernel as fn

    paged = page_size is not None
    config = configs.decode_config(split, head_dim, torch.bfloat16, paged)
    constexprs = dict(
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, HAS_LO=False, HAS_HI=False, HAS_SEQLENS=True,
        IS_PAGED=paged, PAGE_SIZE=page_size or 1, FINAL=not split, PRECISION="ieee", BLOCK_M=block_m,
        STRIDE_UNIT=1, **config.kwargs,
    )  # fmt: skip
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_strides"):
            signature[name] = ("i32", "i32", "i32")
        elif name in ("CACHE_SEQLENS", "BLOCK_TABLE"):
            signature[name] = "*i32"
        elif name in ("LSE", "O_PARTIAL", "LSE2_PARTIAL"):
            signature[name] = "*fp32"
        elif name[0].isupper():
            signature[name] = "*bf16"
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return _compile_sm90(fn, signature, constexprs, config, ("stride_tb",))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", default="sm90,sm90-fp32")
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--kernels", default="fwd,bwd_dkdv,bwd_dq")
    ap.add_argument("--candidates", action="store_true", help="also the configs of tools.tune.CANDIDATES")
    ap.add_argument("--defaults", action="store_true", help="only the first (default) config of each entry")
    ap.add_argument("--masks", default="hi", help="mask specialisations: none,hi,lo,lo+hi (default: causal)")
    ap.add_argument("--aligned-lengths", action="store_true", help="sequence lengths divisible by 16")
    ap.add_argument("--fp16", action="store_true", help="float16 inputs (default bfloat16)")
    ap.add_argument("--varlen", action="store_true", help="IS_VARLEN (packed sequences)")
    args = ap.parse_args()
    print(
        "| table | kernel | D | config | shared KB | regs | spill B | blocks/SM | wgmma | ex2 | cp.async "
        "| no spill |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    failures = 0  # configs that do not compile or need more shared memory than a block may have
    for table in args.tables.split(","):
        for kernel in args.kernels.split(","):
            for dim in (int(d) for d in args.dims.split(",")):
                cfgs = configs.configs_for(kernel, table, dim)
                if args.varlen:  # HOST_DESC configs take no varlen launch (registry.Kernel.takes_varlen)
                    cfgs = [c for c in cfgs if registry.KERNELS[kernel].takes_varlen(c)]
                cfgs = cfgs[: 1 if args.defaults else None]
                if args.candidates:
                    cfgs = cfgs + candidates_for(kernel, table, dim)
                for cfg, mask in ((c, m) for c in cfgs for m in args.masks.split(",")):
                    label = configs.label(cfg) + ("" if args.masks == "hi" else f" [{mask}]")
                    try:
                        r = compile_config(
                            kernel, cfg, dim, table.endswith("fp32"), mask, args.aligned_lengths, args.fp16,
                            args.varlen,
                        )  # fmt: skip
                    except Exception as exc:  # report, keep going
                        failures += 1
                        error = str(exc).splitlines()[0][:80]
                        print(f"| {table} | {kernel} | {dim} | {label} | error: {error} |")
                        continue
                    failures += r["shared"] > SHARED_LIMIT
                    print(
                        f"| {table} | {kernel} | {dim} | {label} | {r['shared'] / 1024:.0f} | {r['regs']} | "
                        f"{r['spills']} | {blocks_per_sm(r['shared'], r['regs'], cfg.num_warps)} | "
                        f"{r['wgmma']} | {r['ex2']} | {r['cp_async']} | "
                        f"{'yes' if r['spills'] == 0 else 'NO'}"
                        f"{' (wgmma serialized)' if r['serialized'] else ''} |",
                        flush=True,
                    )
    print(f"{failures} configs failed to compile or need more than {SHARED_LIMIT} bytes of shared memory")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
