"""Layers that own parameters on a real GPU, in bf16: ops against float64, whole tiny models against plain.

Tolerances: the kernels round exactly where transformers does, so the remaining difference between kernel and
plain models comes from the merged gate_up GEMM (cuBLAS may pick another reduction order for N = 2I than for
N = I) and fp32 rsqrt/exp approximations: bf16 outputs then differ by about one bf16 ulp (2^-8 ≈ 4e-3
relative) in some elements, which two layers of a random model carry to a logit relative error ~1e-2.
"""
import random

import pytest
import torch


from .conftest import GPU_REL_TOL, assert_gpu_parity, requires_cuda
from .test_layouts import CASES, configs

pytestmark = [pytest.mark.gpu, requires_cuda]



def gated64(gate_up, act):
    g, u = gate_up.double().chunk(2, dim=-1)
    a = g * torch.sigmoid(g) if act == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
    return a * u


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gated_act_cutile_matches_float64(ck_gpu, act, dtype):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    shapes = [(1, 14336), (16, 11008), (4096, 9728), (3, 160)] + \
        [(int(2 ** rng.uniform(0, 13)), rng.choice([9728, 11008, 14336, 18944, 28672, rng.randint(1, 4000)]))
         for _ in range(8)]
    for rows, inter in shapes:
        gate_up = torch.randn(rows, 2 * inter, device="cuda", dtype=dtype) * 3
        out = torch.full((rows, inter), float("nan"), device="cuda", dtype=dtype)
        ck_gpu.gated_act_cutile(gate_up, act, out=out)
        torch.cuda.synchronize()
        assert not out.isnan().any(), f"unwritten outputs at {(rows, inter)}, seed {seed}"
        ref = gated64(gate_up, act)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < GPU_REL_TOL[dtype], f"{(rows, inter)} {dtype} {act}: {err:.2e}, seed {seed}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gemma_rms_norm_cutile_matches_float64(ck_gpu, dtype):
    for rows, hidden in [(1, 2560), (777, 3840), (4096, 5376), (65536, 256)]:
        x = torch.randn(rows, hidden, device="cuda", dtype=dtype)
        w = (0.3 * torch.randn(hidden, device="cuda")).to(dtype)
        out = torch.full_like(x, float("nan"))
        ck_gpu.rms_norm_cutile(x, w, 1e-6, out=out, gemma=True)
        x64 = x.double()
        ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w.double())
        assert not out.isnan().any()
        assert ((out.double() - ref).norm() / ref.norm()).item() < GPU_REL_TOL[dtype]


@pytest.mark.parametrize("family,case", CASES)
def test_layout_models_on_gpu(checkpoints, hub, family, case):
    assert_gpu_parity(checkpoints[family], configs(family, hub)[case])
