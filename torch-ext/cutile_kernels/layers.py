"""Layers that `kernels.kernelize` and transformers' `KernelConfig` swap in, by class name."""
from .rms_norm import RMSNorm

__all__ = ["RMSNorm"]
