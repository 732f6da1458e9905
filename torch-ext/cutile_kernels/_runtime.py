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


def warn_fallback(op: str, reason: str) -> None:
    """Warn once per (op, reason) that `op` runs the exact PyTorch reference instead of cuTile."""
    if (op, reason) in _warned:
        return
    _warned.add((op, reason))
    warnings.warn(f"cutile_kernels.{op}: running the PyTorch reference because {reason}",
                  RuntimeWarning, stacklevel=3)


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


def cutile_unavailable(x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """None when cuTile can take `x`; otherwise the reason, for `warn_fallback`."""
    if x.dtype not in dtypes:
        return f"dtype {x.dtype} is not handled (only {', '.join(str(d) for d in dtypes)})"
    if torch.is_grad_enabled() and x.requires_grad:
        return "autograd is recording and this kernel has no backward"
    if x.device.type != "cuda":
        return f"the input is on {x.device.type}"
    return cutile_import_error() or _device_reason(x.device.index)


def tile_module(name: str):
    """`tile/<name>.py`, the cuTile kernels from kernel-src/ (imported on first use: it imports cuda.tile)."""
    return importlib.import_module(f".tile.{name}", __package__)


@functools.cache
def persistent_blocks(index: int) -> int:
    """Grid size for persistent kernels: a few blocks per SM keep the memory system busy."""
    return 4 * torch.cuda.get_device_properties(index).multi_processor_count


def launch(grid: tuple[int, ...], kernel, args: tuple) -> None:
    import cuda.tile as ct

    ct.launch(torch.cuda.current_stream(), grid, kernel, args)
