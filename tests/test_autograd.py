"""The training path on CPU: each custom op's registered backward (the same formulas the cuTile backward kernels
compute) against float64 gradcheck and against autograd through transformers' own modules. On CPU the backward
ops run their PyTorch formula; tests/test_gpu_autograd.py checks the cuTile kernels against float64 on a GPU."""
import importlib

import kernels
import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm


@pytest.fixture
def ck(kernel_repo):
    return kernels.get_local_kernel(kernel_repo / "build" / "torch-cpu")


def op(ck, module, name):
    return getattr(importlib.import_module(f"{ck.__name__}.{module}"), name)


@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_backward_formula_in_float64(ck, gemma):
    """transformers' RMSNorm forward computes in fp32 even for float64 inputs, so gradcheck cannot use it;
    the backward formula is checked against autograd of the same function in float64 (to 1e-10), and
    gradcheck runs on that function through the formula."""
    formula = ck.rms_norm_backward_reference

    def forward64(x, w):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return h * (1 + w) if gemma else h * w

    class Checked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return forward64(x, w)

        @staticmethod
        def backward(ctx, dy):
            return formula(*ctx.saved_tensors, dy, 1e-6, gemma)

    x = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Checked.apply, (x, w))
    dy = torch.randn(3, 4, 16, dtype=torch.float64)
    forward64(x, w).backward(dy)
    dx, dw = formula(x.detach(), w.detach(), dy, 1e-6, gemma)
    assert torch.allclose(dx, x.grad, atol=1e-10) and torch.allclose(dw, w.grad, atol=1e-10)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_gated_act_op_gradcheck(ck, act):
    gu = torch.randn(5, 2 * 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op(ck, "gated_act", "gated_act_op")(t, act), (gu,))


@pytest.mark.parametrize("norm_cls,gemma", [(LlamaRMSNorm, False), (Gemma3RMSNorm, True)])
def test_rms_norm_op_grads_match_transformers(ck, norm_cls, gemma):
    norm = norm_cls(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32) * 0.3 + (0 if gemma else 1))
    x = torch.randn(6, 32, requires_grad=True)
    dy = torch.randn(6, 32)
    norm(x).backward(dy)
    want = (x.grad.clone(), norm.weight.grad.clone())
    x.grad = None
    w = norm.weight.detach().clone().requires_grad_()
    op(ck, "rms_norm", "rms_norm_op")(x, w, 1e-6, gemma).backward(dy)
    assert torch.allclose(x.grad, want[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(w.grad, want[1], rtol=1e-5, atol=1e-6)


def test_swiglu_mlp_grads_match_transformers(ck):
    from transformers import LlamaConfig

    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=2))
    x = torch.randn(5, 16, requires_grad=True)
    mlp(x).sum().backward()
    want = x.grad.clone()
    x.grad = None
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    out = mlp.down_proj(op(ck, "gated_act", "gated_act_op")(x @ gate_up.T, "silu"))
    out.sum().backward()
    assert torch.allclose(x.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_rope_op_gradcheck(ck, unsqueeze_dim):
    """The backward (the forward with the inverse rotation) in float64, with distinct sin halves so the
    half-swap is exercised, against numerical gradients."""
    b, s, d = 2, 5, 8
    q = torch.randn((b, 3, s, d) if unsqueeze_dim == 1 else (b, s, 3, d), dtype=torch.float64, requires_grad=True)
    k = torch.randn((b, 1, s, d) if unsqueeze_dim == 1 else (b, s, 1, d), dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(b, s, d, dtype=torch.float64), torch.randn(b, s, d, dtype=torch.float64)
    rope_op = op(ck, "rope", "rope_op")
    assert torch.autograd.gradcheck(lambda q, k: rope_op(q, k, cos, sin, unsqueeze_dim), (q, k))


def test_opcheck_with_autograd(ck):
    """opcheck's autograd-registration and AOT-dispatch checks on inputs that require grad."""
    x = torch.randn(3, 5, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    for gemma in (False, True):
        torch.library.opcheck(op(ck, "rms_norm", "rms_norm_op"), (x, w, 1e-6, gemma))
    torch.library.opcheck(op(ck, "gated_act", "gated_act_op"), (torch.randn(4, 96, requires_grad=True), "silu"))
    q, k = torch.randn(2, 4, 9, 32, requires_grad=True), torch.randn(2, 2, 9, 32, requires_grad=True)
    torch.library.opcheck(op(ck, "rope", "rope_op"), (q, k, torch.randn(2, 9, 32), torch.randn(2, 9, 32), 1))
    dy = torch.randn(3, 5, 64)
    torch.library.opcheck(op(ck, "rms_norm", "rms_norm_backward_op"), (x.detach(), w.detach(), dy, 1e-6, False))
    torch.library.opcheck(op(ck, "gated_act", "gated_act_backward_op"),
                          (torch.randn(4, 96), torch.randn(4, 48), "gelu_pytorch_tanh"))


def test_compiled_training_step_has_no_break_from_the_ops(ck):
    """Forward and backward through the custom ops under torch.compile(fullgraph=True): a break raises."""
    def f(x, w, gate_up):
        return ck.rms_norm(x, w, 1e-6).sum() + ck.gemma_rms_norm(x, w, 1e-6).sum() + ck.gated_act(gate_up, "silu").sum()

    args = [torch.randn(3, 64, requires_grad=True), torch.randn(64, requires_grad=True),
            torch.randn(3, 128, requires_grad=True)]
    torch.compile(f, fullgraph=True, backend="aot_eager")(*args).backward()
    got = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    f(*args).backward()
    assert all(torch.allclose(g, a.grad, rtol=1e-5, atol=1e-6) for g, a in zip(got, args))
