"""RoPE on CPU: the reference is transformers' apply_rotary_pos_emb, and the `rotary_pos_emb` function of
every family is replaced through KernelConfig with identical logits."""
import kernels
import pytest
import torch
from transformers import AutoModelForCausalLM, KernelConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from devtools.checkpoints import ALL_FAMILIES

IDS = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def ck(kernel_repo):
    return kernels.get_local_kernel(kernel_repo / "build" / "torch-cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_reference_equals_transformers(ck, dtype, unsqueeze_dim):
    b, hq, hk, s, d = 2, 4, 2, 7, 64
    shape = (b, hq, s, d) if unsqueeze_dim == 1 else (b, s, hq, d)
    kshape = (b, hk, s, d) if unsqueeze_dim == 1 else (b, s, hk, d)
    q, k = torch.randn(shape, dtype=dtype), torch.randn(kshape, dtype=dtype)
    freqs = torch.randn(b, s, d // 2)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    want = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    got = ck.layers.ApplyRotaryPosEmb().forward(q, k, cos, sin, unsqueeze_dim)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_unsupported_head_dim_is_a_reason(ck):
    import importlib

    q = torch.randn(1, 2, 3, 96)
    check = importlib.import_module(f"{ck.__name__}.rope")._rope_unavailable
    reason = check(q, q, torch.randn(1, 3, 96), torch.randn(1, 3, 96), 1)
    assert reason and "head_dim 96" in reason


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_rotary_pos_emb_through_kernel_config(checkpoints, hub, cpu_kernel_config, family):
    plain = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    with torch.no_grad():
        want = plain(IDS).logits  # before the load: the rotary function object is shared by both models
    config = KernelConfig({"rotary_pos_emb": f"{hub}:ApplyRotaryPosEmb"})
    model = AutoModelForCausalLM.from_pretrained(checkpoints[family], use_kernels=True, kernel_config=config)
    layer = kernels.get_kernel(hub, version=1).layers.ApplyRotaryPosEmb
    funcs = {id(f): f for m in model.modules() for f in m.__dict__.get("_kernel_funcs", {}).values()}
    assert funcs and all(f.forward.__func__ is layer.forward for f in funcs.values())
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, want)


def test_guard_restores_the_shared_rotary_function(checkpoints, hub, cpu_kernel_config, kernel_repo):
    from transformers.models.qwen3 import modeling_qwen3

    guard = kernels.get_local_kernel(kernel_repo / "build" / "torch-cpu").transformers_state_guard
    func = modeling_qwen3.apply_rotary_pos_emb
    with guard():
        AutoModelForCausalLM.from_pretrained(checkpoints["qwen3"], use_kernels=True,
                                             kernel_config=KernelConfig({"rotary_pos_emb": f"{hub}:ApplyRotaryPosEmb"}))
        assert "forward" in func.__dict__
    assert "forward" not in func.__dict__
