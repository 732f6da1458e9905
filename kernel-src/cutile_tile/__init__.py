"""cuTile (`cuda.tile`) kernels of cutile-kernels.

Imported lazily by the torch-facing package: nothing here may run at import time of `cutile_kernels`
on a machine without `cuda-tile`.
"""

# Constants the launchers (torch-ext) and the kernels share. Kept here because this file imports nothing:
# the torch-facing package reads them at import time, on machines without cuda.tile too.
# transformers' ACT2FN names (config.hidden_act / hidden_activation) -> the gated_act kernels' ACT constant
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1}
