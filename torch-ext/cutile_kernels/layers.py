"""Layers that `kernels.kernelize` and transformers' `KernelConfig` swap in, by class name.

Each lives beside its reference, launcher and (for layers that own parameters) its `<Name>Layout`.
"""
from .attention import QKVAttention
from .decoder import DecoderLayer, GemmaDecoderLayer
from .mlp import GemmaRMSNormMLP, RMSNormMLP, SwiGLUMLP
from .rms_norm import GemmaRMSNorm, RMSNorm
from .rope import ApplyRotaryPosEmb

__all__ = ["ApplyRotaryPosEmb", "DecoderLayer", "GemmaDecoderLayer", "GemmaRMSNorm", "GemmaRMSNormMLP", "QKVAttention",
           "RMSNorm", "RMSNormMLP", "SwiGLUMLP"]
