"""Cross-entropy of a causal LM's logits, as transformers' ForCausalLMLoss computes it, without its fp32 copies.

transformers upcasts the (tokens, vocab) logits to fp32, takes log_softmax (another fp32 tensor, saved for the
backward) and picks each row's target; the backward writes fp32 gradients and casts them back. At 2048 tokens of
Llama 3's 128256-word vocabulary that is about nine passes over 0.5-1 GB. Here the forward reads the logits once
(an online log-sum-exp per row, in fp32) and keeps one fp32 number per row; the backward reads them once more
and writes the gradient in the logits' dtype: three passes of the bf16 logits.

Compile-time constants: the dtypes, TILE_N (columns per tile). Rows, vocabulary size and ignore_index are runtime
values, so a model compiles one forward and one backward per dtype.
"""
import cuda.tile as ct
import torch

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
    t = ct.astype(ct.gather(target, rows), ct.int32)
    picked = ct.astype(ct.gather(logits, (rows, t)), ct.float32)
    valid = (t >= 0) & (t < n_cols)
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


def forward_launch(logits, target, loss, lse, ignore_index: int, gpu):
    """(kernel, grid, args) of cross_entropy_fwd: logits (rows, vocab), target (rows,) -> loss, lse (rows,) fp32."""
    return (cross_entropy_fwd, (logits.shape[0],),
            (logits, target, loss, lse, logits.shape[1], int(ignore_index), TILE_N))


def backward_launch(logits, target, lse, dloss, dlogits, ignore_index: int, gpu):
    """(kernel, grid, args) of cross_entropy_bwd: one block per tile of each row."""
    return (cross_entropy_bwd, (logits.shape[0], -(-logits.shape[1] // TILE_N)),
            (logits, target, lse, dloss, dlogits, logits.shape[1], int(ignore_index), TILE_N))


def specializations(array):
    """Every launch the launchers ask for (`array(dtype, shape)` stands for a tensor): forward and backward per
    logits dtype, int64 targets (transformers' labels), fp32 losses."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        logits, target, rows = array(dtype, (64, 128256)), array(torch.int64, (64,)), array(torch.float32, (64,))
        yield forward_launch(logits, target, rows, rows, -100, ("", 132))
        yield backward_launch(logits, target, rows, rows, logits, -100, ("", 132))
