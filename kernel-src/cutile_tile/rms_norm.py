"""RMSNorm forward in cuTile: y = (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * w.

The rounding follows transformers' LlamaRMSNorm exactly: statistics in fp32, the normalized row rounded to
the input dtype, then multiplied by the weight in fp32 and rounded to the output dtype.
"""
import cuda.tile as ct


@ct.kernel
def rms_norm_fwd(x, weight, out, n_cols: int, eps: float,
                 TILE_M: ct.Constant[int], TILE_N: ct.Constant[int]):
    # Persistent over row tiles: the grid is sized to the machine, each block strides through the rows.
    n_row_tiles = ct.cdiv(x.shape[0], TILE_M)
    w = ct.load(weight, (0,), shape=(TILE_N,), padding_mode=ct.PaddingMode.ZERO)
    w = ct.reshape(ct.astype(w, ct.float32), (1, TILE_N))
    for t in range(ct.bid(0), n_row_tiles, ct.num_blocks(0)):
        # Padded columns load as zero, so they add nothing to the sum of squares; the mean divides by n_cols.
        xt = ct.load(x, (t, 0), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO)
        xf = ct.astype(xt, ct.float32)
        mean_sq = ct.sum(xf * xf, axis=1, keepdims=True) / n_cols
        normed = ct.astype(xf * ct.rsqrt(mean_sq + eps), x.dtype)
        y = ct.astype(normed, ct.float32) * w
        # Stores past the array edge are clipped, so the padded rows and columns are never written.
        ct.store(out, (t, 0), tile=ct.astype(y, out.dtype))
