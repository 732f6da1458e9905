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
                "nvidia-nvvm==13.4.* nvidia-cuda-crt==13.4.*")

DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what every kernel takes (fp32 statistics inside)
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


def device_unsupported(x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """None when cuTile can take `x` (dtype, a CUDA tensor, a vetted GPU); otherwise the reason. The first
    line is the per-call path (a few attribute reads); the GPU is vetted once, on its first tensor."""
    if x.is_cuda and x.dtype in dtypes and x.get_device() in _READY:
        return None
    if x.dtype not in dtypes:
        return f"dtype {x.dtype} is not handled (only {', '.join(str(d) for d in dtypes)})"
    if x.device.type != "cuda":
        return f"the input is on {x.device.type}"
    reason = cutile_import_error() or _device_reason(x.get_device())
    if reason is None:
        _READY.add(x.get_device())
    return reason


@functools.cache
def gpu(index: int) -> tuple[str, int]:
    """(model key of the per-GPU launch table, SM count) of GPU `index`: what the launch plans take."""
    from .tile.tuned import gpu_key

    props = torch.cuda.get_device_properties(index)
    return gpu_key(props.name), props.multi_processor_count


_LAUNCH = []


def launch(index: int, kernel, grid: tuple[int, ...], args: tuple) -> None:
    """ct.launch of a launch plan (kernel, grid, args) on the current stream of GPU `index` (read per call, so
    CUDA graph capture works). The raw stream handle costs ~0.1 µs where torch.cuda.current_stream() costs ~7 µs
    (measured, H100)."""
    if not _LAUNCH:
        import cuda.tile as ct

        _LAUNCH.append(ct.launch)
    _LAUNCH[0](torch._C._cuda_getCurrentRawStream(index), grid, kernel, args)
