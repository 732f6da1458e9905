"""MLP layers that own parameters: the merged gate_up SwiGLU MLP and the fused RMSNorm -> MLP (n-to-1).

Each kernel class (forward only, what kernelize swaps in) sits beside its Layout: the parameters transformers
builds in place of the original modules, a `conversion_mapping` from checkpoint keys to them (reversed on
save), and a reference forward for training, fallbacks and CPU.

Merged gate_up: one GEMM computes [gate | up] (the weights concatenated at load time), the cuTile kernel
applies act(gate) * up, a second GEMM is down_proj.
"""
from __future__ import annotations

import torch
from torch import nn

from .checks import Layout, check_fusion, check_replacement, refuse, refuse_quantized
from .gated_act import check_activation, gated_act, gated_act_reference
from .parallel import declare_merged_mlp_sharding
from .rms_norm import gemma_rms_norm, gemma_rms_norm_reference, rms_norm, rms_norm_reference


def merged_gate_up_rules(src: str, dst: str) -> list:
    """Checkpoint -> Layout: `<src>.gate_proj` and `<src>.up_proj` concatenated into `<dst>.gate_up_proj`;
    `<src>.down_proj` moved to `<dst>.down_proj`. transformers reverses them on save_pretrained.

    Scope: only decoder MLPs have `mlp.{gate,up,down}_proj` in the target families (vision towers name theirs
    fc1/fc2), so no other weight is renamed."""
    try:
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # kernels also loads this package without transformers: then no Layout is used
        return []
    from .parallel import ConcatenateGateUp  # Concatenate(dim=0), packed under tensor parallelism
    rules = [WeightConverter([f"{src}.gate_proj.{p}", f"{src}.up_proj.{p}"], f"{dst}.gate_up_proj.{p}",
                             operations=[ConcatenateGateUp()]) for p in ("weight", "bias")]
    if src != dst:
        rules.append(WeightRenaming(f"{src}.down_proj.", f"{dst}.down_proj."))
    return rules


def _activation(config, site) -> str:
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    try:
        return check_activation(act)
    except ValueError as e:  # refused inside transformers' model construction: leave its state clean
        refuse(str(e).removeprefix("cutile_kernels: "), site)


class _MergedGateUp(Layout):
    """gate_up_proj and down_proj with the shapes (and bias) of an MLP's gate/up/down projections."""

    def _init_projections(self, hidden: int, inter: int, bias: bool, act: str) -> None:
        # Built empty (on meta inside from_pretrained): every value comes from the checkpoint through
        # conversion_mapping, never from the original modules.
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.hidden_act = act

    def _mlp_reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_act_reference(self.gate_up_proj(x), self.hidden_act))


class _MergedMLPKernel(nn.Module):
    """What the kernel classes below read from their Layout (annotations only: kernel classes own nothing)."""

    gate_up_proj: nn.Linear
    down_proj: nn.Linear
    hidden_act: str

    has_backward = True  # GEMMs differentiate through torch, the norm and activation through their custom ops
    can_torch_compile = True  # the GEMMs stay torch ops; norm and activation are custom ops


def _merged_mlp(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return layer.down_proj(gated_act(layer.gate_up_proj(h), layer.hidden_act))


# --- SwiGLUMLP: replaces LlamaMLP, MistralMLP, Qwen2MLP, Qwen3MLP ------------------------------------------

class SwiGLUMLP(_MergedMLPKernel):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _merged_mlp(self, x)


class SwiGLUMLPLayout(_MergedGateUp):
    conversion_mapping = merged_gate_up_rules("mlp", "mlp")

    def __init__(self, config, *modules):  # more arguments: transformers hands it a fusion's modules (refused)
        site = check_replacement(type(self), config, *modules)  # LlamaMLP, MistralMLP, Qwen2MLP, Qwen3MLP
        refuse_quantized(type(self), config, "gate_up_proj", site)
        super().__init__()
        self._init_projections(config.hidden_size, config.intermediate_size,
                               bool(getattr(config, "mlp_bias", False)), _activation(config, site))
        declare_merged_mlp_sharding(config, "mlp", "mlp")  # tensor parallelism: parallel.py

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mlp_reference(x)


# --- RMSNormMLP: fuses (post_attention_layernorm, mlp) of Llama, Mistral, Qwen2, Qwen3 ---------------------

class _NormMLPLayout(_MergedGateUp):
    """Takes the first child's slot (the norm); keeps the norm's `weight`, so its key is unchanged."""

    def _init_from(self, norm: nn.Module, mlp: nn.Module, site) -> None:
        refuse_quantized(type(self), mlp.config, "gate_up_proj", site)
        self.weight = nn.Parameter(torch.empty(norm.weight.shape))
        self._init_projections(mlp.gate_proj.in_features, mlp.gate_proj.out_features,
                               mlp.gate_proj.bias is not None, _activation(mlp.config, site))


class RMSNormMLP(_MergedMLPKernel):
    weight: torch.Tensor
    variance_epsilon: float

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _merged_mlp(self, rms_norm(hidden_states, self.weight, self.variance_epsilon))


class RMSNormMLPLayout(_NormMLPLayout):
    conversion_mapping = merged_gate_up_rules("mlp", "post_attention_layernorm")

    def __init__(self, norm: nn.Module, mlp: nn.Module = None):
        site = check_fusion(type(self), norm, mlp)  # the post_attention_layernorm and mlp of a Llama-form layer
        super().__init__()
        self.variance_epsilon = norm.variance_epsilon
        self._init_from(norm, mlp, site)
        declare_merged_mlp_sharding(mlp.config, "mlp", "post_attention_layernorm")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._mlp_reference(rms_norm_reference(hidden_states, self.weight, self.variance_epsilon))


# --- GemmaRMSNormMLP: fuses Gemma3's (pre_feedforward_layernorm, mlp), GELU-tanh gating ---------------------

class GemmaRMSNormMLP(_MergedMLPKernel):
    weight: torch.Tensor
    eps: float

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _merged_mlp(self, gemma_rms_norm(hidden_states, self.weight, self.eps))


class GemmaRMSNormMLPLayout(_NormMLPLayout):
    conversion_mapping = merged_gate_up_rules("mlp", "pre_feedforward_layernorm")

    def __init__(self, norm: nn.Module, mlp: nn.Module = None):
        site = check_fusion(type(self), norm, mlp)  # Gemma3's pre_feedforward_layernorm and mlp
        super().__init__()
        self.eps = norm.eps
        self._init_from(norm, mlp, site)
        declare_merged_mlp_sharding(mlp.config, "mlp", "pre_feedforward_layernorm")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._mlp_reference(gemma_rms_norm_reference(hidden_states, self.weight, self.eps))
