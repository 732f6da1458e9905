"""RMSNorm, both forms (Llama: x̂·w; Gemma3: x̂·(1+w)): the op against float64 on every device (the matrix; on a
GPU cuTile over fresh random shapes with poisoned outputs), the references against transformers' modules, the
registered backward (gradcheck, float64 formula, transformers' gradients), opcheck, fallbacks and their reasons,
and the Gemma3RMSNorm Layout through KernelConfig."""
import random
import warnings

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from ._helpers import (CI_DEVICE, DEVICES, DTYPES, assert_close_to_float64, assert_grads_close, check_layout_model,
                       fresh_rng, layout_mapping, no_fallback, poisoned, recorded_launches, reset_fallback_warnings,
                       tune_everywhere)

EPS = 1e-6
FORMS = [pytest.param(False, id="llama"), pytest.param(True, id="gemma")]
# (rows, hidden) of the GPU matrix: Gemma3's widths for the Gemma form, fresh random shapes for the Llama form
HIDDEN = [128, 1536, 2560, 4096, 5120, 8192]
GEMMA3_SHAPES = [(1, 2560), (777, 3840), (4096, 5376), (65536, 256)]
CPU_SHAPES = [(1, 64), (37, 160), (5, 2048)]


def random_shapes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    shapes = [(1, 128), (65536, 128), (65536, 4096), (3, 1536), (17, 2560), (1000, 5120), (4096, 8192)]
    while len(shapes) < n:
        rows = int(round(2 ** rng.uniform(0, 16)))
        hidden = rng.choice(HIDDEN) if rng.random() < 0.6 else rng.randint(128, 8192)
        shapes.append((rows, hidden))
    return shapes


def rms_norm64(x, w, eps, gemma):
    """Both forms in float64 (transformers' modules compute in fp32 even for float64 inputs)."""
    x64 = x.double()
    h = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return h * (1 + w.double()) if gemma else h * w.double()


def make_inputs(rows, hidden, dtype, gemma, device, scale=1.0):
    x = torch.randn(rows, hidden, device=device, dtype=dtype) * scale
    w = (0.3 * torch.randn(hidden, device=device) + (0 if gemma else 1)).to(dtype)
    return x, w


def check_rms_norm(ck, x, w, gemma, where=""):
    """One call against float64: on a GPU the cuTile launcher writes into a poisoned buffer, elsewhere the public
    function runs (the reference); then the output agrees with the same-dtype reference (transformers'
    rounding) almost everywhere."""
    where = f"{tuple(x.shape)} {x.dtype} gemma={gemma} {where}"
    if x.is_cuda:
        out = ck.rms_norm_cutile(x, w, EPS, gemma=gemma, out=poisoned(x.shape, x))
    else:
        out = (ck.gemma_rms_norm if gemma else ck.rms_norm)(x, w, EPS)
    assert_close_to_float64(out, rms_norm64(x, w, EPS, gemma), x.dtype, where)
    same = (ck.gemma_rms_norm_reference if gemma else ck.rms_norm_reference)(x, w, EPS).float()
    off = ((out.float() - same).abs() > 1e-6 + 1e-2 * same.abs()).float().mean().item()
    assert off < 1e-3, f"{where}: {off:.2%} of elements differ from the reference"


def check_rms_norm_backward(ck, rows, hidden, dtype, gemma, device):
    """dx and dweight of the public function (on a GPU: the cuTile backward, no fallback) against float64."""
    x, w = make_inputs(rows, hidden, dtype, gemma, device)
    x.requires_grad_()
    w.requires_grad_()
    dy = torch.randn(rows, hidden, device=device, dtype=dtype)
    with no_fallback(ck, on=x.is_cuda):
        (ck.gemma_rms_norm if gemma else ck.rms_norm)(x, w, EPS).backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rms_norm64(x64, w64, EPS, gemma).backward(dy.double())
    assert_grads_close([(x.grad, x64.grad), (w.grad, w64.grad)], dtype, (rows, hidden, dtype, gemma))


# --- the matrix --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gemma", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(device_ck, device, dtype, gemma):
    seed, rng = fresh_rng()
    shapes = CPU_SHAPES if device == "cpu" else GEMMA3_SHAPES if gemma else random_shapes(24, seed)
    for rows, hidden in shapes:
        x, w = make_inputs(rows, hidden, dtype, gemma, device, scale=rng.choice([0.05, 1.0, 20.0]))
        check_rms_norm(device_ck, x, w, gemma, f"seed {seed}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gemma", FORMS)
def test_permuted_input(device_ck, device, gemma):
    """Gemma3's q_norm and k_norm take (B, H, S, D) views of (B, S, H, D) projections: the output has the
    input's strides (as transformers' norm returns it) and its values are within the float64 bounds."""
    for b, s, h, d in ([(2, 5, 3, 64)] if device == "cpu" else [(1, 300, 16, 256), (2, 77, 8, 128), (1, 1, 16, 256)]):
        x = torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16).transpose(1, 2)
        _, w = make_inputs(1, d, torch.bfloat16, gemma, device)
        out = (device_ck.gemma_rms_norm if gemma else device_ck.rms_norm)(x, w, EPS)
        assert out.stride() == x.stride(), (b, s, h, d)
        assert_close_to_float64(out, rms_norm64(x, w, EPS, gemma), x.dtype, f"permuted {(b, h, s, d)}")


def test_launcher_normalizes_a_permuted_input_in_memory_order(ck, monkeypatch):
    """The launcher's glue on CPU (the launch recorded, not run): a (B, H, S, D) view of a (B, S, H, D) tensor
    reaches the kernel as its memory-order rows (no copy), and the output, with x's strides, as the same rows."""
    plans = recorded_launches(ck, "rms_norm", monkeypatch)
    x = torch.randn(2, 5, 3, 64, dtype=torch.bfloat16).transpose(1, 2)
    out = ck.rms_norm_cutile(x, torch.randn(64, dtype=torch.bfloat16), EPS, True)
    (rows, _, out_rows, *_), = plans
    assert out.shape == x.shape and out.stride() == x.stride()
    assert rows.data_ptr() == x.data_ptr() and torch.equal(rows, x.transpose(1, 2).reshape(-1, 64))
    assert out_rows.data_ptr() == out.data_ptr() and out_rows.shape == rows.shape and out_rows.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gemma", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_backward(device_ck, device, dtype, gemma):
    rng = random.Random()
    shapes = [(1, 64), (37, 160)] if device == "cpu" else \
        [(1, 4096), (37, 2560), (4096, 4096), (rng.randint(1, 3000), rng.choice([128, 5120]))]
    for rows, hidden in shapes:
        check_rms_norm_backward(device_ck, rows, hidden, dtype, gemma, device)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(0, 0, False, False), (0, 0, False, False, 8), (4, 2, True, False),
                                    (2, 2, False, True), (1, 0, True, False)])
def test_every_kind_of_tuned_forward_matches_float64(ck_gpu, config, monkeypatch):
    """What the tuner may write for the forward, run before it is chosen: rms_norm_row (also with 8 warps) and
    rms_norm_fwd (TMA, prefetching, one block per tile), both forms, bf16 and fp16 (both take the 16-bit
    entries)."""
    tune_everywhere(ck_gpu, monkeypatch, ("rms_norm", "gemma_rms_norm"), config, range(7, 14))  # 65..8192 columns
    seed, rng = fresh_rng()
    for rows, hidden in [(1, 2560), (rng.randint(2, 64), rng.choice([1536, 3584, 5376])),
                         (rng.randint(65, 5000), rng.choice([2560, 5120, rng.randint(65, 8192)]))]:
        for dtype in (torch.bfloat16, torch.float16):
            for gemma in (False, True):
                check_rms_norm(ck_gpu, *make_inputs(rows, hidden, dtype, gemma, "cuda"), gemma,
                               f"{config} seed {seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(0, 0, 0, 0), (0, 0, 0, 0, 8), (1, 4, 0, 0), (2, 2, 2, 10), (1, 2, 0, 10, 8),
                                    (2, 2, 2, 10, 0, 1), (1, 4, 0, 0, 8, 1)])
def test_every_kind_of_tuned_backward_matches_float64(ck_gpu, config, monkeypatch):
    """What the tuner may write for the backward, run before it is chosen: rms_norm_bwd_row (one row per block,
    also with 8 warps), the persistent kernel (with occupancy, latency and warps hints) and rms_norm_bwd_split (two
    tiles per row; 3584 columns do not split), at one row, decode and prefill row counts, both forms, bf16 and fp16
    (both take the 16-bit entries)."""
    tune_everywhere(ck_gpu, monkeypatch, ("rms_norm_backward",), config, (12, 13))  # 2049..4096, 4097..8192 columns
    rng = random.Random()
    for rows, hidden in [(1, 4096), (rng.randint(2, 64), rng.choice([2560, 4096, 5376])),
                         (rng.randint(65, 700), rng.choice([3584, 5120]))]:
        for dtype in (torch.bfloat16, torch.float16):
            for gemma in (False, True):
                check_rms_norm_backward(ck_gpu, rows, hidden, dtype, gemma, "cuda")


@pytest.mark.kernels_ci
@pytest.mark.parametrize("gemma", FORMS)
def test_rms_norm_ci(ck_gpu, gemma):
    check_rms_norm(ck_gpu, *make_inputs(7, 512, torch.bfloat16, gemma, CI_DEVICE), gemma)
    check_rms_norm_backward(ck_gpu, 7, 512, torch.bfloat16, gemma, CI_DEVICE)


# --- references and the registered backward (CPU) -----------------------------------------------------------

@pytest.mark.parametrize("norm_cls", [LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm, Gemma3RMSNorm])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 64), (3, 7, 4, 32), (1, 1536)])
def test_reference_equals_transformers_forward(ck, norm_cls, dtype, shape):
    norm = norm_cls(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(shape[-1]))
    x = torch.randn(shape, dtype=dtype)
    layer = ck.layers.GemmaRMSNorm if norm_cls is Gemma3RMSNorm else ck.layers.RMSNorm
    with torch.no_grad():
        expected = norm(x)
        got = layer.forward(norm, x)  # the layer's forward, bound to transformers' module
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("gemma", FORMS)
def test_backward_formula_in_float64(ck, gemma):
    """transformers' RMSNorm forward computes in fp32 even for float64 inputs, so gradcheck cannot use it;
    the backward formula is checked against autograd of the same function in float64 (to 1e-10), and
    gradcheck runs on that function through the formula."""
    formula = ck.rms_norm_backward_reference

    class Checked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return rms_norm64(x, w, 1e-6, gemma)

        @staticmethod
        def backward(ctx, dy):
            return formula(*ctx.saved_tensors, dy, 1e-6, gemma)

    x = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Checked.apply, (x, w))
    dy = torch.randn(3, 4, 16, dtype=torch.float64)
    rms_norm64(x, w, 1e-6, gemma).backward(dy)
    dx, dw = formula(x.detach(), w.detach(), dy, 1e-6, gemma)
    assert torch.allclose(dx, x.grad, atol=1e-10) and torch.allclose(dw, w.grad, atol=1e-10)
    dres = torch.randn_like(dy)  # a residual's gradient, added to dx (add_rms_norm's and the sandwich's backward)
    dx_res, dw_res = formula(x.detach(), w.detach(), dy, 1e-6, gemma, dres)
    assert torch.allclose(dx_res, x.grad + dres, atol=1e-10) and torch.equal(dw_res, dw)


@pytest.mark.parametrize("norm_cls,gemma", [(LlamaRMSNorm, False), (Gemma3RMSNorm, True)])
def test_op_grads_match_transformers(ck, norm_cls, gemma):
    norm = norm_cls(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32) * 0.3 + (0 if gemma else 1))
    x = torch.randn(6, 32, requires_grad=True)
    dy = torch.randn(6, 32)
    norm(x).backward(dy)
    want = (x.grad.clone(), norm.weight.grad.clone())
    x.grad = None
    w = norm.weight.detach().clone().requires_grad_()
    ck._ops.ops.rms_norm(x, w, 1e-6, gemma).backward(dy)
    assert torch.allclose(x.grad, want[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(w.grad, want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,requires_grad", [(torch.float32, False), (torch.bfloat16, False),
                                                (torch.float32, True)])
def test_opcheck(ck, dtype, requires_grad):
    """opcheck of both ops (schema, fake, AOT dispatch; with inputs that require grad also the autograd
    registration), for both forms and a strided input."""
    ops = ck._ops.ops
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=requires_grad)
    w = torch.randn(64, dtype=dtype, requires_grad=requires_grad)
    for gemma in (False, True):
        torch.library.opcheck(ops.rms_norm.default, (x, w, 1e-6, gemma))
    if not requires_grad:
        torch.library.opcheck(ops.rms_norm.default, (x[:, ::2], w, 1e-6, False))
    else:
        dy = torch.randn(3, 5, 64)
        torch.library.opcheck(ops.rms_norm_backward.default, (x.detach(), w.detach(), dy, 1e-6, False))
        # a transposed input (Gemma3 normalizes q and k as (B, H, S, D) views): the fake's strides are the real ones
        xt, dyt = x.detach().transpose(0, 1), dy.transpose(0, 1)
        torch.library.opcheck(ops.rms_norm.default, (xt.requires_grad_(), w, 1e-6, True))
        torch.library.opcheck(ops.rms_norm_backward.default, (xt.detach(), w.detach(), dyt, 1e-6, True))
        torch.library.opcheck(ops.rms_norm_backward_add.default, (x.detach(), w.detach(), dy, dy.flip(0), 1e-6,
                                                                  False))


# --- fallbacks ----------------------------------------------------------------------------------------------

def test_cpu_input_warns_once_naming_the_reason(ck):
    reset_fallback_warnings(ck)
    x, w = torch.randn(4, 32), torch.randn(32)
    with pytest.warns(ck.CutileFallbackWarning, match="the input is on cpu"):
        ck.rms_norm(x, w, 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.rms_norm(x, w, 1e-6)  # second call: silent


def test_unhandled_dtype_falls_back_with_its_reason(ck):
    reset_fallback_warnings(ck)
    x, w = torch.randn(4, 32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    with pytest.warns(ck.CutileFallbackWarning, match="dtype torch.float64"):
        out = ck.rms_norm(x, w, 1e-5)
    assert torch.equal(out, ck.rms_norm_reference(x, w, 1e-5))


def test_weight_of_the_wrong_shape_raises(ck):
    with pytest.raises(ValueError, match=r"must be \(8,\)"):
        ck.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6)


def test_cpu_fallback_keeps_autograd(ck):
    x, w = torch.randn(4, 32, requires_grad=True), torch.randn(32, requires_grad=True)
    ck.rms_norm(x, w, 1e-5).sum().backward()
    x64, w64 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ck.rms_norm_reference(x64, w64, 1e-5).sum().backward()
    assert torch.equal(x.grad, x64.grad) and torch.equal(w.grad, w64.grad)


# --- GPU: edge shapes and reasons; the Gemma3RMSNorm Layout (both devices) -----------------------------

@pytest.mark.gpu
def test_zero_rows_strided_and_widest_rows(ck_gpu):
    bf = dict(device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, **bf)
    assert ck_gpu.rms_norm_cutile(torch.empty(0, 256, **bf), w, 1e-6).shape == (0, 256)
    x = torch.randn(8, 512, **bf)[:, ::2]  # non-contiguous rows
    assert torch.allclose(ck_gpu.rms_norm(x, w, 1e-6).float(), ck_gpu.rms_norm_reference(x, w, 1e-6).float(),
                          rtol=1e-2, atol=1e-2)
    x, w = torch.randn(33, 16384, **bf), torch.randn(16384, **bf)  # hidden 16384, the widest tile
    ref = ck_gpu.rms_norm_reference(x, w, 1e-6).float()
    assert (ck_gpu.rms_norm(x, w, 1e-6).float() - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.gpu
def test_supported_inputs_take_cutile_and_others_name_their_reason(ck_gpu):
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    reset_fallback_warnings(ck_gpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ck_gpu.rms_norm(x, torch.ones(4096, device="cuda", dtype=torch.bfloat16), 1e-6)
        ck_gpu.rms_norm(x, torch.ones(4096, device="cuda", dtype=torch.float32), 1e-6)  # fp32 weight: taken
    with pytest.warns(ck_gpu.CutileFallbackWarning, match="weight is torch.float16"):
        ck_gpu.rms_norm(x, torch.ones(4096, device="cuda", dtype=torch.float16), 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_gemma3_norm_layout(ck_hub, checkpoints, hub, cpu_kernel_config, tmp_path, device):
    check_layout_model(ck_hub, checkpoints["gemma3"], layout_mapping(ck_hub, "gemma3", hub, "norm"), device, tmp_path)
