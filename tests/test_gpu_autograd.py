"""The cuTile backward kernels on a real GPU against float64 autograd (fresh random shapes)."""
import random

import pytest
import torch

from .conftest import requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}



def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_backward(ck_gpu, dtype, gemma):
    rng = random.Random()
    for rows, hidden in [(1, 4096), (37, 2560), (4096, 4096), (rng.randint(1, 3000), rng.choice([128, 5120]))]:
        x = torch.randn(rows, hidden, device="cuda", dtype=dtype, requires_grad=True)
        w = (0.3 * torch.randn(hidden, device="cuda") + (0 if gemma else 1)).to(dtype).requires_grad_()
        dy = torch.randn(rows, hidden, device="cuda", dtype=dtype)
        ck_gpu.rms_norm_autograd(x, w, 1e-6, gemma).backward(dy)
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        h = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
        (h * (1 + w64) if gemma else h * w64).backward(dy.double())
        assert rel(x.grad, x64.grad) < REL_TOL[dtype]
        assert rel(w.grad, w64.grad) < REL_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_gated_act_backward(ck_gpu, dtype, act):
    for rows, inter in [(1, 14336), (300, 9728), (2048, 2000)]:
        gu = torch.randn(rows, 2 * inter, device="cuda", dtype=dtype, requires_grad=True)
        dy = torch.randn(rows, inter, device="cuda", dtype=dtype)
        ck_gpu.gated_act_autograd(gu, act).backward(dy)
        g64 = gu.detach().double().requires_grad_()
        g, u = g64.chunk(2, dim=-1)
        a = torch.nn.functional.silu(g) if act == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
        (a * u).backward(dy.double())
        assert rel(gu.grad, g64.grad) < REL_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_backward(ck_gpu, dtype):
    q = torch.randn(2, 300, 8, 128, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 300, 2, 128, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    freqs = torch.rand(2, 300, 64, device="cuda") * 100
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    qe, ke = ck_gpu.rope_autograd(q, k, cos, sin)
    torch.autograd.backward((qe, ke), (dq, dk))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    torch.autograd.backward(ck_gpu.rope_reference(q64, k64, cos.double(), sin.double()), (dq.double(), dk.double()))
    assert rel(q.grad, q64.grad) < REL_TOL[dtype] and rel(k.grad, k64.grad) < REL_TOL[dtype]
