"""Layers that own parameters, on CPU: SwiGLUMLP, RMSNormMLP (n-to-1), GemmaRMSNorm, GemmaRMSNormMLP.

Each loads through from_pretrained(use_kernels=True, kernel_config=...) (transformers' "cpu" refusal lifted by
the cpu_kernel_config fixture), matches the plain model exactly, saves back to the original keys, keeps the kernel
forward in training (has_backward=True) with the plain model's loss and gradients, and leaves transformers' global
state clean.
"""
import json

import kernels
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, KernelConfig

from devtools.checkpoints import ALL_FAMILIES

IDS = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
MLP_CLASS = {"llama": "LlamaMLP", "mistral": "MistralMLP", "qwen2": "Qwen2MLP", "qwen3": "Qwen3MLP"}


def fused_key(norm: str):
    return (("RMSNorm", f"model.layers.*.{norm}"), ("MLP", "model.layers.*.mlp"))


def configs(family: str, hub: str) -> dict[str, dict]:
    """The recommended KernelConfig mappings (README table) per family."""
    if family == "gemma3":
        return {"norm": {"^Gemma3RMSNorm$": f"{hub}:GemmaRMSNorm"},
                "fused": {fused_key("pre_feedforward_layernorm"): f"{hub}:GemmaRMSNormMLP"},
                "norm+fused": {"^Gemma3RMSNorm$": f"{hub}:GemmaRMSNorm",
                               fused_key("pre_feedforward_layernorm"): f"{hub}:GemmaRMSNormMLP"}}
    return {"mlp": {f"^{MLP_CLASS[family]}$": f"{hub}:SwiGLUMLP"},
            "fused": {fused_key("post_attention_layernorm"): f"{hub}:RMSNormMLP"},
            "norm+fused": {"RMSNorm": f"{hub}:RMSNorm",
                           fused_key("post_attention_layernorm"): f"{hub}:RMSNormMLP"}}


CASES = [(f, name) for f in ALL_FAMILIES for name in ("norm", "mlp", "fused", "norm+fused")
         if name in configs(f, "x")]


def load(path, mapping):
    return AutoModelForCausalLM.from_pretrained(path, use_kernels=True, kernel_config=KernelConfig(mapping),
                                                output_loading_info=True)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def layouts(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Layout")]


def checkpoint_keys(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family,case", CASES)
def test_layout_loads_matches_and_round_trips(checkpoints, hub, cpu_kernel_config, tmp_path, family, case):
    plain = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    model, info = load(checkpoints[family], configs(family, hub)[case])
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    kernel = kernels.get_kernel(hub, version=1)
    found = layouts(model)
    assert found
    for m in found:  # kernelize bound the kernel class's forward to each Layout
        kernel_cls = getattr(kernel.layers, type(m).__name__.removesuffix("Layout"))
        assert m.forward.__func__ is kernel_cls.forward
    assert torch.equal(logits(model), logits(plain))

    model.save_pretrained(tmp_path)
    assert checkpoint_keys(tmp_path) == checkpoint_keys(checkpoints[family])
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == \
        json.loads((checkpoints[family] / "config.json").read_text())["architectures"]
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(logits(reloaded), logits(plain))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_training_keeps_the_kernel_forward(checkpoints, hub, cpu_kernel_config, family):
    """model.train() re-kernelizes in TRAINING mode (transformers); after enable_training the layers
    (has_backward=True) stay, not the Layout's reference, and the step matches the plain model."""
    case = "fused"
    plain = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    model, _ = load(checkpoints[family], configs(family, hub)[case])
    kernels.get_kernel(hub, version=1).enable_training(model)
    model.train()
    plain.train()
    assert layouts(model) and all(m.forward.__func__ is not type(m).forward for m in layouts(model))
    out, ref = model(IDS, labels=IDS), plain(IDS, labels=IDS)
    assert torch.equal(out.logits, ref.logits)
    out.loss.backward()
    ref.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    g = grads[next(n for n in grads if n.endswith("gate_up_proj.weight"))]
    assert g is not None and g.abs().sum() > 0
    # the merged gradient is the two original gradients, concatenated
    layer = plain.model.layers[0].mlp
    merged = torch.cat([layer.gate_proj.weight.grad, layer.up_proj.weight.grad])
    fused_name = "pre_feedforward_layernorm" if family == "gemma3" else "post_attention_layernorm"
    got = grads[f"model.layers.0.{fused_name}.gate_up_proj.weight"]
    assert torch.allclose(got, merged, rtol=1e-5, atol=1e-7)
    model.eval()  # and back to inference: still the kernel forward
    assert all(m.forward.__func__ is not type(m).forward for m in layouts(model))


def test_train_without_enable_training_falls_back_to_the_reference(checkpoints, hub, cpu_kernel_config):
    """What enable_training exists for: transformers maps a KernelConfig for the load-time mode only, so a plain
    model.train() swaps the Layout's reference forward back in (still correct, but no kernels)."""
    model, _ = load(checkpoints["llama"], configs("llama", hub)["fused"])
    model.train()
    assert all(m.forward.__func__ is type(m).forward for m in layouts(model))
    with pytest.raises(ValueError, match="not loaded with a KernelConfig"):
        kernels.get_kernel(hub, version=1).enable_training(AutoModelForCausalLM.from_pretrained(checkpoints["llama"]))


def test_layout_forward_without_cuda_tile(checkpoints, hub, cpu_kernel_config, monkeypatch):
    """With cuda.tile missing the kernel forward still computes the exact result (reference path)."""
    import sys

    monkeypatch.setitem(sys.modules, "cuda.tile", None)
    plain = AutoModelForCausalLM.from_pretrained(checkpoints["qwen3"])
    model, _ = load(checkpoints["qwen3"], configs("qwen3", hub)["fused"])
    assert torch.equal(logits(model), logits(plain))


def test_output_hidden_states_after_fused_load(checkpoints, hub, cpu_kernel_config):
    model, _ = load(checkpoints["qwen3"], configs("qwen3", hub)["fused"])
    with torch.no_grad():
        assert len(model(IDS, output_hidden_states=True).hidden_states) == 3


@pytest.mark.parametrize("guarded", [True, False])
def test_guard_keeps_later_plain_loads_clean(checkpoints, hub, cpu_kernel_config, kernel_repo, guarded):
    """Without the guard transformers leaks the load's patches into a later plain load (this is the bug the
    guard exists for); with it the later plain load is exactly the plain model."""
    guard = kernels.get_local_kernel(kernel_repo / "build" / "torch-cpu").transformers_state_guard
    reference = AutoModelForCausalLM.from_pretrained(checkpoints["qwen3"])
    ref_logits = logits(reference)
    if guarded:
        with guard():
            load(checkpoints["qwen3"], configs("qwen3", hub)["fused"])
    else:
        load(checkpoints["qwen3"], configs("qwen3", hub)["fused"])  # the autouse guard cleans up after the test
    later, info = AutoModelForCausalLM.from_pretrained(checkpoints["qwen3"], output_loading_info=True)
    clean = not any(info.values()) and not layouts(later)
    assert clean is guarded
    if guarded:
        assert torch.equal(logits(later), ref_logits)
        with torch.no_grad():
            assert len(later(IDS, output_hidden_states=True).hidden_states) == 3


def test_unsupported_activation_is_a_clear_error(checkpoints, hub, cpu_kernel_config, tmp_path):
    from devtools.checkpoints import make_checkpoint

    path = make_checkpoint("llama", tmp_path / "relu", hidden_act="relu")
    with pytest.raises(ValueError, match="activation 'relu' is not supported"):
        load(path, configs("llama", hub)["mlp"])


def test_guard_restores_classes_after_a_failed_load(checkpoints, hub, cpu_kernel_config, kernel_repo, tmp_path):
    """transformers' apply_patches leaves Layout classes in its modules when building the model raises."""
    from transformers.models.llama import modeling_llama

    from devtools.checkpoints import make_checkpoint

    original = modeling_llama.LlamaMLP
    guard = kernels.get_local_kernel(kernel_repo / "build" / "torch-cpu").transformers_state_guard
    path = make_checkpoint("llama", tmp_path / "relu", hidden_act="relu")
    with guard(), pytest.raises(ValueError):
        load(path, configs("llama", hub)["mlp"])
    assert modeling_llama.LlamaMLP is original
