"""LoRA adapters trained on transformers' own modules, converted for a model loaded with the merged Layouts.

SwiGLUMLPLayout, RMSNormMLPLayout, GemmaRMSNormMLPLayout and QKVAttentionLayout replace gate_proj and up_proj (q_proj,
k_proj and v_proj) by one Linear. An adapter trained on the original model has LoRA weights for the separate
projections, which match no module here: loaded as it is, PEFT injects nothing there and only warns ("missing
adapter keys"; transformers' load report lists them as UNEXPECTED), so the adapter's MLP (attention) updates are
silently dropped. `convert_lora_adapter` rewrites such an adapter for this model's module tree, exactly:

    W_gate' = W_gate + s_gate B_gate A_gate,  W_up' = W_up + s_up B_up A_up
    =>  W_gate_up' = W_gate_up + B A,  A = [A_gate; A_up],  B = [[s_gate B_gate, 0], [0, s_up B_up]]

(PEFT's own conversion for fused MoE experts does the same). Each module's scaling (lora_alpha / r, or / sqrt(r)
with rsLoRA, per rank_pattern and alpha_pattern) is folded into its B, and every module is zero-padded to the
largest rank, so the converted adapter has one rank, lora_alpha equal to it (scaling 1) and an explicit list of
target modules. A LoRA on down_proj moves with it where the fused norm+MLP Layouts put down_proj. Adapters trained
on a model with these Layouts need no conversion (their targets are `gate_up_proj`, `qkv_proj`).

`peft` is not a dependency of this package (imported here only).
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import torch
from torch import nn


def _plan(model: nn.Module) -> tuple[dict[str, list[tuple[str, int]]], dict[str, str]]:
    """({merged module path: [(original module path, rows)]}, {original path: path in this model}) of the model's
    merged Layouts (paths as model.named_modules() names them)."""
    merges, moves = {}, {}
    for path, module in model.named_modules():
        if not getattr(type(module), "_cutile_kernels_layout", False):
            continue
        gate_up, qkv = getattr(module, "gate_up_proj", None), getattr(module, "qkv_proj", None)
        if isinstance(gate_up, nn.Linear):  # from <layer>.mlp: in place (SwiGLUMLP) or in the norm's slot (fused)
            source = f"{path.rsplit('.', 1)[0]}.mlp" if "." in path else "mlp"
            rows = gate_up.out_features // 2
            merges[f"{path}.gate_up_proj"] = [(f"{source}.gate_proj", rows), (f"{source}.up_proj", rows)]
            moves[f"{source}.down_proj"] = f"{path}.down_proj"
        if isinstance(qkv, nn.Linear):
            merges[f"{path}.qkv_proj"] = [(f"{path}.{x}_proj", rows) for x, rows in zip("qkv", module.qkv_split)]
    return merges, moves


def _refuse(adapter, why: str):
    raise ValueError(f"cutile_kernels.convert_lora_adapter: {adapter}: {why}")


def convert_lora_adapter(model: nn.Module, adapter: str | Path, save_directory: str | Path,
                         **download_kwargs) -> Path:
    """Write to `save_directory` the LoRA adapter `adapter` (a Hub id or a directory, as PeftModel.from_pretrained
    takes it; `download_kwargs` such as revision or token go to the download) rewritten for `model`, a model loaded
    with this package's KernelConfig: load it with `PeftModel.from_pretrained(model, save_directory)` or
    `model.load_adapter(save_directory)`. Raises for what it cannot convert exactly (DoRA, LoRA biases, embedding
    LoRA, other PEFT methods) and for LoRA weights that match no module of `model`. Returns `save_directory`."""
    from peft import PeftConfig, PeftType
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key
    from safetensors.torch import save_file

    config = PeftConfig.from_pretrained(str(adapter), **download_kwargs)
    if config.peft_type != PeftType.LORA:
        _refuse(adapter, f"a {config.peft_type} adapter; only LoRA is converted")
    unsupported = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "fan_in_fan_out": "fan_in_fan_out",
                   "target_parameters": "target_parameters"}
    for field, what in unsupported.items():
        if getattr(config, field, None):
            _refuse(adapter, f"{what} is not converted")
    weights = load_peft_weights(str(adapter), device="cpu", **download_kwargs)
    pairs, others = {}, {}
    for key, tensor in weights.items():
        found = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if found:
            pairs.setdefault(found[1], {})[found[2]] = tensor
        elif "lora_" in key:
            _refuse(adapter, f"{key} is not a Linear's LoRA weight (embedding LoRA, DoRA and biases are not converted)")
        else:
            others[key] = tensor  # modules_to_save and the like: kept as they are

    lora = {}  # module path -> (A, s * B): each module's scaling folded into its B
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            _refuse(adapter, f"{path} has LoRA weights {sorted(ab)}, not A and B")
        r = ab["A"].shape[0]
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), path), config.lora_alpha)
        scale = alpha / (math.sqrt(r) if config.use_rslora else r)
        lora[path] = ab["A"], (ab["B"].float() * scale).to(ab["B"].dtype)
    if not lora:
        _refuse(adapter, "it holds no LoRA weights")
    merges, moves = _plan(model)
    for target, parts in merges.items():
        found = [lora.pop(source, None) for source, _ in parts]
        if all(f is None for f in found):
            continue
        like = next(f for f in found if f is not None)[0]
        a = torch.cat([f[0] if f is not None else like.new_zeros(0, like.shape[1]) for f in found])
        lora[target] = a, torch.block_diag(*[f[1] if f is not None else like.new_zeros(rows, 0)
                                             for f, (_, rows) in zip(found, parts)])
    lora = {moves.get(path, path): ab for path, ab in lora.items()}
    modules = dict(model.named_modules())
    for path, (a, b) in lora.items():
        linear = modules.get(path)
        if not isinstance(linear, nn.Linear) or (linear.in_features, linear.out_features) != (a.shape[1], b.shape[0]):
            _refuse(adapter, f"its LoRA for {path} ({a.shape[1]} -> {b.shape[0]}) matches no Linear of this model "
                             f"(found {type(linear).__name__ if linear is not None else 'nothing'}); an adapter "
                             "for another model?")
    rank = max(a.shape[0] for a, _ in lora.values())
    out = dict(others)
    for path, (a, b) in lora.items():  # zero-padded to one rank: the same product
        out[f"base_model.model.{path}.lora_A.weight"] = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
        out[f"base_model.model.{path}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1)
    converted = copy.deepcopy(config)
    converted.r, converted.lora_alpha, converted.use_rslora = rank, rank, False  # scaling 1: folded into B
    converted.rank_pattern, converted.alpha_pattern = {}, {}
    converted.target_modules = sorted(lora)
    converted.layers_to_transform = converted.layers_pattern = converted.exclude_modules = None
    save_directory = Path(save_directory)
    converted.save_pretrained(str(save_directory))
    save_file({k: v.contiguous() for k, v in out.items()}, str(save_directory / "adapter_model.safetensors"))
    return save_directory
