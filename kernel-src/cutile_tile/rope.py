"""Rotary position embedding of q and k in one launch, for transformers' `apply_rotary_pos_emb`.

Layout as transformers passes it: q (B, Hq, S, D) and k (B, Hk, S, D) with any strides (usually transposed
views of the projections), cos/sin (B, S, D) or (1, S, D) (one row for every batch row) holding the
half-duplicated frequencies. Rounding follows
transformers: q*cos and rotate_half(q)*sin are each rounded to the output dtype, then their sum. The output dtype
is q's, or float32 for 16-bit q and k with float32 cos/sin (a float32 model under torch.autocast), as PyTorch's
promotion gives it.

Work split: q's heads are cut into chunks of TILE_H heads, k's into chunks of TILE_HK = min(TILE_H, k's heads
rounded up to a power of two); q's chunks come first, then k's. A block takes TILE_S positions of one batch row and
`chunks_per_block` consecutive chunks, so cos/sin are loaded once per block and reused for every head it rotates
(prefill: all heads in one block; decode: one chunk per block, so the few positions still spread over the
machine). The launch plan picks TILE_S, TILE_H and chunks_per_block per GPU from `tuned.py`, or `rope_row` (one
position per block, every head, through gather/scatter).

Compile-time constants: dtype, HALF (D / 2), TILE_S, TILE_H and TILE_HK (powers of two). (Plain, non-TMA loads and
stores were tried as a tuning knob: no gain on either GPU, and on an H200 a launch at head_dim 256 x 32768
tokens failed among those candidates; benchmarks/NOTES.md.)
"""
import cuda.tile as ct
import torch

from . import with_hints
from .tuned import lookup, shapes

_ZERO = ct.PaddingMode.ZERO


def _round(v, dtype):
    return ct.astype(ct.astype(v, dtype), ct.float32)


def _load_half(x, b, c, s, i, TILE_H, TILE_S, HALF, NATIVE, LATENCY):
    # LATENCY: the load's DRAM latency hint (0: none), for blocks that loop over many head chunks
    if LATENCY:
        tile = ct.load(x, (b, c, s, i), shape=(1, TILE_H, TILE_S, HALF), padding_mode=_ZERO, latency=LATENCY)
    else:
        tile = ct.load(x, (b, c, s, i), shape=(1, TILE_H, TILE_S, HALF), padding_mode=_ZERO)
    tile = ct.reshape(tile, (TILE_H, TILE_S, HALF))
    return tile if NATIVE else ct.astype(tile, ct.float32)


def _rotated(a, b, c, s, dtype):
    """One half of x * cos + rotate_half(x) * sin (rotate_half(x) = [-x2, x1]), rounded as transformers rounds."""
    return _round(_round(a * c, dtype) + _round(b * s, dtype), dtype)


def _store_halves(out, b, c, s, y1, y2, TILE_H, TILE_S, HALF):
    ct.store(out, (b, c, s, 0), tile=ct.reshape(ct.astype(y1, out.dtype), (1, TILE_H, TILE_S, HALF)))
    ct.store(out, (b, c, s, 1), tile=ct.reshape(ct.astype(y2, out.dtype), (1, TILE_H, TILE_S, HALF)))


def _rotate(x, out, b, c, s, c1, c2, s1, s2, TILE_H, TILE_S, HALF, NATIVE, LATENCY):
    # heads past the end load as zero and their stores are clipped; NATIVE: in x's dtype (cos/sin too)
    x1 = _load_half(x, b, c, s, 0, TILE_H, TILE_S, HALF, NATIVE, LATENCY)
    x2 = _load_half(x, b, c, s, 1, TILE_H, TILE_S, HALF, NATIVE, LATENCY)
    if NATIVE:
        y1, y2 = _summed_products(x1, c1, -x2, s1), _summed_products(x2, c2, x1, s2)
    else:
        y1, y2 = _rotated(x1, -x2, c1, s1, out.dtype), _rotated(x2, x1, c2, s2, out.dtype)
    _store_halves(out, b, c, s, y1, y2, TILE_H, TILE_S, HALF)


def _cos_sin_batch(t, b):
    # cos/sin hold one batch row for all (transformers' (1, S, D) for shared positions, read in place) or one each
    return ct.minimum(b, t.shape[0] - 1)


def _cos_sin_half(t, b, s, i, TILE_S, HALF, NATIVE):
    tile = ct.load(t, (_cos_sin_batch(t, b), s, i), shape=(1, TILE_S, HALF), padding_mode=_ZERO)
    return tile if NATIVE else ct.astype(tile, ct.float32)  # (1, TILE_S, HALF) broadcasts over the TILE_H heads


def _sin_halves(s1, s2, inverse):
    """The sin halves of the rotation by the opposite angle when `inverse` is nonzero (RoPE's backward: the rotation's
    transpose is the same op with sin' = -[sin2, sin1], for any cos/sin halves), formed in registers."""
    flip = inverse != 0
    return ct.where(flip, -s2, s1), ct.where(flip, -s1, s2)


def _tiled(q, k, q_weight, k_weight, cos, sin, q_out, k_out, q_chunks, n_chunks, chunks_per_block, inverse, eps,
           NORM, GEMMA, HALF, TILE_S, TILE_H, TILE_HK, NATIVE, LATENCY):
    """The tiled kernels' body: this block's TILE_S positions, cos/sin loaded once, and its chunks of heads (q's
    first, then k's), each rotated, or normalized (NORM: with the weights) and rotated."""
    s, b = ct.bid(0), ct.bid(1)
    c1, c2 = _cos_sin_half(cos, b, s, 0, TILE_S, HALF, NATIVE), _cos_sin_half(cos, b, s, 1, TILE_S, HALF, NATIVE)
    s1, s2 = _cos_sin_half(sin, b, s, 0, TILE_S, HALF, NATIVE), _cos_sin_half(sin, b, s, 1, TILE_S, HALF, NATIVE)
    if not NORM:  # the norm kernels are forward only
        s1, s2 = _sin_halves(s1, s2, inverse)
    first = ct.bid(2) * chunks_per_block
    for c in range(first, first + chunks_per_block):
        if c < q_chunks:
            if NORM:
                _norm_rotate(q, q_weight, q_out, b, c, s, c1, c2, s1, s2, eps, TILE_H, TILE_S, HALF, GEMMA, NATIVE,
                             LATENCY)
            else:
                _rotate(q, q_out, b, c, s, c1, c2, s1, s2, TILE_H, TILE_S, HALF, NATIVE, LATENCY)
        elif c < n_chunks:
            if NORM:
                _norm_rotate(k, k_weight, k_out, b, c - q_chunks, s, c1, c2, s1, s2, eps, TILE_HK, TILE_S, HALF,
                             GEMMA, NATIVE, LATENCY)
            else:
                _rotate(k, k_out, b, c - q_chunks, s, c1, c2, s1, s2, TILE_HK, TILE_S, HALF, NATIVE, LATENCY)


@ct.kernel
def rope_fwd(q, k, cos, sin, q_out, k_out, q_chunks: int, n_chunks: int, chunks_per_block: int, inverse: int,
             HALF: ct.Constant[int], TILE_S: ct.Constant[int], TILE_H: ct.Constant[int], TILE_HK: ct.Constant[int],
             NATIVE: ct.Constant[bool], LATENCY: ct.Constant[int]):
    """inverse (1): the rotation by the opposite angle, RoPE's backward (`_sin_halves`; an argument, not a
    constant: the backward shares the forward's compiled kernels). NATIVE: the rotation in the inputs' dtype
    (`_summed_products`), as rope_row's. LATENCY: the loads' DRAM latency hint (0: none; a block looping over many
    chunks)."""
    _tiled(q, k, q, k, cos, sin, q_out, k_out, q_chunks, n_chunks, chunks_per_block, inverse, 0.0, False, False,
           HALF, TILE_S, TILE_H, TILE_HK, NATIVE, LATENCY)


def _summed_products(a, c, b, s):
    """a*c + b*s in the tiles' own dtype, each product and the sum rounded once to it: for bf16 and fp16 what
    PyTorch's fp32-then-round gives (a product of two such values is exact in fp32; a sum is too unless one addend
    is below half an ulp of the other, where both round to the larger), as packed HMUL2/HADD2 without unpacking.
    Both operands of the add are negations, not products, so cuTile does not contract them into an FMA (which
    rounds a product away)."""
    return -((-(a * c)) + (-(b * s)))


def _row_indices(TILE_H, HALF):
    # (TILE_H, 1) heads and (1, HALF) columns: heads past x's last load as zero and are not stored (bounds-checked)
    return ct.reshape(ct.arange(TILE_H, dtype=ct.int32), (TILE_H, 1)), ct.reshape(ct.arange(HALF, dtype=ct.int32),
                                                                                  (1, HALF))


def _scatter_halves(out, b, h, s, d, y1, y2, HALF):
    ct.scatter(out, (b, h, s, d), ct.astype(y1, out.dtype), latency=1)
    ct.scatter(out, (b, h, s, d + HALF), ct.astype(y2, out.dtype), latency=1)


def _rotate_rows(x, out, b, s, c1, c2, s1, s2, TILE_H, HALF, NATIVE):
    h, d = _row_indices(TILE_H, HALF)
    x1 = ct.gather(x, (b, h, s, d), latency=1)
    x2 = ct.gather(x, (b, h, s, d + HALF), latency=1)
    if NATIVE:  # in x's dtype (cos/sin too)
        y1, y2 = _summed_products(x1, c1, -x2, s1), _summed_products(x2, c2, x1, s2)
    else:
        x1, x2 = ct.astype(x1, ct.float32), ct.astype(x2, ct.float32)
        y1, y2 = _rotated(x1, -x2, c1, s1, out.dtype), _rotated(x2, x1, c2, s2, out.dtype)
    _scatter_halves(out, b, h, s, d, y1, y2, HALF)


def _row_half(t, b, s, i, HALF, TILED, NATIVE=False):
    # (1, HALF) of cos/sin at position s: index gathers (16-bit loads, no tensor view) or one tile load (128-bit);
    # in fp32, or NATIVE in their own dtype
    b = _cos_sin_batch(t, b)
    if TILED:
        tile = ct.reshape(ct.load(t, (b, s, i), shape=(1, 1, HALF)), (1, HALF))
    else:
        tile = ct.gather(t, (b, s, ct.reshape(ct.arange(HALF, dtype=ct.int32), (1, HALF)) + i * HALF), latency=1)
    return tile if NATIVE else ct.astype(tile, ct.float32)


@ct.kernel
def rope_row(q, k, cos, sin, q_out, k_out, inverse: int, HALF: ct.Constant[int], TILE_H: ct.Constant[int],
             TILE_HK: ct.Constant[int], TILED: ct.Constant[bool], NATIVE: ct.Constant[bool]):
    """One position per block, every head of q and of k, through gather/scatter (no tensor views to set up: the
    shortest prologue, as rms_norm_row for decode sizes). TILE_H / TILE_HK: q's / k's heads rounded up to a
    power of two. TILED: cos/sin through tile loads instead of gathers (sm_90: 824 instructions instead of 1216,
    no 16-bit scalar loads). NATIVE (with TILED): the rotation in the inputs' dtype, `_summed_products` (sm_90,
    bf16: about a third fewer instructions; a tuner candidate). inverse: as rope_fwd's."""
    s, b = ct.bid(0), ct.bid(1)
    c1, c2 = _row_half(cos, b, s, 0, HALF, TILED, NATIVE), _row_half(cos, b, s, 1, HALF, TILED, NATIVE)
    s1, s2 = _sin_halves(_row_half(sin, b, s, 0, HALF, TILED, NATIVE), _row_half(sin, b, s, 1, HALF, TILED, NATIVE),
                         inverse)
    _rotate_rows(q, q_out, b, s, c1, c2, s1, s2, TILE_H, HALF, NATIVE)
    _rotate_rows(k, k_out, b, s, c1, c2, s1, s2, TILE_HK, HALF, NATIVE)


def _normed_half(xh, rstd, w, dtype, GEMMA, NATIVE):
    """One half of a head's RMSNorm output rounded to x's dtype (as q_norm/k_norm return it) as transformers
    rounds: Llama form (Qwen3) x̂ rounded before the weight product, Gemma form x̂·(1 + w) rounded once. In fp32
    tiles, or NATIVE in x's dtype (the Llama form's weight product then too: w in x's dtype)."""
    normed = xh * rstd
    if NATIVE:
        return ct.astype(normed, dtype) * w if not GEMMA else ct.astype(normed * w, dtype)
    if not GEMMA:
        normed = _round(normed, dtype)
    return _round(normed * w, dtype)


def _weight_half(weight, i, HALF, GEMMA, NATIVE):
    # (1, HALF) in fp32 (Gemma: 1 + w), or NATIVE Llama form in the weight's dtype
    w = ct.reshape(ct.load(weight, (i,), shape=(HALF,)), (1, HALF))
    if NATIVE and not GEMMA:
        return w
    w = ct.astype(w, ct.float32)
    return w + 1.0 if GEMMA else w


def _norm_rope_halves(x1, x2, weight, c1, c2, s1, s2, eps, axis, shape, dtype, HALF, GEMMA, NATIVE):
    """Both rotated halves of RMSNorm(x) (x1, x2: fp32 halves of head rows along `axis`, which share one sum of
    squares; `shape`: the weight halves' broadcast shape)."""
    squares = ct.sum(x1 * x1, axis=axis, keepdims=True) + ct.sum(x2 * x2, axis=axis, keepdims=True)
    rstd = ct.rsqrt(squares * (1.0 / (2 * HALF)) + eps)  # an exact power of two: no IEEE division
    w1 = ct.reshape(_weight_half(weight, 0, HALF, GEMMA, NATIVE), shape)
    w2 = ct.reshape(_weight_half(weight, 1, HALF, GEMMA, NATIVE), shape)
    n1 = _normed_half(x1, rstd, w1, dtype, GEMMA, NATIVE)
    n2 = _normed_half(x2, rstd, w2, dtype, GEMMA, NATIVE)
    if NATIVE:
        return _summed_products(n1, c1, -n2, s1), _summed_products(n2, c2, n1, s2)
    return _rotated(n1, -n2, c1, s1, dtype), _rotated(n2, n1, c2, s2, dtype)


def _norm_rotate_rows(x, weight, out, b, s, c1, c2, s1, s2, eps, TILE_H, HALF, GEMMA, NATIVE):
    # as _rotate_rows, with every head row normalized first
    h, d = _row_indices(TILE_H, HALF)
    x1 = ct.astype(ct.gather(x, (b, h, s, d), latency=1), ct.float32)
    x2 = ct.astype(ct.gather(x, (b, h, s, d + HALF), latency=1), ct.float32)
    y1, y2 = _norm_rope_halves(x1, x2, weight, c1, c2, s1, s2, eps, 1, (1, HALF), x.dtype, HALF, GEMMA, NATIVE)
    _scatter_halves(out, b, h, s, d, y1, y2, HALF)


def _norm_rotate(x, weight, out, b, c, s, c1, c2, s1, s2, eps, TILE_H, TILE_S, HALF, GEMMA, NATIVE, LATENCY):
    # as _rotate, with every head row normalized first; padded heads load as zero (finite: eps > 0), not stored
    x1 = _load_half(x, b, c, s, 0, TILE_H, TILE_S, HALF, False, LATENCY)
    x2 = _load_half(x, b, c, s, 1, TILE_H, TILE_S, HALF, False, LATENCY)
    y1, y2 = _norm_rope_halves(x1, x2, weight, c1, c2, s1, s2, eps, 2, (1, 1, HALF), x.dtype, HALF, GEMMA, NATIVE)
    _store_halves(out, b, c, s, y1, y2, TILE_H, TILE_S, HALF)


@ct.kernel
def qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, q_out, k_out, q_chunks: int, n_chunks: int,
                     chunks_per_block: int, eps: float, GEMMA: ct.Constant[bool], HALF: ct.Constant[int],
                     TILE_S: ct.Constant[int], TILE_H: ct.Constant[int], TILE_HK: ct.Constant[int],
                     NATIVE: ct.Constant[bool], LATENCY: ct.Constant[int]):
    """qk_norm_rope_row's work split as rope_fwd's (tiles of TILE_S positions x TILE_H heads, chunks_per_block
    chunks per block): for many positions, where one position per block leaves the norms' reductions exposed.
    NATIVE: after the norm's statistics, the rest in the inputs' dtype (`_summed_products`). LATENCY: as
    rope_fwd's."""
    _tiled(q, k, q_weight, k_weight, cos, sin, q_out, k_out, q_chunks, n_chunks, chunks_per_block, 0, eps, True,
           GEMMA, HALF, TILE_S, TILE_H, TILE_HK, NATIVE, LATENCY)


@ct.kernel
def qk_norm_rope_row(q, k, q_weight, k_weight, cos, sin, q_out, k_out, eps: float, GEMMA: ct.Constant[bool],
                     HALF: ct.Constant[int], TILE_H: ct.Constant[int], TILE_HK: ct.Constant[int],
                     NATIVE: ct.Constant[bool]):
    """Qwen3's and Gemma3's q_norm / k_norm (RMSNorm over head_dim) followed by RoPE, as rope_row (cos/sin tile
    loads): one position per block, every head of q and of k; the normalized heads never go to memory. NATIVE:
    as in qk_norm_rope_fwd."""
    s, b = ct.bid(0), ct.bid(1)
    c1, c2 = _row_half(cos, b, s, 0, HALF, True, NATIVE), _row_half(cos, b, s, 1, HALF, True, NATIVE)
    s1, s2 = _row_half(sin, b, s, 0, HALF, True, NATIVE), _row_half(sin, b, s, 1, HALF, True, NATIVE)
    _norm_rotate_rows(q, q_weight, q_out, b, s, c1, c2, s1, s2, eps, TILE_H, HALF, GEMMA, NATIVE)
    _norm_rotate_rows(k, k_weight, k_out, b, s, c1, c2, s1, s2, eps, TILE_HK, HALF, GEMMA, NATIVE)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def qk_norm_launch(q, k, q_weight, k_weight, cos, sin, q_out, k_out, eps: float, gemma: bool, gpu):
    """(kernel, grid, args) of qk_norm_rope_row or qk_norm_rope_fwd for q (B, Hq, S, D), k (B, Hk, S, D), weights
    (D,), cos/sin (B, S, D): this GPU's `qk_norm_rope` entry (RoPE's candidates, each also with a fourth element 1:
    NATIVE), else the H100's (any dtype, as RoPE), else `qk_default_config` (head dims no table holds)."""
    b, hq, s, d = q.shape
    hk = k.shape[1]
    config = (lookup(gpu[0], "qk_norm_rope", torch.bfloat16, d, b * s)
              or lookup(REFERENCE_GPU, "qk_norm_rope", torch.bfloat16, d, b * s)  # as RoPE (see REFERENCE_GPU)
              or qk_default_config(b * s, hq + hk, gpu[1], d // 2))
    if config[:3] in (ROW, ROW_TILED, ROW_NATIVE):  # the row kernel always loads cos/sin as tiles
        return _row_kernel(qk_norm_rope_row, config), (s, b), (
            q, k, q_weight, k_weight, cos, sin, q_out, k_out, float(eps), bool(gemma), d // 2, _pow2(hq), _pow2(hk),
            config[:3] == ROW_NATIVE)
    native, latency = _tile_knobs(config)
    grid, q_chunks, chunks, tile_s, tile_h, tile_hk, per_block = _tiled_plan(s, b, hq, hk, config[:3])
    return qk_norm_rope_fwd, grid, (q, k, q_weight, k_weight, cos, sin, q_out, k_out, q_chunks, chunks, per_block,
                                    float(eps), bool(gemma), d // 2, tile_s, tile_h, tile_hk, native, latency)


QK_TILE_ELEMENTS = 4096  # elements per half-tile at most: sm_90 spills past it (the norm keeps more tiles live)


def qk_default_config(tokens: int, heads: int, n_sms: int, half: int) -> tuple[int, int, int]:
    """Untuned GPUs: the row kernel for decode-size batches (one launch, every head), else RoPE's tiles with
    fewer positions where they would spill."""
    if tokens <= 64:
        return ROW_TILED
    tile_s, tile_h, per_block = default_config(tokens, heads, n_sms)
    while tile_s > 1 and tile_s * tile_h * half > QK_TILE_ELEMENTS:
        tile_s //= 2
    return tile_s, tile_h, per_block


def _tiled_plan(s, b, hq, hk, config):
    """(grid, q chunks, all chunks, TILE_S, TILE_H, TILE_HK, chunks per block) of a (TILE_S, TILE_H, chunks per
    block) configuration: k's chunks are no wider than k has heads (8 kv heads beside a 32-head q tile: no padded
    heads to rotate)."""
    tile_s, tile_h, per_block = config
    tile_hk = min(tile_h, _pow2(hk))
    q_chunks, chunks = -(-hq // tile_h), -(-hq // tile_h) + -(-hk // tile_hk)
    return (-(-s // tile_s), b, -(-chunks // per_block)), q_chunks, chunks, tile_s, tile_h, tile_hk, per_block


ROW = (0, 0, 0)  # the configuration that runs rope_row (cos/sin gathered)
ROW_TILED = (0, 0, 1)  # rope_row with cos/sin tile loads
ROW_NATIVE = (0, 0, 2)  # rope_row with cos/sin tile loads and the rotation in the inputs' dtype
# A fourth element of a row configuration: warps per block (num_worker_warps, 8; cuTile's own choice is 4 for 32 +
# 8 heads of 128). Of a tile configuration: 1 for NATIVE, and a fifth the loads' latency hint (`_tile_knobs`).


def _tile_knobs(config) -> tuple[bool, int]:
    """(NATIVE, LATENCY) of a tile configuration (TILE_S, TILE_H, chunks per block[, native[, latency]])."""
    native, latency = (*config[3:], 0, 0)[:2]
    return bool(native), int(latency)


def _row_kernel(kernel, config):
    return with_hints(kernel, 0, config[3] if len(config) == 4 else 0)


# Every dtype looks up the 16-bit entries (the tables hold bf16 measurements), and GPUs without RoPE entries take
# the H100's for the head_dim and token bucket: the H100 and the H200 chose alike (one head per tile, 1-16 positions,
# all heads in one block at prefill), 1.1-5.4x faster than default_config on both (results/h100/tune_h100.md,
# h200/tune_h200.md; at head_dim 256 its 16 x 8 head tiles also spill registers). default_config serves the head
# dims neither has.
REFERENCE_GPU = "h100"


def default_config(tokens: int, heads: int, n_sms: int) -> tuple[int, int, int]:
    """(TILE_S, TILE_H, chunks_per_block) for GPUs without a tuned entry: up to 4K elements per half-tile,
    and enough blocks to give every SM a few."""
    tile_s = min(16, 1 << (tokens - 1).bit_length())
    tile_h = min(8, 1 << (heads - 1).bit_length())
    chunks = -(-heads // tile_h)
    blocks = -(-tokens // tile_s)
    per_block = max(1, min(chunks, blocks * chunks // (4 * n_sms)))
    return tile_s, tile_h, per_block


def forward_launch(q, k, cos, sin, q_out, k_out, gpu, config=None, inverse: bool = False):
    """(kernel, grid, args) of rope_row or rope_fwd for q (B, Hq, S, D), k (B, Hk, S, D), cos/sin (B, S, D);
    `gpu` is the device's (name, SM count). `config` (else this GPU's table, the H100's, `default_config`):
    ROW, ROW_TILED, ROW_NATIVE (each[, warps per block]), or (TILE_S, TILE_H, chunks per block[, 1: NATIVE[,
    latency hint]]). `inverse`: the rotation by the opposite angle (RoPE's backward; same plan)."""
    b, hq, s, d = q.shape
    hk = k.shape[1]
    config = (config or lookup(gpu[0], "rope", torch.bfloat16, d, b * s)
              or lookup(REFERENCE_GPU, "rope", torch.bfloat16, d, b * s) or default_config(b * s, hq + hk, gpu[1]))
    same = cos.dtype == q.dtype  # else 16-bit q and k with float32 cos/sin (autocast): the rotation in float32
    if config[:3] in (ROW, ROW_TILED, ROW_NATIVE):
        return _row_kernel(rope_row, config), (s, b), (q, k, cos, sin, q_out, k_out, int(inverse), d // 2, _pow2(hq),
                                                       _pow2(hk), config[:3] != ROW, config[:3] == ROW_NATIVE and same)
    native, latency = _tile_knobs(config)
    native = native and same
    grid, q_chunks, chunks, tile_s, tile_h, tile_hk, per_block = _tiled_plan(s, b, hq, hk, config[:3])
    return rope_fwd, grid, (q, k, cos, sin, q_out, k_out, q_chunks, chunks, per_block, int(inverse), d // 2, tile_s,
                            tile_h, tile_hk, native, latency)


def specializations(array):
    """Every launch the launcher asks for on an untuned GPU (`array(dtype, shape)` stands for a tensor): per
    dtype and head_dim (64, 128, 256), decode (one position) and prefill, and rope_row and qk_norm_rope_row for
    32 + 8 heads; then every tuned configuration."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (64, 128, 256):
            for s in (1, 4096):
                q, k, cs = array(dtype, (1, 32, s, d)), array(dtype, (1, 8, s, d)), array(dtype, (1, s, d))
                yield forward_launch(q, k, cs, cs, q, k, ("", 132))
                if dtype is not torch.float32:  # float32 cos/sin (autocast): float32 outputs
                    cs, qo, ko = (array(torch.float32, t.shape) for t in (cs, q, k))
                    yield forward_launch(q, k, cs, cs, qo, ko, ("", 132))
            one, cs = array(dtype, (1, 1, 1, d)), array(dtype, (1, 1, d))  # rope_row (a tuned choice at decode)
            yield rope_row, (1, 1), (one, one, cs, cs, one, one, 0, d // 2, 32, 8, False, False)
            if d == 128 and dtype is not torch.float16:  # the tuner's native-dtype candidates compile
                yield rope_row, (1, 1), (one, one, cs, cs, one, one, 0, d // 2, 32, 8, True, True)
                q, k, cs = array(dtype, (1, 32, 4096, d)), array(dtype, (1, 8, 4096, d)), array(dtype, (1, 4096, d))
                yield forward_launch(q, k, cs, cs, q, k, ("", 132), (8, 1, 40, 1))
            w = array(dtype, (d,))
            for gemma in (False, True):  # q_norm / k_norm + RoPE (Qwen3: Llama form; Gemma3), decode and prefill
                for s in (1, 4096):
                    q, k, cs = array(dtype, (1, 32, s, d)), array(dtype, (1, 8, s, d)), array(dtype, (1, s, d))
                    yield qk_norm_launch(q, k, w, w, cs, cs, q, k, 1e-6, gemma, ("", 132))
                if d == 128 and dtype is not torch.float16:  # the tuner's native-dtype candidates compile
                    one, cs = array(dtype, (1, 32, 1, d)), array(dtype, (1, 1, d))
                    kv = array(dtype, (1, 8, 1, d))
                    yield qk_norm_rope_row, (1, 1), (one, kv, w, w, cs, cs, one, kv, 1e-6, gemma, d // 2, 32, 8, True)
                    yield qk_norm_rope_fwd, (1, 1, 1), (one, kv, w, w, cs, cs, one, kv, 1, 2, 2, 1e-6, gemma, d // 2,
                                                        32, 1, 1, True, 0)
    seen = set()
    for op in ("rope", "qk_norm_rope"):
        for key, d, tokens in shapes(op):  # every tuned configuration (bf16; qk_norm_rope: Llama form), once
            q, k = array(torch.bfloat16, (1, 32, tokens, d)), array(torch.bfloat16, (1, 8, tokens, d))
            cs, w = array(torch.bfloat16, (1, tokens, d)), array(torch.bfloat16, (d,))
            plans = ([forward_launch(q, k, cs, cs, q, k, (key, 132))] if op == "rope" else
                     [qk_norm_launch(q, k, w, w, cs, cs, q, k, 1e-6, False, (key, 132))])
            if op == "rope":  # and with float32 cos/sin (autocast)
                cs, qo, ko = (array(torch.float32, t.shape) for t in (cs, q, k))
                plans.append(forward_launch(q, k, cs, cs, qo, ko, (key, 132)))
            for plan in plans:
                constants = (plan[0], tuple(a.dtype if hasattr(a, "shape") else a for a in plan[2]))
                if constants not in seen:
                    seen.add(constants)
                    yield plan
