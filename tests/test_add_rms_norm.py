"""Residual add + RMSNorm in one pass (both forms), and Gemma3's sandwich (norm, add, norm): each op against
float64 on every device (the matrix; on a GPU cuTile over fresh random shapes with poisoned outputs for both
outputs), the references against transformers' `residual + hidden` and its norm modules, the registered backwards
against autograd through the references, opcheck, torch.compile and invalid arguments."""
import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ._helpers import (CI_DEVICE, DEVICES, DTYPES, assert_close_to_float64, assert_grads_close, fresh_rng,
                       no_fallback, poisoned, recorded_launches)
from .test_rms_norm import FORMS, make_inputs, rms_norm64

EPS = 1e-6
CPU_SHAPES = [(1, 64), (37, 160), (5, 2048)]
# decode sizes (up to two rows per SM) run add_rms_norm_row: (7, 2560) and (250, 5376) pad columns in its tiles
GPU_SHAPES = [(1, 4096), (16, 4096), (7, 2560), (250, 5376), (512, 2560), (4096, 5376), (32768, 4096), (3, 128),
              (65536, 128)]


def run_op(ck, name, x, *args, buffers=("out", "summed")):
    """ck.<name>(x, *args): on a GPU its cuTile launcher writing into poisoned `buffers` of x's shape, elsewhere the
    public function (the reference)."""
    if x.is_cuda:
        return getattr(ck, f"{name}_cutile")(x, *args, **{b: poisoned(x.shape, x) for b in buffers})
    return getattr(ck, name)(x, *args)


def check_add_rms_norm(ck, x, residual, w, gemma, where=""):
    """Both outputs against float64 (the sum rounded to the dtype first, as transformers adds)."""
    where = f"{tuple(x.shape)} {x.dtype} gemma={gemma} {where}"
    out, summed = run_op(ck, "add_rms_norm", x, residual, w, EPS, gemma)
    want_sum = residual + x  # exact in the dtype: one rounding of the float sum
    assert not summed.isnan().any() and torch.equal(summed, want_sum), f"{where}: the sum"
    assert_close_to_float64(out, rms_norm64(want_sum, w, EPS, gemma), x.dtype, where)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gemma", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["add_rms_norm", "rms_norm_add"])
def test_add_rms_norm(device_ck, device, dtype, gemma, op):
    """add_rms_norm (the sum's norm) and rms_norm_add (the sum with a norm), over fresh random shapes."""
    check = check_add_rms_norm if op == "add_rms_norm" else check_rms_norm_add
    seed, rng = fresh_rng()
    shapes = CPU_SHAPES if device == "cpu" else GPU_SHAPES + [(rng.randint(1, 20000), rng.randint(64, 8192))]
    for rows, hidden in shapes:
        x, w = make_inputs(rows, hidden, dtype, gemma, device, scale=rng.choice([0.05, 1.0, 20.0]))
        check(device_ck, x, torch.randn_like(x), w, gemma, f"seed {seed}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gemma", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_backward(device_ck, device, dtype, gemma):
    """d x = d residual = d summed + the norm's input gradient; d weight the norm's (on a GPU: the cuTile backward,
    no fallback), against float64 autograd."""
    for rows, hidden in ([(1, 64), (37, 160)] if device == "cpu" else [(1, 4096), (37, 2560), (4096, 4096)]):
        x, w = make_inputs(rows, hidden, dtype, gemma, device)
        r = torch.randn_like(x)
        leaves = [t.clone().requires_grad_() for t in (x, r, w)]
        dy, ds = torch.randn_like(x), torch.randn_like(x)
        with no_fallback(device_ck, on=x.is_cuda):
            out, summed = device_ck.add_rms_norm(*leaves, EPS, gemma)
            torch.autograd.backward((out, summed), (dy, ds))
        x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, r, w))
        s64 = x64 + r64
        torch.autograd.backward((rms_norm64(s64, w64, EPS, gemma), s64), (dy.double(), ds.double()))
        assert_grads_close([(leaves[0].grad, x64.grad), (leaves[1].grad, r64.grad), (leaves[2].grad, w64.grad)],
                           dtype, (rows, hidden, dtype, gemma))


@pytest.mark.kernels_ci
@pytest.mark.parametrize("gemma", FORMS)
def test_add_rms_norm_ci(ck_gpu, gemma):
    x, w = make_inputs(7, 512, torch.bfloat16, gemma, CI_DEVICE)
    check_add_rms_norm(ck_gpu, x, torch.randn_like(x), w, gemma)


# --- Gemma3's sandwich: pre_feedforward_layernorm(residual + post_attention_layernorm(x)) --------------------------

def check_sandwich(ck, x, residual, post_w, w, where=""):
    """Both outputs against float64, and the sum against the same-dtype reference's (transformers' roundings) within
    one rounding step."""
    where = f"sandwich {tuple(x.shape)} {x.dtype} {where}"
    out, summed = run_op(ck, "sandwich_rms_norm", x, residual, post_w, w, EPS)
    s64 = residual.double() + rms_norm64(x, post_w, EPS, True)
    assert_close_to_float64(summed, s64, x.dtype, f"{where}: the sum")
    assert_close_to_float64(out, rms_norm64(summed, w, EPS, True), x.dtype, where)
    _, want_sum = ck.sandwich_rms_norm_reference(x, residual, post_w, w, EPS)
    assert (summed.float() - want_sum.float()).abs().max() <= 2 * want_sum.float().abs().max() * 2**-7, where


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sandwich_rms_norm(device_ck, device, dtype):
    seed, rng = fresh_rng()
    shapes = CPU_SHAPES if device == "cpu" else GPU_SHAPES + [(rng.randint(1, 20000), rng.randint(64, 8192))]
    for rows, hidden in shapes:
        x, post_w = make_inputs(rows, hidden, dtype, True, device, scale=rng.choice([0.05, 1.0, 20.0]))
        _, w = make_inputs(rows, hidden, dtype, True, device)
        check_sandwich(device_ck, x, torch.randn_like(x), post_w, w, f"seed {seed}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sandwich_rms_norm_backward(device_ck, device, dtype):
    """Gradients of x, the residual and both weights (on a GPU: the cuTile backward kernels, no fallback) against
    float64 autograd."""
    for rows, hidden in ([(1, 64), (37, 160)] if device == "cpu" else [(1, 2560), (37, 3840), (4096, 2560)]):
        x, post_w = make_inputs(rows, hidden, dtype, True, device)
        _, w = make_inputs(rows, hidden, dtype, True, device)
        r = torch.randn_like(x)
        leaves = [t.clone().requires_grad_() for t in (x, r, post_w, w)]
        dy, ds = torch.randn_like(x), torch.randn_like(x)
        with no_fallback(device_ck, on=x.is_cuda):
            torch.autograd.backward(device_ck.sandwich_rms_norm(*leaves, EPS), (dy, ds))
        l64 = [t.detach().double().requires_grad_() for t in (x, r, post_w, w)]
        s64 = l64[1] + rms_norm64(l64[0], l64[2], EPS, True)
        torch.autograd.backward((rms_norm64(s64, l64[3], EPS, True), s64), (dy.double(), ds.double()))
        assert_grads_close([(g.grad, w64.grad) for g, w64 in zip(leaves, l64)], dtype, (rows, hidden, dtype))


def check_rms_norm_add(ck, x, residual, w, gemma, where=""):
    """residual + norm(x) against float64 and, within one rounding step, the same-dtype reference."""
    where = f"rms_norm_add {tuple(x.shape)} {x.dtype} gemma={gemma} {where}"
    summed = run_op(ck, "rms_norm_add", x, residual, w, EPS, gemma, buffers=("summed",))
    assert_close_to_float64(summed, residual.double() + rms_norm64(x, w, EPS, gemma), x.dtype, where)
    want = ck.rms_norm_add_reference(x, residual, w, EPS, gemma)
    assert (summed.float() - want.float()).abs().max() <= 2 * want.float().abs().max() * 2**-7, where


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_add_backward(device_ck, device, dtype):
    for rows, hidden in ([(1, 64), (37, 160)] if device == "cpu" else [(1, 2560), (37, 3840), (4096, 2560)]):
        x, w = make_inputs(rows, hidden, dtype, True, device)
        r, dy = torch.randn_like(x), torch.randn_like(x)
        leaves = [t.clone().requires_grad_() for t in (x, r, w)]
        with no_fallback(device_ck, on=x.is_cuda):
            torch.autograd.backward(device_ck.rms_norm_add(*leaves, EPS, True), dy)
        l64 = [t.detach().double().requires_grad_() for t in (x, r, w)]
        torch.autograd.backward(l64[1] + rms_norm64(l64[0], l64[2], EPS, True), dy.double())
        assert_grads_close([(g.grad, w64.grad) for g, w64 in zip(leaves, l64)], dtype, (rows, hidden, dtype))


@pytest.mark.kernels_ci
def test_sandwich_rms_norm_ci(ck_gpu):
    x, post_w = make_inputs(7, 512, torch.bfloat16, True, CI_DEVICE)
    check_sandwich(ck_gpu, x, torch.randn_like(x), post_w, torch.randn_like(post_w))


# --- reference, registered backward, compile (CPU) ---------------------------------------------------------

@pytest.mark.parametrize("norm_cls", [LlamaRMSNorm, Gemma3RMSNorm])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_equals_transformers(ck, norm_cls, dtype):
    """A decoder layer's `hidden = residual + hidden; normed = norm(hidden)`, bit for bit."""
    norm = norm_cls(96, eps=EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x, residual = torch.randn(3, 5, 96, dtype=dtype), torch.randn(3, 5, 96, dtype=dtype)
    with torch.no_grad():
        out, summed = ck.add_rms_norm(x, residual, norm.weight, EPS, norm_cls is Gemma3RMSNorm)
        assert torch.equal(summed, residual + x)
        assert torch.equal(out, norm(residual + x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_add_reference_equals_transformers(ck, dtype):
    """Gemma3's `residual + post_feedforward_layernorm(hidden)`, bit for bit."""
    post = Gemma3RMSNorm(96, eps=EPS).to(dtype)
    with torch.no_grad():
        post.weight.copy_(torch.randn(96))
        x, residual = torch.randn(3, 5, 96, dtype=dtype), torch.randn(3, 5, 96, dtype=dtype)
        assert torch.equal(ck.rms_norm_add(x, residual, post.weight, EPS, True), residual + post(x))


@pytest.mark.parametrize("gemma", FORMS)
def test_rms_norm_add_registered_backward_equals_autograd_of_the_reference(ck, gemma):
    leaves = [torch.randn(4, 7, 48, requires_grad=True), torch.randn(4, 7, 48, requires_grad=True),
              torch.randn(48, requires_grad=True)]
    grad = torch.randn(4, 7, 48)
    got = torch.autograd.grad(ck._ops.ops.rms_norm_add(*leaves, EPS, gemma), leaves, grad)
    want = torch.autograd.grad(ck.rms_norm_add_reference(*leaves, EPS, gemma), leaves, grad)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)
    torch.library.opcheck(ck._ops.ops.rms_norm_add.default, (*leaves, EPS, gemma))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sandwich_reference_equals_transformers(ck, dtype):
    """Gemma3's `hidden = residual + post_attention_layernorm(hidden); normed = pre_feedforward_layernorm(hidden)`,
    bit for bit."""
    post, pre = Gemma3RMSNorm(96, eps=EPS).to(dtype), Gemma3RMSNorm(96, eps=EPS).to(dtype)
    with torch.no_grad():
        post.weight.copy_(torch.randn(96))
        pre.weight.copy_(torch.randn(96))
        x, residual = torch.randn(3, 5, 96, dtype=dtype), torch.randn(3, 5, 96, dtype=dtype)
        out, summed = ck.sandwich_rms_norm(x, residual, post.weight, pre.weight, EPS)
        assert torch.equal(summed, residual + post(x))
        assert torch.equal(out, pre(residual + post(x)))


def test_sandwich_registered_backward_equals_autograd_of_the_reference(ck):
    leaves = [torch.randn(4, 7, 48, requires_grad=True), torch.randn(4, 7, 48, requires_grad=True),
              torch.randn(48, requires_grad=True), torch.randn(48, requires_grad=True)]
    grads = (torch.randn(4, 7, 48), torch.randn(4, 7, 48))
    got = torch.autograd.grad(ck._ops.ops.sandwich_rms_norm(*leaves, EPS), leaves, grads)
    want = torch.autograd.grad(ck.sandwich_rms_norm_reference(*leaves, EPS), leaves, grads)
    for g, w in zip(got, want):  # fp32 sums in another order (two norms deep): 1e-5 failed about once in 50 draws
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5)
    torch.library.opcheck(ck._ops.ops.sandwich_rms_norm.default, (*leaves, EPS))


def test_sandwich_backward_op_formula_and_opcheck(ck):
    """The sandwich's backward op (one launch at decode sizes on a GPU) returns (dx, d, [dweight | dpost_weight]):
    its reference is autograd of the forward's reference, and its schema and fake pass opcheck."""
    x, r = (torch.randn(3, 5, 48) for _ in range(2))  # fp32: transformers' norms compute in fp32 (no float64)
    pw, w = torch.randn(48), torch.randn(48)
    dn, ds = torch.randn_like(x), torch.randn_like(x)
    leaves = [t.clone().requires_grad_() for t in (x, r, pw, w)]
    normed, summed = ck.sandwich_rms_norm_reference(*leaves, EPS)
    want = torch.autograd.grad((normed, summed), leaves, (dn, ds))
    args = (x, summed.detach(), pw, w, dn, ds)
    dx, d, dweights = ck._ops.ops.sandwich_rms_norm_backward(*args, EPS)
    for got, expected in zip((dx, d, dweights[48:], dweights[:48]), want):
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(ck._ops.ops.sandwich_rms_norm_backward.default, (*args, EPS))


@pytest.mark.parametrize("rows", [1, 37, 100])
def test_sandwich_backward_is_one_launch_at_decode_sizes(ck, monkeypatch, rows):
    """The launcher's glue on CPU (launches recorded, not run; an untuned stand-in GPU): up to 64 rows one
    sandwich_rms_norm_bwd_row launch, whose weight-term rows are the two halves of one buffer that (past one row)
    a single dw_sum reduces; more rows take the two backward launches (and their sums)."""
    plans = recorded_launches(ck, "rms_norm", monkeypatch)
    x, summed, dn, ds = (torch.randn(rows, 96, dtype=torch.bfloat16) for _ in range(4))
    pw, w = torch.randn(96, dtype=torch.bfloat16), torch.randn(96, dtype=torch.bfloat16)
    dx, d, dweights = ck.sandwich_rms_norm_backward_cutile(x, summed, pw, w, dn, ds, EPS)
    assert dx.shape == d.shape == x.shape and dweights.shape == (192,) and dweights.dtype == torch.bfloat16
    if rows > 64:  # the outer norm's backward, then the inner one's, their sums writing into one vector
        outer, inner = [p for p in plans if len(p) > 4]  # (the dw sums take 4 arguments)
        assert torch.equal(outer[0], summed) and torch.equal(inner[0], x)
        assert inner[2].data_ptr() == outer[4].data_ptr()  # the inner backward's gradient is the outer's d
        sums = [p for p in plans if len(p) == 4]
        assert [s[1].data_ptr() for s in sums] == [dweights.data_ptr(), dweights[96:].data_ptr()][:len(sums)]
        return
    fused, *sums = plans
    assert len(sums) == (rows > 1) and len(fused) == 13
    assert all(torch.equal(a, b) for a, b in zip(fused[:6], (x, summed, pw, w, dn, ds)))
    assert (fused[6].data_ptr(), fused[7].data_ptr()) == (dx.data_ptr(), d.data_ptr())
    dw_rows, dpw_rows = fused[8], fused[9]
    assert dw_rows.shape == dpw_rows.shape == (rows, 96)
    assert dpw_rows.data_ptr() - dw_rows.data_ptr() == 96 * dw_rows.element_size()  # [dweight | dpost] per row
    assert dw_rows.dtype == (torch.float32 if rows > 1 else torch.bfloat16)
    if sums:
        partial, out, *_ = sums[0]
        assert partial.data_ptr() == dw_rows.data_ptr() and partial.shape == (rows, 192) and out is dweights
    else:
        assert dweights.data_ptr() == dw_rows.data_ptr()


@pytest.mark.parametrize("gemma", FORMS)
def test_registered_backward_equals_autograd_of_the_reference(ck, gemma):
    leaves = [torch.randn(4, 7, 48, requires_grad=True), torch.randn(4, 7, 48, requires_grad=True),
              torch.randn(48, requires_grad=True)]
    grads = (torch.randn(4, 7, 48), torch.randn(4, 7, 48))
    got = torch.autograd.grad(ck._ops.ops.add_rms_norm(*leaves, EPS, gemma), leaves, grads)
    want = torch.autograd.grad(ck.add_rms_norm_reference(*leaves, EPS, gemma), leaves, grads)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)


def test_opcheck_and_compile(ck):
    args = [torch.randn(4, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True),
            torch.randn(32, requires_grad=True), EPS, False]
    torch.library.opcheck(ck._ops.ops.add_rms_norm.default, args)
    x, r = torch.randn(2, 5, 64, dtype=torch.bfloat16), torch.randn(2, 5, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    compiled = torch.compile(lambda a, b, c: ck.add_rms_norm(a, b, c, EPS), fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, r, w), ck.add_rms_norm_reference(x, r, w, EPS)):
        assert torch.equal(got, want)


def test_invalid_weight_raises(ck):
    with pytest.raises(ValueError, match="the weight must be"):
        ck.add_rms_norm(torch.randn(2, 64), torch.randn(2, 64), torch.randn(32), EPS)


@pytest.mark.parametrize("layout", ["rows", "batch", "strided"])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_launchers_hand_the_kernels_row_views_of_their_outputs(ck, monkeypatch, layout, weight_dtype):
    """The launchers' glue on CPU (the launch recorded, not run): rms_norm and the fused ops return outputs of
    x's shape in the dtype the norm gives (contiguous; rms_norm's has a permuted x's strides), and the kernels
    receive (rows, hidden) views of exactly those outputs and of the inputs' values."""
    plans = recorded_launches(ck, "rms_norm", monkeypatch)
    x = {"rows": torch.randn(5, 64), "batch": torch.randn(2, 3, 64),
         "strided": torch.randn(3, 2, 64).transpose(0, 1)}[layout].bfloat16()
    residual, w = torch.randn_like(x), torch.randn(64, dtype=weight_dtype)
    out = ck.rms_norm_cutile(x, w, EPS)
    (rows, _, out_rows, *_), = plans
    in_memory_order = x.transpose(0, 1) if layout == "strided" else x  # rms_norm reads a permuted x as it lies
    assert out.shape == x.shape and (out.stride() == x.stride() if layout == "strided" else out.is_contiguous())
    assert out.dtype == (torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32)
    assert torch.equal(rows, in_memory_order.reshape(-1, 64)) and out_rows.shape == (x.numel() // 64, 64)
    assert out_rows.data_ptr() == out.data_ptr()
    plans.clear()
    normed, summed = ck.add_rms_norm_cutile(x, residual, w, EPS)
    (rows, res_rows, _, normed_rows, summed_rows, *_), = plans
    assert normed.shape == summed.shape == x.shape and normed.is_contiguous() and summed.is_contiguous()
    assert summed.dtype == x.dtype and normed.dtype == out.dtype
    assert torch.equal(rows, x.reshape(-1, 64)) and torch.equal(res_rows, residual.reshape(-1, 64))
    assert (normed_rows.data_ptr(), summed_rows.data_ptr()) == (normed.data_ptr(), summed.data_ptr())
    assert normed_rows.shape == summed_rows.shape == (x.numel() // 64, 64)
    plans.clear()
    summed = ck.rms_norm_add_cutile(x, residual, w, EPS, True)
    (rows, res_rows, w_given, summed_rows, *_), = plans
    assert w_given is w and summed.shape == x.shape and summed.dtype == x.dtype and summed.is_contiguous()
    assert torch.equal(rows, x.reshape(-1, 64)) and torch.equal(res_rows, residual.reshape(-1, 64))
    assert summed_rows.data_ptr() == summed.data_ptr() and summed_rows.shape == (x.numel() // 64, 64)
    plans.clear()
    post_w = torch.randn(64, dtype=weight_dtype)
    normed, summed = ck.sandwich_rms_norm_cutile(x, residual, post_w, w, EPS)
    (rows, res_rows, post_given, w_given, normed_rows, summed_rows, *_), = plans
    assert post_given is post_w and w_given is w  # the post-attention norm's weight first
    assert normed.dtype == summed.dtype == x.dtype and normed.shape == x.shape and normed.is_contiguous()
    assert torch.equal(rows, x.reshape(-1, 64)) and torch.equal(res_rows, residual.reshape(-1, 64))
    assert (normed_rows.data_ptr(), summed_rows.data_ptr()) == (normed.data_ptr(), summed.data_ptr())
