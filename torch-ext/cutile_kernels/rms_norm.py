"""RMSNorm in the Llama form (Llama, Mistral, Qwen2, Qwen3) and the Gemma form (Gemma3: x̂ · (1 + w)).

References, cuTile launchers (forward and backward), the op descriptions and the layers side by side; the
kernels and their launch plans are `tile/rms_norm.py` (kernel-src/cutile_tile/rms_norm.py).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ._op import CutileOp
from ._runtime import DTYPES, device_unsupported, gpu, launch
from .checks import Layout, check_replacement
MAX_HIDDEN = 16384  # the widest row one tile holds (kernel-src compiles TILE_N up to this)


@functools.cache
def _kernels():
    """tile/rms_norm.py: rms_norm_fwd, rms_norm_bwd and their launch plans (imports cuda.tile: first use only)."""
    from .tile import rms_norm

    return rms_norm


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Exactly transformers' LlamaRMSNorm.forward (also Mistral, Qwen2, Qwen3)."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


def gemma_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Exactly transformers' Gemma3RMSNorm.forward: fp32 throughout, (1 + w), one rounding at the end."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).type_as(x)


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool, dy: torch.Tensor | None = None):
    """None when the cuTile kernels take these arguments, else why not; a weight that is not of the hidden
    size raises (the reference would broadcast it into wrong numbers)."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"cutile_kernels.rms_norm: the weight has shape {tuple(weight.shape)}, the input "
                         f"{tuple(x.shape)}; the weight must be ({x.shape[-1]},)")
    reason = device_unsupported(x, DTYPES)
    if reason is None:
        if weight.dtype is not x.dtype and weight.dtype is not torch.float32:
            reason = f"the weight is {weight.dtype} and the input {x.dtype}"
        elif x.shape[-1] > MAX_HIDDEN:
            reason = f"the hidden size {x.shape[-1]} is wider than {MAX_HIDDEN}"
        elif weight.get_device() != x.get_device():
            reason = f"the weight is on {weight.device}, the input on {x.device}"
        elif dy is not None and not (dy.dtype is x.dtype is weight.dtype):
            reason = f"the backward takes one dtype (x {x.dtype}, weight {weight.dtype}, grad {dy.dtype})"
    return reason


def rms_norm_cutile(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The cuTile path alone (no checks); `out`, if given, is a contiguous buffer of x's shape. A permuted x (Gemma3
    normalizes q and k as (B, H, S, D) views of (B, S, H, D)) is normalized in memory order, without a copy, into
    an output laid out like it (as transformers' norm returns it)."""
    n = x.shape[-1]
    rows = None if out is not None or x.is_contiguous() else _rows_in_memory_order(x)
    if rows is not None:
        out = torch.empty_like(x, dtype=_norm_output_dtype(x, weight, gemma))
        out_rows = _rows_in_memory_order(out)  # x's strides, so its rows in the same order
    else:
        rows = _rows(x, n)
        out = _norm_output(x, weight, gemma) if out is None else out
        out_rows = _rows(out, n)
    if rows.shape[0] and n:
        index = x.get_device()
        launch(index, *_kernels().forward_launch(rows, weight, out_rows, eps, gemma, gpu(index)))
    return out


# Host time per call matters at decode (eager: every launch waits on Python). Measured on CPU: torch.empty_like
# takes half of torch.empty with dtype and device; view(-1, n) 0.7 µs, view(torch.Size) 2.6.
def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """`t` as contiguous (rows, n): itself when it is one already."""
    if t.is_contiguous():
        return t if t.dim() == 2 else t.view(-1, n)
    return t.reshape(-1, n).contiguous()


def _rows_in_memory_order(t: torch.Tensor) -> torch.Tensor | None:
    """t's rows as a (rows, n) view in memory order when t is a permutation of a contiguous tensor with its last
    dimension innermost (row order differs from t's: an output must have t's strides), else None."""
    if t.stride(-1) != 1:
        return None
    order = sorted(range(t.dim() - 1), key=lambda d: -t.stride(d))
    mem = t.permute(*order, t.dim() - 1)
    return mem.view(-1, t.shape[-1]) if mem.is_contiguous() else None


def _norm_output_dtype(x: torch.Tensor, weight: torch.Tensor, gemma: bool) -> torch.dtype:
    """The normalized rows' dtype: x's, or float32 for a float32 weight (Llama form)."""
    return x.dtype if gemma or weight.dtype is x.dtype else torch.float32


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of t's shape and dtype."""
    return torch.empty_like(t) if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)


def _norm_output(x: torch.Tensor, weight: torch.Tensor, gemma: bool) -> torch.Tensor:
    """The normalized rows' buffer: x's shape, x's dtype, or float32 for a float32 weight (Llama form)."""
    dtype = _norm_output_dtype(x, weight, gemma)
    return _empty_like(x) if dtype is x.dtype else torch.empty(x.shape, dtype=dtype, device=x.device)


def _rms_norm_reference(x, weight, eps, gemma):
    return (gemma_rms_norm_reference if gemma else rms_norm_reference)(x, weight, eps)


def _rms_norm_fake(x, weight, eps, gemma):
    return x.new_empty(x.shape, dtype=x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype))


# --- backward: (dx, dweight) ----------------------------------------------------------------------------------

def rms_norm_backward_reference(x, weight, dy, eps: float, gemma: bool = False, dres=None):
    """(dx, dweight) of rms_norm / gemma_rms_norm, in float32 (float64 for float64 inputs); with `dres` (a
    residual's gradient, x's shape) dx + dres, rounded once."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, d = x.to(acc), dy.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    g = d * (weight.to(acc) + (1.0 if gemma else 0.0))
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if dres is not None:
        dx = dx + dres.to(acc)
    xw = xhat if gemma else xhat.to(x.dtype).to(acc)  # the Llama form multiplies w by x̂ rounded to x's dtype
    return dx.to(x.dtype), (d * xw).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)


def rms_norm_backward_cutile(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, eps: float, gemma: bool,
                             dx: torch.Tensor | None = None, dres: torch.Tensor | None = None,
                             dw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dx per row in one pass; dweight as fp32 partial sums (one row per block), reduced by rms_norm_bwd_dw_sum,
    or, when one block takes every row, written by the kernel itself (one launch). `dx`, if given, is a contiguous
    buffer of x's shape; `dres` (x's shape), if given, is added to dx in the kernel; `dw`, if given, is a
    contiguous (hidden,) buffer of the weight's dtype that receives dweight."""
    n = x.shape[-1]
    rows, d = x.reshape(-1, n).contiguous(), dy.reshape(-1, n).contiguous()
    res = None if dres is None else dres.reshape(-1, n).contiguous()
    m, index = rows.shape[0], x.get_device()
    dx = torch.empty_like(rows) if dx is None else dx.view(m, n)
    if not m:
        return dx.view(x.shape), torch.zeros_like(weight) if dw is None else dw.zero_()
    kernels, device = _kernels(), gpu(index)
    blocks = kernels.backward_blocks(rows, device)
    dw = torch.empty(n, dtype=weight.dtype, device=x.device) if dw is None else dw
    dw_partial = dw.view(1, n) if blocks == 1 else torch.empty(blocks, n, dtype=torch.float32, device=x.device)
    launch(index, *kernels.backward_launch(rows, weight, d, dx, dw_partial, eps, gemma, device, dres=res))
    if blocks > 1:
        launch(index, *kernels.dw_sum_launch(dw_partial, dw))
    return dx.view(x.shape), dw


RMS_NORM_BACKWARD = CutileOp(
    "rms_norm_backward", launcher=rms_norm_backward_cutile, reference=rms_norm_backward_reference,
    check=lambda x, weight, dy, eps, gemma: _check(x, weight, eps, gemma, dy),
    fake=lambda x, weight, dy, eps, gemma: (x.new_empty(x.shape), weight.new_empty(weight.shape)))


def rms_norm_backward_add_cutile(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, dres: torch.Tensor,
                                 eps: float, gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx + dres, dweight): the backward of a norm whose input also went on as a residual (add_rms_norm,
    sandwich_rms_norm), the residual's gradient dres added in the kernel before dx is rounded."""
    return rms_norm_backward_cutile(x, weight, dy, eps, gemma, dres=dres)


def _backward_add_check(x, weight, dy, dres, eps, gemma):
    if dres.shape != x.shape:
        raise ValueError(f"cutile_kernels.rms_norm_backward_add: dres has shape {tuple(dres.shape)}, x "
                         f"{tuple(x.shape)}")
    reason = _check(x, weight, eps, gemma, dy)
    if reason is None and dres.dtype is not x.dtype:
        reason = f"the residual's gradient is {dres.dtype} and the input {x.dtype}"
    return reason


RMS_NORM_BACKWARD_ADD = CutileOp(
    "rms_norm_backward_add", launcher=rms_norm_backward_add_cutile,
    reference=lambda x, weight, dy, dres, eps, gemma: rms_norm_backward_reference(x, weight, dy, eps, gemma, dres),
    check=_backward_add_check,
    fake=lambda x, weight, dy, dres, eps, gemma: (x.new_empty(x.shape), weight.new_empty(weight.shape)))


def _rms_norm_setup(ctx, inputs, output):
    x, weight, ctx.eps, ctx.gemma = inputs
    ctx.save_for_backward(x, weight)


def _rms_norm_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dweight = RMS_NORM_BACKWARD.in_backward(x, weight, dy, ctx.eps, ctx.gemma)
    return dx, dweight, None, None


RMS_NORM = CutileOp("rms_norm", launcher=rms_norm_cutile, reference=_rms_norm_reference, check=_check,
                     fake=_rms_norm_fake, backward=_rms_norm_backward, setup_context=_rms_norm_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-form RMSNorm over the last dimension: cuTile on a supported GPU, the exact reference otherwise."""
    return RMS_NORM(x, weight, float(eps), False)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma-form RMSNorm: cuTile on a supported GPU, the exact reference otherwise."""
    return RMS_NORM(x, weight, float(eps), True)


# --- residual add + RMSNorm: (norm(x + residual), x + residual) -----------------------------------------------

def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           gemma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly a decoder layer's `hidden = residual + hidden` followed by its RMSNorm: (normed, hidden)."""
    summed = residual + x
    return _rms_norm_reference(summed, weight, eps, gemma), summed


def _add_check(x, residual, weight, eps, gemma):
    reason = _check(x, weight, eps, gemma)
    if reason is None and (residual.shape != x.shape or residual.dtype is not x.dtype
                           or residual.get_device() != x.get_device()):
        reason = f"the residual is {tuple(residual.shape)} {residual.dtype}, the input {tuple(x.shape)} {x.dtype}"
    return reason


def add_rms_norm_cutile(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        gemma: bool = False, out: torch.Tensor | None = None,
                        summed: torch.Tensor | None = None, post_weight: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cuTile path alone (no checks); `out` and `summed`, if given, are contiguous buffers of x's shape. With
    `post_weight`, x is first normalized with it (the sandwich)."""
    n = x.shape[-1]
    rows, res = _rows(x, n), _rows(residual, n)
    out = _norm_output(x, weight, gemma) if out is None else out
    summed = _empty_like(x) if summed is None else summed
    if rows.shape[0] and n:
        index = x.get_device()
        launch(index, *_kernels().add_forward_launch(rows, res, weight, _rows(out, n), _rows(summed, n), eps, gemma,
                                                     gpu(index), post_weight))
    return out, summed


def _add_rms_norm_setup(ctx, inputs, output):
    ctx.eps, ctx.gemma = inputs[3], inputs[4]
    ctx.save_for_backward(output[1], inputs[2])


def _add_rms_norm_backward(ctx, d_normed, d_summed):
    """Both inputs get d(summed) plus the norm's input gradient; the weight the norm's."""
    summed, weight = ctx.saved_tensors
    d, dweight = RMS_NORM_BACKWARD_ADD.in_backward(summed, weight, d_normed, d_summed, ctx.eps, ctx.gemma)
    return d, d, dweight, None, None


ADD_RMS_NORM = CutileOp(
    "add_rms_norm", launcher=add_rms_norm_cutile, reference=add_rms_norm_reference, check=_add_check,
    fake=lambda x, residual, weight, eps, gemma: (_rms_norm_fake(x, weight, eps, gemma), torch.empty_like(x)),
    backward=_add_rms_norm_backward, setup_context=_add_rms_norm_setup)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 gemma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual) in one pass (the Gemma form with gemma=True): cuTile on a supported
    GPU, the exact reference otherwise. What a decoder layer computes between its attention and its MLP."""
    return ADD_RMS_NORM(x, residual, weight, float(eps), bool(gemma))


# --- Gemma3's sandwich: (norm(residual + norm(x, post_weight), weight), residual + norm(x, post_weight)) ------------

def sandwich_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, post_weight: torch.Tensor,
                                weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly Gemma3's `hidden = residual + post_attention_layernorm(hidden)` and pre_feedforward_layernorm of it
    (both Gemma-form norms with one eps): (normed, hidden)."""
    return add_rms_norm_reference(gemma_rms_norm_reference(x, post_weight, eps), residual, weight, eps, True)


def _sandwich_check(x, residual, post_weight, weight, eps):
    return _add_check(x, residual, weight, eps, True) or _check(x, post_weight, eps, True)


def sandwich_rms_norm_cutile(x: torch.Tensor, residual: torch.Tensor, post_weight: torch.Tensor,
                             weight: torch.Tensor, eps: float, out: torch.Tensor | None = None,
                             summed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cuTile path alone (no checks): one kernel reads x and the residual once; the norm of x never goes to
    memory. `out` and `summed`, if given, are contiguous buffers of x's shape."""
    return add_rms_norm_cutile(x, residual, weight, eps, True, out, summed, post_weight)


def _sandwich_setup(ctx, inputs, output):
    ctx.eps = inputs[4]
    ctx.save_for_backward(inputs[0], output[1], inputs[2], inputs[3])


def sandwich_rms_norm_backward_reference(x, summed, post_weight, weight, d_normed, d_summed, eps: float):
    """(dx, d, [dweight | dpost_weight]) of sandwich_rms_norm: the outer norm's input gradient plus d(summed) is d,
    the residual's gradient and the inner norm's output gradient (the package's backward formula in PyTorch). The
    two weight gradients come as one vector (a custom op's outputs may not alias: the fused kernel's sum writes
    both into one buffer, split by the autograd function)."""
    d, dweight = rms_norm_backward_reference(summed, weight, d_normed, eps, True, d_summed)
    dx, dpost_weight = rms_norm_backward_reference(x, post_weight, d, eps, True)
    return dx, d, torch.cat([dweight, dpost_weight])


def sandwich_rms_norm_backward_cutile(x: torch.Tensor, summed: torch.Tensor, post_weight: torch.Tensor,
                                      weight: torch.Tensor, d_normed: torch.Tensor, d_summed: torch.Tensor,
                                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At decode sizes one launch (sandwich_rms_norm_bwd_row) and, past one row, one dw_sum of both weights' fp32
    row terms side by side; elsewhere the outer norm's backward with d(summed) added in its kernel, then the
    inner norm's. Returns as the reference."""
    n, index = x.shape[-1], x.get_device()
    s = summed.reshape(-1, n)
    m = s.shape[0]
    kernels, device = _kernels(), gpu(index)
    if m and kernels.sandwich_backward_fits(s, device):  # asked before the row terms' buffer is made
        rows, s, dn, ds = (t.reshape(-1, n).contiguous() for t in (x, s, d_normed, d_summed))
        dx, d = torch.empty_like(rows), torch.empty_like(rows)
        terms = torch.empty(m, 2 * n, dtype=weight.dtype if m == 1 else torch.float32, device=x.device)
        launch(index, *kernels.sandwich_backward_launch(rows, s, post_weight, weight, dn, ds, dx, d, terms[:, :n],
                                                        terms[:, n:], eps, device))
        if m == 1:
            return dx.view(x.shape), d.view(x.shape), terms[0]
        dweights = torch.empty(2 * n, dtype=weight.dtype, device=x.device)
        launch(index, *kernels.dw_sum_launch(terms, dweights))
        return dx.view(x.shape), d.view(x.shape), dweights
    dweights = torch.empty(2 * n, dtype=weight.dtype, device=x.device)  # both sums write into it: no cat
    d, _ = rms_norm_backward_cutile(summed, weight, d_normed, eps, True, dres=d_summed, dw=dweights[:n])
    dx, _ = rms_norm_backward_cutile(x, post_weight, d, eps, True, dw=dweights[n:])
    return dx, d, dweights


def _sandwich_backward_check(x, summed, post_weight, weight, d_normed, d_summed, eps):
    return (_sandwich_check(x, summed, post_weight, weight, eps) or _check(x, weight, eps, True, d_normed)
            or _check(x, post_weight, eps, True, d_summed))


SANDWICH_RMS_NORM_BACKWARD = CutileOp(
    "sandwich_rms_norm_backward", launcher=sandwich_rms_norm_backward_cutile,
    reference=sandwich_rms_norm_backward_reference, check=_sandwich_backward_check,
    fake=lambda x, summed, post_weight, weight, d_normed, d_summed, eps: (
        x.new_empty(x.shape), x.new_empty(x.shape), weight.new_empty(2 * weight.shape[0])))


def _sandwich_backward(ctx, d_normed, d_summed):
    x, summed, post_weight, weight = ctx.saved_tensors
    dx, d, dweights = SANDWICH_RMS_NORM_BACKWARD.in_backward(x, summed, post_weight, weight, d_normed, d_summed, ctx.eps)
    n = weight.shape[0]
    return dx, d, dweights[n:], dweights[:n], None


SANDWICH_RMS_NORM = CutileOp(
    "sandwich_rms_norm", launcher=sandwich_rms_norm_cutile, reference=sandwich_rms_norm_reference,
    check=_sandwich_check,
    fake=lambda x, residual, post_weight, weight, eps: (x.new_empty(x.shape), x.new_empty(x.shape)),
    backward=_sandwich_backward, setup_context=_sandwich_setup)


def sandwich_rms_norm(x: torch.Tensor, residual: torch.Tensor, post_weight: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(GemmaRMSNorm(residual + GemmaRMSNorm(x, post_weight), weight), residual + GemmaRMSNorm(x, post_weight)) in
    one pass: what Gemma3's decoder layer computes between its attention and its MLP. cuTile on a supported GPU,
    the exact reference otherwise."""
    return SANDWICH_RMS_NORM(x, residual, post_weight, weight, float(eps))


# --- a norm's output added to the residual: residual + norm(x) (Gemma3's post_feedforward_layernorm) ----------------

def rms_norm_add_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           gemma: bool = False) -> torch.Tensor:
    """Exactly `residual + norm(x)`, as Gemma3's decoder layer ends."""
    return residual + _rms_norm_reference(x, weight, eps, gemma)


def _norm_add_check(x, residual, weight, eps, gemma):
    reason = _add_check(x, residual, weight, eps, gemma)
    if reason is None and not gemma and weight.dtype is not x.dtype:
        reason = f"the weight is {weight.dtype} and the input {x.dtype} (the sum would be float32)"
    return reason


def rms_norm_add_cutile(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        gemma: bool = False, summed: torch.Tensor | None = None) -> torch.Tensor:
    """The cuTile path alone (no checks): one kernel; the norm's output never goes to memory. `summed`, if given,
    is a contiguous buffer of x's shape."""
    n = x.shape[-1]
    rows, res = _rows(x, n), _rows(residual, n)
    summed = _empty_like(x) if summed is None else summed
    if rows.shape[0] and n:
        index = x.get_device()
        launch(index, *_kernels().norm_add_launch(rows, res, weight, _rows(summed, n), eps, gemma, gpu(index)))
    return summed


def _rms_norm_add_setup(ctx, inputs, output):
    ctx.eps, ctx.gemma = inputs[3], inputs[4]
    ctx.save_for_backward(inputs[0], inputs[2])


def _rms_norm_add_backward(ctx, d_summed):
    """The residual gets d(summed); x and the weight the norm's gradients of it."""
    x, weight = ctx.saved_tensors
    dx, dweight = RMS_NORM_BACKWARD.in_backward(x, weight, d_summed, ctx.eps, ctx.gemma)
    return dx, d_summed, dweight, None, None


RMS_NORM_ADD = CutileOp(
    "rms_norm_add", launcher=rms_norm_add_cutile, reference=rms_norm_add_reference, check=_norm_add_check,
    fake=lambda x, residual, weight, eps, gemma: x.new_empty(x.shape),
    backward=_rms_norm_add_backward, setup_context=_rms_norm_add_setup)


def rms_norm_add(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 gemma: bool = False) -> torch.Tensor:
    """residual + RMSNorm(x) in one pass (the Gemma form with gemma=True): how Gemma3's decoder layer ends. cuTile
    on a supported GPU, the exact reference otherwise."""
    return RMS_NORM_ADD(x, residual, weight, float(eps), bool(gemma))


class RMSNorm(nn.Module):
    """Stateless replacement of the `RMSNorm` forward that transformers registers (uses the host's weight)."""

    weight: torch.Tensor
    variance_epsilon: float

    has_backward = True  # autograd goes through the rms_norm custom op, whose backward is the cuTile rms_norm_bwd kernel
    can_torch_compile = True  # torch.compile sees one custom op (rms_norm), no graph break

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class GemmaRMSNorm(nn.Module):
    """Gemma3RMSNorm forward in cuTile. transformers does not register Gemma3RMSNorm for kernels, so it is
    swapped through its Layout: KernelConfig({"^Gemma3RMSNorm$": "<repo>:GemmaRMSNorm"})."""

    weight: torch.Tensor
    eps: float

    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gemma_rms_norm(hidden_states, self.weight, self.eps)


class GemmaRMSNormLayout(Layout):
    """Gemma3RMSNorm's parameters under their own names (`weight`), so checkpoints load and save unchanged
    and no conversion rule is registered. Its forward is the exact reference (training, fallbacks)."""

    def __init__(self, dim: int, eps: float = 1e-6):  # Gemma3Attention passes `dim=` by keyword
        check_replacement(type(self), dim, eps)  # replaces Gemma3RMSNorm only (never a Llama-form norm)
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gemma_rms_norm_reference(hidden_states, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
