"""Output of the benchmark: markdown table with ratios, error summary, JSON, PNG plot, RESULTS.md entry.

A row is a dict (also what the JSON holds): dtype, batch, heads, seqlen, head_dim, causal, pass, flops,
check (ours against a peer, or None) and results: {provider: {ms, tflops, error, wrong}}.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# (provider, peer, column title): the provider's speed over the peer's (peer's time / provider's time)
RATIOS = (
    ("ours", "sdpa-flash", "ours/sdpa-flash"),
    ("ours", "sdpa-cudnn", "ours/cudnn"),
    ("ours", "sdpa", "ours/sdpa"),
    ("ours-torch", "sdpa", "ours-torch/sdpa"),
    ("ours", "ours-prev", "ours/prev"),
)
SELF = ("ours", "ours-prev", "ours-torch")  # ours, an earlier commit of it, its torch backend: not peers


def environment_meta(device: torch.device, command: str, commit: str | None = None) -> dict:
    """Card, versions, date and commit: what a result needs to be compared with another."""
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "commit": commit or git_commit(),
        "env": {var: os.environ.get(var) for var in ("FLASHATTN_AUTOTUNE", "TRITON_INTERPRET")},
        "command": command.strip(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(
            card=torch.cuda.get_device_name(device),
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        cpu = platform.processor() or platform.machine()
        meta.update(card=f"CPU ({cpu}, {torch.get_num_threads()} threads)")
    return meta


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def git_commit() -> str | None:
    """Short hash of the checkout's HEAD, "+dirty" when tracked files changed; None outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _cell(result: dict | None, unit: str) -> str:
    if result is None:
        return ""
    if result.get("wrong"):
        return "WRONG"
    if result.get("ms") is None:
        return "-"
    return f"{result['tflops']:.1f}" if unit == "TFLOP/s" else f"{result['ms']:.2f}"


def _ratio(result: dict | None, peer_ms: float | None) -> str:
    """Speed of a provider over a peer's (same FLOPs, so the inverse ratio of times); "-" if either is
    missing."""
    if not result or result.get("ms") is None or not peer_ms:
        return "-"
    return f"{peer_ms / result['ms']:.2f}"


def format_table(rows: list[dict], providers: list[str], unit: str) -> str:
    """Markdown tables, one per dtype: D, causal, S, pass, each provider's speed, and ours' ratios."""
    peers = [p for p in providers if p not in SELF]
    ratio_cols = []
    if "ours" in providers and peers:
        ratio_cols.append(("ours", "best", "ours/best peer"))
    ratio_cols += [c for c in RATIOS if c[0] in providers and c[1] in providers]
    what = "TFLOP/s, higher is better" if unit == "TFLOP/s" else "milliseconds, lower is better"
    if ratio_cols:
        what += "; a/b columns: a's speed over b's (b's time / a's time), higher is better for a"
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        header = ["D", "causal", "S", "pass", *providers, *(title for _, _, title in ratio_cols)]
        out += [f"{dtype}, {what}:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in (r for r in rows if r["dtype"] == dtype):
            res = r["results"]
            cells = [str(r["head_dim"]), "yes" if r["causal"] else "no", str(r["seqlen"]), r["pass"]]
            cells += [_cell(res.get(p), unit) for p in providers]
            for name, peer, _ in ratio_cols:
                if peer == "best":
                    times = [res[p]["ms"] for p in peers if res.get(p) and res[p].get("ms") is not None]
                    cells.append(_ratio(res.get(name), min(times) if times else None))
                else:
                    cells.append(_ratio(res.get(name), (res.get(peer) or {}).get("ms")))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _row_label(r: dict) -> str:
    if r.get("suite") == "decode":
        return f"{r['dtype']} decode {r['batch']}x{r['cache']}"
    return f"{r['dtype']} D{r['head_dim']} S{r['seqlen']} {'causal' if r['causal'] else 'full'} {r['pass']}"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _decode_label(r: dict) -> str:
    cache = f"{r['cache'] // 1024}k" if r["cache"] % 1024 == 0 else str(r["cache"])
    return f"{r['batch']} x {cache}"


def format_decode_table(rows: list[dict], providers: list[str], copy_gbps: float) -> str:
    """Markdown tables of the decode suite, one per dtype: GB/s of K/V read per provider, ours' share of
    the copy bandwidth, and ours' ratios to the best peer and to SDPA flash / cuDNN."""
    peers = [p for p in providers if p not in SELF]
    ratio_cols = []
    if "ours" in providers and peers:
        ratio_cols.append(("best", "ours/best peer"))
        ratio_cols += [(peer, title) for who, peer, title in RATIOS if who == "ours" and peer in peers]
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        header = ["batch x cache", *providers]
        header += ["ours % of copy"] if "ours" in providers else []
        header += [title for _, title in ratio_cols]
        out += [
            f"{dtype}, decode: GB/s of K+V read, higher is better (copy bandwidth {copy_gbps:.0f} GB/s):",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        expanded = set()
        for r in (r for r in rows if r["dtype"] == dtype):
            res = r["results"]
            cells = [_decode_label(r)]
            for p in providers:
                result = res.get(p)
                cell = "" if result is None else "WRONG" if result.get("wrong") else "-"
                if result and result.get("gbps") is not None:
                    gbps = result["gbps"]
                    cell = f"{gbps:.0f}" if gbps >= 100 else f"{gbps:.2g}"  # small: CPU runs
                    cell += "*" if result.get("kv") == "expanded" else ""
                    if result.get("kv") == "expanded":
                        expanded.add(p)
                cells.append(cell)
            ours = res.get("ours")
            if "ours" in providers:
                cells.append(f"{ours['pct_copy']:.0f}%" if ours and ours.get("gbps") is not None else "-")
            for name, _ in ratio_cols:
                if name == "best":
                    times = [res[p]["ms"] for p in peers if res.get(p) and res[p].get("ms") is not None]
                    cells.append(_ratio(ours, min(times) if times else None))
                else:
                    cells.append(_ratio(ours, (res.get(name) or {}).get("ms")))
            out.append("| " + " | ".join(cells) + " |")
        if expanded:
            out += [
                "",
                f"\\* {', '.join(sorted(expanded))}: the backend rejects enable_gqa=True, so it reads K/V "
                "expanded to the query heads (repeated once, outside timing, as a user of it would keep the "
                "cache): heads / kv_heads times the bytes counted.",
            ]
        out.append("")
    return "\n".join(out)


def write_decode_plot(path: str, rows: list[dict], providers: list[str], copy_gbps: float, title: str) -> str:
    """GB/s per (batch x cache) shape, a line per provider and the copy bandwidth. Returns a message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot skipped: matplotlib is not installed (pip install matplotlib), {path} not written"
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes.flat, dtypes, strict=True):
        panel = [r for r in rows if r["dtype"] == dtype]
        labels = [_decode_label(r) for r in panel]
        for name in providers:
            ys = [(r["results"].get(name) or {}).get("gbps") for r in panel]
            ax.plot(labels, [float("nan") if y is None else y for y in ys], marker="o", label=name,
                    color=f"C{providers.index(name)}", linewidth=2.2 if name == "ours" else 1.2)  # fmt: skip
        ax.axhline(copy_gbps, color="gray", linestyle="--", linewidth=1, label="copy bandwidth")
        ax.set_title(f"{dtype} decode", fontsize=9)
        ax.set_xlabel("batch x cache")
        ax.set_ylabel("GB/s of K+V read")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"


def format_problems(rows: list[dict], max_labels: int = 8) -> str:
    """What shows as WRONG or "-", grouped by provider and message so that a run of failures reads as one."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in rows:
        for name, res in r["results"].items():
            if res.get("wrong"):
                groups[(name, "WRONG: " + res["wrong"])].append(_row_label(r))
            elif res.get("error"):
                groups[(name, res["error"])].append(_row_label(r))
    if not groups:
        return ""
    lines = ["Not measured (WRONG: ours differs from the reference peer; -: failed, reason below):"]
    for (name, message), labels in groups.items():
        shown = ", ".join(labels[:max_labels])
        if len(labels) > max_labels:
            shown += f" and {len(labels) - max_labels} more"
        lines.append(f"- {name} ({shown}): {message}")
    return "\n".join(lines) + "\n"


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def write_plot(path: str, rows: list[dict], providers: list[str], unit: str, title: str) -> str:
    """One subplot per (dtype, D, causal, pass): speed against S, a line per provider. Returns a message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot skipped: matplotlib is not installed (pip install matplotlib), {path} not written"
    panels = list(dict.fromkeys((r["dtype"], r["head_dim"], r["causal"], r["pass"]) for r in rows))
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, panels, strict=False):
        dtype, head_dim, causal, pass_ = key
        panel = [r for r in rows if (r["dtype"], r["head_dim"], r["causal"], r["pass"]) == key]
        for name in providers:
            points = [
                (r["seqlen"], r["results"][name]["tflops" if unit == "TFLOP/s" else "ms"])
                for r in panel
                if r["results"].get(name, {}).get("ms") is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                width = 2.2 if name == "ours" else 1.2
                ax.plot(xs, ys, marker="o", label=name, color=f"C{providers.index(name)}", linewidth=width)
        seqlens = sorted({r["seqlen"] for r in panel})
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqlens, [f"{s // 1024}k" if s % 1024 == 0 else str(s) for s in seqlens])
        ax.minorticks_off()
        ax.set_title(f"{dtype} D={head_dim} {'causal' if causal else 'full'} {pass_}", fontsize=9)
        ax.set_xlabel("seqlen")
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"


def results_header(meta: dict, settings: str) -> str:
    versions = f"torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}"
    if meta.get("cuda"):
        versions += f", CUDA {meta['cuda']}, cuDNN {meta['cudnn']}"
    return "\n".join(
        [
            f"## {meta['card']}, {meta['date']}",
            "",
            f"- versions: {versions}",
            f"- commit: {meta['commit'] or 'unknown (not a git checkout)'}",
            "- environment: "
            + ", ".join(f"{k}={v if v is not None else 'unset'}" for k, v in meta["env"].items()),
            f"- command: `{meta['command']}`",
            f"- {settings}",
            "",
        ]
    )


def append_results_md(path: str, header: str, table: str, problems: str) -> None:
    with open(path, "a") as f:
        f.write("\n" + header + "\n" + table + "\n" + (problems + "\n" if problems else ""))


def finish(
    args,
    meta: dict,
    rows: list[dict],
    table: str,
    header: str,
    fatal: str | None,
    started: float,
    plot: Callable[[str], str],
) -> int:
    """The end of a benchmark run: the table, its problems and any early stop printed, then the final JSON,
    the plot (plot(path) writes it and returns a line to print) and the RESULTS.md entry where args asks for
    them. Returns the exit code: 2 stopped early, 1 a result was wrong, else 0."""
    problems = format_problems(rows)
    print(table)
    if problems:
        print(problems)
    if fatal:
        print(f"STOPPED EARLY: {fatal}\n")
    print(f"{len(rows)} rows in {time.perf_counter() - started:.0f} s.")
    meta.update(partial=False, fatal=fatal)
    if args.json:
        write_json(args.json, meta, rows)
        print(f"JSON written to {args.json}")
    if args.plot:
        print(plot(args.plot))
    if args.results_md:
        stopped = f"\nSTOPPED EARLY: {fatal}\n" if fatal else ""
        append_results_md(args.results_md, header, table, problems + stopped)
        print(f"table appended to {args.results_md}")
    wrong = any(res.get("wrong") for r in rows for res in r["results"].values())
    return 2 if fatal else 1 if wrong else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.report RUN.json --plot OUT.png [--table]`: redraws a run's plot (and prints its
    table) from its JSON, so that only the JSON needs keeping."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("json", help="a run's JSON (benchmarks.run --json)")
    ap.add_argument("--plot", metavar="PATH", help="write the PNG here")
    ap.add_argument("--table", action="store_true", help="print the markdown table")
    args = ap.parse_args(argv)
    run = json.loads(Path(args.json).read_text())
    meta, rows = run["meta"], run["rows"]
    if meta.get("suite") == "decode":
        copy_gbps = meta["copy"]["gbps"]
        if args.plot:
            title = f"{meta['card']}, {meta['date']}"
            print(write_decode_plot(args.plot, rows, meta["providers"], copy_gbps, title))
        if args.table:
            print(format_decode_table(rows, meta["providers"], copy_gbps))
        return 0
    unit = "TFLOP/s" if any(res.get("tflops") for r in rows for res in r["results"].values()) else "ms"
    if args.plot:
        print(write_plot(args.plot, rows, meta["providers"], unit, f"{meta['card']}, {meta['date']}"))
    if args.table:
        print(format_table(rows, meta["providers"], unit))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
