"""RMSNorm forward in cuTile, in the two forms transformers uses.

Llama form (LlamaRMSNorm, also Mistral, Qwen2, Qwen3): y = (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * w, with
statistics in fp32 and the normalized row rounded to the input dtype before the weight product.
Gemma form (Gemma3RMSNorm, GEMMA=True): y = (x * rsqrt(mean(x^2) + eps) * (1 + w)) in fp32, rounded once.

Compile-time constants (one compile each): the dtypes of x, weight and out, GEMMA, TILE_N (the hidden size
rounded up to a power of two) and TILE_M (a function of TILE_N). Row count, hidden size and eps are runtime values, so
an 8B model (hidden 4096, head_dim 128) compiles two specializations per dtype.
"""
import cuda.tile as ct

# Rows one block normalizes per step: up to this many elements per tile (q/k norms have 128 columns).
TILE_ELEMENTS = 4096


def rows_per_tile(tile_n: int) -> int:
    return max(1, min(32, TILE_ELEMENTS // tile_n))


@ct.kernel
def rms_norm_fwd(x, weight, out, n_cols: int, eps: float,
                 GEMMA: ct.Constant[bool], TILE_M: ct.Constant[int], TILE_N: ct.Constant[int]):
    # Persistent over row tiles: the grid is sized to the machine, each block strides through the rows.
    n_row_tiles = ct.cdiv(x.shape[0], TILE_M)
    w = ct.load(weight, (0,), shape=(TILE_N,), padding_mode=ct.PaddingMode.ZERO)
    w = ct.reshape(ct.astype(w, ct.float32), (1, TILE_N))
    if GEMMA:
        w = w + 1.0
    for t in range(ct.bid(0), n_row_tiles, ct.num_blocks(0)):
        # Padded columns load as zero, so they add nothing to the sum of squares; the mean divides by n_cols.
        xt = ct.load(x, (t, 0), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO)
        xf = ct.astype(xt, ct.float32)
        mean_sq = ct.sum(xf * xf, axis=1, keepdims=True) / n_cols
        normed = xf * ct.rsqrt(mean_sq + eps)
        if not GEMMA:
            normed = ct.astype(ct.astype(normed, x.dtype), ct.float32)
        y = normed * w
        # Stores past the array edge are clipped, so the padded rows and columns are never written.
        ct.store(out, (t, 0), tile=ct.astype(y, out.dtype))


def specializations(array, scalar):
    """Every (kernel, parameters) the launcher can ask for; `array(dtype, ndim)`/`scalar(dtype)` build them."""
    dtype_sets = [(d, d, d, gemma) for d in (ct.bfloat16, ct.float16, ct.float32) for gemma in (False, True)]
    dtype_sets += [(d, ct.float32, ct.float32, False) for d in (ct.bfloat16, ct.float16)]  # fp32 weight
    for x_dtype, w_dtype, out_dtype, gemma in dtype_sets:
        for tile_n in (2 ** k for k in range(6, 15)):  # hidden 33 .. 16384
            yield rms_norm_fwd, [array(x_dtype, 2), array(w_dtype, 1), array(out_dtype, 2),
                                 scalar(ct.int32), scalar(ct.float32), gemma, rows_per_tile(tile_n), tile_n]
