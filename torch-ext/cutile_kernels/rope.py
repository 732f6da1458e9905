"""Rotary position embedding (transformers' registered function `rotary_pos_emb`): reference, cuTile launcher,
op description and the `ApplyRotaryPosEmb` layer; and `qk_norm_rope`, Qwen3's and Gemma3's q_norm / k_norm with
the RoPE after them in one launch (the decoder-layer kernels call it). The kernels and their launch plans are
`tile/rope.py` (kernel-src/cutile_tile/rope.py; q and k in one launch).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ._op import CutileOp
from ._runtime import DTYPES, device_unsupported, gpu, launch
from .rms_norm import RMS_NORM_BACKWARD, gemma_rms_norm_reference, rms_norm_reference


@functools.cache
def _kernels():
    """tile/rope.py: rope_fwd and its launch plan (imports cuda.tile: first use only)."""
    from .tile import rope

    return rope


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Exactly transformers' apply_rotary_pos_emb (Llama, Mistral, Qwen2, Qwen3, Gemma3)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def head_dim_supported(d: int) -> bool:
    """The kernels take head dims twice a power of two, from 32 (the halves are tiles)."""
    return d >= 32 and d % 2 == 0 and (d // 2) & (d // 2 - 1) == 0


# (q and k, cos and sin) dtypes the kernels take besides one dtype for all: under torch.autocast a float32 model's
# projections give 16-bit q and k while its rotary embedding stays float32; transformers then computes (and returns)
# the rotation in float32, and so do the kernels (`rope_dtype`)
MIXED = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}


def rope_dtype(q: torch.Tensor, cos: torch.Tensor) -> torch.dtype:
    """The outputs' dtype: PyTorch's promotion of q's and cos's, as transformers' element-wise RoPE gives it."""
    return q.dtype if cos.dtype is q.dtype else torch.promote_types(q.dtype, cos.dtype)


def _check(q, k, cos, sin, unsqueeze_dim) -> str | None:
    """None when the cuTile kernel takes these arguments, else why not."""
    reason = device_unsupported(q, DTYPES) or device_unsupported(k, DTYPES)
    if reason is not None:
        return reason
    d = q.shape[-1]
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return f"the layout is not (B, H, S, D) with cos (B, S, D) (unsqueeze_dim={unsqueeze_dim})"
    if not head_dim_supported(d) or k.shape[-1] != d or cos.shape[-1] != d:
        return f"head_dim {d} is not twice a power of two (>= 32) for q, k, cos and sin alike"
    same = k.dtype is q.dtype and sin.dtype is cos.dtype
    if not (same and (cos.dtype is q.dtype or (q.dtype, cos.dtype) in MIXED)):
        return (f"q, k, cos and sin are {q.dtype}, {k.dtype}, {cos.dtype}, {sin.dtype} (one dtype, or 16-bit q and k "
                "with float32 cos and sin)")
    if cos.shape != sin.shape:
        return "cos and sin differ in shape"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        return "a last dimension is not contiguous"
    return None


def _cos_sin_for(q, cos, sin):
    """cos/sin as the kernels index them: (B, S, D) or (1, S, D) (the kernels read batch row min(b, rows - 1)), with
    no zero strides. transformers' (1, S, D) for positions shared by the batch reaches the kernel as it is (before,
    two copies per call for a batch above 1); only a broadcast over positions is materialized."""
    b, _, s, d = q.shape
    return _kernel_rows(cos, b, s, d), _kernel_rows(sin, b, s, d)


def _kernel_rows(t, b, s, d):
    if t.shape[0] not in (1, b) or t.shape[1] != s:
        t = t.expand(b, s, d)
    if t.shape[0] > 1 and t.stride(0) == 0:  # an expanded batch: its first row serves every batch row
        t = t[:1]
    if t.stride(-1) != 1 or (s > 1 and t.stride(1) == 0):
        t = t.contiguous()
    return t


def _rotate(q, k, cos, sin, unsqueeze_dim, q_out, k_out, inverse: bool):
    """rope_cutile and rope_backward_cutile: outputs are new tensors laid out as q and k are, as transformers'
    element-wise RoPE returns them (or the given buffers, any layout). In q's layout a block writes the rows it
    read: the usual (B, H, S, D) view of a (B, S, H, D) projection is read and written in memory order."""
    if unsqueeze_dim == 2:  # (B, S, H, D): the kernel indexes (B, H, S, D); a transposed view is free
        q_embed, k_embed = _rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 1,
                                   None if q_out is None else q_out.transpose(1, 2),
                                   None if k_out is None else k_out.transpose(1, 2), inverse)
        return q_embed.transpose(1, 2), k_embed.transpose(1, 2)
    dtype = rope_dtype(q, cos)
    cos, sin = _cos_sin_for(q, cos, sin)
    q_out = torch.empty_like(q, dtype=dtype) if q_out is None else q_out
    k_out = torch.empty_like(k, dtype=dtype) if k_out is None else k_out
    if q.numel() and k.numel():
        index = q.get_device()
        launch(index, *_kernels().forward_launch(q, k, cos, sin, q_out, k_out, gpu(index), inverse=inverse))
    return q_out, k_out


def rope_cutile(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1,
                q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cuTile path alone (no checks); outputs as `_rotate` describes."""
    return _rotate(q, k, cos, sin, unsqueeze_dim, q_out, k_out, False)


def rope_backward_cutile(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1, q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's backward, the cuTile path alone: the same kernel rotating by the opposite angle (sin' formed in its
    registers, so no extra launch)."""
    return _rotate(dq, dk, cos, sin, unsqueeze_dim, q_out, k_out, True)


def inverse_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin' = -[sin[half:], sin[:half]]: RoPE with it is the rotation's transpose (for any cos/sin halves)."""
    half = sin.shape[-1] // 2
    return -torch.cat([sin[..., half:], sin[..., :half]], dim=-1)


def rope_backward_reference(dq, dk, cos, sin, unsqueeze_dim: int = 1):
    """(dq, dk) through RoPE's backward: RoPE is a rotation, so rope(dy, cos, sin') = rope(x, cos, sin)^T dy."""
    return rope_reference(dq, dk, cos, inverse_sin(sin), unsqueeze_dim)


def _rope_setup(ctx, inputs, output):
    _, _, cos, sin, ctx.unsqueeze_dim = inputs
    ctx.save_for_backward(cos, sin)


def _rotated_grads(op, dq, dk, cos, sin, unsqueeze_dim):
    """Gradients through `op` (a rotation's transpose is the rotation by the opposite angle, and back)."""
    dq, dk = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk))
    return op.in_backward(dq, dk, cos, sin, unsqueeze_dim)


def _rope_backward(ctx, dq, dk):
    return *_rotated_grads(ROPE_BACKWARD, dq, dk, *ctx.saved_tensors, ctx.unsqueeze_dim), None, None, None


def _rope_backward_backward(ctx, ddq, ddk):
    return *_rotated_grads(ROPE, ddq, ddk, *ctx.saved_tensors, ctx.unsqueeze_dim), None, None, None


def _laid_out_like(out, x):
    """`out` in the layout of torch.empty_like(x) (what the launcher allocates and the fake promises; out's dtype):
    x's strides when x is dense, which the first comparison takes without an allocation."""
    if out.stride() == x.stride():
        return out
    like = torch.empty_like(x, dtype=out.dtype)
    return out if out.stride() == like.stride() else like.copy_(out)


def _tokens(q, heads_dim: int) -> int:
    # q is (B, H, S, D) (heads_dim 1) or (B, S, H, D) (heads_dim 2)
    return q.numel() // (q.shape[heads_dim] * q.shape[-1])


def _conform_q_k(out, q, k, *_):
    return _laid_out_like(out[0], q), _laid_out_like(out[1], k)


def _rope_fake(q, k, cos, sin, unsqueeze_dim):
    dtype = rope_dtype(q, cos)
    return torch.empty_like(q, dtype=dtype), torch.empty_like(k, dtype=dtype)


ROPE = CutileOp("rope", launcher=rope_cutile, reference=rope_reference, check=_check, fake=_rope_fake,
                 conform=_conform_q_k, tokens=lambda q, k, cos, sin, unsqueeze_dim: _tokens(q, unsqueeze_dim),
                 backward=_rope_backward, setup_context=_rope_setup)
ROPE_BACKWARD = CutileOp(
    "rope_backward", launcher=rope_backward_cutile, reference=rope_backward_reference, check=_check,
    fake=_rope_fake, conform=_conform_q_k,
    tokens=lambda dq, dk, cos, sin, unsqueeze_dim: _tokens(dq, unsqueeze_dim),
    backward=_rope_backward_backward, setup_context=_rope_setup)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """(q_embed, k_embed): cuTile on a supported GPU, the exact reference otherwise."""
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return rope_reference(q, k, cos, sin, unsqueeze_dim)  # the op's backward gives q and k gradients only
    return ROPE(q, k, cos, sin, unsqueeze_dim)


class ApplyRotaryPosEmb(nn.Module):
    """Stateless replacement of transformers' `rotary_pos_emb` function:
    KernelConfig({"rotary_pos_emb": "<repo>:ApplyRotaryPosEmb"})."""

    has_backward = True  # the rope op's backward is the same kernel with the inverse rotation (rope_backward)
    can_torch_compile = True

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)


# --- q_norm / k_norm + RoPE (Qwen3, Gemma3): the normalized heads never go to memory ------------------------------

def qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps: float, gemma: bool = False):
    """Exactly Qwen3Attention's (gemma=False) or Gemma3Attention's (gemma=True) q_norm, k_norm and
    apply_rotary_pos_emb, for q (B, Hq, S, D) and k (B, Hk, S, D) (the projections' transposed views)."""
    norm = gemma_rms_norm_reference if gemma else rms_norm_reference
    return rope_reference(norm(q, q_weight, eps), norm(k, k_weight, eps), cos, sin)


def _qk_check(q, k, q_weight, k_weight, cos, sin, eps, gemma):
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.dim() != 1 or w.shape[0] != q.shape[-1]:
            raise ValueError(f"cutile_kernels.qk_norm_rope: {name} has shape {tuple(w.shape)}, q "
                             f"{tuple(q.shape)}; it must be ({q.shape[-1]},)")
    reason = _check(q, k, cos, sin, 1)
    if reason is None and cos.dtype is not q.dtype:  # the fused norm + RoPE takes one dtype
        reason = f"q is {q.dtype} and cos/sin {cos.dtype}"
    if reason is None and not all(w.dtype is q.dtype and w.get_device() == q.get_device()
                                  for w in (q_weight, k_weight)):
        reason = f"the norm weights are {q_weight.dtype}/{k_weight.dtype} on {q_weight.device}, q {q.dtype}"
    return reason


def qk_norm_rope_cutile(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, eps: float, gemma: bool = False,
                        q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cuTile path alone (no checks); outputs laid out as q and k (as rope_cutile's)."""
    cos, sin = _cos_sin_for(q, cos, sin)
    q_out = torch.empty_like(q) if q_out is None else q_out
    k_out = torch.empty_like(k) if k_out is None else k_out
    if q.numel() and k.numel():
        index = q.get_device()
        launch(index, *_kernels().qk_norm_launch(q, k, q_weight, k_weight, cos, sin, q_out, k_out, eps, gemma,
                                                 gpu(index)))
    return q_out, k_out


def _qk_setup(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, ctx.eps, ctx.gemma = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)


def _qk_backward(ctx, dq, dk):
    """The inverse rotation (one rope launch), then each norm's backward; the norms' outputs are not saved (the
    kernel recomputes x̂ from q and k)."""
    q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
    dq, dk = _rotated_grads(ROPE_BACKWARD, dq, dk, cos, sin, 1)
    dq, dq_weight = RMS_NORM_BACKWARD.in_backward(q, q_weight, dq, ctx.eps, ctx.gemma)
    dk, dk_weight = RMS_NORM_BACKWARD.in_backward(k, k_weight, dk, ctx.eps, ctx.gemma)
    return dq, dk, dq_weight, dk_weight, None, None, None, None


QK_NORM_ROPE = CutileOp(
    "qk_norm_rope", launcher=qk_norm_rope_cutile, reference=qk_norm_rope_reference, check=_qk_check,
    fake=lambda q, k, q_weight, k_weight, cos, sin, eps, gemma: (torch.empty_like(q), torch.empty_like(k)),
    conform=_conform_q_k, tokens=lambda q, *args: _tokens(q, 1),
    backward=_qk_backward, setup_context=_qk_setup)


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps: float, gemma: bool = False):
    """(rope(q_norm(q)), rope(k_norm(k))) for q (B, Hq, S, D), k (B, Hk, S, D), per-head norm weights (D,) and
    cos/sin (B, S, D): one cuTile launch on a supported GPU, the exact reference otherwise."""
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps, gemma)
    return QK_NORM_ROPE(q, k, q_weight, k_weight, cos, sin, float(eps), bool(gemma))
