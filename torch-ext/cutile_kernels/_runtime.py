"""When a cuTile kernel can run, and the one-time warning that names why it cannot.

`cuda-tile` is not on the Kernel Hub's dependency allow list, so it is never declared and never imported at
package import time: `cuda.tile` (and the kernels under `tile/`) load on the first call that needs them.

Where a launch goes (`launch`): a cubin of this variant (`cubins/`, see _aot.py) when one matches the kernel,
its arguments and this GPU's arch; else cuTile's JIT (ct.launch) when cuda.tile imports; else the op runs its
reference (the launcher raises KernelUnavailable, which the op turns into the one-time warning). A GPU with
precompiled kernels needs no cuda.tile: the kernel modules are then loaded for planning only.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from pathlib import Path

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


class KernelUnavailable(RuntimeError):
    """A launch that neither a precompiled cubin nor the JIT can run; the op runs its reference instead."""


# GPUs (device indices) where cuTile can run (precompiled kernels for its arch, or cuda.tile imports) and the
# capability is supported: the hot path checks only this.
_READY: set[int] = set()
_PACKAGE_DIR = Path(__file__).resolve().parent
# GPU index -> its precompiled kernels (_aot.Precompiled), or None: decided once per GPU
_PRECOMPILED: dict[int, object] = {}


def precompiled(index: int):
    """The precompiled kernels of this variant for GPU `index`, or None."""
    if index not in _PRECOMPILED:
        from . import _aot

        found = _aot.find(_PACKAGE_DIR, index, torch.cuda.get_device_capability(index))
        if found is not None:  # the op modules import their kernel modules: without cuda.tile, for planning
            _aot.load_planning_modules(__package__, _PACKAGE_DIR)
        _PRECOMPILED[index] = found
    return _PRECOMPILED[index]


def device_unsupported(x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """None when cuTile can take `x` (dtype, a CUDA tensor, a vetted GPU); otherwise the reason. The first
    line is the per-call path (a few attribute reads); the GPU is vetted once, on its first tensor."""
    if x.is_cuda and x.dtype in dtypes and x.get_device() in _READY:
        return None
    if x.dtype not in dtypes:
        return f"dtype {x.dtype} is not handled (only {', '.join(str(d) for d in dtypes)})"
    if x.device.type != "cuda":
        return f"the input is on {x.device.type}"
    index = x.get_device()
    reason = _device_reason(index) or (None if precompiled(index) is not None else cutile_import_error())
    if reason is None:
        _READY.add(index)
    return reason


@functools.cache
def gpu(index: int) -> tuple[str, int]:
    """(model key of the per-GPU launch table, SM count) of GPU `index`: what the launch plans take."""
    from .tile.tuned import gpu_key

    props = torch.cuda.get_device_properties(index)
    return gpu_key(props.name), props.multi_processor_count


_LAUNCH = []


def launch(index: int, kernel, grid: tuple[int, ...], args: tuple) -> None:
    """Launch a launch plan (kernel, grid, args) on the current stream of GPU `index` (read per call, so CUDA
    graph capture works): its precompiled cubin when one matches, else ct.launch; KernelUnavailable when
    neither can. The raw stream handle costs ~0.1 µs where torch.cuda.current_stream() costs ~7 µs (measured,
    H100)."""
    stream = torch._C._cuda_getCurrentRawStream(index)
    cubins = _PRECOMPILED.get(index)
    if cubins is not None and cubins.launch(kernel, grid, args, stream):
        return
    if not _LAUNCH:
        if cutile_import_error():
            raise KernelUnavailable(f"no precompiled kernel takes these arguments (alignment, strides or sizes "
                                    f"outside what was compiled) and {cutile_import_error()}")
        import cuda.tile as ct

        _LAUNCH.append(ct.launch)
    if not hasattr(kernel, "_annotated_function"):  # planned without cuda.tile: the same kernel for the JIT
        from . import _aot

        kernel = _aot.jit_kernel(kernel, __package__, _PACKAGE_DIR)
    _LAUNCH[0](stream, grid, kernel, args)
