"""The kernels a launch may pick from, what each accepts, and the choice of config for one launch: forced
(an argument or hooks.overrides), tuned (FLASHATTN_AUTOTUNE=1, kept on disk by kernels/tuning.py), or the
table's measured pick (configs.ordered), in that order of precedence."""

from __future__ import annotations

import dataclasses
import importlib
import warnings

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

from .. import _prefetch
from . import configs, gluon, hooks, tuning
from . import device as dev
from .bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
from .fwd import attn_fwd_kernel


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One algorithm's kernels: the Triton one, and the Gluon one (module, name; imported on first use,
    Gluon being experimental) that GLUON_WS configs launch, for the head dims it takes. Both take packed
    varlen sequences (IS_VARLEN), the Gluon ones through descriptors they make per sequence on the device,
    so HOST_DESC configs do not apply to them (problems says so)."""

    name: str
    title: str
    triton_fn: object
    gluon_fn: tuple[str, str] | None = None
    gluon_dims: tuple[int, ...] = ()

    def takes_varlen(self, config: triton.Config) -> bool:
        """Whether the kernel `config` launches accepts IS_VARLEN (packed sequences)."""
        return not config.kwargs.get("HOST_DESC")

    def fn_for(self, config: triton.Config):
        if config.kwargs.get("GLUON_WS"):
            module, name = self.gluon_fn
            return getattr(importlib.import_module(f".{module}", __package__), name)
        return self.triton_fn

    def problems(self, config: triton.Config, args: dict) -> list[str]:
        """Why `config` cannot launch with these arguments (empty if it can)."""
        if not config.kwargs.get("GLUON_WS"):
            return []
        if self.gluon_fn is None:
            return [f"the {self.title} has no Gluon kernel"]
        if args.get("IS_VARLEN") and not self.takes_varlen(config):
            return ["HOST_DESC takes no varlen (packed) sequences: its descriptors span whole tensors"]
        found = gluon.problems(self.gluon_dims, args)
        if config.kwargs.get("HOST_DESC"):
            found += gluon.host_desc_problems(args)
        if config.kwargs.get("FUSED_DQ"):
            if args.get("DQ_ACC") is None:
                found.append("FUSED_DQ adds dQ into a float32 accumulator only attention_backward makes")
            if args.get("HEAD_DIM_PAD") == 256:
                found.append("FUSED_DQ takes head dims 64 and 128")
        if config.kwargs.get("DQ_ORDERED") and not config.kwargs.get("FUSED_DQ"):
            found.append("DQ_ORDERED orders FUSED_DQ's dQ adds: it needs FUSED_DQ")
        if config.kwargs.get("WS_OVERLAP") and gluon.length_one(args):
            found.append("WS_OVERLAP takes no sequence length of 1 (Triton 3.6 cannot compile it)")
        return found

    def applies(self, config: triton.Config, args: dict) -> bool:
        """Whether the choice may take `config`: it can run (problems), and where it makes host
        descriptors, the call has the work to pay for them."""
        if config.kwargs.get("HOST_DESC") and not gluon.host_desc_ok(args):
            return False
        return not self.problems(config, args)


KERNELS = {
    k.name: k
    for k in (
        Kernel("fwd", "forward", attn_fwd_kernel, ("fwd_ws", "attn_fwd_ws_kernel"), (64, 128, 256)),
        Kernel(
            "bwd_dkdv", "dK/dV", attn_bwd_dkdv_kernel, ("bwd_ws", "attn_bwd_dkdv_ws_kernel"), (64, 128, 256)
        ),
        Kernel("bwd_dq", "dQ", attn_bwd_dq_kernel, ("bwd_ws", "attn_bwd_dq_ws_kernel"), (64, 128, 256)),
    )
}

# kernel name -> the config of its last launch (the benchmark and tools report it)
last_launched: dict[str, triton.Config] = {}


def launch_args(kernel: Kernel, config: triton.Config, args: dict) -> tuple:
    """(kernel_fn, arguments) of a launch of `config`: `args` with HOST_DESC's descriptors and a probe's
    extra arguments (hooks); the config's meta-parameters, warps and stages go with them at the launch.
    Raises where `config` does not apply (problems)."""
    problems = kernel.problems(config, args)
    if problems:
        raise ValueError(
            f"flashattention: the GLUON_WS {kernel.title} config does not apply: " + "; ".join(problems)
        )
    fn = kernel.fn_for(config)
    if config.kwargs.get("HOST_DESC"):
        args = dict(args, **gluon.host_descriptors(args, config.kwargs["BLOCK_N"]))
    extra = (hooks.current.extra_args or {}).get(kernel.name)
    if extra:
        args = dict(args, **extra)
    return fn, args


def run(kernel: Kernel, grid, args: dict, config: triton.Config) -> tuple:
    """Launches `config`; returns what a launch plan is made of: (name, kernel_fn, compiled, grid, args,
    config)."""
    fn, args = launch_args(kernel, config, args)
    compiled = fn[grid](**args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    last_launched[kernel.name] = config
    return kernel.name, fn, compiled, grid, args, config


def first_choice(
    name: str, args: dict, device: torch.device, dtype: torch.dtype, seqlen_k=None
) -> triton.Config | None:
    """The config that launch(name, ...) with these arguments tries first, or None where it would tune
    (several configs apply and autotuning is on) or none applies: what kernels/warmup.py compiles ahead."""
    kernel = KERNELS[name]
    forced, _, usable = _usable(kernel, args, device, dtype, seqlen_k)
    if not usable or (forced is None and tuning.enabled() and len(usable) > 1):
        return None
    return usable[0]


def _usable(kernel: Kernel, args: dict, device, dtype, seqlen_k=None) -> tuple[list | None, list, list]:
    """(the hooks' forced configs or None, the entry chosen from, its configs that apply to `args`).
    seqlen_k: the key length the table's pick depends on, if not args' (varlen: the longest sequence's)."""
    forced = (hooks.current.configs or {}).get(kernel.name)
    if forced is not None:
        entry = list(forced)
    else:
        table = configs.table_name(device, dtype)
        seqlen_k = args["seqlen_k"] if seqlen_k is None else seqlen_k
        entry = configs.ordered(kernel.name, table, args["HEAD_DIM_PAD"], bool(args["HAS_HI"]), seqlen_k)
        if args.get("IS_VARLEN"):  # HOST_DESC does not apply: the pick's twin without it first
            entry = configs.without_host_desc(entry)
    return forced, entry, [c for c in entry if kernel.applies(c, args)]


def launch(
    name: str, grid, args: dict, device: torch.device, dtype: torch.dtype, config=None, seqlen_k=None
) -> tuple:
    """Launches kernel `name` on `device` with `config` if given, else with the config chosen for these
    arguments (the module docstring's order). seqlen_k: the key length the table's pick depends on, if not
    args' (varlen: the longest sequence's, args' being the packed total). Returns run's launch record, for
    the caller's plan."""
    kernel = KERNELS[name]
    _prefetch.wait()  # Triton's cache key, if the import-time thread is computing it
    with dev.on(device):
        if config is not None:
            return run(kernel, grid, args, config)
        forced, entry, usable = _usable(kernel, args, device, dtype, seqlen_k)
        if not usable:  # only forced lists can end here: every table entry holds a Triton config
            return run(kernel, grid, args, entry[0])  # raises what keeps it from running
        if forced is None and tuning.enabled() and len(usable) > 1:
            key = tuning.case_key(name, configs.table_name(device, dtype), dtype, args)
            picked = _tuned(kernel, grid, args, device, key, usable)
            if picked is not None:
                return run(kernel, grid, args, picked)
        failure = None
        for config in usable:
            if failure is not None and kernel.problems(config, args):  # a Gluon compile failure above
                continue
            try:
                return run(kernel, grid, args, config)
            except OutOfResources as err:  # a smaller GPU than the table's: the next config, with a warning
                _note_out_of_resources(kernel.name, config, err)
                failure = err
            except (CompilationError, PTXASError) as err:
                if not config.kwargs.get("GLUON_WS"):
                    raise
                gluon.note_compile_error(err)
                failure = err
        raise failure


_out_of_resources: set = set()  # (kernel, config label) pairs warned about


def _note_out_of_resources(name: str, config: triton.Config, err: Exception) -> None:
    """A table config this GPU cannot launch (shared memory, registers): warn once a config."""
    label = configs.label(config)
    if (name, label) in _out_of_resources:
        return
    _out_of_resources.add((name, label))
    warnings.warn(
        f"flashattention: the {name} kernel's config {label} does not fit this GPU ({err}); the table's next "
        "config runs instead, which may be slower. The tables are measured on H100/H200 and A100: report "
        "your GPU model.",
        stacklevel=5,
    )


def _tuned(kernel: Kernel, grid, args: dict, device, key: str, usable: list) -> triton.Config | None:
    """The case's pick: stored, or timed now. During CUDA graph capture a case not tuned yet cannot be
    (timing runs cannot be captured): None, with a warning, and the launch takes the table's choice."""
    picked = tuning.PICKS.get(device, key, usable)
    if picked is not None:
        return picked
    if dev.capturing():
        warnings.warn(
            f"flashattention: {kernel.name} has not been tuned for this case yet ({key}) and cannot be tuned "
            "during CUDA graph capture; the captured graph uses the table's pick. Run the same call once "
            "before capturing to capture the tuned config.",
            stacklevel=5,
        )
        return None
    picked = tuning.tune(
        lambda config: run(kernel, grid, args, config), usable, lambda c: kernel.applies(c, args)
    )
    tuning.PICKS.put(device, key, picked)
    return picked
