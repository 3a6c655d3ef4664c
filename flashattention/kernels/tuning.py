"""Autotuning, opt-in (FLASHATTN_AUTOTUNE=1): a case's first call times every config of its table entry that
applies, and the pick is kept in memory and on disk, per GPU model and torch/triton/flashattention versions,
so that a new process launches it at once instead of tuning again."""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
import triton
import triton.testing
from triton.compiler.errors import CompilationError, CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

from .. import __version__, _env
from . import configs, gluon, hooks

CLOSE = 0.05  # configs this close to the fastest in the first pass are timed again


def enabled() -> bool:
    if _env.interpreting():
        return False
    return _env.autotune() if hooks.current.autotune is None else hooks.current.autotune


def case_key(name: str, table: str, dtype: torch.dtype, args: dict) -> str:
    """What a pick depends on: the kernel, table and dtype, the key's arguments (configs.AUTOTUNE_KEY), and
    whether HOST_DESC and WS_OVERLAP configs may run (gluon.host_desc_ok, gluon.length_one)."""
    parts = [name, table, str(dtype).removeprefix("torch.")]
    parts += [f"{k}={args.get(k)}" for k in configs.AUTOTUNE_KEY]
    parts += [f"host_desc={int(gluon.host_desc_ok(args))}", f"length_one={int(gluon.length_one(args))}"]
    if args.get("IS_VARLEN"):  # not every config applies (registry.Kernel.takes_varlen)
        parts.append("varlen")
    return "|".join(parts)


def tune(run, entry: list[triton.Config], applies=lambda config: True) -> triton.Config:
    """The fastest config of `entry` that still applies when its turn comes, run(config) launching it:
    medians of triton's do_bench (L2 flushed). Configs that do not fit the GPU or that this Triton cannot
    compile are skipped, as Triton's Autotuner skips them. The configs within CLOSE of the fastest are
    timed again in reverse order and ranked by the mean of both runs: the GPU's clocks drift while it
    tunes, which one pass in table order turns into a bias."""

    def time_config(i):
        return triton.testing.do_bench(lambda: run(entry[i]), return_mode="median")

    timings = {}
    for i, config in enumerate(entry):
        if not applies(config):  # a Gluon config after another failed to compile
            continue
        try:
            timings[i] = time_config(i)
        except (OutOfResources, CompileTimeAssertionFailure, PTXASError):
            continue
        except CompilationError as err:
            if not config.kwargs.get("GLUON_WS"):
                raise
            gluon.note_compile_error(err)
    if not timings:
        raise OutOfResources(0, 0, "shared memory or registers: no config of the table fits this GPU")
    fastest = min(timings.values())
    close = [i for i, t in timings.items() if t <= fastest * (1 + CLOSE)]
    if len(close) > 1:
        for i in reversed(close):
            timings[i] = (timings[i] + time_config(i)) / 2
        timings = {i: timings[i] for i in close}
    return entry[min(timings, key=timings.get)]


class PickStore:
    """case key -> the label of its picked config, one JSON file per GPU model and versions under
    _env.cache_dir(), read once per process and written (atomically) after each new pick."""

    def __init__(self) -> None:
        self._files: dict[Path, dict[str, str]] = {}

    def get(self, device: torch.device, key: str, entry) -> triton.Config | None:
        """The stored pick of `key` if it is still one of `entry`'s configs (tables change between
        versions: a pick that is gone is tuned again)."""
        name = self._data(_path(device)).get(key)
        if name is not None:
            for config in entry:
                if configs.label(config) == name:
                    return config
        return None

    def put(self, device: torch.device, key: str, config: triton.Config) -> None:
        path = _path(device)
        data = self._data(path)
        data[key] = configs.label(config)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(f.name, path)
        except OSError as err:
            _warn_once(
                f"flashattention: tuning results could not be saved to {path} ({err}); set "
                "FLASHATTN_CACHE_DIR to a writable directory to keep them between processes."
            )

    def clear_memory(self) -> None:
        """Forgets what was read; the files stay (a later get reads them again)."""
        self._files.clear()

    def _data(self, path: Path) -> dict[str, str]:
        data = self._files.get(path)
        if data is None:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):  # none yet, or a torn file of an older version: tune again
                data = {}
            self._files[path] = data if isinstance(data, dict) else {}
        return self._files[path]


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=2)


def _path(device: torch.device) -> Path:
    if device.type != "cuda":
        return _env.cache_dir() / _file_name(-1)
    return _env.cache_dir() / _file_name(
        device.index if device.index is not None else torch.cuda.current_device()
    )


@functools.cache
def _file_name(index: int) -> str:
    gpu = torch.cuda.get_device_name(index) if index >= 0 else "cpu"
    name = f"tuning-{gpu}-torch{torch.__version__}-triton{triton.__version__}-fa{__version__}.json"
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name)


PICKS = PickStore()
