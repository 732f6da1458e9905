"""RMSNorm forward in cuTile, in the two forms transformers uses.

Llama form (LlamaRMSNorm, also Mistral, Qwen2, Qwen3): y = (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * w, with
statistics in fp32 and the normalized row rounded to the input dtype before the weight product.
Gemma form (Gemma3RMSNorm, GEMMA=True): y = (x * rsqrt(mean(x^2) + eps) * (1 + w)) in fp32, rounded once.

Compile-time constants (one compile each): the dtypes of x, weight and out, GEMMA, TILE_N (the hidden size
rounded up to a power of two), TILE_M (rows per tile: a power of two up to 32) and TMA (loads through the
tensor memory accelerator or not). TILE_M, TMA and the grid come from the per-GPU table (`tuned.py`). Row count, hidden size and
eps are runtime values, so an 8B model (hidden 4096, head_dim 128) compiles a handful of specializations per
dtype: decode (few rows) and prefill (many rows) take different TILE_M.

Design (benchmarks/sweep_rms_norm.py, H100): persistent blocks (2 per SM), tiles of up to 16K elements, and
stores without TMA reach the copy bandwidth at 8192+ rows; with few rows, one row per block spreads the work, and
for decode sizes `rms_norm_row` (gather/scatter, no tensor views) has the shortest prologue.
"""
import cuda.tile as ct
import torch

from . import with_hints
from .tuned import lookup, shapes

TILE_ELEMENTS = 16384  # elements per tile at most (fp32 registers stay within one block)
BLOCKS_PER_SM = 2
ROW_GATHER = 0  # TILE_M of a configuration that runs rms_norm_row (one row per block, gather/scatter)
ROW_GATHER_MAX = 8192  # widest row rms_norm_row holds in one tile
# most rows the untuned backward gives rms_norm_bwd_row (one fp32 dw row each for the launcher's sum): past that
# the partial rows cost more than the persistent kernel's per-block partials
BACKWARD_ROW_MAX = 64


def split_tiles(n_cols: int) -> tuple[int, int] | None:
    """(TILE_A, TILE_B) of rms_norm_bwd_split: the largest power of two below n_cols, then the remainder rounded up
    to one (2560 = 2048 + 512, 5120 = 4096 + 1024, 5376 -> 4096 + 2048); None where that holds no fewer columns
    than one tile of the next power of two (3584 -> 2048 + 2048)."""
    tile_a = 1 << (n_cols.bit_length() - 1)
    if tile_a == n_cols or tile_a < 64:
        return None
    tile_b = 1 << (n_cols - tile_a - 1).bit_length()
    return (tile_a, tile_b) if tile_b < tile_a else None


def default_config(n_cols: int, n_rows: int, n_sms: int) -> tuple[int, int, bool, bool]:
    """(TILE_M, blocks per SM (0: one block per tile), TMA loads, prefetch[, warps per block: tuned entries of the
    one-row kernels only]) for GPUs without a tuned entry: up to
    two rows per SM, rms_norm_row; otherwise rows per tile shrink until every SM has a tile; persistent blocks,
    2 per SM."""
    tile_n = max(64, 1 << (n_cols - 1).bit_length())
    if n_rows <= 2 * n_sms and tile_n <= ROW_GATHER_MAX:
        return ROW_GATHER, 0, False, False
    tile_m = max(1, min(32, TILE_ELEMENTS // tile_n))
    while tile_m > 1 and n_rows < tile_m * n_sms:
        tile_m //= 2
    return tile_m, BLOCKS_PER_SM, True, False


def _plan(x, gpu, op, default=None):
    m, n = x.shape
    tile_m, per_sm, *knobs = lookup(gpu[0], op, x.dtype, n, m) or (default or default_config)(n, m, gpu[1])
    tiles = -(-m // max(1, tile_m))
    blocks = max(1, min(tiles, per_sm * gpu[1]) if per_sm else tiles)
    return blocks, (n, tile_m, max(64, 1 << (n - 1).bit_length()), *knobs)


def forward_launch(x, weight, out, eps: float, gemma: bool, gpu):
    """(kernel, grid, args) of rms_norm_fwd (or rms_norm_row) for rows x (m, n) -> out (m, n); `gpu` is the
    device's (name key, SM count). What the launcher runs and `specializations` enumerates."""
    blocks, (n, tile_m, tile_n, tma, prefetch, *warps) = _plan(x, gpu, "gemma_rms_norm" if gemma else "rms_norm")
    if tile_m == ROW_GATHER and tile_n <= ROW_GATHER_MAX:
        return with_hints(rms_norm_row, 0, *warps), (x.shape[0],), (x, weight, out, n, float(eps), gemma, tile_n)
    return rms_norm_fwd, (blocks,), (x, weight, out, n, float(eps), gemma, max(1, tile_m), tile_n, tma, prefetch)


def _normalized(xt, w, n_cols, eps, dtype, GEMMA):
    # The norm of a (TILE_M, TILE_N) tile times w (from _weight_row). Padded columns load as zero, so they add
    # nothing to the sum of squares; the mean divides by n_cols.
    xf = ct.astype(xt, ct.float32)
    return _times_weight(xf * ct.rsqrt(ct.sum(xf * xf, axis=1, keepdims=True) / n_cols + eps), w, dtype, GEMMA)


def _times_weight(normed, w, dtype, GEMMA):
    """transformers' weight product of the fp32 normalized rows: Gemma form normed * (1 + w) in fp32; Llama form
    w * normed rounded to the input dtype, in that dtype when w has it (a product of two bf16/fp16 values rounded
    once is what PyTorch's fp32 product rounded to the dtype gives; packed HMUL2, no unpacking: sm_90 rms_norm_row
    at 2560 columns 600 -> 448 instructions), else in fp32."""
    if GEMMA:
        return normed * w
    if w.dtype == dtype:
        return ct.astype(normed, dtype) * w
    return ct.astype(ct.astype(normed, dtype), ct.float32) * w


def _normalize_store(xt, w, out, t, n_cols, eps, dtype, GEMMA):
    # Stores past the array edge are clipped, so the padded rows and columns are never written. Plain stores
    # beat TMA here (up to 2x on narrow rows, H100).
    ct.store(out, (t, 0), tile=ct.astype(_normalized(xt, w, n_cols, eps, dtype, GEMMA), out.dtype), allow_tma=False)


def _weight_row(weight, TILE_N, GEMMA, dtype, j=0):
    # (1, TILE_N), the weight's tile j: 1 + w in fp32 (Gemma form), w in `dtype` where it has it (see
    # _times_weight), else in fp32
    return _weight(ct.reshape(ct.load(weight, (j,), shape=(TILE_N,), padding_mode=ct.PaddingMode.ZERO),
                              (1, TILE_N)), GEMMA, dtype)


def _weight(w, GEMMA, dtype):
    if not GEMMA and w.dtype == dtype:
        return w
    wf = ct.astype(w, ct.float32)
    return wf + 1.0 if GEMMA else wf


@ct.kernel
def rms_norm_fwd(x, weight, out, n_cols: int, eps: float, GEMMA: ct.Constant[bool], TILE_M: ct.Constant[int],
                 TILE_N: ct.Constant[int], TMA: ct.Constant[bool], PREFETCH: ct.Constant[bool]):
    # Persistent over row tiles: the grid is sized to the machine, each block strides through the rows.
    # PREFETCH loads a block's next tile before normalizing the current one (two tiles in flight per block),
    # always without TMA: TMA loads carried to the next iteration gave wrong rows on an H200 (benchmarks/NOTES.md).
    n_row_tiles, step = ct.cdiv(x.shape[0], TILE_M), ct.num_blocks(0)
    w = _weight_row(weight, TILE_N, GEMMA, x.dtype)
    if PREFETCH:
        xt = ct.load(x, (ct.bid(0), 0), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO, allow_tma=False)
        for t in range(ct.bid(0), n_row_tiles, step):
            # past the last tile this loads zeros (padding), which are never stored
            x_next = ct.load(x, (t + step, 0), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO,
                             allow_tma=False)
            _normalize_store(xt, w, out, t, n_cols, eps, x.dtype, GEMMA)
            xt = x_next
    else:
        for t in range(ct.bid(0), n_row_tiles, step):
            xt = ct.load(x, (t, 0), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO, allow_tma=TMA)
            _normalize_store(xt, w, out, t, n_cols, eps, x.dtype, GEMMA)


@ct.kernel
def rms_norm_row(x, weight, out, n_cols: int, eps: float, GEMMA: ct.Constant[bool], TILE_N: ct.Constant[int]):
    """One row per block through gather/scatter (columns past n_cols read as zero and are not written): no
    tensor views to set up, the shortest prologue for decode-size inputs (H200, 16 x 4096: 1.95 µs where the
    tiled kernel takes 2.34)."""
    row, cols = ct.bid(0), ct.arange(TILE_N, dtype=ct.int32)
    xf = _gathered(x, row, cols)
    _normalize_scatter(xf, _gathered_weight(weight, cols, GEMMA, x.dtype), out, row, cols, n_cols, eps, x.dtype,
                       GEMMA)


def _normalized_row(xf, w, n_cols, eps, dtype, GEMMA):
    # the one-row kernels' _normalized (xf in fp32): columns past n_cols are zero
    return _times_weight(xf * ct.rsqrt(ct.sum(xf * xf, axis=0, keepdims=False) / n_cols + eps), w, dtype, GEMMA)


def _normalize_scatter(xf, w, out, row, cols, n_cols, eps, dtype, GEMMA):
    # columns past n_cols are not written (bounds-checked)
    ct.scatter(out, (row, cols), ct.astype(_normalized_row(xf, w, n_cols, eps, dtype, GEMMA), out.dtype), latency=1)


def _gathered(a, row, cols):
    # row `row` of a at `cols` in fp32 (the one-row kernels; columns past the row read as zero)
    return ct.astype(ct.gather(a, (row, cols), latency=1), ct.float32)


def _gathered_weight(weight, cols, GEMMA, dtype):
    return _weight(ct.gather(weight, cols, latency=1), GEMMA, dtype)


def _summed(x, r, dtype):
    """transformers' `residual + hidden` rounded to `dtype`: in that dtype when both have it (a sum of two bf16 or
    fp16 values rounded once is what PyTorch's fp32 sum rounded to the dtype gives), else through fp32. Where x is
    the Llama form's weight product, the cast between them keeps cuTile from contracting the two into one FMA
    (tests/test_aot.py reads the SASS; rope._summed_products blocks it where no cast stands between)."""
    if x.dtype == dtype and r.dtype == dtype:
        return x + r
    return ct.astype(ct.astype(x, ct.float32) + ct.astype(r, ct.float32), dtype)


def _add_rms_norm_tiles(x, residual, post_weight, weight, out, summed, n_cols, eps, GEMMA, SANDWICH, OUTER, TILE_M,
                       TILE_N, TMA):
    # SANDWICH: x is normalized with post_weight before the add; OUTER: the sum's norm is stored to out
    n_row_tiles = ct.cdiv(x.shape[0], TILE_M)
    w, w_post = _weight_row(weight, TILE_N, GEMMA, x.dtype), _weight_row(post_weight, TILE_N, GEMMA, x.dtype)
    for t in range(ct.bid(0), n_row_tiles, ct.num_blocks(0)):
        xt = ct.load(x, (t, 0), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO, allow_tma=TMA)
        rt = ct.load(residual, (t, 0), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO, allow_tma=TMA)
        if SANDWICH:  # the post-attention norm's output, in x's dtype as its module returns it
            xt = ct.astype(_normalized(xt, w_post, n_cols, eps, x.dtype, GEMMA), x.dtype)
        st = _summed(xt, rt, summed.dtype)
        ct.store(summed, (t, 0), tile=st, allow_tma=False)
        if OUTER:
            _normalize_store(st, w, out, t, n_cols, eps, summed.dtype, GEMMA)


@ct.kernel
def add_rms_norm_fwd(x, residual, weight, out, summed, n_cols: int, eps: float, GEMMA: ct.Constant[bool],
                     TILE_M: ct.Constant[int], TILE_N: ct.Constant[int], TMA: ct.Constant[bool]):
    """A decoder layer's `residual + hidden` (rounded to the input dtype, as transformers adds them) written to
    `summed`, and its RMSNorm to `out`, from one read of each input."""
    _add_rms_norm_tiles(x, residual, weight, weight, out, summed, n_cols, eps, GEMMA, False, True, TILE_M, TILE_N,
                        TMA)


@ct.kernel
def sandwich_rms_norm_fwd(x, residual, post_weight, weight, out, summed, n_cols: int, eps: float,
                          GEMMA: ct.Constant[bool], TILE_M: ct.Constant[int], TILE_N: ct.Constant[int],
                          TMA: ct.Constant[bool]):
    """Gemma3's sandwich: `residual + post_attention_layernorm(hidden)` to `summed` and pre_feedforward_layernorm
    of it to `out`, from one read of each input (the norm of `hidden` never goes to memory)."""
    _add_rms_norm_tiles(x, residual, post_weight, weight, out, summed, n_cols, eps, GEMMA, True, True, TILE_M,
                        TILE_N, TMA)


@ct.kernel
def rms_norm_add_fwd(x, residual, weight, summed, n_cols: int, eps: float, GEMMA: ct.Constant[bool],
                     TILE_M: ct.Constant[int], TILE_N: ct.Constant[int], TMA: ct.Constant[bool]):
    """`residual + norm(x)` (Gemma3's post_feedforward_layernorm and the layer's last residual add) to `summed`:
    the norm's output never goes to memory."""
    _add_rms_norm_tiles(x, residual, weight, weight, summed, summed, n_cols, eps, GEMMA, True, False, TILE_M,
                        TILE_N, TMA)


def _add_rms_norm_one_row(x, residual, post_weight, weight, out, summed, n_cols, eps, GEMMA, SANDWICH, OUTER,
                          TILE_N):
    row, cols = ct.bid(0), ct.arange(TILE_N, dtype=ct.int32)
    xt, rt = ct.gather(x, (row, cols), latency=1), ct.gather(residual, (row, cols), latency=1)
    if SANDWICH:  # the post-attention norm's output, in x's dtype as its module returns it
        xt = ct.astype(_normalized_row(ct.astype(xt, ct.float32), _gathered_weight(post_weight, cols, GEMMA, x.dtype),
                                       n_cols, eps, x.dtype, GEMMA), x.dtype)
    st = _summed(xt, rt, summed.dtype)
    ct.scatter(summed, (row, cols), st, latency=1)
    if OUTER:
        _normalize_scatter(ct.astype(st, ct.float32), _gathered_weight(weight, cols, GEMMA, x.dtype), out, row, cols,
                           n_cols, eps, summed.dtype, GEMMA)


@ct.kernel
def add_rms_norm_row(x, residual, weight, out, summed, n_cols: int, eps: float, GEMMA: ct.Constant[bool],
                     TILE_N: ct.Constant[int]):
    """add_rms_norm_fwd for decode sizes, one row per block through gather/scatter, as rms_norm_row (the
    tiled kernel's tensor views cost the same prologue here: 2.8-3.1 µs at 1-64 rows of 2560 on an H100, where
    rms_norm_row takes 1.6-2.1)."""
    _add_rms_norm_one_row(x, residual, weight, weight, out, summed, n_cols, eps, GEMMA, False, True, TILE_N)


@ct.kernel
def sandwich_rms_norm_row(x, residual, post_weight, weight, out, summed, n_cols: int, eps: float,
                          GEMMA: ct.Constant[bool], TILE_N: ct.Constant[int]):
    """sandwich_rms_norm_fwd for decode sizes, one row per block (as add_rms_norm_row)."""
    _add_rms_norm_one_row(x, residual, post_weight, weight, out, summed, n_cols, eps, GEMMA, True, True, TILE_N)


@ct.kernel
def rms_norm_add_row(x, residual, weight, summed, n_cols: int, eps: float, GEMMA: ct.Constant[bool],
                     TILE_N: ct.Constant[int]):
    """rms_norm_add_fwd for decode sizes, one row per block (as add_rms_norm_row)."""
    _add_rms_norm_one_row(x, residual, weight, weight, summed, summed, n_cols, eps, GEMMA, True, False, TILE_N)


def _fused_launch(row_kernel, tiled_kernel, x, arrays, eps: float, gemma: bool, gpu):
    """(kernel, grid, args) of a fused residual add + norm for rows x (m, n): its one-row kernel or its tiled one,
    from the fused add's launch table entries (the fused forms move the same bytes); `arrays` are its array
    arguments."""
    blocks, (n, tile_m, tile_n, tma, _, *warps) = _plan(x, gpu, "gemma_add_rms_norm" if gemma else "add_rms_norm")
    if tile_m == ROW_GATHER and tile_n <= ROW_GATHER_MAX:
        return with_hints(row_kernel, 0, *warps), (x.shape[0],), (*arrays, n, float(eps), gemma, tile_n)
    return tiled_kernel, (blocks,), (*arrays, n, float(eps), gemma, max(1, tile_m), tile_n, tma)


def add_forward_launch(x, residual, weight, out, summed, eps: float, gemma: bool, gpu, post_weight=None):
    """(kernel, grid, args) of add_rms_norm_fwd (or add_rms_norm_row) for rows x, residual (m, n) -> out,
    summed (m, n); with `post_weight`, of sandwich_rms_norm_fwd (or _row), which normalizes x with it first."""
    if post_weight is None:
        return _fused_launch(add_rms_norm_row, add_rms_norm_fwd, x, (x, residual, weight, out, summed), eps, gemma,
                             gpu)
    return _fused_launch(sandwich_rms_norm_row, sandwich_rms_norm_fwd, x,
                         (x, residual, post_weight, weight, out, summed), eps, gemma, gpu)


def norm_add_launch(x, residual, weight, summed, eps: float, gemma: bool, gpu):
    """(kernel, grid, args) of rms_norm_add_fwd (or _row) for rows x, residual (m, n) -> summed (m, n)."""
    return _fused_launch(rms_norm_add_row, rms_norm_add_fwd, x, (x, residual, weight, summed), eps, gemma, gpu)


def specializations(array):
    """Every launch the launchers ask for on an untuned GPU (`array(dtype, shape)` stands for a tensor):
    forward and backward, every dtype set, hidden sizes 33..16384 (TILE_N 64..16384), decode and prefill."""
    gpu = ("", 132)
    dtype_sets = [(d, d, d, gemma) for d in (torch.bfloat16, torch.float16, torch.float32) for gemma in (False, True)]
    dtype_sets += [(d, torch.float32, torch.float32, False) for d in (torch.bfloat16, torch.float16)]  # fp32 w
    for x_dtype, w_dtype, out_dtype, gemma in dtype_sets:
        for n in (2 ** k for k in range(6, 15)):
            for m in (1, 1 << 20):
                yield forward_launch(array(x_dtype, (m, n)), array(w_dtype, (n,)), array(out_dtype, (m, n)), 1e-6,
                                     gemma, gpu)
    seen = set()
    for gemma in (False, True):  # every tuned configuration (bf16), once
        for key, n, m in shapes("gemma_rms_norm" if gemma else "rms_norm"):
            plan = forward_launch(array(torch.bfloat16, (m, n)), array(torch.bfloat16, (n,)),
                                  array(torch.bfloat16, (m, n)), 1e-6, gemma, (key, 132))
            if (plan[0], plan[2][5:]) not in seen:  # the kernel carries its hints (warps)
                seen.add((plan[0], plan[2][5:]))
                yield plan
    for dtype in (torch.bfloat16, torch.float16, torch.float32):  # fused residual add + norm
        for gemma in (False, True):
            for n in (128, 4096, 8192, 16384):
                for m in (1, 1 << 20):
                    rows, w = array(dtype, (m, n)), array(dtype, (n,))
                    yield add_forward_launch(rows, rows, w, rows, rows, 1e-6, gemma, gpu)
                    if gemma:  # Gemma3's sandwich and its last norm + residual add
                        yield add_forward_launch(rows, rows, w, rows, rows, 1e-6, gemma, gpu, post_weight=w)
                        yield norm_add_launch(rows, rows, w, rows, 1e-6, gemma, gpu)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for gemma in (False, True):
            for n in (128, 4096, 16384):
                for m in (1, BACKWARD_ROW_MAX, 1 << 20):
                    rows, w = array(dtype, (m, n)), array(dtype, (n,))
                    # one block writes dweight in the weight's dtype, more write fp32 partial rows
                    partial = array(dtype if m == 1 else torch.float32, (1, n))
                    yield backward_launch(rows, w, rows, rows, partial, 1e-6, gemma, gpu)
                    yield backward_launch(rows, w, rows, rows, partial, 1e-6, gemma, gpu, dres=rows)
        for n in (128, 4096, 16384):  # Gemma3's sandwich backward at decode sizes (one row: dweights direct)
            for m in (1, BACKWARD_ROW_MAX):
                rows, w = array(dtype, (m, n)), array(dtype, (n,))
                partial = array(dtype if m == 1 else torch.float32, (m, n))
                plan = sandwich_backward_launch(rows, rows, w, w, rows, rows, rows, rows, partial, partial, 1e-6,
                                                gpu)
                if plan is not None:
                    yield plan
        # rms_norm_bwd_split (tuned entries only; compiles per width): one plan
        rows, w = array(dtype, (4096, 2560)), array(dtype, (2560,))
        yield (with_hints(rms_norm_bwd_split, 2), (264,), (rows, w, rows, rows, rows, array(torch.float32, (264, 2560)),
                                                            2560, 1e-6, True, False, 2, *split_tiles(2560), 10))
        for blocks in (2, 264):  # the partial rows' sum into dweight
            yield dw_sum_launch(array(torch.float32, (blocks, 4096)), array(dtype, (4096,)))


def backward_config(n_cols: int, n_rows: int, n_sms: int) -> tuple[int, int, int, int]:
    """(TILE_M, blocks per SM, occupancy hint, load latency hint[, warps per block (0: cuTile's choice)[, split:
    rms_norm_bwd_split]]: tuned entries only) of rms_norm_bwd for GPUs without a tuned entry: two rows per tile
    (one past 4096 columns), two blocks per SM compiled for two (H200 32768 x 4096: 217 µs, 88 % of copy, where
    the untuned kernel took 539). Rows narrower than 2048 keep the untuned form
    (16K-element tiles, no hints): 2 x 128 tiles with the latency hint compiled to a 2.2 MB cubin in 20 s.
    Decode-size inputs (up to BACKWARD_ROW_MAX rows) take rms_norm_bwd_row."""
    tile_n = max(64, 1 << (n_cols - 1).bit_length())
    if n_rows <= BACKWARD_ROW_MAX and tile_n <= ROW_GATHER_MAX:
        return ROW_GATHER, 0, 0, 0
    if tile_n < 2048:
        return min(32, TILE_ELEMENTS // tile_n), 2, 0, 0
    return max(1, min(2, 8192 // tile_n)), 2, 2, 10


def backward_blocks(x, gpu) -> int:
    """Blocks of rms_norm_bwd for rows x, i.e. rows of its dw_partial output."""
    return _plan(x, gpu, "rms_norm_backward", backward_config)[0]


def backward_launch(x, weight, dy, dx, dw_partial, eps: float, gemma: bool, gpu, dres=None):
    """(kernel, grid, args) of rms_norm_bwd; dw_partial has backward_blocks(x, gpu) rows. With `dres` (x's
    shape) dx gets dres added before its one rounding: a residual's gradient (add_rms_norm, sandwich_rms_norm)
    without a separate add over the rows."""
    blocks, (n, tile_m, tile_n, occupancy, latency, *more) = _plan(x, gpu, "rms_norm_backward", backward_config)
    warps, split = (*more, 0, 0)[:2]
    add = dres is not None
    arrays = (x, weight, dy, dres if add else dy, dx, dw_partial, n, float(eps), gemma, add)
    if tile_m == ROW_GATHER and tile_n <= ROW_GATHER_MAX:
        return with_hints(rms_norm_bwd_row, occupancy, warps), (blocks,), (*arrays, tile_n)
    parts = split and split_tiles(n)  # None for a width of the bucket that does not split: one tile per row
    if parts:
        return with_hints(rms_norm_bwd_split, occupancy, warps), (blocks,), (*arrays, tile_m, *parts, latency)
    return with_hints(rms_norm_bwd, occupancy, warps), (blocks,), (*arrays, tile_m, tile_n, latency)


def _sandwich_plan(summed, gpu):
    """(width, TILE_N, occupancy, warps) of the row kernel where this GPU's backward plan for these rows is the row
    kernel (decode sizes), else None."""
    _, (n, tile_m, tile_n, occupancy, _, *more) = _plan(summed, gpu, "rms_norm_backward", backward_config)
    if tile_m != ROW_GATHER or tile_n > ROW_GATHER_MAX:
        return None
    return n, tile_n, occupancy, (*more, 0)[0]


def sandwich_backward_fits(summed, gpu) -> bool:
    """Whether the sandwich's backward runs as sandwich_rms_norm_bwd_row here: what the launcher asks before it
    allocates that path's buffers."""
    return _sandwich_plan(summed, gpu) is not None


def sandwich_backward_launch(x, summed, post_weight, weight, d_normed, d_summed, dx, d, dw_rows, dpw_rows,
                             eps: float, gpu):
    """(kernel, grid, args) of sandwich_rms_norm_bwd_row with the row kernel's warps where `sandwich_backward_fits`,
    else None (the launcher runs the two backward launches). dw_rows and dpw_rows hold one row per input row (fp32,
    or the weights' dtype for one row)."""
    plan = _sandwich_plan(summed, gpu)
    if plan is None:
        return None
    n, tile_n, occupancy, warps = plan
    warps = warps or (8 if tile_n >= 8192 else 0)  # two rows' worth of tiles: 4 warps spill at 8192 (sm_90)
    return (with_hints(sandwich_rms_norm_bwd_row, occupancy, warps), (summed.shape[0],),
            (x, summed, post_weight, weight, d_normed, d_summed, dx, d, dw_rows, dpw_rows, n, float(eps), tile_n))


DW_TILE_N = 64  # rms_norm_bwd_dw_sum's columns per block: 64 blocks for 4096 columns


def dw_sum_launch(dw_partial, dw):
    """(kernel, grid, args) of rms_norm_bwd_dw_sum: dweight from the backward's fp32 partial rows in one launch."""
    tile_m = 32 if dw_partial.shape[0] <= 32 else 128
    return rms_norm_bwd_dw_sum, (-(-dw_partial.shape[1] // DW_TILE_N),), (dw_partial, dw, tile_m, DW_TILE_N)


@ct.kernel
def rms_norm_bwd_dw_sum(dw_partial, dw, TILE_M: ct.Constant[int], TILE_N: ct.Constant[int]):
    """dw[j] = sum over i of dw_partial[i, j], in fp32, rounded once to dw's dtype. torch's
    `partial.sum(0, dtype=torch.bfloat16)` rounds every partial to bf16 first and runs two kernels: with
    rms_norm_bwd_row it was ~5 of the 8 µs of a 16 x 4096 backward (H100)."""
    acc = ct.full((TILE_M, TILE_N), 0.0, dtype=ct.float32)
    for t in range(ct.cdiv(dw_partial.shape[0], TILE_M)):
        acc = acc + ct.load(dw_partial, (t, ct.bid(0)), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO)
    ct.store(dw, (ct.bid(0),), tile=ct.astype(ct.sum(acc, axis=0, keepdims=False), dw.dtype), allow_tma=False)


def _backward_terms(xf, d, w, n_cols, eps, axis, dtype, GEMMA):
    """(dx, the dw term d * x̂) of fp32 rows xf (along `axis`) with output gradient d and fp32 weight w (1 + w:
    Gemma form). The Llama form's dx treats its rounding of x̂ as identity, and its dw term uses x̂ rounded to
    `dtype`, as autograd through transformers' forward does."""
    rstd = ct.rsqrt(ct.sum(xf * xf, axis=axis, keepdims=True) / n_cols + eps)
    xhat = xf * rstd
    g = d * w
    dot = ct.sum(g * xhat, axis=axis, keepdims=True) / n_cols
    return rstd * (g - xhat * dot), d * _dw_xhat(xhat, dtype, GEMMA)


@ct.kernel
def rms_norm_bwd(x, weight, dy, dres, dx, dw_partial, n_cols: int, eps: float,
                 GEMMA: ct.Constant[bool], ADD: ct.Constant[bool], TILE_M: ct.Constant[int],
                 TILE_N: ct.Constant[int], LATENCY: ct.Constant[int]):
    """dx (plus dres when ADD: a residual's gradient, added before dx is rounded; otherwise dres is unused), and
    per-block partial sums of dw (rows of dw_partial, summed by the launcher; with one block, dw itself, in the
    weight's dtype). rstd is recomputed from x (one more read of x, no saved state); the arithmetic is
    `_backward_terms`. LATENCY: the loads' DRAM latency hint (0: none)."""
    n_row_tiles = ct.cdiv(x.shape[0], TILE_M)
    w = _weight_row(weight, TILE_N, GEMMA, ct.float32)  # fp32 either way
    acc = ct.full((1, TILE_N), 0.0, dtype=ct.float32)
    for t in range(ct.bid(0), n_row_tiles, ct.num_blocks(0)):
        dxt, dw_term = _backward_terms(_loaded(x, t, 0, TILE_M, TILE_N, LATENCY),
                                       _loaded(dy, t, 0, TILE_M, TILE_N, LATENCY), w, n_cols, eps, 1, x.dtype, GEMMA)
        if ADD:
            dxt = dxt + _loaded(dres, t, 0, TILE_M, TILE_N, LATENCY)
        ct.store(dx, (t, 0), tile=ct.astype(dxt, dx.dtype), allow_tma=False)
        acc = acc + ct.sum(dw_term, axis=0, keepdims=True)
    ct.store(dw_partial, (ct.bid(0), 0), tile=ct.astype(acc, dw_partial.dtype), allow_tma=False)


@ct.kernel
def rms_norm_bwd_split(x, weight, dy, dres, dx, dw_partial, n_cols: int, eps: float, GEMMA: ct.Constant[bool],
                       ADD: ct.Constant[bool], TILE_M: ct.Constant[int], TILE_A: ct.Constant[int],
                       TILE_B: ct.Constant[int], LATENCY: ct.Constant[int]):
    """rms_norm_bwd with each row as a TILE_A tile and the TILE_B tile after it (split_tiles): 5120 columns hold
    no padding where one 8192-wide tile holds 3072 (sm_90: 179 local-memory accesses instead of 742). The forward
    in this form lost to rms_norm_row at 2560 and 5120 columns, 512-32768 rows (H100,
    results/h100/tune_h100_rowkernels.md), so it was removed. The arithmetic is `_backward_terms`'s, its
    row sums taken over both tiles; ADD and dres as rms_norm_bwd's."""
    j = TILE_A // TILE_B
    wa = _weight_row(weight, TILE_A, GEMMA, ct.float32)
    wb = _weight_row(weight, TILE_B, GEMMA, ct.float32, j)
    acc_a, acc_b = ct.full((1, TILE_A), 0.0, dtype=ct.float32), ct.full((1, TILE_B), 0.0, dtype=ct.float32)
    for t in range(ct.bid(0), ct.cdiv(x.shape[0], TILE_M), ct.num_blocks(0)):
        xa, xb = _loaded(x, t, 0, TILE_M, TILE_A, LATENCY), _loaded(x, t, j, TILE_M, TILE_B, LATENCY)
        da, db = _loaded(dy, t, 0, TILE_M, TILE_A, LATENCY), _loaded(dy, t, j, TILE_M, TILE_B, LATENCY)
        squares = ct.sum(xa * xa, axis=1, keepdims=True) + ct.sum(xb * xb, axis=1, keepdims=True)
        rstd = ct.rsqrt(squares / n_cols + eps)
        xa, xb = xa * rstd, xb * rstd  # x̂
        ga, gb = da * wa, db * wb
        dot = (ct.sum(ga * xa, axis=1, keepdims=True) + ct.sum(gb * xb, axis=1, keepdims=True)) / n_cols
        dxa, dxb = rstd * (ga - xa * dot), rstd * (gb - xb * dot)
        if ADD:
            dxa = dxa + _loaded(dres, t, 0, TILE_M, TILE_A, LATENCY)
            dxb = dxb + _loaded(dres, t, j, TILE_M, TILE_B, LATENCY)
        ct.store(dx, (t, 0), tile=ct.astype(dxa, dx.dtype), allow_tma=False)
        ct.store(dx, (t, j), tile=ct.astype(dxb, dx.dtype), allow_tma=False)
        acc_a = acc_a + ct.sum(da * _dw_xhat(xa, x.dtype, GEMMA), axis=0, keepdims=True)
        acc_b = acc_b + ct.sum(db * _dw_xhat(xb, x.dtype, GEMMA), axis=0, keepdims=True)
    ct.store(dw_partial, (ct.bid(0), 0), tile=ct.astype(acc_a, dw_partial.dtype), allow_tma=False)
    ct.store(dw_partial, (ct.bid(0), j), tile=ct.astype(acc_b, dw_partial.dtype), allow_tma=False)


def _loaded(a, t, j, TILE_M, TILE_N, LATENCY):
    # tile (t, j) of a in fp32; LATENCY: the load's DRAM latency hint (0: none)
    if LATENCY:
        return ct.astype(ct.load(a, (t, j), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO,
                                 latency=LATENCY), ct.float32)
    return ct.astype(ct.load(a, (t, j), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO), ct.float32)


def _dw_xhat(xhat, dtype, GEMMA):
    # the x̂ of the dw term: the Llama form's x̂ rounded to the input dtype (see _backward_terms)
    if GEMMA:
        return xhat
    return ct.astype(ct.astype(xhat, dtype), ct.float32)


@ct.kernel
def rms_norm_bwd_row(x, weight, dy, dres, dx, dw_rows, n_cols: int, eps: float, GEMMA: ct.Constant[bool],
                     ADD: ct.Constant[bool], TILE_N: ct.Constant[int]):
    """rms_norm_bwd for decode-size inputs: one row per block through gather/scatter, as rms_norm_row (the tiled
    backward took 3.0 µs for one 4096-wide row on an H100, torch.compile's 2.4). Row i's dw term d * x̂ goes to
    dw_rows[i] (fp32, summed by the launcher; with one row, dw itself in the weight's dtype); ADD and dres as
    rms_norm_bwd's."""
    row, cols = ct.bid(0), ct.arange(TILE_N, dtype=ct.int32)
    dxt, dw_term = _backward_terms(_gathered(x, row, cols), _gathered(dy, row, cols),
                                   _gathered_weight(weight, cols, GEMMA, ct.float32), n_cols, eps, 0, x.dtype, GEMMA)
    if ADD:
        dxt = dxt + _gathered(dres, row, cols)
    ct.scatter(dx, (row, cols), ct.astype(dxt, dx.dtype), latency=1)
    ct.scatter(dw_rows, (row, cols), ct.astype(dw_term, dw_rows.dtype), latency=1)


@ct.kernel
def sandwich_rms_norm_bwd_row(x, summed, post_weight, weight, d_normed, d_summed, dx, d, dw_rows, dpw_rows,
                              n_cols: int, eps: float, TILE_N: ct.Constant[int]):
    """Gemma3's sandwich backward for decode-size inputs in one launch, one row per block (as rms_norm_bwd_row):
    the outer norm's backward of d_normed plus d_summed is d (the residual's gradient, rounded once to its dtype,
    as rms_norm_bwd's ADD rounds it), and the inner norm's backward of that rounded d is dx; the weights' row terms
    go to dw_rows[i] and dpw_rows[i] (fp32, summed by the launcher; with one row, the gradients themselves). The
    two-launch path's numbers, from one pass over the row and one launch instead of two (four with the sums)."""
    row, cols = ct.bid(0), ct.arange(TILE_N, dtype=ct.int32)
    d_outer, dw_term = _backward_terms(_gathered(summed, row, cols), _gathered(d_normed, row, cols),
                                       _gathered_weight(weight, cols, True, ct.float32), n_cols, eps, 0, x.dtype, True)
    d_row = ct.astype(d_outer + _gathered(d_summed, row, cols), d.dtype)
    ct.scatter(d, (row, cols), d_row, latency=1)
    dxt, dpw_term = _backward_terms(_gathered(x, row, cols), ct.astype(d_row, ct.float32),
                                    _gathered_weight(post_weight, cols, True, ct.float32), n_cols, eps, 0, x.dtype,
                                    True)
    ct.scatter(dx, (row, cols), ct.astype(dxt, dx.dtype), latency=1)
    ct.scatter(dw_rows, (row, cols), ct.astype(dw_term, dw_rows.dtype), latency=1)
    ct.scatter(dpw_rows, (row, cols), ct.astype(dpw_term, dpw_rows.dtype), latency=1)
