"""Gated activation of a merged gate_up projection, act(gate) * up: SiLU (SwiGLU) and GELU-tanh (GeGLU).

Reference and cuTile launcher; the kernel is `tile/gated_act.py::gated_act_fwd`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._ops import add_op_namespace_prefix
from ._runtime import cutile_ready, compiling_without_grad, cutile_unavailable, launch, tile_module, warn_fallback

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
    """[..., 2 * I] -> [..., I]: cuTile on a supported GPU, the exact reference otherwise."""
    if compiling_without_grad(gate_up):
        return gated_act_op(gate_up, act)
    if not cutile_ready(gate_up, DTYPES):
        reason = cutile_unavailable(gate_up, DTYPES)
        if reason:
            warn_fallback("gated_act", reason)
            return gated_act_reference(gate_up, act)
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
