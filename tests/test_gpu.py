"""cuTile on a real GPU: RMSNorm against float64 over fresh random shapes, and transformers' KernelConfig route.

Run on a GPU machine: `python3 -m pytest tests -m gpu` (skips cleanly without CUDA).
"""
import random
import warnings

import pytest
import torch

from devtools.checkpoints import FAMILIES

from .conftest import GPU_REL_TOL, assert_gpu_parity, requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]

HIDDEN = [128, 1536, 2560, 4096, 5120, 8192]


def random_shapes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    shapes = [(1, 128), (65536, 128), (65536, 4096), (3, 1536), (17, 2560), (1000, 5120), (4096, 8192)]
    while len(shapes) < n:
        rows = int(round(2 ** rng.uniform(0, 16)))
        hidden = rng.choice(HIDDEN) if rng.random() < 0.6 else rng.randint(128, 8192)
        shapes.append((rows, hidden))
    return shapes



def reference64(x, w, eps):
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_cutile_matches_float64(ck_gpu, dtype):
    seed = random.randrange(2**31)
    worst = 0.0
    for rows, hidden in random_shapes(24, seed):
        x = torch.randn(rows, hidden, device="cuda", dtype=dtype) * random.choice([0.05, 1.0, 20.0])
        w = (1 + 0.3 * torch.randn(hidden, device="cuda")).to(dtype)
        out = torch.full_like(x, float("nan"))  # poisoned: any element the kernel misses stays NaN
        ck_gpu.rms_norm_cutile(x, w, 1e-6, out=out)
        torch.cuda.synchronize()
        assert not out.isnan().any(), f"unwritten or NaN outputs at {(rows, hidden)}, seed {seed}"
        ref = reference64(x, w, 1e-6)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        worst = max(worst, err)
        assert err < GPU_REL_TOL[dtype], f"{(rows, hidden)} {dtype}: rel err {err:.2e}, seed {seed}"
        # and it agrees with the same-dtype reference (transformers' rounding) almost everywhere
        same = ck_gpu.rms_norm_reference(x, w, 1e-6)
        off = ((out.float() - same.float()).abs() > 1e-6 + 1e-2 * same.float().abs()).float().mean().item()
        assert off < 1e-3, f"{(rows, hidden)} {dtype}: {off:.2%} of elements differ from the reference"
    print(f"{dtype}: worst rel err vs float64 {worst:.2e} (seed {seed})")


def test_rms_norm_zero_rows_and_strided_input(ck_gpu):
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    empty = torch.empty(0, 256, device="cuda", dtype=torch.bfloat16)
    assert ck_gpu.rms_norm_cutile(empty, w, 1e-6).shape == (0, 256)
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)[:, ::2]  # non-contiguous rows
    assert torch.allclose(ck_gpu.rms_norm(x, w, 1e-6).float(), ck_gpu.rms_norm_reference(x, w, 1e-6).float(),
                          rtol=1e-2, atol=1e-2)


def test_no_fallback_for_supported_inputs(ck_gpu):
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ck_gpu.rms_norm(x, torch.ones(4096, device="cuda", dtype=torch.bfloat16), 1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_kernel_config_route_on_gpu(checkpoints, hub, family):
    """Route 4a unpatched: from_pretrained(use_kernels=True, kernel_config=...) with real cuTile."""
    model = assert_gpu_parity(checkpoints[family], {"RMSNorm": f"{hub}:RMSNorm"})
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(m.forward.__func__.__qualname__ == "RMSNorm.forward" for m in norms)
