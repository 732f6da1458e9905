"""RoPE and edge cases on a real GPU: fresh random shapes against float64, poisoned outputs, strided inputs,
zero rows and very wide rows, and a whole model with every kernel through KernelConfig."""
import random

import pytest
import torch

from .conftest import GPU_REL_TOL, assert_gpu_parity, requires_cuda
from .test_layouts import fused_key

pytestmark = [pytest.mark.gpu, requires_cuda]



def rope64(x, cos, sin, unsqueeze_dim):
    x, c, s = x.double(), cos.double().unsqueeze(unsqueeze_dim), sin.double().unsqueeze(unsqueeze_dim)
    half = x.shape[-1] // 2
    return x * c + torch.cat((-x[..., half:], x[..., :half]), -1) * s


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rope_cutile_matches_float64(ck_gpu, dtype):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for _ in range(10):
        b, s, d = rng.choice([1, 2, 3]), rng.choice([1, 5, 16, 17, 300, 2048]), rng.choice([64, 128, 256])
        hk = rng.choice([1, 2, 8])
        hq = hk * rng.choice([1, 4])
        unsqueeze_dim = rng.choice([1, 2])
        # transformers' layout: projections viewed (B, S, H, D) and transposed to (B, H, S, D)
        q = torch.randn(b, s, hq, d, device="cuda", dtype=dtype)
        k = torch.randn(b, s, hk, d, device="cuda", dtype=dtype)
        if unsqueeze_dim == 1:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        freqs = torch.rand(b, s, d // 2, device="cuda") * 100
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        q_out = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)
        k_out = torch.full(k.shape, float("nan"), device="cuda", dtype=dtype)
        got_q, got_k = ck_gpu.rope_cutile(q, k, cos, sin, unsqueeze_dim, q_out=q_out, k_out=k_out)
        torch.cuda.synchronize()
        for got, x in ((got_q, q), (got_k, k)):
            assert not got.isnan().any(), f"unwritten outputs {(b, s, hq, hk, d, unsqueeze_dim)} seed {seed}"
            ref = rope64(x, cos, sin, unsqueeze_dim)
            err = ((got.double() - ref).norm() / ref.norm()).item()
            assert err < GPU_REL_TOL[dtype], f"{(b, s, hq, hk, d, unsqueeze_dim)} {dtype}: {err:.2e} seed {seed}"
        same_q, _ = ck_gpu.rope_reference(q, k, cos, sin, unsqueeze_dim)
        assert (got_q.float() - same_q.float()).abs().max() <= 2 * same_q.float().abs().max() * 2**-7


def test_edge_cases(ck_gpu):
    bf = dict(device="cuda", dtype=torch.bfloat16)
    # very wide rows (hidden 16384) and zero rows
    x, w = torch.randn(33, 16384, **bf), torch.randn(16384, **bf)
    ref = ck_gpu.rms_norm_reference(x, w, 1e-6).float()
    assert (ck_gpu.rms_norm(x, w, 1e-6).float() - ref).abs().max() <= 0.02 * ref.abs().max()
    assert ck_gpu.gated_act(torch.empty(0, 512, **bf), "silu").shape == (0, 256)
    q = torch.empty(1, 4, 0, 128, **bf)
    assert ck_gpu.apply_rotary_pos_emb(q, q, torch.empty(1, 0, 128, **bf), torch.empty(1, 0, 128, **bf))[0].shape == q.shape
    # non-contiguous gate_up (a column slice): correct result
    gu = torch.randn(64, 3000, **bf)[:, :2048]
    assert torch.allclose(ck_gpu.gated_act(gu, "silu").float(), ck_gpu.gated_act_reference(gu, "silu").float(),
                          rtol=1e-2, atol=1e-2)


def test_llama_with_every_kernel(hub, tmp_path):
    from devtools.checkpoints import make_checkpoint

    # head_dim 64: the tiny checkpoints' head_dim 16 is below what the RoPE kernel takes (it falls back)
    path = make_checkpoint("llama", tmp_path / "llama-hd64", head_dim=64)
    assert_gpu_parity(path, {"RMSNorm": f"{hub}:RMSNorm", "rotary_pos_emb": f"{hub}:ApplyRotaryPosEmb",
                             fused_key("post_attention_layernorm"): f"{hub}:RMSNormMLP"})
