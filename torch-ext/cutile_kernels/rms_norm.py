"""RMSNorm in the Llama form (Llama, Mistral, Qwen2, Qwen3) and the Gemma form (Gemma3: x̂ · (1 + w)).

Reference, cuTile launchers (forward and backward), the custom ops and layers side by side; the cuTile kernels
are `tile/rms_norm.py::rms_norm_fwd` and `rms_norm_bwd`.
"""
from __future__ import annotations

import torch
from torch import nn

from ._ops import add_op_namespace_prefix
from ._runtime import cutile_ready, cutile_unavailable, launch, needs_grad, sm_count, tile_module, warn_fallback

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HIDDEN = 16384  # the widest row one tile holds (kernel-src compiles TILE_N up to this)


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


def _weight_unavailable(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    if weight.dtype not in (x.dtype, torch.float32):
        return f"the weight is {weight.dtype} and the input {x.dtype}"
    if x.shape[-1] > MAX_HIDDEN:
        return f"the hidden size {x.shape[-1]} is wider than {MAX_HIDDEN}"
    if weight.shape != x.shape[-1:] or weight.device != x.device:
        return f"the weight has shape {tuple(weight.shape)} on {weight.device}, the input {tuple(x.shape)}"
    return None


def _weight_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The per-call weight check; `_weight_unavailable` says why when it fails."""
    return (weight.dtype in (x.dtype, torch.float32) and weight.dim() == 1
            and weight.shape[0] == x.shape[-1] <= MAX_HIDDEN and weight.get_device() == x.get_device())


def _dispatch(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """Both forms: the custom op under torch.compile or when autograd records (its backward is cuTile), the
    cuTile launch when it takes the inputs, else the reference (differentiable by PyTorch)."""
    if torch.compiler.is_compiling():
        return rms_norm_op(x, weight, float(eps), gemma)
    if not (cutile_ready(x, DTYPES) and _weight_fits(x, weight)):  # the hot path: attribute reads only
        reason = cutile_unavailable(x, DTYPES) or _weight_unavailable(x, weight)
        if reason:
            warn_fallback("gemma_rms_norm" if gemma else "rms_norm", reason)
            return (gemma_rms_norm_reference if gemma else rms_norm_reference)(x, weight, eps)
    if needs_grad(x, weight):
        return rms_norm_op(x, weight, float(eps), gemma)
    return rms_norm_cutile(x, weight, eps, gemma=gemma)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-form RMSNorm over the last dimension: cuTile on a supported GPU, the exact reference otherwise."""
    return _dispatch(x, weight, eps, False)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma-form RMSNorm: cuTile on a supported GPU, the exact reference otherwise."""
    return _dispatch(x, weight, eps, True)


def rms_norm_cutile(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None,
                    gemma: bool = False) -> torch.Tensor:
    """The cuTile path alone (no checks); `out`, if given, is a contiguous buffer of x's shape."""
    n = x.shape[-1]
    rows = x.view(-1, n) if x.is_contiguous() else x.reshape(-1, n).contiguous()
    m = rows.shape[0]
    if out is None:
        dtype = x.dtype if gemma or weight.dtype == x.dtype else torch.float32
        out = torch.empty((m, n), dtype=dtype, device=x.device)
    if m and n:
        index = x.get_device()
        tile = tile_module("rms_norm")
        tile_n, tile_m = tile.tile_shape(n, m, sm_count(index))
        grid = (min(-(-m // tile_m), tile.BLOCKS_PER_SM * sm_count(index)),)
        launch(index, grid, tile.rms_norm_fwd, (rows, weight, out.view(m, n), n, float(eps), gemma, tile_m, tile_n))
    return out.view(x.shape)


@torch.library.custom_op(add_op_namespace_prefix("rms_norm"), mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """The torch.compile face of both forms: an opaque op (cuTile or reference inside) with a fake below."""
    return _dispatch(x, weight, eps, gemma).contiguous()


@torch.library.register_fake(add_op_namespace_prefix("rms_norm"))
def _(x, weight, eps, gemma):
    return x.new_empty(x.shape, dtype=x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype))


# --- backward: (dx, dweight) ----------------------------------------------------------------------------------

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
    """dx per row in one pass; dweight as per-block fp32 partial sums (one row each), reduced by torch."""
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


@torch.library.custom_op(add_op_namespace_prefix("rms_norm_backward"), mutates_args=())
def rms_norm_backward_op(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, eps: float,
                         gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    fast = cutile_ready(x, DTYPES) and _weight_fits(x, weight) and weight.dtype == dy.dtype == x.dtype
    return (rms_norm_backward_cutile if fast else rms_norm_backward_reference)(x, weight, dy, eps, gemma)


@torch.library.register_fake(add_op_namespace_prefix("rms_norm_backward"))
def _(x, weight, dy, eps, gemma):
    return torch.empty_like(x), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, ctx.eps, ctx.gemma = inputs
    ctx.save_for_backward(x, weight)


def _rms_norm_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dweight = rms_norm_backward_op(x, weight, dy, ctx.eps, ctx.gemma)
    return dx, dweight, None, None


torch.library.register_autograd(add_op_namespace_prefix("rms_norm"), _rms_norm_backward,
                                setup_context=_rms_norm_setup)


class RMSNorm(nn.Module):
    """Stateless replacement of the `RMSNorm` forward that transformers registers (uses the host's weight)."""

    weight: torch.Tensor
    variance_epsilon: float

    has_backward = True  # autograd goes through rms_norm_op, whose backward is the cuTile rms_norm_bwd kernel
    can_torch_compile = True  # torch.compile sees one custom op (rms_norm_op), no graph break

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


class GemmaRMSNormLayout(nn.Module):
    """Gemma3RMSNorm's parameters under their own names (`weight`), so checkpoints load and save unchanged
    and no conversion rule is registered. Its forward is the exact reference (training, fallbacks)."""

    def __init__(self, dim: int, eps: float = 1e-6):  # Gemma3Attention passes `dim=` by keyword
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gemma_rms_norm_reference(hidden_states, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
