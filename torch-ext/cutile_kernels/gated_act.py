"""Gated activation of a merged gate_up projection, act(gate) * up: SiLU (SwiGLU) and GELU-tanh (GeGLU).

Reference, cuTile launchers (forward and backward) and the custom ops; the kernels are
`tile/gated_act.py::gated_act_fwd` and `gated_act_bwd`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._ops import add_op_namespace_prefix
from ._runtime import cutile_ready, cutile_unavailable, launch, needs_grad, tile_module, warn_fallback

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# transformers' ACT2FN names (config.hidden_act / hidden_activation) -> the kernel's ACT constant
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1}


def check_activation(act: str) -> str:
    if act not in ACTIVATIONS:
        raise ValueError(f"cutile_kernels: activation {act!r} is not supported (only {sorted(ACTIVATIONS)})")
    return act


def gated_act_reference(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up in the input dtype, exactly as transformers' MLPs compute it."""
    gate, up = gate_up.chunk(2, dim=-1)
    a = F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")
    return a * up


def gated_act(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """[..., 2 * I] -> [..., I]: cuTile on a supported GPU (through the custom op under torch.compile or when
    autograd records), the exact reference otherwise."""
    if torch.compiler.is_compiling():
        return gated_act_op(gate_up, act)
    if not cutile_ready(gate_up, DTYPES):
        reason = cutile_unavailable(gate_up, DTYPES)
        if reason:
            warn_fallback("gated_act", reason)
            return gated_act_reference(gate_up, act)
    if needs_grad(gate_up):
        return gated_act_op(gate_up, act)
    return gated_act_cutile(gate_up, act)


def gated_act_cutile(gate_up: torch.Tensor, act: str, out: torch.Tensor | None = None) -> torch.Tensor:
    inter = gate_up.shape[-1] // 2
    rows = gate_up.view(-1, 2 * inter) if gate_up.is_contiguous() else gate_up.reshape(-1, 2 * inter).contiguous()
    if out is None:
        out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
    flat = out.view(-1, inter)
    if rows.shape[0] and inter:
        tile = tile_module("gated_act")
        grid = (-(-rows.shape[0] // tile.TILE_M), -(-inter // tile.TILE_N))
        approx = gate_up.dtype != torch.float32  # hardware exp2/div/tanh: exact enough below fp32
        args = (rows[:, :inter], rows[:, inter:], flat, ACTIVATIONS[act], approx, tile.TILE_M, tile.TILE_N)
        launch(gate_up.get_device(), grid, tile.gated_act_fwd, args)
    return out


@torch.library.custom_op(add_op_namespace_prefix("gated_act"), mutates_args=())
def gated_act_op(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """The torch.compile face of gated_act (cuTile or reference inside)."""
    return gated_act(gate_up, act).contiguous()


@torch.library.register_fake(add_op_namespace_prefix("gated_act"))
def _(gate_up, act):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


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


@torch.library.custom_op(add_op_namespace_prefix("gated_act_backward"), mutates_args=())
def gated_act_backward_op(gate_up: torch.Tensor, dy: torch.Tensor, act: str) -> torch.Tensor:
    fast = cutile_ready(gate_up, DTYPES) and dy.dtype == gate_up.dtype
    return (gated_act_backward_cutile if fast else gated_act_backward_reference)(gate_up, dy, act)


@torch.library.register_fake(add_op_namespace_prefix("gated_act_backward"))
def _(gate_up, dy, act):
    return torch.empty_like(gate_up)


def _gated_act_setup(ctx, inputs, output):
    gate_up, ctx.act = inputs
    ctx.save_for_backward(gate_up)


def _gated_act_backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return gated_act_backward_op(gate_up, dy, ctx.act), None


torch.library.register_autograd(add_op_namespace_prefix("gated_act"), _gated_act_backward,
                                setup_context=_gated_act_setup)
