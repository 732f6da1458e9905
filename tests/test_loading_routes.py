"""Every route that loads the RMSNorm kernel into tiny Llama, Mistral, Qwen2 and Qwen3 checkpoints, and the guard
that keeps a kernel load out of later plain loads.

(a) transformers' KernelConfig with the Hub repo id resolved to the local build through LOCAL_KERNELS (on CPU
    with transformers' "cpu" refusal lifted; on a GPU unpatched, with real cuTile, also with every kernel);
(b) local paths: kernels.get_local_kernel / LocalLayerRepository + kernelize, and transformers'
    use_local_kernel=True (broken upstream, kept as a strict xfail);
(c) CPU: transformers refuses "cpu"; kernels' own kernelize(device="cpu") picks the torch-cpu variant.
"""
import kernels
import pytest
import torch
from kernels import LayerRepository, LocalLayerRepository, Mode, kernelize, use_kernel_mapping
from transformers import AutoModelForCausalLM, KernelConfig

from devtools.checkpoints import FAMILIES, make_checkpoint

from ._helpers import IDS, assert_gpu_parity, layout_mapping, layouts, load, logits, plain


def norms(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


def assert_kernel_forward(model, kernel_module):
    found = norms(model)
    assert found, "the model has no RMSNorm modules"
    for m in found:
        assert m.forward.__func__ is kernel_module.layers.RMSNorm.forward, type(m).__name__


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("form", ["string", "revision"])
def test_kernel_config_from_pretrained(checkpoints, hub, ck_hub, cpu_kernel_config, family, form):
    value = f"{hub}:RMSNorm" if form == "string" else (f"{hub}:RMSNorm", {"revision": "v1"})
    want = logits(plain(checkpoints[family]))
    model = AutoModelForCausalLM.from_pretrained(checkpoints[family], use_kernels=True,
                                                 kernel_config=KernelConfig({"RMSNorm": value}))
    assert_kernel_forward(model, ck_hub)
    assert torch.equal(logits(model), want)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_kernel_config_route_on_gpu(checkpoints, hub, ck_hub, family):
    """Route (a) unpatched: from_pretrained(use_kernels=True, kernel_config=...) with real cuTile."""
    model = assert_gpu_parity(ck_hub, checkpoints[family], {"RMSNorm": f"{hub}:RMSNorm"})
    assert_kernel_forward(model, ck_hub)


@pytest.mark.gpu
def test_llama_with_every_kernel(hub, ck_hub, tmp_path):
    # head_dim 64: the tiny checkpoints' head_dim 16 is below what the RoPE kernel takes (it falls back)
    path = make_checkpoint("llama", tmp_path / "llama-hd64", head_dim=64)
    assert_gpu_parity(ck_hub, path, ck_hub.recommended_mapping("llama", hub))


@pytest.mark.parametrize("family", FAMILIES)
def test_get_local_kernel_and_local_layer_repository(checkpoints, kernel_repo, family):
    module = kernels.get_local_kernel(kernel_repo)
    assert module.__name__.startswith("_cutile_kernels_cpu_")
    want, model = logits(plain(checkpoints[family])), plain(checkpoints[family])
    repo = LocalLayerRepository(repo_path=kernel_repo / "build", layer_name="RMSNorm")
    with use_kernel_mapping({"RMSNorm": {"cpu": repo}}, inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE, device="cpu")
    assert_kernel_forward(model, module)
    assert torch.equal(logits(model), want)


@pytest.mark.xfail(strict=True, raises=AttributeError,
                   reason="transformers 5.13-5.23: use_local_kernel=True fails with "
                          "\"'tuple' object has no attribute 'split'\" (docs/upstream-use-local-kernel.md)")
def test_use_local_kernel_true(checkpoints, kernel_repo, cpu_kernel_config):
    config = KernelConfig({"RMSNorm": f"{kernel_repo / 'build'}:RMSNorm"}, use_local_kernel=True)
    want = logits(plain(checkpoints["llama"]))
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], use_kernels=True, kernel_config=config)
    assert torch.equal(logits(model), want)


def test_transformers_refuses_cpu_in_kernel_config(checkpoints, hub):
    with pytest.raises(ValueError, match="Only devices in .* are supported, got: cpu"):
        AutoModelForCausalLM.from_pretrained(checkpoints["qwen3"], use_kernels=True,
                                             kernel_config=KernelConfig({"RMSNorm": f"{hub}:RMSNorm"}))


@pytest.mark.parametrize("family", FAMILIES)
def test_kernelize_on_cpu_uses_the_cpu_variant(checkpoints, hub, ck_hub, family):
    want, model = logits(plain(checkpoints[family])), plain(checkpoints[family])
    repo = LayerRepository(hub, layer_name="RMSNorm", version=1)
    with use_kernel_mapping({"RMSNorm": {"cpu": repo}}, inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE, device="cpu")
    assert ck_hub.__name__.startswith("_cutile_kernels_cpu_")
    assert_kernel_forward(model, ck_hub)
    assert torch.equal(logits(model), want)


# --- the guard ----------------------------------------------------------------------------------------------

def test_guard_keeps_later_plain_loads_clean(checkpoints, hub, ck, ck_hub, cpu_kernel_config):
    """After a load inside the guard, a plain load is exactly the plain model, recorders included (without the
    guard the package removes its own share after each load: tests/test_misuse.py)."""
    path = checkpoints["qwen3"]
    ref_logits = logits(plain(path))
    with ck.transformers_state_guard():
        load(path, layout_mapping(ck_hub, "qwen3", hub, "fused"))
    later, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()) and not layouts(later)
    assert torch.equal(logits(later), ref_logits)
    with torch.no_grad():
        assert len(later(IDS, output_hidden_states=True).hidden_states) == 3


def test_guard_restores_classes_after_a_failed_load(ck, ck_hub, hub, cpu_kernel_config, tmp_path):
    """transformers' apply_patches leaves Layout classes in its modules when building the model raises."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaMLP
    path = make_checkpoint("llama", tmp_path / "relu", hidden_act="relu")
    with ck.transformers_state_guard(), pytest.raises(ValueError):
        load(path, layout_mapping(ck_hub, "llama", hub, "mlp"))
    assert modeling_llama.LlamaMLP is original


def test_readme_form_for_an_untrusted_repo(checkpoints, hub, ck, ck_hub, cpu_kernel_config):
    """The README's transformers example: ("<repo>:Layer", {"version": 1, "trust_remote_code": True}) values, as
    `recommended_mapping(..., trust_remote_code=True)` builds them, for a plain and a fusion (tuple) key; the model
    loads with the kernels' forwards and the exact logits."""
    mapping = ck.recommended_mapping("qwen3", hub, trust_remote_code=True)
    assert all(isinstance(v, tuple) and v[1] == {"version": 1, "trust_remote_code": True} for v in mapping.values())
    model, info = load(checkpoints["qwen3"], mapping)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_kernel_forward(model, ck_hub)
    assert layouts(model)
    assert torch.equal(logits(model), logits(plain(checkpoints["qwen3"])))
