"""cuTile (`cuda.tile`) kernels of cutile-kernels.

Imported lazily by the torch-facing package: nothing here may run at import time of `cutile_kernels`
on a machine without `cuda-tile`.
"""

import functools

# Constants the launchers (torch-ext) and the kernels share. Kept here because this file imports nothing but the
# standard library: the torch-facing package reads them at import time, on machines without cuda.tile too.
# transformers' ACT2FN names (config.hidden_act / hidden_activation) -> the gated_act kernels' ACT constant
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1}


def with_hints(kernel, occupancy: int = 0, warps: int = 0):
    """`kernel` compiled for `occupancy` resident blocks per SM and `warps` warps per block (0: cuTile's choice).
    The occupancy hint sets the register budget: the RMSNorm backward at 32768 x 4096 ran 2.5x faster with
    occupancy 2 on an H200 than without (benchmarks/NOTES.md). `warps` (num_worker_warps: 4 or 8 with CTK 13.4):
    cuTile gives a 4096-wide bf16 row in rms_norm_row 128 threads, 8 warps make it 256 (Liger's RMSNorm runs 8
    warps from 2048 columns): half the loads per thread. Called per launch: no hints is the kernel itself."""
    return _hinted(kernel, occupancy, warps) if occupancy or warps else kernel


@functools.cache
def _hinted(kernel, occupancy: int, warps: int):
    # cached: each variant has its own compile cache
    hints = {k: v for k, v in (("occupancy", occupancy), ("num_worker_warps", warps)) if v}
    return kernel.replace_hints(**hints)
