"""`python -m flashattention info | check | bench`: what runs here, whether it is right, how fast it is."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import flashattention
from flashattention import _env, flash_attention
from flashattention.reference import attention_reference
from flashattention.testing import DTYPE_NAMES, Case, error_and_bound


def _interpreting() -> bool:
    return _env.interpreter_requested()


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"


# ---------------------------------------------------------------------------------------------------- info


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def _try_backend(backend: str, device: torch.device) -> str:
    """Runs a tiny causal forward and backward; "ok (...)" or why not."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 32, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    try:
        out = flash_attention(q, k, v, causal=True, backend=backend)
        out.float().sum().backward()
    except Exception as exc:  # noqa: BLE001 - reporting why a backend does not work is the point
        return "not available: " + _one_line(exc)
    ref, _ = attention_reference(q.detach(), k.detach(), v.detach(), causal=True)
    err = (out.detach().double() - ref).abs().max().item()
    finite = all(torch.isfinite(t).all() for t in (out, q.grad, k.grad, v.grad))
    status = "ok" if finite and err < 1e-2 else "WRONG"
    where = f"{DTYPE_NAMES[dtype]} on {device.type}"
    return f"{status} (forward + backward, {where}, max |out - reference| {err:.1e})"


def cmd_info(args: argparse.Namespace) -> int:
    rows = [
        ("flashattention", f"{flashattention.__version__} ({Path(flashattention.__file__).parent})"),
        ("python", f"{platform.python_version()} ({platform.system()} {platform.machine()})"),
        (
            "torch",
            f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
            f"cuDNN {torch.backends.cudnn.version() if torch.cuda.is_available() else 'none'})",
        ),
        ("triton", _triton_version()),
    ]
    if torch.cuda.is_available():
        device = torch.device("cuda")
        props = torch.cuda.get_device_properties(device)
        rows.append(
            (
                "device",
                f"{props.name}, compute capability {props.major}.{props.minor}, "
                f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB "
                f"({torch.cuda.device_count()} visible)",
            )
        )
    else:
        device = torch.device("cpu")
        rows.append(("device", f"cpu only (no CUDA GPU visible to torch), {torch.get_num_threads()} threads"))
    for var, value in _env.settings().items():
        rows.append((var, "unset" if value is None else repr(value)))
    picks = "triton" if device.type == "cuda" else "torch (PyTorch's SDPA where exactly ours)"
    rows.append(("backend auto", f"-> {picks} on {device.type}"))
    for backend in ("triton", "torch"):
        rows.append((f"backend {backend}", _try_backend(backend, device)))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


# --------------------------------------------------------------------------------------------------- check


def _describe(case: Case) -> str:
    heads = f"H{case.heads}" + (f"/{case.kv_heads}" if case.kv_heads != case.heads else "")
    mask = "causal" if case.causal else "full"
    if case.window != (-1, -1):
        mask = f"window{case.window}".replace(" ", "")
    return f"B{case.batch} {heads} Sq{case.seqlen_q} Sk{case.seqlen_k} D{case.head_dim} {mask}"


# Every row sees at least one key in all of these (the kernels' empty-row case is the tests' business).
CASES = (
    Case(2, 4, 4, 128, 128, 64, name="dense"),
    Case(1, 3, 3, 113, 113, 64, causal=True, name="causal, odd length"),
    Case(2, 2, 2, 37, 203, 64, causal=True, name="causal, Sq < Sk (bottom-right)"),
    Case(1, 2, 2, 255, 255, 64, window=(32, 8), name="sliding window"),
    Case(2, 8, 2, 96, 96, 128, causal=True, name="GQA 8/2, causal"),
    Case(1, 4, 1, 64, 150, 32, name="MQA 4/1"),
    Case(1, 2, 2, 100, 100, 72, causal=True, name="head dim 72, causal"),
    Case(1, 2, 2, 77, 77, 40, window=(16, 0), name="head dim 40, window"),
    Case(1, 2, 2, 64, 64, 256, name="head dim 256"),
    Case(2, 4, 4, 1, 77, 64, causal=True, name="one query row"),
)
GPU_CASES = CASES + (Case(1, 4, 4, 2048, 2048, 128, causal=True, name="long causal"),)
# Triton's CPU interpreter runs every program in numpy: keep these small.
INTERPRETER_CASES = (
    Case(1, 2, 2, 48, 48, 32, name="dense"),
    Case(1, 2, 2, 33, 57, 40, causal=True, name="causal, Sq < Sk, head dim 40"),
    Case(1, 2, 2, 64, 64, 16, window=(8, 4), name="sliding window"),
    Case(1, 4, 2, 40, 40, 16, causal=True, name="GQA 4/2, causal"),
)


def _run_case(case: Case, dtype: torch.dtype, backend: str, device: torch.device) -> tuple[bool, str]:
    torch.manual_seed(0)
    q, k, v, dout = dataclasses.replace(case, dtype=dtype).inputs(device)
    mask = case.mask_kwargs()

    def forward_backward(fn, inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out, lse = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
        return [out.detach(), lse.detach(), *grads]

    ours = forward_backward(
        lambda *t: flash_attention(*t, **mask, return_lse=True, backend=backend), (q, k, v)
    )
    ref = forward_backward(lambda *t: attention_reference(*t, **mask), (q.double(), k.double(), v.double()))
    same = forward_backward(lambda *t: attention_reference(*t, **mask, upcast=False), (q, k, v))
    worst, ok_all = "", True
    worst_ratio = -1.0
    for name, o, r, s in zip(("out", "lse", "dq", "dk", "dv"), ours, ref, same, strict=True):
        err, bound = error_and_bound(o, r, s)
        ok = err <= bound
        ratio = err / bound if ok and bound > 0 else (0.0 if ok else float("inf"))
        ok_all &= ok
        if ratio > worst_ratio:
            worst_ratio = ratio
            worst = f"{name} {err:.1e} {'<=' if ok else 'NOT <='} {bound:.1e}"
    return ok_all, worst


def cmd_check(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.autotune:
        os.environ["FLASHATTN_AUTOTUNE"] = "1"
    os.environ.setdefault("FLASHATTN_POISON", "1")  # outputs start as NaN: an unwritten element fails
    _env.set_poison(os.environ["FLASHATTN_POISON"] not in ("", "0"))  # read at import: told again here
    plans: list[tuple[str, tuple[Case, ...], tuple[torch.dtype, ...]]] = []
    if device.type == "cuda":
        all_dtypes = (torch.float16, torch.bfloat16, torch.float32)
        plans += [("triton", GPU_CASES, all_dtypes), ("torch", CASES, all_dtypes)]
    else:
        plans.append(("torch", CASES, (torch.float32, torch.bfloat16)))
        if _interpreting():
            plans.append(("triton", INTERPRETER_CASES, (torch.float32, torch.float16, torch.bfloat16)))
    if args.backend != "all":
        plans = [p for p in plans if p[0] == args.backend]
    print(
        f"flashattention {flashattention.__version__} check on {device.type}"
        f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}"
        + "".join(f", {name}={value or 'unset'}" for name, value in _env.settings().items())
    )
    print(
        "rule: max|ours - ref| <= 2 * max|torch same dtype - ref| + floor, for out, lse, dq, dk, dv; "
        "ref in float64"
    )
    if device.type == "cpu" and not _interpreting() and args.backend in ("all", "triton"):
        print(
            "triton backend skipped: no CUDA GPU; set TRITON_INTERPRET=1 to run the kernels in Triton's "
            "CPU interpreter"
        )
    if not plans:
        print(f"nothing to check: backend {args.backend!r} does not run on {device.type} here")
        return 1
    header = ("backend", "dtype", "case", "shape", "worst (err vs bound)", "result")
    all_cases = [c for _, cases, _ in plans for c in cases]
    widths = (7, 5, max(len(c.name) for c in all_cases), max(len(_describe(c)) for c in all_cases), 30, 6)

    def print_row(cells: tuple[str, ...]) -> None:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip(), flush=True)

    print()
    print_row(header)
    checks = failures = 0
    for backend, cases, dtypes in plans:
        for dtype in dtypes:
            for case in cases:
                try:
                    ok, worst = _run_case(case, dtype, backend, device)
                except Exception as exc:  # noqa: BLE001 - an exception is a failed check, reported in the table
                    ok, worst = False, _one_line(exc)[:200]
                checks += 1
                failures += not ok
                print_row(
                    (backend, DTYPE_NAMES[dtype], case.name, _describe(case), worst, "pass" if ok else "FAIL")
                )
    print(f"\n{'PASS' if failures == 0 else 'FAIL'}: {checks - failures} of {checks} checks passed")
    return 0 if failures == 0 else 1


# --------------------------------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace, forwarded: list[str]) -> int:
    """Runs `python -m benchmarks.run` in the repository checkout this package lives in, as a process of
    its own (the benchmarks are not part of the installed package)."""
    checkout = Path(flashattention.__file__).resolve().parent.parent
    if not (checkout / "benchmarks" / "run.py").is_file():
        print(
            "The benchmarks live in the repository, not in the installed package. From a checkout run:\n"
            "    git clone <this repository> && cd flashattention\n"
            "    pip install . matplotlib\n"
            "    python -m benchmarks.run --help      (or: python -m flashattention bench --help)",
            file=sys.stderr,
        )
        return 2
    return subprocess.run([sys.executable, "-m", "benchmarks.run", *forwarded], cwd=checkout).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flashattention", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,check,bench}")
    sub.add_parser(
        "info",
        help="device, versions, environment and which backends work here",
        description="Prints the device, versions, TRITON_INTERPRET / FLASHATTN_AUTOTUNE and runs a "
        "tiny forward + backward with each backend to say which work here.",
    )
    check = sub.add_parser(
        "check",
        help="compare the kernels with the float64 reference on this machine (exit 1 on failure)",
        description="Runs flash_attention (forward, LSE, dq, dk, dv) against reference.attention_reference "
        "in float64 on a handful of shapes: causal, Sq != Sk, sliding window, GQA/MQA, odd head dims, "
        "one-row queries. Pass rule: max|ours - ref| <= 2 * max|torch_same_dtype - ref| + floor. On a GPU: "
        "triton and torch backends, fp16/bf16/fp32. On the CPU: the torch backend, and the triton backend "
        "in Triton's interpreter when TRITON_INTERPRET=1 (tiny shapes).",
    )
    check.add_argument(
        "--backend",
        choices=("all", "triton", "torch"),
        default="all",
        help="which backend to check (default: all that run here)",
    )
    check.add_argument(
        "--autotune",
        action="store_true",
        help="time every config of the tables (FLASHATTN_AUTOTUNE=1; default: the tables' measured picks)",
    )
    sub.add_parser(
        "bench",
        add_help=False,
        help="the benchmark against SDPA and FlexAttention; arguments go to benchmarks.run "
        "(see `python -m flashattention bench --help`)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return {"info": cmd_info, "check": cmd_check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
