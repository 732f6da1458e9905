"""cuTile (`cuda.tile`) kernels of cutile-kernels.

Imported lazily by the torch-facing package: nothing here may run at import time of `cutile_kernels`
on a machine without `cuda-tile`.
"""
