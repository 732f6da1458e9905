"""Gated activations of the merged gate_up projection: out = act(gate) * up, for SwiGLU and GeGLU MLPs.

`gate` and `up` are the two halves of one (rows, 2 * intermediate) GEMM output, passed as strided views.
Rounding follows transformers: act(gate) rounded to the input dtype, then the product rounded again.
Compile-time constants: dtype, ACT (0 = SiLU, 1 = GELU-tanh) and the tile shape (fixed per dtype), so a model
compiles one specialization per activation.
"""
import cuda.tile as ct

SILU = 0
GELU_TANH = 1
TILE_M = 16
TILE_N = 256


@ct.kernel
def gated_act_fwd(gate, up, out, ACT: ct.Constant[int], TILE_M: ct.Constant[int], TILE_N: ct.Constant[int]):
    m, n = ct.bid(0), ct.bid(1)
    g = ct.astype(ct.load(gate, (m, n), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO), ct.float32)
    u = ct.load(up, (m, n), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO)
    if ACT == SILU:
        a = g / (1.0 + ct.exp(-g))
    else:
        # 0.5 * g * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 * g^3))), as torch's gelu(approximate="tanh")
        a = 0.5 * g * (1.0 + ct.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    a = ct.astype(ct.astype(a, out.dtype), ct.float32)
    ct.store(out, (m, n), tile=ct.astype(a * ct.astype(u, ct.float32), out.dtype))


def specializations(array, scalar):
    for dtype in (ct.bfloat16, ct.float16, ct.float32):
        for act in (SILU, GELU_TANH):
            yield gated_act_fwd, [array(dtype, 2), array(dtype, 2), array(dtype, 2), act, TILE_M, TILE_N]
