"""cuTile kernels for transformers LLMs, loaded through the Kernel Hub (`kernels`)."""
from . import layers
from .rms_norm import rms_norm, rms_norm_cutile, rms_norm_reference

__all__ = ["layers", "rms_norm", "rms_norm_cutile", "rms_norm_reference"]
