"""Cross-entropy of a causal LM's logits (transformers' ForCausalLMLoss) in one pass over the logits per direction.

References, cuTile launchers (forward and backward), the op descriptions, and `causal_lm_loss`, the drop-in for
transformers' `ForCausalLMLoss` that `enable_training(model)` installs as the model's loss function. The kernels
and their launch plans are `tile/cross_entropy.py` (kernel-src/cutile_tile/cross_entropy.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._op import CutileOp
from ._runtime import DTYPES, device_unsupported, gpu, launch


@functools.cache
def _kernels():
    """tile/cross_entropy.py: cross_entropy_fwd / _bwd and their launch plans (imports cuda.tile: first use)."""
    from .tile import cross_entropy

    return cross_entropy


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(logits, target, ignore_index) -> str | None:
    """None when the cuTile kernels take these arguments, else why not; mismatched shapes raise."""
    if logits.dim() != 2 or target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"cutile_kernels.cross_entropy: logits must be (rows, vocab) and target (rows,); got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    reason = device_unsupported(logits, DTYPES)
    if reason is None and (target.dtype != torch.int64 or target.device != logits.device):
        reason = f"the target is {target.dtype} on {target.device} (the kernels take int64 beside the logits)"
    if reason is None and logits.stride(-1) != 1:
        reason = "the logits' last dimension is not contiguous"
    if reason is None and logits.shape[1] >= 2 ** 31:
        reason = f"a vocabulary of {logits.shape[1]} words does not fit int32 column indices"
    return reason


def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor, ignore_index: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per row, log-sum-exp per row), in float32 (float64 for float64 logits): transformers' upcast logits
    through `F.cross_entropy(..., reduction="none")`, 0 where the target is ignore_index."""
    x = logits.to(_acc(logits.dtype))
    return F.cross_entropy(x, target, ignore_index=ignore_index, reduction="none"), torch.logsumexp(x, dim=-1)


def cross_entropy_cutile(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                         loss: torch.Tensor | None = None, lse: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cuTile path alone (no checks); `loss` and `lse`, if given, are (rows,) float32 buffers. A target outside
    [0, vocab) that is not ignore_index gives a NaN loss (PyTorch's kernels raise a device-side assert)."""
    rows = logits.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device) if loss is None else loss
    lse = torch.empty_like(loss) if lse is None else lse
    if rows and logits.shape[1]:
        index = logits.get_device()
        launch(index, *_kernels().forward_launch(logits, target, loss, lse, ignore_index, gpu(index)))
    return loss, lse


def cross_entropy_backward_reference(logits, target, lse, dloss, ignore_index: int):
    """d(logits) = dloss * (softmax(logits) - one_hot(target)) per row, 0 in ignored rows, in the logits' dtype."""
    x = logits.to(_acc(logits.dtype))
    keep = target != ignore_index
    p = torch.exp(x - lse.to(x.dtype)[:, None])
    p[keep, target[keep]] -= 1
    return (p * torch.where(keep, dloss.to(x.dtype), 0)[:, None]).to(logits.dtype)


def cross_entropy_backward_cutile(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                                  dloss: torch.Tensor, ignore_index: int, dlogits: torch.Tensor | None = None
                                  ) -> torch.Tensor:
    """d(logits) in one pass (the cuTile path alone); `dlogits`, if given, is a contiguous buffer of the logits'
    shape and dtype."""
    if dlogits is None:
        dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if logits.numel():
        index = logits.get_device()
        launch(index, *_kernels().backward_launch(logits, target, lse, dloss.float().contiguous(), dlogits,
                                                  ignore_index, gpu(index)))
    return dlogits


CROSS_ENTROPY_BACKWARD = CutileOp(
    "cross_entropy_backward", launcher=cross_entropy_backward_cutile, reference=cross_entropy_backward_reference,
    check=lambda logits, target, lse, dloss, ignore_index: _check(logits, target, ignore_index),
    fake=lambda logits, target, lse, dloss, ignore_index: torch.empty_like(
        logits, memory_format=torch.contiguous_format))


def _cross_entropy_setup(ctx, inputs, output):
    logits, target, ctx.ignore_index = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, target, output[1])


def _cross_entropy_backward(ctx, dloss, _dlse):
    logits, target, lse = ctx.saved_tensors
    return CROSS_ENTROPY_BACKWARD.in_backward(logits, target, lse, dloss, ctx.ignore_index), None, None


CROSS_ENTROPY = CutileOp(
    "cross_entropy", launcher=cross_entropy_cutile, reference=cross_entropy_reference,
    check=_check, fake=lambda logits, target, ignore_index: (
        logits.new_empty(logits.shape[0], dtype=_acc(logits.dtype)),
        logits.new_empty(logits.shape[0], dtype=_acc(logits.dtype))),
    backward=_cross_entropy_backward, setup_context=_cross_entropy_setup)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-row cross-entropy (float32; float64 for float64 logits) of logits (rows, vocab) against int64 targets,
    0 where the target is ignore_index: cuTile on a supported GPU, the exact reference otherwise."""
    return CROSS_ENTROPY(logits, target, int(ignore_index))[0]


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels=None, **kwargs) -> torch.Tensor:
    """transformers' ForCausalLMLoss (same arguments and result) with its cross-entropy in cuTile: the logits are
    read in their own dtype, with no fp32 copy and no saved log-softmax. The mean over the targets that are not
    ignore_index, or the sum divided by num_items_in_batch when given (gradient accumulation)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(logits.device, torch.int64)
    losses = cross_entropy(logits.reshape(-1, vocab_size), target, ignore_index)
    if num_items_in_batch is None:
        return losses.sum() / (target != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(losses.device)
    return losses.sum() / num_items_in_batch
