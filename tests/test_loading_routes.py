"""Every route that loads the RMSNorm kernel into tiny Llama, Mistral, Qwen2 and Qwen3 checkpoints on CPU.

(a) transformers' KernelConfig with the Hub repo id resolved to the local build through LOCAL_KERNELS;
(b) local paths: kernels.get_local_kernel / LocalLayerRepository + kernelize, and transformers'
    use_local_kernel=True (broken upstream, kept as a strict xfail);
(c) CPU: transformers refuses "cpu"; kernels' own kernelize(device="cpu") picks the torch-cpu variant.
"""
import kernels
import pytest
import torch
from kernels import LayerRepository, LocalLayerRepository, Mode, kernelize, use_kernel_mapping
from transformers import AutoModelForCausalLM, KernelConfig

from devtools.checkpoints import FAMILIES

IDS = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def norms(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


def assert_kernel_forward(model, kernel_module):
    found = norms(model)
    assert found, "the model has no RMSNorm modules"
    for m in found:
        assert m.forward.__func__ is kernel_module.layers.RMSNorm.forward, type(m).__name__


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("form", ["string", "revision"])
def test_kernel_config_from_pretrained(checkpoints, hub, cpu_kernel_config, family, form):
    value = f"{hub}:RMSNorm" if form == "string" else (f"{hub}:RMSNorm", {"revision": "v1"})
    plain = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    model = AutoModelForCausalLM.from_pretrained(checkpoints[family], use_kernels=True,
                                                 kernel_config=KernelConfig({"RMSNorm": value}))
    assert_kernel_forward(model, kernels.get_kernel(hub, version=1))
    assert torch.equal(logits(model), logits(plain))


@pytest.mark.parametrize("family", FAMILIES)
def test_get_local_kernel_and_local_layer_repository(checkpoints, kernel_repo, family):
    module = kernels.get_local_kernel(kernel_repo)
    assert module.__name__.startswith("_cutile_kernels_cpu_")
    plain = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    model = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    repo = LocalLayerRepository(repo_path=kernel_repo / "build", layer_name="RMSNorm")
    with use_kernel_mapping({"RMSNorm": {"cpu": repo}}, inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE, device="cpu")
    assert_kernel_forward(model, module)
    assert torch.equal(logits(model), logits(plain))


@pytest.mark.xfail(strict=True, raises=AttributeError,
                   reason="transformers 5.13-5.23: use_local_kernel=True fails with "
                          "\"'tuple' object has no attribute 'split'\" (docs/upstream-use-local-kernel.md)")
def test_use_local_kernel_true(checkpoints, kernel_repo, cpu_kernel_config):
    config = KernelConfig({"RMSNorm": f"{kernel_repo / 'build'}:RMSNorm"}, use_local_kernel=True)
    plain = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], use_kernels=True, kernel_config=config)
    assert torch.equal(logits(model), logits(plain))


def test_transformers_refuses_cpu_in_kernel_config(checkpoints, hub):
    with pytest.raises(ValueError, match="Only devices in .* are supported, got: cpu"):
        AutoModelForCausalLM.from_pretrained(checkpoints["qwen3"], use_kernels=True,
                                             kernel_config=KernelConfig({"RMSNorm": f"{hub}:RMSNorm"}))


@pytest.mark.parametrize("family", FAMILIES)
def test_kernelize_on_cpu_uses_the_cpu_variant(checkpoints, hub, family):
    plain = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    model = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    repo = LayerRepository(hub, layer_name="RMSNorm", version=1)
    with use_kernel_mapping({"RMSNorm": {"cpu": repo}}, inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE, device="cpu")
    module = kernels.get_kernel(hub, version=1)
    assert module.__name__.startswith("_cutile_kernels_cpu_")
    assert_kernel_forward(model, module)
    assert torch.equal(logits(model), logits(plain))


def test_training_mode_uses_the_kernel(checkpoints, hub):
    """has_backward=True: kernelize in TRAINING mode swaps the kernel in, and a training step's loss and every
    gradient equal the plain model's (on CPU the kernel runs its exact, differentiable reference)."""
    plain = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    model.train()
    repo = LayerRepository(hub, layer_name="RMSNorm", version=1)
    with use_kernel_mapping({"RMSNorm": {"cpu": repo}}, inherit_mapping=False):
        kernelize(model, mode=Mode.TRAINING, device="cpu")
    assert_kernel_forward(model, kernels.get_kernel(hub, version=1))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    out, ref = model(ids, labels=ids), plain(ids, labels=ids)
    out.loss.backward()
    ref.loss.backward()
    assert torch.equal(out.loss, ref.loss)
    want = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, want[name].grad), name
