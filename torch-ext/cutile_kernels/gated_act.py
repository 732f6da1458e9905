"""Gated activation of a merged gate_up projection, act(gate) * up: SiLU (SwiGLU) and GELU-tanh (GeGLU).

References, cuTile launchers (forward and backward) and the op descriptions; the kernels and their launch
plans are `tile/gated_act.py` (kernel-src/cutile_tile/gated_act.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._op import CutileOp
from ._runtime import DTYPES, device_unsupported, gpu, launch
from .tile import ACTIVATIONS


@functools.cache
def _kernels():
    """tile/gated_act.py: gated_act_fwd, gated_act_bwd and their launch plans (imports cuda.tile: first use)."""
    from .tile import gated_act

    return gated_act


def check_activation(act: str) -> str:
    if act not in ACTIVATIONS:
        raise ValueError(f"cutile_kernels: activation {act!r} is not supported (only {sorted(ACTIVATIONS)})")
    return act


def _check(gate_up: torch.Tensor, act: str, dy: torch.Tensor | None = None) -> str | None:
    """None when the cuTile kernels take these arguments, else why not; an unknown activation or an odd
    last dimension raises (no half is the gate)."""
    check_activation(act)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"cutile_kernels.gated_act: the last dimension of gate_up is {gate_up.shape[-1]}; it "
                         "must be even ([gate | up] halves)")
    reason = device_unsupported(gate_up, DTYPES)
    if reason is None and dy is not None and dy.dtype is not gate_up.dtype:
        reason = f"the backward takes one dtype (gate_up {gate_up.dtype}, grad {dy.dtype})"
    return reason


def gated_act_reference(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up in the input dtype, exactly as transformers' MLPs compute it."""
    check_activation(act)
    gate, up = gate_up.chunk(2, dim=-1)
    a = F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")
    return a * up


def gated_act_cutile(gate_up: torch.Tensor, act: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The cuTile path alone (no checks); `out`, if given, is a contiguous buffer of the output's shape."""
    inter = gate_up.shape[-1] // 2
    rows = gate_up.view(-1, 2 * inter) if gate_up.is_contiguous() else gate_up.reshape(-1, 2 * inter).contiguous()
    if out is None:
        out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] and inter:
        index = gate_up.get_device()
        gate, up = rows.chunk(2, 1)  # one call for both halves: 1 µs less host time than two slices (CPU)
        launch(index, *_kernels().forward_launch(gate, up, out if out.dim() == 2 else out.view(-1, inter), act,
                                                 gpu(index)))
    return out


# --- backward: d(gate_up) ------------------------------------------------------------------------------------

def gated_act_backward_reference(gate_up, dy, act: str):
    """d(gate_up) = [dy * up * act'(gate) | dy * act(gate)], in float32 (float64 for float64 inputs)."""
    acc = torch.float64 if gate_up.dtype == torch.float64 else torch.float32
    g, u = gate_up.to(acc).chunk(2, dim=-1)
    d = dy.to(acc)
    if act == "silu":
        s = torch.sigmoid(g)
        a, da = g * s, s * (1 + g * (1 - s))
    else:
        k0 = 0.7978845608028654  # sqrt(2 / pi)
        th = torch.tanh(k0 * (g + 0.044715 * g ** 3))
        a = 0.5 * g * (1 + th)
        da = 0.5 * (1 + th) + 0.5 * g * (1 - th * th) * k0 * (1 + 3 * 0.044715 * g * g)
    return torch.cat([d * u * da, d * a], dim=-1).to(gate_up.dtype)


def gated_act_backward_cutile(gate_up: torch.Tensor, dy: torch.Tensor, act: str,
                              grad: torch.Tensor | None = None) -> torch.Tensor:
    """d(gate_up) in one pass; `grad`, if given, is a contiguous buffer of gate_up's shape."""
    inter = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * inter).contiguous()
    d = dy.reshape(-1, inter).contiguous()
    grad = torch.empty_like(rows) if grad is None else grad.view(-1, 2 * inter)
    if rows.shape[0] and inter:
        index = gate_up.get_device()
        launch(index, *_kernels().backward_launch(rows[:, :inter], rows[:, inter:], d, grad[:, :inter],
                                                  grad[:, inter:], act, gpu(index)))
    return grad.view(gate_up.shape)


GATED_ACT_BACKWARD = CutileOp(
    "gated_act_backward", launcher=gated_act_backward_cutile, reference=gated_act_backward_reference,
    check=lambda gate_up, dy, act: _check(gate_up, act, dy),
    fake=lambda gate_up, dy, act: gate_up.new_empty(gate_up.shape))


def _gated_act_setup(ctx, inputs, output):
    gate_up, ctx.act = inputs
    ctx.save_for_backward(gate_up)


def _gated_act_backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return GATED_ACT_BACKWARD.in_backward(gate_up, dy, ctx.act), None


GATED_ACT = CutileOp("gated_act", launcher=gated_act_cutile, reference=gated_act_reference, check=_check,
                      fake=lambda gate_up, act: gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2),
                      backward=_gated_act_backward, setup_context=_gated_act_setup)


def gated_act(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """[..., 2 * I] -> [..., I], act(gate) * up for act in ACTIVATIONS: cuTile on a supported GPU, the exact
    reference otherwise."""
    return GATED_ACT(gate_up, act)
