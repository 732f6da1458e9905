"""Cross-entropy of a causal LM's logits, as transformers' ForCausalLMLoss computes it, without its fp32 copies.

transformers upcasts the (tokens, vocab) logits to fp32, takes log_softmax (another fp32 tensor, saved for the
backward) and picks each row's target; the backward writes fp32 gradients and casts them back. At 2048 tokens of
Llama 3's 128256-word vocabulary that is about nine passes over 0.5-1 GB. Here the forward reads the logits once
(an online log-sum-exp per row, in fp32) and keeps one fp32 number per row; the backward reads them once more
and writes the gradient in the logits' dtype: three passes of the bf16 logits.

Compile-time constants: the dtypes, TILE_N (columns per tile). Rows, vocabulary size and ignore_index are runtime
values, so a model compiles one forward and one backward per dtype. TILE_N and the warps per block come from the
per-GPU table (`tuned.py`, keys "cross_entropy" and "cross_entropy_backward"), else the defaults below.
"""
import cuda.tile as ct
import torch

from . import with_hints
from .tuned import lookup, shapes

TILE_N = 4096  # columns per tile: 8 KB of bf16 logits, 32 fp32 values per thread of a 4-warp block


def _row():
    # (1,) index tile of this block's row (grid x: rows, which may exceed the y dimension's 65535)
    return ct.bid(0) + ct.arange(1, dtype=ct.int32)


@ct.kernel
def cross_entropy_fwd(logits, target, loss, lse, n_cols: int, ignore_index: int, TILE_N: ct.Constant[int]):
    """Row i's log-sum-exp (fp32, into lse[i]) and loss lse - logits[i, target[i]] (0 where target[i] is
    ignore_index; NaN for a target outside [0, n_cols), where PyTorch raises). One block per row, one pass over
    its tiles with a running maximum and a sum rescaled whenever the maximum grows (columns past the row load
    as -inf and add nothing)."""
    rows = _row()
    m = ct.full((1, 1), -float("inf"), dtype=ct.float32)
    s = ct.full((1, 1), 0.0, dtype=ct.float32)
    for j in range(ct.cdiv(n_cols, TILE_N)):
        x = ct.astype(ct.load(logits, (ct.bid(0), j), shape=(1, TILE_N), padding_mode=ct.PaddingMode.NEG_INF),
                      ct.float32)
        m_new = ct.maximum(m, ct.max(x, axis=1, keepdims=True))
        s = s * ct.exp(m - m_new) + ct.sum(ct.exp(x - m_new), axis=1, keepdims=True)
        m = m_new
    row_lse = ct.reshape(m + ct.log(s), (1,))
    t = ct.gather(target, rows)  # compared in its own (int64) type: a huge target must not wrap into range
    valid = (t >= 0) & (t < n_cols)
    picked = ct.astype(ct.gather(logits, (rows, ct.astype(ct.where(valid, t, 0), ct.int32))), ct.float32)
    row_loss = ct.where(t == ignore_index, 0.0, ct.where(valid, row_lse - picked, float("nan")))
    ct.scatter(lse, rows, row_lse)
    ct.scatter(loss, rows, ct.astype(row_loss, loss.dtype))


@ct.kernel
def cross_entropy_bwd(logits, target, lse, dloss, dlogits, n_cols: int, ignore_index: int,
                      TILE_N: ct.Constant[int]):
    """dlogits[i, j] = dloss[i] * (softmax(logits[i])[j] - [j == target[i]]), rounded once to dlogits' dtype; 0 in
    rows whose target is ignore_index (their loss is a constant). Block (i, j): tile j of row i, with the forward's
    lse[i] (no second pass over the row)."""
    rows = _row()
    t = ct.astype(ct.gather(target, rows), ct.int32)
    g = ct.where(t == ignore_index, 0.0, ct.astype(ct.gather(dloss, rows), ct.float32))
    x = ct.astype(ct.load(logits, (ct.bid(0), ct.bid(1)), shape=(1, TILE_N), padding_mode=ct.PaddingMode.ZERO),
                  ct.float32)
    p = ct.exp(x - ct.reshape(ct.gather(lse, rows), (1, 1))) * ct.reshape(g, (1, 1))
    cols = ct.reshape(ct.bid(1) * TILE_N + ct.arange(TILE_N, dtype=ct.int32), (1, TILE_N))
    d = ct.where(cols == ct.reshape(t, (1, 1)), p - ct.reshape(g, (1, 1)), p)
    ct.store(dlogits, (ct.bid(0), ct.bid(1)), tile=ct.astype(d, dlogits.dtype), allow_tma=False)


def _config(op, logits, gpu) -> tuple[int, int]:
    """(TILE_N, warps per block: 0 = cuTile's choice) for these logits on this GPU."""
    return lookup(gpu[0], op, logits.dtype, logits.shape[1], logits.shape[0]) or (TILE_N, 0)


def forward_launch(logits, target, loss, lse, ignore_index: int, gpu):
    """(kernel, grid, args) of cross_entropy_fwd: logits (rows, vocab), target (rows,) -> loss, lse (rows,) fp32."""
    tile_n, warps = _config("cross_entropy", logits, gpu)
    return (with_hints(cross_entropy_fwd, 0, warps), (logits.shape[0],),
            (logits, target, loss, lse, logits.shape[1], int(ignore_index), tile_n))


def backward_launch(logits, target, lse, dloss, dlogits, ignore_index: int, gpu):
    """(kernel, grid, args) of cross_entropy_bwd: one block per tile of each row."""
    tile_n, warps = _config("cross_entropy_backward", logits, gpu)
    return (with_hints(cross_entropy_bwd, 0, warps), (logits.shape[0], -(-logits.shape[1] // tile_n)),
            (logits, target, lse, dloss, dlogits, logits.shape[1], int(ignore_index), tile_n))


def specializations(array):
    """Every launch the launchers ask for (`array(dtype, shape)` stands for a tensor): forward and backward per
    logits dtype, int64 targets (transformers' labels), fp32 losses; then every tuned configuration (bf16), once."""
    def plans(dtype, rows, vocab, gpu):
        logits, target, row = array(dtype, (rows, vocab)), array(torch.int64, (rows,)), array(torch.float32, (rows,))
        return (forward_launch(logits, target, row, row, -100, gpu),
                backward_launch(logits, target, row, row, logits, -100, gpu))

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        yield from plans(dtype, 64, 128256, ("", 132))
    seen = set()
    for op, which in (("cross_entropy", 0), ("cross_entropy_backward", 1)):
        for key, vocab, rows in shapes(op):
            plan = plans(torch.bfloat16, rows, vocab, (key, 132))[which]
            if (plan[0], plan[2][-1]) not in seen:  # the kernel carries its hints (warps), the last argument TILE_N
                seen.add((plan[0], plan[2][-1]))
                yield plan
