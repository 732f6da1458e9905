"""Rotary position embedding (transformers' registered function `rotary_pos_emb`): reference, cuTile launcher
and the `ApplyRotaryPosEmb` layer. The kernel is `tile/rope.py::rope_fwd` (q and k in one launch).
"""
from __future__ import annotations

import torch
from torch import nn

from ._ops import add_op_namespace_prefix
from ._runtime import cutile_ready, cutile_unavailable, launch, needs_grad, tile_module, warn_fallback

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Exactly transformers' apply_rotary_pos_emb (Llama, Mistral, Qwen2, Qwen3, Gemma3)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def _rope_unavailable(q, k, cos, sin, unsqueeze_dim) -> str | None:
    half = q.shape[-1] // 2
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return f"the layout is not (B, H, S, D) with cos (B, S, D) (unsqueeze_dim={unsqueeze_dim})"
    if q.shape[-1] % 2 or half & (half - 1) or half < 16:
        return f"head_dim {q.shape[-1]} is not twice a power of two (>= 32)"
    if not (k.dtype == cos.dtype == sin.dtype == q.dtype) or cos.shape != sin.shape:
        return "q, k, cos and sin differ in dtype or cos/sin in shape"
    if any(t.stride(-1) != 1 for t in (q, k, cos, sin)):
        return "a last dimension is not contiguous"
    if needs_grad(cos, sin):
        return "cos/sin require grad (the kernel's backward gives q and k gradients only)"
    return None


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """(q_embed, k_embed): cuTile on a supported GPU (through the custom op under torch.compile or when autograd
    records for q or k), the exact reference otherwise."""
    if torch.compiler.is_compiling() and not needs_grad(cos, sin):
        return rope_op(q, k, cos, sin, unsqueeze_dim)
    reason = None
    if not (cutile_ready(q, DTYPES) and cutile_ready(k, DTYPES)):
        reason = cutile_unavailable(q, DTYPES) or cutile_unavailable(k, DTYPES)
    reason = reason or _rope_unavailable(q, k, cos, sin, unsqueeze_dim)
    if reason:
        warn_fallback("apply_rotary_pos_emb", reason)
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    if needs_grad(q, k):
        return rope_op(q, k, cos, sin, unsqueeze_dim)
    return rope_cutile(q, k, cos, sin, unsqueeze_dim)


def rope_cutile(q, k, cos, sin, unsqueeze_dim: int = 1, q_out=None, k_out=None):
    """The cuTile path alone. Outputs are new contiguous tensors in q's and k's logical shape."""
    if unsqueeze_dim == 2:  # (B, S, H, D): the kernel indexes (B, H, S, D); a transposed view is free
        q_embed, k_embed = rope_cutile(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 1,
                                       None if q_out is None else q_out.transpose(1, 2),
                                       None if k_out is None else k_out.transpose(1, 2))
        return q_embed.transpose(1, 2), k_embed.transpose(1, 2)
    b, hq, s, d = q.shape
    cos, sin = cos.expand(b, s, d), sin.expand(b, s, d)
    if cos.stride(0) == 0 or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format) if q_out is None else q_out
    k_out = torch.empty_like(k, memory_format=torch.contiguous_format) if k_out is None else k_out
    if q.numel() and k.numel():
        tile = tile_module("rope")
        tile_s = min(tile.MAX_TILE_S, 1 << (s - 1).bit_length())
        grid = (-(-s // tile_s), b, hq + k.shape[1])
        launch(q.get_device(), grid, tile.rope_fwd, (q, k, cos, sin, q_out, k_out, hq, d // 2, tile_s))
    return q_out, k_out


@torch.library.custom_op(add_op_namespace_prefix("rope"), mutates_args=())
def rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            unsqueeze_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch.compile face of apply_rotary_pos_emb (cuTile or reference inside); contiguous outputs."""
    q_embed, k_embed = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    return q_embed.contiguous(), k_embed.contiguous()


@torch.library.register_fake(add_op_namespace_prefix("rope"))
def _(q, k, cos, sin, unsqueeze_dim):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup(ctx, inputs, output):
    _, _, cos, sin, ctx.unsqueeze_dim = inputs
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, dq, dk):
    """RoPE is a rotation, so its backward is the same op with the inverse rotation: with
    sin' = -[sin[half:], sin[:half]], rope(dy, cos, sin') = rope(x, cos, sin)^T dy (for q and k alike)."""
    cos, sin = ctx.saved_tensors
    half = sin.shape[-1] // 2
    sin_inverse = -torch.cat([sin[..., half:], sin[..., :half]], dim=-1)
    dq, dk = rope_op(dq.contiguous(), dk.contiguous(), cos, sin_inverse, ctx.unsqueeze_dim)
    return dq, dk, None, None, None


torch.library.register_autograd(add_op_namespace_prefix("rope"), _rope_backward, setup_context=_rope_setup)


class ApplyRotaryPosEmb(nn.Module):
    """Stateless replacement of transformers' `rotary_pos_emb` function:
    KernelConfig({"rotary_pos_emb": "<repo>:ApplyRotaryPosEmb"})."""

    has_backward = True  # rope_op's backward is the same kernel with the inverse rotation
    can_torch_compile = True

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
