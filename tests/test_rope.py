"""RoPE (transformers' `rotary_pos_emb` function): the op against float64 on every device (the matrix; on a GPU
cuTile over fresh random layouts with poisoned outputs), the reference against transformers'
apply_rotary_pos_emb, the registered backward (the inverse rotation: gradcheck, float64), opcheck, and the
function of every family replaced through KernelConfig with identical logits."""

import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM, KernelConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from devtools.checkpoints import ALL_FAMILIES

from ._helpers import (CI_DEVICE, DEVICES, DTYPES, assert_close_to_float64, assert_grads_close, fresh_rng, logits,
                       no_fallback, poisoned, recorded_launches, reset_fallback_warnings, tune_everywhere)


def rope64(x, cos, sin, unsqueeze_dim):
    x, c, s = x.double(), cos.double().unsqueeze(unsqueeze_dim), sin.double().unsqueeze(unsqueeze_dim)
    half = x.shape[-1] // 2
    return x * c + torch.cat((-x[..., half:], x[..., :half]), -1) * s


def make_inputs(b, s, hq, hk, d, unsqueeze_dim, dtype, device):
    """q, k in transformers' layout (projections viewed (B, S, H, D), transposed to (B, H, S, D) when
    unsqueeze_dim is 1), and cos/sin of random frequencies."""
    q = torch.randn(b, s, hq, d, device=device, dtype=dtype)
    k = torch.randn(b, s, hk, d, device=device, dtype=dtype)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    freqs = torch.rand(b, s, d // 2, device=device) * 100
    emb = torch.cat([freqs, freqs], -1)
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


def check_rope(ck, q, k, cos, sin, unsqueeze_dim, where="", inverse=False):
    """One call against float64: on a GPU the cuTile launcher writes into poisoned buffers, elsewhere the public
    function runs (the reference); q's output stays within 2 ulp (bf16) of the same-dtype reference. `inverse`:
    RoPE's backward (the rotation by the opposite angle) instead, with distinct sin halves."""
    where = f"q {tuple(q.shape)} k {tuple(k.shape)} {q.dtype} unsqueeze_dim={unsqueeze_dim} inverse={inverse} {where}"
    if inverse:
        sin = torch.randn_like(sin)  # the kernel forms -[sin2, sin1]: halves that differ show a wrong swap
    sin64 = ck.rope.inverse_sin(sin.double()) if inverse else sin
    if q.is_cuda:
        launcher = ck.rope_backward_cutile if inverse else ck.rope_cutile
        got = launcher(q, k, cos, sin, unsqueeze_dim, q_out=poisoned(q.shape, q), k_out=poisoned(k.shape, k))
    else:
        got = (ck._ops.ops.rope_backward if inverse else ck.apply_rotary_pos_emb)(q, k, cos, sin, unsqueeze_dim)
    for out, x in zip(got, (q, k)):
        assert_close_to_float64(out, rope64(x, cos, sin64, unsqueeze_dim), q.dtype, where)
    same_q, _ = (ck.rope_backward_reference if inverse else ck.rope_reference)(q, k, cos, sin, unsqueeze_dim)
    assert (got[0].float() - same_q.float()).abs().max() <= 2 * same_q.float().abs().max() * 2**-7, where


def check_rope_backward(ck, q, k, cos, sin):
    """dq and dk of the public function (on a GPU: the inverse rotation in cuTile, no fallback) against
    autograd of the reference in float64."""
    q, k = q.requires_grad_(), k.requires_grad_()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    with no_fallback(ck, on=q.is_cuda):
        torch.autograd.backward(ck.apply_rotary_pos_emb(q, k, cos, sin), (dq, dk))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    torch.autograd.backward(ck.rope_reference(q64, k64, cos.double(), sin.double()), (dq.double(), dk.double()))
    assert_grads_close([(q.grad, q64.grad), (k.grad, k64.grad)], q.dtype, tuple(q.shape))


# --- the matrix --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope(device_ck, device, dtype):
    seed, rng = fresh_rng()
    for _ in range(10 if device == "cuda" else 3):
        b, s, d = rng.choice([1, 2, 3]), rng.choice([1, 5, 16, 17, 300, 2048]), rng.choice([64, 128, 256])
        if device == "cpu":
            s = min(s, 17)
        hk = rng.choice([1, 2, 8])
        hq = hk * rng.choice([1, 4])
        unsqueeze_dim = rng.choice([1, 2])
        q, k, cos, sin = make_inputs(b, s, hq, hk, d, unsqueeze_dim, dtype, device)
        if rng.random() < 0.3:  # positions shared by the batch: transformers' (1, S, D)
            cos, sin = cos[:1], sin[:1]
        check_rope(device_ck, q, k, cos, sin, unsqueeze_dim, f"seed {seed}", inverse=rng.random() < 0.5)


REAL_HEADS = [(32, 8, 128), (28, 4, 128), (16, 8, 256), (8, 4, 256), (3, 1, 64)]  # q heads, kv heads, head_dim


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 2, 8), (1, 32, 1), (1, 32, 2), (2, 8, 3),
                                    (16, 1, 4), (8, 1, 40), (8, 1, 40, 1), (1, 32, 2, 1), (8, 1, 40, 1, 10)])
def test_every_kind_of_tuned_choice_matches_float64(ck_gpu, config, monkeypatch):
    """What the tuner may write into this GPU's table, run before it is chosen: rope_row ((0, 0, 0); (0, 0, 1) with
    cos/sin tile loads; (0, 0, 2) also rotating in the inputs' dtype), q tiles of 32 heads beside k's narrower
    ones, several chunks per block, position tiles, a fourth element 1 (in the inputs' dtype); real head counts,
    both layouts, two dtypes (every dtype takes the 16-bit entries); each forward and inverse (the backward)."""
    seed, rng = fresh_rng()
    for hq, hk, d in REAL_HEADS:
        tune_everywhere(ck_gpu, monkeypatch, ("rope",), config, ((d - 1).bit_length(),))
        for dtype in (torch.bfloat16, torch.float32):
            b, s, unsqueeze_dim = rng.choice([1, 2]), rng.choice([1, 3, 17, 300]), rng.choice([1, 2])
            inputs = make_inputs(b, s, hq, hk, d, unsqueeze_dim, dtype, "cuda")
            for inverse in (False, True):
                check_rope(ck_gpu, *inputs, unsqueeze_dim, f"config {config} seed {seed}", inverse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_backward(device_ck, device, dtype):
    check_rope_backward(device_ck, *make_inputs(2, 300 if device == "cuda" else 9, 8, 2, 128, 1, dtype, device))


@pytest.mark.kernels_ci
def test_rope_ci(ck_gpu):
    check_rope(ck_gpu, *make_inputs(1, 7, 4, 2, 64, 1, torch.bfloat16, CI_DEVICE), 1)
    check_rope_backward(ck_gpu, *make_inputs(1, 7, 4, 2, 64, 1, torch.bfloat16, CI_DEVICE))


# --- the reference and the registered backward (CPU) --------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_reference_equals_transformers(ck, dtype, unsqueeze_dim):
    q, k, cos, sin = make_inputs(2, 7, 4, 2, 64, unsqueeze_dim, dtype, "cpu")
    want = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    got = ck.layers.ApplyRotaryPosEmb().forward(q, k, cos, sin, unsqueeze_dim)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_op_gradcheck(ck, unsqueeze_dim):
    """The backward (the forward with the inverse rotation) in float64, with distinct sin halves so the
    half-swap is exercised, against numerical gradients."""
    b, s, d = 2, 5, 8
    q = torch.randn((b, 3, s, d) if unsqueeze_dim == 1 else (b, s, 3, d), dtype=torch.float64, requires_grad=True)
    k = torch.randn((b, 1, s, d) if unsqueeze_dim == 1 else (b, s, 1, d), dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(b, s, d, dtype=torch.float64), torch.randn(b, s, d, dtype=torch.float64)
    for op in (ck._ops.ops.rope, ck._ops.ops.rope_backward):  # rope_backward's backward: the rope op again
        assert torch.autograd.gradcheck(lambda q, k: op(q, k, cos, sin, unsqueeze_dim), (q, k))
    assert torch.autograd.gradgradcheck(lambda q, k: ck._ops.ops.rope(q, k, cos, sin, unsqueeze_dim), (q, k))
    # the backward op is the transpose of the forward: <rope(x), y> = <x, rope_backward(y)>
    y = [torch.randn_like(q), torch.randn_like(k)]
    forward = ck._ops.ops.rope(q, k, cos, sin, unsqueeze_dim)
    backward = ck._ops.ops.rope_backward(*y, cos, sin, unsqueeze_dim)
    assert torch.allclose(sum((f * t).sum() for f, t in zip(forward, y)),
                          sum((x * t).sum() for x, t in zip((q, k), backward)))


@pytest.mark.parametrize("dtype,requires_grad", [(torch.float32, False), (torch.bfloat16, False),
                                                (torch.float32, True)])
@pytest.mark.parametrize("transposed", [False, True])
def test_opcheck(ck, dtype, requires_grad, transposed):
    """Schema, fake (strides included: outputs laid out as q and k, contiguous or the usual transposed views)."""
    q, k, cos, sin = make_inputs(2, 9, 4, 2, 32, 1, dtype, "cpu")
    if not transposed:
        q, k = q.contiguous(), k.contiguous()
    for op in (ck._ops.ops.rope, ck._ops.ops.rope_backward):
        args = (q.requires_grad_(requires_grad), k.requires_grad_(requires_grad), cos, sin, 1)
        torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_outputs_are_laid_out_as_transformers_lays_them_out(ck, unsqueeze_dim):
    """Every path returns q's and k's layout, as transformers' element-wise RoPE does (attention reads the
    (B, H, S, D) view of a (B, S, H, D) projection): the public function, the custom op (also when the
    reference stands in, as on CPU) and its fake."""
    q, k, cos, sin = make_inputs(2, 5, 4, 2, 64, unsqueeze_dim, torch.bfloat16, "cpu")
    want = [t.stride() for t in apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)]
    assert want == [q.stride(), k.stride()]
    assert [t.stride() for t in ck.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)] == want
    assert [t.stride() for t in ck._ops.ops.rope(q, k, cos, sin, unsqueeze_dim)] == want
    with torch._subclasses.FakeTensorMode() as mode:
        fake = ck._ops.ops.rope(*(mode.from_tensor(t) for t in (q, k, cos, sin)), unsqueeze_dim)
    assert [t.stride() for t in fake] == want
    # a reference output in another layout is copied into the fake's
    assert ck.rope._laid_out_like(q.contiguous(), q).stride() == q.stride()


# --- through KernelConfig -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_rotary_pos_emb_through_kernel_config(checkpoints, hub, ck_hub, cpu_kernel_config, family):
    # the plain logits first: the rotary function object is shared by both models
    want = logits(AutoModelForCausalLM.from_pretrained(checkpoints[family]))
    config = KernelConfig({"rotary_pos_emb": f"{hub}:ApplyRotaryPosEmb"})
    model = AutoModelForCausalLM.from_pretrained(checkpoints[family], use_kernels=True, kernel_config=config)
    layer = ck_hub.layers.ApplyRotaryPosEmb
    funcs = {id(f): f for m in model.modules() for f in m.__dict__.get("_kernel_funcs", {}).values()}
    assert funcs and all(f.forward.__func__ is layer.forward for f in funcs.values())
    assert torch.equal(logits(model), want)


def test_guard_restores_the_shared_rotary_function(checkpoints, hub, ck, cpu_kernel_config):
    from transformers.models.qwen3 import modeling_qwen3

    func = modeling_qwen3.apply_rotary_pos_emb
    with ck.transformers_state_guard():
        AutoModelForCausalLM.from_pretrained(checkpoints["qwen3"], use_kernels=True,
                                             kernel_config=KernelConfig({"rotary_pos_emb": f"{hub}:ApplyRotaryPosEmb"}))
        assert "forward" in func.__dict__
    assert "forward" not in func.__dict__


# --- GPU: edge shapes and reasons ---------------------------------------------------------------------------

@pytest.mark.gpu
def test_zero_length_and_unsupported_head_dim(ck_gpu):
    bf = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.empty(1, 4, 0, 128, **bf)
    assert ck_gpu.apply_rotary_pos_emb(q, q, torch.empty(1, 0, 128, **bf), torch.empty(1, 0, 128, **bf))[0].shape == \
        q.shape
    reset_fallback_warnings(ck_gpu)
    q = torch.randn(1, 2, 3, 96, **bf)
    with pytest.warns(ck_gpu.CutileFallbackWarning, match="head_dim 96"):
        ck_gpu.apply_rotary_pos_emb(q, q, torch.randn(1, 3, 96, **bf), torch.randn(1, 3, 96, **bf))


@pytest.mark.parametrize("b,cos_batch,unsqueeze_dim", [(1, 1, 1), (2, 1, 1), (2, 2, 2)])
def test_launcher_hands_the_kernel_full_cos_and_outputs_in_q_layout(ck, monkeypatch, b, cos_batch, unsqueeze_dim):
    """The launcher's glue on CPU (the launch recorded, not run): cos/sin reach the kernel as given, (B, S, D) or
    (1, S, D) (the kernel reads row min(b, rows - 1); no copy), a batch broadcast by expand as its first row, a
    broadcast over positions materialized (no zero strides); the outputs are tensors laid out as q and k that the
    kernel writes, and q, k arrive as (B, H, S, D) views of the inputs."""
    plans = recorded_launches(ck, "rope", monkeypatch)
    q, k, cos, sin = make_inputs(b, 3, 4, 2, 64, unsqueeze_dim, torch.bfloat16, "cpu")
    cos, sin = cos[:cos_batch], sin[:cos_batch]
    q_out, k_out = ck.rope_cutile(q, k, cos, sin, unsqueeze_dim)
    ck.rope_cutile(q, k, cos.expand(b, 3, 64), sin[:, :1].expand(b, 3, 64), unsqueeze_dim)
    (q_in, k_in, cos_in, sin_in, q_rows, k_rows, *_), (_, _, cos_expanded, sin_expanded, *_) = plans
    assert q_out.shape == q.shape and k_out.shape == k.shape
    for given, want in ((q_in, q), (k_in, k)):
        assert torch.equal(given, want if unsqueeze_dim == 1 else want.transpose(1, 2))
    for t, want in ((cos_in, cos), (sin_in, sin)):
        assert t is want
    assert cos_expanded.shape == (cos_batch, 3, 64) and cos_expanded.data_ptr() == cos.data_ptr()
    assert sin_expanded.shape == (cos_batch, 3, 64) and 0 not in sin_expanded.stride()[:2]
    assert torch.equal(sin_expanded, sin[:, :1].expand(sin_expanded.shape))
    assert (q_out.stride(), k_out.stride()) == (q.stride(), k.stride())
    assert (q_rows.stride(), k_rows.stride()) == (q_in.stride(), k_in.stride())
    assert (q_rows.data_ptr(), k_rows.data_ptr()) == (q_out.data_ptr(), k_out.data_ptr())


# --- 16-bit q and k with float32 cos and sin (a float32 model under torch.autocast) ------------------------------

def test_float32_cos_sin_take_the_kernel_with_float32_outputs(ck, monkeypatch):
    """Under torch.autocast a float32 model's projections give bf16/fp16 q and k while its rotary embedding stays
    float32; transformers then rotates (and returns) in float32. The check takes that pair (not other mixes; not
    the fused qk_norm_rope), the launcher allocates float32 outputs laid out as q and k and plans the float32
    rotation (NATIVE off), and the op's fake and reference agree (opcheck)."""
    rope = importlib.import_module(f"{ck.__name__}.rope")
    q, k, cos, sin = make_inputs(2, 5, 4, 2, 64, 1, torch.bfloat16, "cpu")
    cos32, sin32 = cos.float(), sin.float()
    for op in (ck._ops.ops.rope, ck._ops.ops.rope_backward):  # the reference (CPU) against the fake
        torch.library.opcheck(op.default, (q, k, cos32, sin32, 1))
    want = apply_rotary_pos_emb(q, k, cos32, sin32)
    assert all(torch.equal(g, w) for g, w in zip(ck.rope_reference(q, k, cos32, sin32), want))
    monkeypatch.setattr(rope, "device_unsupported", lambda x, dtypes: None)  # as on a GPU
    assert rope._check(q, k, cos32, sin32, 1) is None
    assert rope._check(q.half(), k.half(), cos32, sin32, 1) is None
    assert "one dtype, or 16-bit q and k with float32 cos and sin" in rope._check(q.float(), k.float(), cos, sin, 1)
    assert "one dtype" in rope._check(q, k.half(), cos32, sin32, 1)
    assert "cos/sin" in rope._qk_check(q, k, torch.ones(64, dtype=q.dtype), torch.ones(64, dtype=q.dtype), cos32,
                                        sin32, 1e-6, False)
    plans = recorded_launches(ck, "rope", monkeypatch)
    tile = importlib.import_module(f"{ck.__name__}.tile.rope")
    for config, native_at in ((tile.ROW_NATIVE, -1), ((1, 1, 6, 1), -2)):  # rope_row's NATIVE; rope_fwd's (LATENCY)
        monkeypatch.setattr(tile, "lookup", lambda *args, _config=config: _config)  # a native-dtype table entry
        q_out, k_out = ck.rope_cutile(q, k, cos32, sin32, 1)
        assert q_out.dtype == k_out.dtype == torch.float32
        assert (q_out.stride(), k_out.stride()) == (q.stride(), k.stride())
        ck.rope_cutile(q, k, cos, sin, 1)
        assert plans[-2][native_at] is False and plans[-1][native_at] is True  # float32 rotation / bf16's own


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_cos_sin_on_gpu(ck_gpu, dtype):
    """16-bit q and k with float32 cos/sin: float32 outputs within float32 rounding of float64 (poisoned
    buffers), and through autograd (the Function, then rope_backward in float32) q's gradient in q's dtype within
    its bounds; no fallback."""
    seed, rng = fresh_rng()
    for _ in range(6):
        b, s, d, unsqueeze_dim = rng.choice([1, 2]), rng.choice([1, 7, 300, 2048]), rng.choice([64, 128, 256]), \
            rng.choice([1, 2])
        q, k, cos, sin = make_inputs(b, s, 8, 2, d, unsqueeze_dim, dtype, "cuda")
        cos, sin = cos.float(), sin.float()
        got = ck_gpu.rope_cutile(q, k, cos, sin, unsqueeze_dim, q_out=poisoned(q.shape, cos),
                                 k_out=poisoned(k.shape, cos))
        for out, x in zip(got, (q, k)):
            assert out.dtype == torch.float32
            assert_close_to_float64(out, rope64(x, cos, sin, unsqueeze_dim), torch.float32, f"seed {seed}")
    q, k, cos, sin = make_inputs(2, 300, 8, 2, 128, 1, dtype, "cuda")
    q, k, cos, sin = q.requires_grad_(), k.requires_grad_(), cos.float(), sin.float()
    dq, dk = torch.randn(q.shape, device="cuda"), torch.randn(k.shape, device="cuda")
    with no_fallback(ck_gpu):
        out = ck_gpu.apply_rotary_pos_emb(q, k, cos, sin)
        assert out[0].dtype == torch.float32
        torch.autograd.backward(out, (dq, dk))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    torch.autograd.backward(ck_gpu.rope_reference(q64, k64, cos.double(), sin.double()), (dq.double(), dk.double()))
    assert q.grad.dtype == dtype
    assert_grads_close([(q.grad, q64.grad), (k.grad, k64.grad)], dtype, f"seed {seed}")


# --- qk_norm_rope: Qwen3's / Gemma3's q_norm and k_norm with RoPE in one launch ---------------------------------

def norm64(x, w, eps, gemma):
    x = x.double()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed * ((1.0 + w.double()) if gemma else w.double())


def qk_inputs(b, s, hq, hk, d, dtype, device, gen=None):
    """q, k as (B, H, S, D) views of the projections, random norm weights (Gemma3's start near zero: (1 + w)),
    cos/sin; eps 1e-6."""
    q, k, cos, sin = make_inputs(b, s, hq, hk, d, 1, dtype, device)
    q, k = q * 3, k * 3  # not unit rows, so the norm changes them
    wq, wk = (torch.randn(d, device=device, dtype=dtype) for _ in range(2))
    return q, k, wq, wk, cos, sin, 1e-6


def check_qk_norm_rope(ck, q, k, wq, wk, cos, sin, eps, gemma, where=""):
    """One call against float64 (norm, then rotation, in float64): on a GPU the cuTile launcher into poisoned
    buffers, elsewhere the public function (the reference)."""
    where = f"q {tuple(q.shape)} k {tuple(k.shape)} {q.dtype} gemma={gemma} {where}"
    if q.is_cuda:
        got = ck.qk_norm_rope_cutile(q, k, wq, wk, cos, sin, eps, gemma, poisoned(q.shape, q), poisoned(k.shape, k))
    else:
        got = ck.qk_norm_rope(q, k, wq, wk, cos, sin, eps, gemma)
    for out, x, w in zip(got, (q, k), (wq, wk)):
        assert_close_to_float64(out, rope64(norm64(x, w, eps, gemma), cos, sin, 1), q.dtype, where)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True], ids=["qwen3", "gemma3"])
def test_qk_norm_rope(device_ck, device, dtype, gemma):
    seed, rng = fresh_rng()
    for _ in range(6 if device == "cuda" else 2):
        b, s, d = rng.choice([1, 2]), rng.choice([1, 5, 17, 300]), rng.choice([64, 128, 256])
        hk = rng.choice([1, 2, 4, 8])
        inputs = qk_inputs(b, s if device == "cuda" else min(s, 17), hk * rng.choice([1, 2, 4]), hk, d, dtype, device)
        check_qk_norm_rope(device_ck, *inputs, gemma, f"seed {seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(0, 0, 1), (0, 0, 2), (0, 0, 2, 8), (1, 8, 1), (1, 32, 2), (32, 1, 4), (32, 1, 40),
                                    (4, 8, 2), (1, 32, 2, 1), (32, 1, 40, 1), (32, 1, 40, 1, 10)])
def test_every_kind_of_tuned_qk_choice_matches_float64(ck_gpu, config, monkeypatch):
    """qk_norm_rope's table choices (the row kernel; tiles of positions x heads, several chunks per block; a
    fourth element or (0, 0, 2): in the inputs' dtype after the norm's statistics) at every bucket, real head
    counts (padded head tiles included), both forms, before the tuner may pick them."""
    seed, rng = fresh_rng()
    for hq, hk, d in REAL_HEADS:
        tune_everywhere(ck_gpu, monkeypatch, ("qk_norm_rope",), config, ((d - 1).bit_length(),))
        for gemma in (False, True):
            inputs = qk_inputs(rng.choice([1, 2]), rng.choice([1, 3, 17, 300]), hq, hk, d, torch.bfloat16, "cuda")
            check_qk_norm_rope(ck_gpu, *inputs, gemma, f"config {config} seed {seed}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gemma", [False, True], ids=["qwen3", "gemma3"])
def test_qk_norm_rope_backward(device_ck, device, gemma):
    """dq, dk and both norm weights' gradients of the public function (on a GPU: the inverse rotation and the
    norm backward in cuTile, no fallback) against autograd of the reference in float64."""
    q, k, wq, wk, cos, sin, eps = qk_inputs(2, 300 if device == "cuda" else 7, 8, 2, 128, torch.bfloat16, device)
    leaves = [t.requires_grad_() for t in (q, k, wq, wk)]
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    with no_fallback(device_ck, on=q.is_cuda):
        torch.autograd.backward(device_ck.qk_norm_rope(*leaves, cos, sin, eps, gemma), (dq, dk))
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    torch.autograd.backward(device_ck.qk_norm_rope_reference(*leaves64, cos.double(), sin.double(), eps, gemma),
                            (dq.double(), dk.double()))
    assert_grads_close([(t.grad, t64.grad) for t, t64 in zip(leaves, leaves64)], q.dtype, f"gemma={gemma}")


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_reference_is_transformers_attention(ck, family, dtype):
    """The reference equals the attention's own q_norm, k_norm (on the (B, S, H, D) projection, as Qwen3 does, or
    on its transposed view, as Gemma3 does) and apply_rotary_pos_emb, bit for bit and in the same layout."""
    from devtools.checkpoints import config_for

    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    attention = getattr(modeling, "Qwen3Attention" if family == "qwen3" else "Gemma3Attention")(config_for(family), 0)
    attention = attention.to(dtype)
    for norm in (attention.q_norm, attention.k_norm):
        torch.nn.init.normal_(norm.weight)
    q, k, _, _, cos, sin, _ = qk_inputs(2, 5, 4, 2, attention.head_dim, dtype, "cpu")
    if family == "qwen3":
        pairs = ((attention.q_norm, q), (attention.k_norm, k))
        want_q, want_k = (n(x.transpose(1, 2)).transpose(1, 2) for n, x in pairs)
    else:
        want_q, want_k = attention.q_norm(q), attention.k_norm(k)
    want = modeling.apply_rotary_pos_emb(want_q, want_k, cos, sin)
    eps = attention.q_norm.variance_epsilon if family == "qwen3" else attention.q_norm.eps
    got = ck.qk_norm_rope(q, k, attention.q_norm.weight, attention.k_norm.weight, cos, sin, eps, family == "gemma3")
    for g, w in zip(got, want):
        assert torch.equal(g, w) and g.stride() == w.stride()


@pytest.mark.parametrize("gemma", [False, True])
def test_qk_norm_rope_op_backward_formula_and_opcheck(ck, gemma):
    """The registered backward (inverse rotation, then each norm's backward) in float64 against autograd of the
    float64 formula (transformers' norms compute in fp32 even for float64, so gradcheck cannot use them), with
    distinct sin halves so the half-swap is exercised; schema and fake (q's layout) by opcheck, with gradients."""
    q, k, wq, wk, cos, sin, eps = qk_inputs(2, 4, 3, 1, 8, torch.float64, "cpu")
    sin = torch.randn_like(sin)
    leaves = [t.requires_grad_() for t in (q, k, wq, wk)]
    op = ck._ops.ops.qk_norm_rope
    grads = [torch.randn_like(q), torch.randn_like(k)]
    got = torch.autograd.grad(op(*leaves, cos, sin, eps, gemma), leaves, grads)
    want = torch.autograd.grad([rope64(norm64(x, w, eps, gemma), cos, sin, 1) for x, w in ((q, wq), (k, wk))],
                               leaves, grads)
    assert all(torch.allclose(g, w, atol=1e-10) for g, w in zip(got, want))
    for requires_grad in (False, True):
        args = [t.detach().float().requires_grad_(requires_grad) for t in leaves]
        torch.library.opcheck(op.default, (*args, cos.float(), sin.float(), eps, gemma))


def test_qk_norm_rope_refuses_a_weight_of_another_size(ck):
    q, k, wq, wk, cos, sin, eps = qk_inputs(1, 3, 2, 1, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"k_weight has shape \(32,\)"):
        ck.qk_norm_rope(q, k, wq, wk[:32], cos, sin, eps)


def test_qk_norm_rope_launcher_glue(ck, monkeypatch):
    """On CPU, the launch recorded: q and k reach the kernel as the given (B, H, S, D) views, cos/sin of one batch
    row as they are (the kernel reads that row for every batch row), both weights, and the outputs (laid out as q
    and k) are what the kernel writes."""
    plans = recorded_launches(ck, "rope", monkeypatch)
    q, k, wq, wk, cos, sin, eps = qk_inputs(2, 3, 4, 2, 64, torch.bfloat16, "cpu")
    q_out, k_out = ck.qk_norm_rope_cutile(q, k, wq, wk, cos[:1], sin[:1], eps, True)
    (q_in, k_in, wq_in, wk_in, cos_in, sin_in, q_rows, k_rows, eps_in, gemma, half, tile_h, tile_hk, native), = plans
    assert q_in is q and k_in is k and wq_in is wq and wk_in is wk
    assert cos_in.shape == (1, 3, 64) and cos_in.data_ptr() == cos.data_ptr() and torch.equal(sin_in, sin[:1])
    assert (eps_in, gemma, half, tile_h, tile_hk, native) == (eps, True, 32, 4, 2, False)
    assert (q_out.stride(), k_out.stride()) == (q.stride(), k.stride())
    assert (q_rows.data_ptr(), k_rows.data_ptr()) == (q_out.data_ptr(), k_out.data_ptr())


@pytest.mark.kernels_ci
def test_qk_norm_rope_ci(ck_gpu):
    check_qk_norm_rope(ck_gpu, *qk_inputs(1, 7, 4, 2, 128, torch.bfloat16, CI_DEVICE), False)
    check_qk_norm_rope(ck_gpu, *qk_inputs(1, 7, 4, 2, 256, torch.bfloat16, CI_DEVICE), True)
