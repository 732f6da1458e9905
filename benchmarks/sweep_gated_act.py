"""Design sweep for the gated-activation kernel (kept for the record): tile shape, grid, TMA, approximate math.

    python benchmarks/sweep_gated_act.py

An experimental copy of the kernel takes the choices as compile-time constants; each configuration is checked
against the reference, then timed (CUDA graph of 20 calls, median).
"""

import sys
from pathlib import Path

import cuda.tile as ct
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from devtools.timing import graph_us  # noqa: E402

LOG2E = 1.4426950408889634


@ct.kernel
def gated_sweep(gate, up, out, ACT: ct.Constant[int], APPROX: ct.Constant[bool], LOAD_TMA: ct.Constant[bool],
                STORE_TMA: ct.Constant[bool], TILE_M: ct.Constant[int], TILE_N: ct.Constant[int]):
    n_col = ct.cdiv(out.shape[1], TILE_N)
    n_tiles = ct.cdiv(out.shape[0], TILE_M) * n_col
    for t in range(ct.bid(0), n_tiles, ct.num_blocks(0)):
        m, n = t // n_col, t % n_col
        g = ct.astype(ct.load(gate, (m, n), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO,
                              allow_tma=LOAD_TMA), ct.float32)
        u = ct.load(up, (m, n), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO, allow_tma=LOAD_TMA)
        if ACT == 0:
            if APPROX:
                e = ct.exp2(g * -LOG2E, flush_to_zero=True)
                a = ct.truediv(g, 1.0 + e, rounding_mode=ct.RoundingMode.APPROX, flush_to_zero=True)
            else:
                a = g / (1.0 + ct.exp(-g))
        else:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            if APPROX:
                a = 0.5 * g * (1.0 + ct.tanh(inner, rounding_mode=ct.RoundingMode.APPROX))
            else:
                a = 0.5 * g * (1.0 + ct.tanh(inner))
        a = ct.astype(ct.astype(a, out.dtype), ct.float32)
        ct.store(out, (m, n), tile=ct.astype(a * ct.astype(u, ct.float32), out.dtype), allow_tma=STORE_TMA)


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}: µs per call (graph)")
    tiles = [(1, 1024), (1, 2048), (2, 1024), (4, 512), (8, 256), (16, 256), (4, 1024), (8, 512)]
    for act in (0, 1):
        for m, inter in [(16, 14336), (4096, 14336), (32768, 14336)]:
            gu = torch.randn(m, 2 * inter, device="cuda", dtype=torch.bfloat16)
            g, u = gu[:, :inter], gu[:, inter:]
            ref = (F.silu(g) if act == 0 else F.gelu(g, approximate="tanh")) * u
            out = torch.empty(m, inter, device="cuda", dtype=torch.bfloat16)
            compiled = torch.compile(lambda x: (F.silu(x[:, :inter]) if act == 0 else
                                                F.gelu(x[:, :inter], approximate="tanh")) * x[:, inter:])
            results = [(graph_us(lambda: compiled(gu)), "torch.compile")]
            for approx in (False, True):
                for load_tma in (True, False):
                    for store_tma in (True, False):
                        for tm, tn in tiles:
                            if tm > m:
                                continue
                            n_tiles = -(-m // tm) * -(-inter // tn)
                            for label, grid in (("all", n_tiles), ("4xSM", 4 * sms), ("8xSM", 8 * sms)):
                                grid = min(grid, n_tiles)
                                args = (g, u, out, act, approx, load_tma, store_tma, tm, tn)
                                run = lambda: ct.launch(torch._C._cuda_getCurrentRawStream(0), (grid,),  # noqa
                                                        gated_sweep, args)
                                out.fill_(float("nan"))
                                run()
                                torch.cuda.synchronize()
                                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                                assert err < 1e-2, (act, approx, tm, tn, err)
                                results.append((graph_us(run), f"approx={approx} load_tma={load_tma} "
                                                f"store_tma={store_tma} tile={tm}x{tn} grid={label}"))
            results.sort()
            comp = next(t for t, n in results if n == "torch.compile")
            print(f"act={act} {m}x{inter}: torch.compile {comp:.1f}; best {results[0][0]:.1f} {results[0][1]}; "
                  f"2nd {results[1][0]:.1f} {results[1][1]}; 3rd {results[2][0]:.1f} {results[2][1]}", flush=True)
            exact = [r for r in results if "approx=False" in r[1]]
            print(f"    best exact-math: {exact[0][0]:.1f} {exact[0][1]}", flush=True)


if __name__ == "__main__":
    main()
