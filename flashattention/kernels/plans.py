"""Launch plans: a call whose key (shapes, strides, dtypes, pointer alignments, scalars) was seen before
launches the first call's compiled kernels with the same grids and arguments, its own tensors put in,
through Triton's public `compiled[grid](*args)` path: no argument building, no config choice and no
JITFunction.run, which binds and specialises ~45 arguments per launch."""

from __future__ import annotations

import torch
import triton

from .. import _env
from . import device as dev
from . import tuning


class Plan:
    """One launch: the compiled kernel, its grid, its arguments in the kernel's order (tensors left out:
    each call puts its own in, so a plan keeps no call's tensors alive)."""

    __slots__ = ("name", "config", "kernel", "grid", "values", "tensors", "descs")

    def __init__(self, name: str, kernel_fn, compiled, grid, args: dict, config) -> None:
        """name: the kernel's in registry.last_launched ("" for none); the rest as the launch had them."""
        merged = dict(args, **config.kwargs) if config is not None else args
        self.name, self.config, self.kernel = name, config, compiled
        grid = grid(merged) if callable(grid) else grid
        self.grid = (tuple(grid) + (1, 1))[:3]
        self.values, self.tensors, self.descs = [], [], []
        for i, (arg, param) in enumerate(kernel_fn.signature.parameters.items()):
            value = merged.get(arg, param.default)
            if isinstance(value, torch.Tensor):
                self.tensors.append((i, arg))
            elif type(value).__name__ == "TensorDescriptor":  # HOST_DESC: remade around each call's tensor
                self.descs.append((i, arg, value.shape, value.strides, value.block_shape, value.layout))
            else:
                self.values.append(value)
                continue
            self.values.append(None)

    @staticmethod
    def replayable(compiled) -> bool:
        """Whether `compiled` is a compiled GPU kernel (the interpreter returns none to replay)."""
        return hasattr(compiled, "run") and hasattr(compiled, "__getitem__")

    def __call__(self, device: torch.device, tensors: dict) -> None:
        """Launches on `device` with `tensors` (name -> tensor, as the kernel names them) put in."""
        values = self.values.copy()
        for i, name in self.tensors:
            values[i] = tensors[name]
        if self.descs:
            from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

            for i, name, shape, strides, box, layout in self.descs:
                values[i] = TensorDescriptor(tensors[name], shape, strides, box, layout)
        with dev.on(device):
            dev.ensure_allocator()  # per thread (device-side descriptors' scratch)
            stream = triton.runtime.driver.active.get_current_stream(device.index)
            self.kernel[self.grid](*values, stream=stream)


class PlanCache:
    """key -> the plans of a call's launches, in order; cleared when it grows past `max_size` (the shapes a
    long process has seen)."""

    def __init__(self, max_size: int = 1024) -> None:
        self._plans: dict[tuple, tuple[Plan, ...]] = {}
        self.max_size = max_size

    def __len__(self) -> int:
        return len(self._plans)

    def get(self, key: tuple | None) -> tuple[Plan, ...] | None:
        return None if key is None else self._plans.get(key)

    def put(self, key: tuple | None, launches: tuple) -> None:
        """Keeps the plans of a call's launches ((name, kernel_fn, compiled, grid, args, config) each),
        except where the call has no key, a launch made none (a forced config, the interpreter) or a CUDA
        graph is being captured (an untuned case launches the table's default there, not later calls')."""
        if key is None or None in launches or dev.capturing():
            return
        if not all(Plan.replayable(launch[2]) for launch in launches):
            return
        if len(self._plans) >= self.max_size:
            self._plans.clear()
        self._plans[key] = tuple(Plan(*launch) for launch in launches)

    def clear(self) -> None:
        self._plans.clear()

    def snapshot(self) -> dict[tuple, tuple[Plan, ...]]:
        """A copy of key -> plans (tests compare what a call kept)."""
        return dict(self._plans)

    def replay(self, key: tuple | None, device: torch.device, tensors: dict, last_launched: dict) -> bool:
        """Launches the plans of `key` with `tensors`, if there are any."""
        plans = self.get(key)
        if plans is None:
            return False
        for plan in plans:
            if plan.name:
                last_launched[plan.name] = plan.config
            plan(device, tensors)
        return True


PLANS = PlanCache()


def key(kind: str, tensors: tuple, *scalars) -> tuple | None:
    """A call's key: each tensor's shape, strides, dtype and pointer alignment (what Triton specialises on,
    and what decides CAN_TMA and HOST_DESC), the device and the scalars (the caller's: scale, window, the
    fp32 matmul precision), and whether autotuning is on. Hooks clear the cache when they change what a
    launch would pick. None (no plan) in the interpreter."""
    if _env.interpreting():
        return None
    return (
        kind, tensors[0].device, *scalars, tuning.enabled(),
        *[(t.shape, t.stride(), t.dtype, t.data_ptr() & 15) for t in tensors],
    )  # fmt: skip
