"""Gated activations of the merged gate_up projection: out = act(gate) * up, for SwiGLU and GeGLU MLPs.

`gate` and `up` are the two halves of one (rows, 2 * intermediate) GEMM output, passed as strided views.
Rounding follows transformers: act(gate) rounded to the output dtype, then the product rounded again.
Compile-time constants: dtype, ACT (0 = SiLU, 1 = GELU-tanh), APPROX and the tile shape (fixed), so a model
compiles one specialization per activation and dtype.

Design (benchmarks/sweep_gated_act.py, H100): one 1 x 1024 tile per block beat 2-D tiles and persistent
grids; the hardware's approximate exp2/divide/tanh are worth ~5 % at large shapes and cost < 1e-3 relative
error, well under one bf16/fp16 rounding (2^-8 / 2^-11), so they are used for those dtypes and not for fp32.
"""
import cuda.tile as ct
import torch

from . import ACTIVATIONS, with_hints
from .tuned import lookup, shapes
SILU, GELU_TANH = ACTIVATIONS["silu"], ACTIVATIONS["gelu_pytorch_tanh"]
TILE_M = 1  # the default tile, for GPUs (and shapes) without a tuned entry
TILE_N = 1024
ROW_GATHER = 0  # TILE_M of a tuned entry that runs gated_act_row (gather/scatter; decode sizes)
MAX_GRID_Y = 65535  # CUDA's limit on a grid's y dimension (gated_act_row's rows)
_LOG2E = 1.4426950408889634
_APPROX = ct.RoundingMode.APPROX


@ct.kernel
def gated_act_fwd(gate, up, out, ACT: ct.Constant[int], APPROX: ct.Constant[bool],
                  TILE_M: ct.Constant[int], TILE_N: ct.Constant[int], TMA: ct.Constant[bool]):
    # A 1-D grid over (TILE_M x TILE_N) tiles, row-major; a grid smaller than the tile count makes the blocks
    # persistent (H200 32768 x 14336: 1 x 4096 tiles, 8 blocks per SM, 97 % of copy where one 1 x 1024 tile per
    # block reached 90 %). TMA applies to the loads; stores are plain.
    tiles_n = ct.cdiv(out.shape[1], TILE_N)
    for t in range(ct.bid(0), ct.cdiv(out.shape[0], TILE_M) * tiles_n, ct.num_blocks(0)):
        m, n = t // tiles_n, t % tiles_n
        g = ct.astype(ct.load(gate, (m, n), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO,
                              allow_tma=TMA), ct.float32)
        u = ct.load(up, (m, n), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO, allow_tma=TMA)
        ct.store(out, (m, n), tile=_times_up(_activation(g, ACT, APPROX), u, out.dtype), allow_tma=False)


@ct.kernel
def gated_act_row(gate, up, out, ACT: ct.Constant[int], APPROX: ct.Constant[bool], TILE_N: ct.Constant[int]):
    """gated_act_fwd for decode sizes: block (j, i) takes columns [j * TILE_N, (j + 1) * TILE_N) of row i through
    gather/scatter (columns past the row read as zero and are not written): no tensor views to set up, the
    shortest prologue, as rms_norm_row."""
    row, cols = ct.bid(1), ct.bid(0) * TILE_N + ct.arange(TILE_N, dtype=ct.int32)
    g = ct.astype(ct.gather(gate, (row, cols), latency=1), ct.float32)
    u = ct.gather(up, (row, cols), latency=1)
    ct.scatter(out, (row, cols), _times_up(_activation(g, ACT, APPROX), u, out.dtype), latency=1)


def _activation(g, ACT, APPROX):
    """act(g) of fp32 g: SiLU g * sigmoid(g), or GELU-tanh as torch's gelu(approximate="tanh")."""
    if ACT == SILU:
        if APPROX:
            return ct.truediv(g, 1.0 + ct.exp2(g * -_LOG2E, flush_to_zero=True), rounding_mode=_APPROX,
                              flush_to_zero=True)
        return g / (1.0 + ct.exp(-g))
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))
    if APPROX:
        return 0.5 * g * (1.0 + ct.tanh(inner, rounding_mode=_APPROX))
    return 0.5 * g * (1.0 + ct.tanh(inner))


def _times_up(a, u, dtype):
    """act(gate) rounded to `dtype`, times up, rounded again (transformers' rounding): the product in `dtype` when up
    has it (bf16/fp16 x bf16/fp16 rounded once = PyTorch's fp32 product rounded; packed HMUL2), else in fp32."""
    if u.dtype == dtype:
        return ct.astype(a, dtype) * u
    return ct.astype(ct.astype(ct.astype(a, dtype), ct.float32) * ct.astype(u, ct.float32), dtype)


def _tiles(m, n, op, dtype, gpu, default):
    tile_m, tile_n, tma, *rest = lookup(gpu[0], op, dtype, n, m) or default
    per_sm, warps = (*rest, 0, 0)[:2]
    return (-(-m // max(1, tile_m)), -(-n // tile_n)), tile_m, tile_n, tma, per_sm, warps


def forward_launch(gate, up, out, act: str, gpu):
    """(kernel, grid, args) of gated_act_fwd for gate, up (rows, I) -> out (rows, I); the hardware's
    approximate exp2/divide/tanh below fp32 (see the module docstring). Tiles, blocks per SM (0: one block per
    tile) and warps per block (0: cuTile's choice) from the per-GPU table."""
    (tm, tn), tile_m, tile_n, tma, per_sm, warps = _tiles(*out.shape, act, out.dtype, gpu, (TILE_M, TILE_N, True, 0))
    if tile_m == ROW_GATHER:
        if out.shape[0] <= MAX_GRID_Y:
            return (with_hints(gated_act_row, 0, warps), (tn, out.shape[0]),
                    (gate, up, out, ACTIVATIONS[act], out.dtype != torch.float32, tile_n))
        tile_m, per_sm = 1, 8  # more rows than a grid's y dimension takes: 1-row tiles (tm = rows already), 8 per SM
    blocks = min(tm * tn, per_sm * gpu[1]) if per_sm else tm * tn
    return (with_hints(gated_act_fwd, 0, warps), (blocks,),
            (gate, up, out, ACTIVATIONS[act], out.dtype != torch.float32, tile_m, tile_n, tma))


def backward_launch(gate, up, dy, dgate, dup, act: str, gpu):
    """(kernel, grid, args) of gated_act_bwd, or of gated_act_bwd_row for a tuned entry with TILE_M 0 (decode
    sizes; past MAX_GRID_Y rows, gated_act_bwd with 1-row tiles)."""
    grid, tile_m, tile_n, *_ = _tiles(*dy.shape, act + "_backward", dy.dtype, gpu, (TILE_M, TILE_N, True))
    arrays = (gate, up, dy, dgate, dup, ACTIVATIONS[act], dy.dtype != torch.float32)
    if tile_m == ROW_GATHER:
        if dy.shape[0] <= MAX_GRID_Y:
            return gated_act_bwd_row, (grid[1], dy.shape[0]), (*arrays, tile_n)
        tile_m = 1  # 1-row tiles: _tiles' grid already has a block row per row
    return gated_act_bwd, grid, (*arrays, tile_m, tile_n)


def specializations(array):
    """Every launch the launchers ask for (`array(dtype, shape)` stands for a tensor): one per dtype and
    activation, forward and backward."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for act in ACTIVATIONS:
            t = array(dtype, (64, 1024))
            yield forward_launch(t, t, t, act, ("", 132))
            yield backward_launch(t, t, t, t, t, act, ("", 132))
        for act in ACTIVATIONS:  # gated_act_row and gated_act_bwd_row (tuned entries only)
            t = array(dtype, (1, 14336))
            yield gated_act_row, (14, 1), (t, t, t, ACTIVATIONS[act], dtype != torch.float32, 1024)
            yield gated_act_bwd_row, (14, 1), (t, t, t, t, t, ACTIVATIONS[act], dtype != torch.float32, 1024)
    seen = set()
    for act in ACTIVATIONS:  # every tuned configuration (bf16), once
        for key, n, m in shapes(act):
            t = array(torch.bfloat16, (m, n))
            plan = forward_launch(t, t, t, act, (key, 132))
            if (plan[0], plan[2][3:]) not in seen:  # the kernel carries its hints (warps)
                seen.add((plan[0], plan[2][3:]))
                yield plan


@ct.kernel
def gated_act_bwd(gate, up, dy, dgate, dup, ACT: ct.Constant[int], APPROX: ct.Constant[bool],
                  TILE_M: ct.Constant[int], TILE_N: ct.Constant[int]):
    """d/dgate = dy * up * act'(gate), d/dup = dy * act(gate); dgate and dup are the halves of one
    (rows, 2 * intermediate) gradient, like the forward's input. APPROX (bf16/fp16 gradients): SiLU's sigmoid
    through the hardware's exp2 and divide, as the forward (an IEEE division per element otherwise); GELU's tanh
    stays exact, since its derivative's 1 - tanh^2 would magnify the approximation's error."""
    m, n = ct.bid(0), ct.bid(1)
    g = ct.astype(ct.load(gate, (m, n), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO), ct.float32)
    u = ct.astype(ct.load(up, (m, n), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO), ct.float32)
    d = ct.astype(ct.load(dy, (m, n), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO), ct.float32)
    d_gate, d_up = _gradients(g, u, d, ACT, APPROX)
    ct.store(dgate, (m, n), tile=ct.astype(d_gate, dgate.dtype))
    ct.store(dup, (m, n), tile=ct.astype(d_up, dup.dtype))


@ct.kernel
def gated_act_bwd_row(gate, up, dy, dgate, dup, ACT: ct.Constant[int], APPROX: ct.Constant[bool],
                      TILE_N: ct.Constant[int]):
    """gated_act_bwd for decode sizes, as gated_act_row: block (j, i) takes columns [j * TILE_N, (j + 1) * TILE_N)
    of row i through gather/scatter (past the row: read as zero, not written)."""
    row, cols = ct.bid(1), ct.bid(0) * TILE_N + ct.arange(TILE_N, dtype=ct.int32)
    g = ct.astype(ct.gather(gate, (row, cols), latency=1), ct.float32)
    u = ct.astype(ct.gather(up, (row, cols), latency=1), ct.float32)
    d = ct.astype(ct.gather(dy, (row, cols), latency=1), ct.float32)
    d_gate, d_up = _gradients(g, u, d, ACT, APPROX)
    ct.scatter(dgate, (row, cols), ct.astype(d_gate, dgate.dtype), latency=1)
    ct.scatter(dup, (row, cols), ct.astype(d_up, dup.dtype), latency=1)


def _gradients(g, u, d, ACT, APPROX):
    """(d/dgate, d/dup) in fp32 of fp32 tiles: dy * up * act'(gate) and dy * act(gate)."""
    if ACT == SILU:
        if APPROX:
            s = ct.truediv(1.0, 1.0 + ct.exp2(g * -_LOG2E, flush_to_zero=True), rounding_mode=_APPROX,
                           flush_to_zero=True)
        else:
            s = 1.0 / (1.0 + ct.exp(-g))
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    else:
        k0 = 0.7978845608028654
        th = ct.tanh(k0 * (g + 0.044715 * g * g * g))  # exact: 1 - th^2 cancels where |th| nears 1
        a = 0.5 * g * (1.0 + th)
        da = 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * k0 * (1.0 + 3.0 * 0.044715 * g * g)
    return d * u * da, d * a
