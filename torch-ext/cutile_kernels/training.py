"""Keeping the layers in `model.train()`.

transformers turns a KernelConfig into a kernels mapping for the mode the model is in at load time (inference)
and reuses that mapping when `model.train()` re-kernelizes in TRAINING mode: no entry matches, so every layer
falls back to transformers' own forward (and a Layout to its reference forward), although the layers declare
`has_backward = True`. `enable_training(model)` registers each entry for every mode (kernels' Mode.FALLBACK).

It also makes the model's loss `causal_lm_loss` (cross_entropy.py) where the model's loss is transformers'
ForCausalLMLoss: the cross-entropy without fp32 copies of the logits (the loss is not a module, so no KernelConfig
entry can reach it).
"""
from __future__ import annotations


def enable_training(model, loss: bool = True):
    """Make `model.train()` keep the kernels of a model loaded with `use_kernels=True, kernel_config=...`;
    applies at once when the model is already training. With `loss` (default), a causal LM whose loss function is
    transformers' ForCausalLMLoss computes it with `causal_lm_loss` (the same result from one pass over the logits
    per direction); a loss function set by the user stays. Returns the model."""
    from kernels import Mode

    config = getattr(model, "kernel_config", None)
    if config is None or not isinstance(config.kernel_mapping, dict):
        raise ValueError("cutile_kernels.enable_training: the model was not loaded with a KernelConfig")
    mapping = config.kernel_mapping
    # Applied, a KernelConfig maps each layer to {device: {mode: repository}} (transformers' kernelize form).
    unapplied = [k for k, v in mapping.items()
                 if not (isinstance(v, dict) and all(isinstance(repos, dict) and repos for repos in v.values()))]
    if unapplied:
        raise ValueError(f"cutile_kernels.enable_training: the model's KernelConfig was not applied ({unapplied[0]!r} "
                         f"maps to {mapping[unapplied[0]]!r}); load the model with from_pretrained(..., "
                         "use_kernels=True, kernel_config=config)")
    for devices in mapping.values():
        for device, repos in devices.items():
            # Every mode would pick the same layer; the layer's has_backward/can_torch_compile still decide.
            devices[device] = {Mode.FALLBACK: next(iter(repos.values()))}
    if loss:
        _use_causal_lm_loss(model)
    if model.training:
        model.set_use_kernels(True)
    return model


def _use_causal_lm_loss(model) -> None:
    from transformers.loss.loss_utils import LOSS_MAPPING

    from .cross_entropy import causal_lm_loss

    if getattr(model, "loss_function", None) is LOSS_MAPPING["ForCausalLM"]:
        model.loss_function = causal_lm_loss
