"""Training path (in progress): autograd Functions whose backward runs cuTile kernels on a supported GPU and the
same formulas in PyTorch elsewhere. The formulas are verified by float64 gradcheck on CPU
(tests/test_autograd.py); the cuTile backward kernels compile for every target (CI) and have a GPU test
(tests/test_gpu_autograd.py) that has not run yet. Until it has, the layers keep `has_backward = False` and
these functions are opt-in: rms_norm_autograd, gated_act_autograd, rope_autograd (whose backward is the forward
kernel with the inverse rotation, so it needs no kernel of its own).
"""
from __future__ import annotations

import torch

from ._runtime import cutile_ready, launch, sm_count, tile_module
from .gated_act import ACTIVATIONS, DTYPES, gated_act
from .rms_norm import gemma_rms_norm, rms_norm
from .rope import apply_rotary_pos_emb


def rms_norm_backward_reference(x, weight, dy, eps: float, gemma: bool = False):
    """(dx, dweight) of rms_norm / gemma_rms_norm, in float32 (float64 for float64 inputs)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, d = x.to(acc), dy.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    g = d * (weight.to(acc) + (1.0 if gemma else 0.0))
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    xw = xhat if gemma else xhat.to(x.dtype).to(acc)  # the Llama form multiplies w by x̂ rounded to x's dtype
    return dx.to(x.dtype), (d * xw).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)


def rms_norm_backward_cutile(x, weight, dy, eps: float, gemma: bool = False):
    n = x.shape[-1]
    rows, d = x.reshape(-1, n).contiguous(), dy.reshape(-1, n).contiguous()
    m, index = rows.shape[0], x.get_device()
    dx = torch.empty_like(rows)
    tile = tile_module("rms_norm")
    tile_n, tile_m = tile.tile_shape(n, m, sm_count(index))
    blocks = max(1, min(-(-m // tile_m), tile.BLOCKS_PER_SM * sm_count(index)))
    dw_partial = torch.zeros(blocks, n, dtype=torch.float32, device=x.device)
    if m:
        launch(index, (blocks,), tile.rms_norm_bwd,
               (rows, weight, d, dx, dw_partial, n, float(eps), gemma, tile_m, tile_n))
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, gemma: bool):
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.gemma = eps, gemma
        with torch.no_grad():
            return (gemma_rms_norm if gemma else rms_norm)(x, weight, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        fast = cutile_ready(x, DTYPES) and weight.dtype == x.dtype
        grads = (rms_norm_backward_cutile if fast else rms_norm_backward_reference)(x, weight, dy, ctx.eps,
                                                                                    ctx.gemma)
        return grads[0], grads[1], None, None


def rms_norm_autograd(x, weight, eps: float, gemma: bool = False):
    return RMSNormFunction.apply(x, weight, eps, gemma)


def gated_act_backward_reference(gate_up, dy, act: str):
    acc = torch.float64 if gate_up.dtype == torch.float64 else torch.float32
    g, u = gate_up.to(acc).chunk(2, dim=-1)
    d = dy.to(acc)
    if act == "silu":
        s = torch.sigmoid(g)
        a, da = g * s, s * (1 + g * (1 - s))
    else:
        k0 = 0.7978845608028654
        th = torch.tanh(k0 * (g + 0.044715 * g ** 3))
        a = 0.5 * g * (1 + th)
        da = 0.5 * (1 + th) + 0.5 * g * (1 - th * th) * k0 * (1 + 3 * 0.044715 * g * g)
    return torch.cat([d * u * da, d * a], dim=-1).to(gate_up.dtype)


def gated_act_backward_cutile(gate_up, dy, act: str):
    inter = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * inter).contiguous()
    d = dy.reshape(-1, inter).contiguous()
    grad = torch.empty_like(rows)
    if rows.shape[0] and inter:
        tile = tile_module("gated_act")
        grid = (-(-rows.shape[0] // tile.TILE_M), -(-inter // tile.TILE_N))
        launch(gate_up.get_device(), grid, tile.gated_act_bwd,
               (rows[:, :inter], rows[:, inter:], d, grad[:, :inter], grad[:, inter:], ACTIVATIONS[act],
                tile.TILE_M, tile.TILE_N))
    return grad.view(gate_up.shape)


class GatedActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, act: str):
        ctx.save_for_backward(gate_up)
        ctx.act = act
        with torch.no_grad():
            return gated_act(gate_up, act)

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        fast = cutile_ready(gate_up, DTYPES)
        return (gated_act_backward_cutile if fast else gated_act_backward_reference)(gate_up, dy, ctx.act), None


def gated_act_autograd(gate_up, act: str):
    return GatedActFunction.apply(gate_up, act)


class RotaryFunction(torch.autograd.Function):
    """RoPE is a rotation, so its backward is the same kernel with the inverse rotation: with
    sin' = -[sin[half:], sin[:half]], rope(dy, cos, sin') = rope(x, cos, sin)^T dy (for q and k alike)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim: int):
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        with torch.no_grad():
            return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        half = sin.shape[-1] // 2
        sin_inverse = -torch.cat([sin[..., half:], sin[..., :half]], dim=-1)
        dq, dk = apply_rotary_pos_emb(dq.contiguous(), dk.contiguous(), cos, sin_inverse, ctx.unsqueeze_dim)
        return dq, dk, None, None, None


def rope_autograd(q, k, cos, sin, unsqueeze_dim: int = 1):
    return RotaryFunction.apply(q, k, cos, sin, unsqueeze_dim)
