"""Rotary position embedding of q and k in one launch, for transformers' `apply_rotary_pos_emb`.

Layout as transformers passes it: q (B, Hq, S, D) and k (B, Hk, S, D) with any strides (usually transposed
views of the projections), cos/sin (B, S, D) holding the half-duplicated frequencies. Each block rotates
TILE_S positions of one (batch, head); heads Hq.. of the grid's z axis are k's. Rounding follows
transformers: q*cos and rotate_half(q)*sin are each rounded to the input dtype, then their sum.

Compile-time constants: dtype, HALF (D / 2, a power of two: 32, 64, 128) and TILE_S (positions per block,
a power of two up to 16: decode uses 1), so a model compiles a few specializations per dtype.
"""
import cuda.tile as ct
import torch

MAX_TILE_S = 16
_ZERO = ct.PaddingMode.ZERO


def _round(v, dtype):
    return ct.astype(ct.astype(v, dtype), ct.float32)


def _rotate(x, out, b, h, s, c1, c2, s1, s2, HALF, TILE_S):
    x1 = ct.reshape(ct.astype(ct.load(x, (b, h, s, 0), shape=(1, 1, TILE_S, HALF), padding_mode=_ZERO),
                              ct.float32), (TILE_S, HALF))
    x2 = ct.reshape(ct.astype(ct.load(x, (b, h, s, 1), shape=(1, 1, TILE_S, HALF), padding_mode=_ZERO),
                              ct.float32), (TILE_S, HALF))
    # rotate_half(x) = [-x2, x1]
    y1 = _round(_round(x1 * c1, x.dtype) + _round(-x2 * s1, x.dtype), x.dtype)
    y2 = _round(_round(x2 * c2, x.dtype) + _round(x1 * s2, x.dtype), x.dtype)
    ct.store(out, (b, h, s, 0), tile=ct.reshape(ct.astype(y1, out.dtype), (1, 1, TILE_S, HALF)))
    ct.store(out, (b, h, s, 1), tile=ct.reshape(ct.astype(y2, out.dtype), (1, 1, TILE_S, HALF)))


def _half(t, b, s, i, HALF, TILE_S):
    tile = ct.load(t, (b, s, i), shape=(1, TILE_S, HALF), padding_mode=_ZERO)
    return ct.reshape(ct.astype(tile, ct.float32), (TILE_S, HALF))


@ct.kernel
def rope_fwd(q, k, cos, sin, q_out, k_out, n_q_heads: int, HALF: ct.Constant[int], TILE_S: ct.Constant[int]):
    s, b, h = ct.bid(0), ct.bid(1), ct.bid(2)
    c1, c2 = _half(cos, b, s, 0, HALF, TILE_S), _half(cos, b, s, 1, HALF, TILE_S)
    s1, s2 = _half(sin, b, s, 0, HALF, TILE_S), _half(sin, b, s, 1, HALF, TILE_S)
    if h < n_q_heads:
        _rotate(q, q_out, b, h, s, c1, c2, s1, s2, HALF, TILE_S)
    else:
        _rotate(k, k_out, b, h - n_q_heads, s, c1, c2, s1, s2, HALF, TILE_S)


def forward_launch(q, k, cos, sin, q_out, k_out):
    """(kernel, grid, args) of rope_fwd for q (B, Hq, S, D), k (B, Hk, S, D), cos/sin (B, S, D)."""
    b, hq, s, d = q.shape
    tile_s = min(MAX_TILE_S, 1 << (s - 1).bit_length())
    return rope_fwd, (-(-s // tile_s), b, hq + k.shape[1]), (q, k, cos, sin, q_out, k_out, hq, d // 2, tile_s)


def specializations(array):
    """Every launch the launcher asks for (`array(dtype, shape)` stands for a tensor): per dtype and head_dim
    (64, 128, 256), decode (one position) and prefill."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (64, 128, 256):
            for s in (1, 4096):
                q, k, cs = array(dtype, (1, 32, s, d)), array(dtype, (1, 8, s, d)), array(dtype, (1, s, d))
                yield forward_launch(q, k, cs, cs, q, k)
