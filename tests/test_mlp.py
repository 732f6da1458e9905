"""The MLP layers that own parameters: SwiGLUMLP (merged gate_up), RMSNormMLP (the post-attention norm fused with
the MLP, n-to-1) and GemmaRMSNormMLP, with their Layouts. The matrix loads every family and MLP case through
from_pretrained(use_kernels=True, kernel_config=recommended_mapping(...)): on CPU exact logits and a save that
writes the original keys back, on a GPU real cuTile within bf16 tolerance (tests/_helpers.py
check_layout_model). Training through these layers: tests/test_training.py."""
import sys

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from devtools.checkpoints import ALL_FAMILIES, make_checkpoint

from ._helpers import DEVICES, IDS, check_layout_model, layout_mapping, load, logits, plain

# Gemma3's MLP is offered fused with its norm only (recommended_mapping refuses mlp="merged" for it); the
# kernels_ci subset is Llama's fused case
CASES = [pytest.param(f, case, marks=[pytest.mark.kernels_ci] if (f, case) == ("llama", "fused") else [])
         for f in ALL_FAMILIES for case in ("mlp", "fused", "norm+fused") if not (f == "gemma3" and case == "mlp")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family,case", CASES)
def test_layout(ck_hub, checkpoints, hub, cpu_kernel_config, tmp_path, device, family, case):
    check_layout_model(ck_hub, checkpoints[family], layout_mapping(ck_hub, family, hub, case), device, tmp_path)


def test_swiglu_grads_match_transformers(ck):
    """The merged MLP's gradient through the gated_act op equals autograd through transformers' LlamaMLP."""
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=2))
    x = torch.randn(5, 16, requires_grad=True)
    mlp(x).sum().backward()
    want = x.grad.clone()
    x.grad = None
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    mlp.down_proj(ck._ops.ops.gated_act(x @ gate_up.T, "silu")).sum().backward()
    assert torch.allclose(x.grad, want, rtol=1e-5, atol=1e-6)


def test_layout_forward_without_cuda_tile(checkpoints, ck_hub, hub, cpu_kernel_config, monkeypatch):
    """With cuda.tile missing the kernel forward still computes the exact result (reference path)."""
    monkeypatch.setitem(sys.modules, "cuda.tile", None)
    model, _ = load(checkpoints["qwen3"], layout_mapping(ck_hub, "qwen3", hub, "fused"))
    assert torch.equal(logits(model), logits(plain(checkpoints["qwen3"])))


def test_output_hidden_states_after_fused_load(checkpoints, ck_hub, hub, cpu_kernel_config):
    model, _ = load(checkpoints["qwen3"], layout_mapping(ck_hub, "qwen3", hub, "fused"))
    with torch.no_grad():
        assert len(model(IDS, output_hidden_states=True).hidden_states) == 3


def test_unsupported_activation_is_a_clear_error(ck_hub, hub, cpu_kernel_config, tmp_path):
    path = make_checkpoint("llama", tmp_path / "relu", hidden_act="relu")
    with pytest.raises(ValueError, match="activation 'relu' is not supported"):
        load(path, layout_mapping(ck_hub, "llama", hub, "mlp"))
