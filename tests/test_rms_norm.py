"""RMSNorm on CPU: the reference is transformers' own forward, and every fallback names its reason once."""
import importlib
import warnings

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm


@pytest.fixture
def ck(kernel_repo):
    import kernels

    module = kernels.get_local_kernel(kernel_repo / "build" / "torch-cpu")
    module._runtime._warned.clear()
    return module


@pytest.mark.parametrize("norm_cls", [LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 5, 64), (3, 7, 4, 32), (1, 1536)])
def test_reference_equals_transformers_forward(ck, norm_cls, dtype, shape):
    norm = norm_cls(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(shape[-1]))
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        expected = norm(x)
        got = ck.layers.RMSNorm.forward(norm, x)  # the layer's forward, bound to transformers' module
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


def test_cpu_input_warns_once_naming_the_reason(ck):
    x, w = torch.randn(4, 32), torch.randn(32)
    with pytest.warns(RuntimeWarning, match="the input is on cpu"):
        ck.rms_norm(x, w, 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.rms_norm(x, w, 1e-6)  # second call: silent


@pytest.mark.parametrize("make,reason", [
    (lambda: (torch.randn(4, 32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)), "dtype torch.float64"),
])
def test_unhandled_inputs_fall_back_with_their_reason(ck, make, reason):
    x, w = make()
    with pytest.warns(RuntimeWarning, match=reason):
        out = ck.rms_norm(x, w, 1e-5)
    assert torch.equal(out, ck.rms_norm_reference(x, w, 1e-5))


def test_cpu_fallback_keeps_autograd(ck):
    x, w = torch.randn(4, 32, requires_grad=True), torch.randn(32, requires_grad=True)
    ck.rms_norm(x, w, 1e-5).sum().backward()
    x64, w64 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ck.rms_norm_reference(x64, w64, 1e-5).sum().backward()
    assert torch.equal(x.grad, x64.grad) and torch.equal(w.grad, w64.grad)


def test_missing_cuda_tile_is_reported_with_install_hint(ck, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cuda.tile", None)
    ck._runtime.cutile_import_error.cache_clear()
    try:
        reason = ck._runtime.cutile_import_error()
    finally:
        ck._runtime.cutile_import_error.cache_clear()
    assert reason and "pip install cuda-tile==1.7.0" in reason


def test_weight_mismatch_is_a_reason(ck):
    check = importlib.import_module(f"{ck.__name__}.rms_norm")._weight_unavailable
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert "weight is torch.float16" in check(x, torch.ones(8, dtype=torch.float16))
    assert "shape" in check(x, torch.ones(4, dtype=torch.bfloat16))
    assert check(x, torch.ones(8, dtype=torch.float32)) is None
