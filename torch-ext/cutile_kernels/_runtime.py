"""When a cuTile kernel can run, and the one-time warning that names why it cannot.

`cuda-tile` is not on the Kernel Hub's dependency allow list, so it is never declared and never imported at
package import time: `cuda.tile` (and the kernels under `tile/`) load on the first call that needs them.
"""
from __future__ import annotations

import functools
import importlib
import warnings

import torch

# tileiras targets sm_80 and newer (Ampere, Ada, Hopper with tileiras >= 13.3, Blackwell).
MIN_CAPABILITY = (8, 0)
INSTALL_HINT = ("pip install cuda-tile==1.7.0 nvidia-cuda-tileiras==13.4.* nvidia-cuda-nvcc==13.4.* "
                "nvidia-nvvm==13.4.*")

_warned: set[tuple[str, str]] = set()


class CutileFallbackWarning(RuntimeWarning):
    """An op ran its exact PyTorch reference instead of cuTile (issued once per op and reason); filter by this
    category, e.g. ``warnings.simplefilter("error", CutileFallbackWarning)`` to insist on the kernels."""


def warn_fallback(op: str, reason: str) -> None:
    """Warn once per (op, reason) that `op` runs the exact PyTorch reference instead of cuTile."""
    if (op, reason) in _warned:
        return
    _warned.add((op, reason))
    warnings.warn(f"cutile_kernels.{op}: running the PyTorch reference because {reason}",
                  CutileFallbackWarning, stacklevel=3)


@functools.cache
def cutile_import_error() -> str | None:
    try:
        importlib.import_module("cuda.tile")
    except ImportError as e:  # a missing package or a broken compiler install
        return f"cuda.tile cannot be imported ({e}); install it with: {INSTALL_HINT}"
    return None


@functools.cache
def _device_reason(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < MIN_CAPABILITY:
        return f"the GPU is sm_{major}{minor} and cuTile needs sm_80 or newer"
    return None


# GPUs (device indices) where cuda.tile imported and the capability is supported: the hot path checks only this.
_READY: set[int] = set()


def cutile_ready(x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """The per-call check (a few attribute reads): True when cuTile takes `x` on an already-vetted GPU."""
    return x.is_cuda and x.dtype in dtypes and x.get_device() in _READY


def cutile_unavailable(x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """None when cuTile can take `x`; otherwise the reason, for `warn_fallback`. Vets the GPU on first use."""
    if x.dtype not in dtypes:
        return f"dtype {x.dtype} is not handled (only {', '.join(str(d) for d in dtypes)})"
    if x.device.type != "cuda":
        return f"the input is on {x.device.type}"
    reason = cutile_import_error() or _device_reason(x.get_device())
    if reason is None:
        _READY.add(x.get_device())
    return reason


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Autograd is recording for one of `tensors`: the call goes through the custom op, whose registered
    backward runs the cuTile backward kernels."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


_TILE_MODULES: dict = {}


def tile_module(name: str):
    """`tile/<name>.py`, the cuTile kernels from kernel-src/ (imported on first use: it imports cuda.tile)."""
    module = _TILE_MODULES.get(name)
    if module is None:
        module = _TILE_MODULES[name] = importlib.import_module(f".tile.{name}", __package__)
    return module


@functools.cache
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_LAUNCH = []


def launch(index: int, grid: tuple[int, ...], kernel, args: tuple) -> None:
    """ct.launch on the current stream of GPU `index` (read per call, so CUDA graph capture works). The raw
    stream handle costs ~0.1 µs where torch.cuda.current_stream() costs ~7 µs (measured, H100)."""
    if not _LAUNCH:
        import cuda.tile as ct

        _LAUNCH.append(ct.launch)
    _LAUNCH[0](torch._C._cuda_getCurrentRawStream(index), grid, kernel, args)
