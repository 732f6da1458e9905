"""Design sweep for the RMSNorm kernel (kept for the record): store path, rows per tile and grid size.

    python benchmarks/sweep_rms_norm.py

An experimental copy of the kernel takes the design choices as compile-time constants; every configuration is
checked against the reference, then timed (CUDA graph of 20 calls, median) against the copy bandwidth.
"""
import sys
from pathlib import Path

import cuda.tile as ct
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from devtools.timing import graph_us  # noqa: E402


@ct.kernel
def rms_norm_sweep(x, weight, out, n_cols: int, eps: float, STORE_TMA: ct.Constant[bool],
                   LAT: ct.Constant[bool], TILE_M: ct.Constant[int], TILE_N: ct.Constant[int]):
    n_row_tiles = ct.cdiv(x.shape[0], TILE_M)
    w = ct.reshape(ct.astype(ct.load(weight, (0,), shape=(TILE_N,), padding_mode=ct.PaddingMode.ZERO),
                             ct.float32), (1, TILE_N))
    for t in range(ct.bid(0), n_row_tiles, ct.num_blocks(0)):
        if LAT:
            xt = ct.load(x, (t, 0), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO, latency=10)
        else:
            xt = ct.load(x, (t, 0), shape=(TILE_M, TILE_N), padding_mode=ct.PaddingMode.ZERO)
        xf = ct.astype(xt, ct.float32)
        normed = ct.astype(xf * ct.rsqrt(ct.sum(xf * xf, axis=1, keepdims=True) / n_cols + eps), x.dtype)
        y = ct.astype(ct.astype(normed, ct.float32) * w, out.dtype)
        if LAT:
            ct.store(out, (t, 0), tile=y, allow_tma=STORE_TMA, latency=3)
        else:
            ct.store(out, (t, 0), tile=y, allow_tma=STORE_TMA)


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    peak = 2 * a.numel() / graph_us(lambda: b.copy_(a)) / 1e3
    print(f"{torch.cuda.get_device_name()}: copy {peak:.0f} GB/s; µs per call (graph), % of copy bandwidth")
    for m, n in [(16, 4096), (8192, 4096), (32768, 4096), (4096, 8192), (131072, 128), (8192, 1024)]:
        x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        ref = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
        out = torch.empty_like(x)
        tile_n = 1 << (n - 1).bit_length()
        results = []
        for tma in (True, False):
            for lat in (False, True):
                for tile_m in (1, 2, 4, 8, 16, 32):
                    if tile_m * tile_n > 16384 or tile_m > m:
                        continue
                    tiles = -(-m // tile_m)
                    for label, grid in (("1xSM", sms), ("2xSM", 2 * sms), ("4xSM", 4 * sms), ("8xSM", 8 * sms),
                                        ("all", tiles)):
                        grid = min(grid, tiles)
                        args = (x, w, out, n, 1e-6, tma, lat, tile_m, tile_n)
                        # the raw current stream, read at call time: inside graph capture it is the capture stream
                        run = lambda: ct.launch(torch._C._cuda_getCurrentRawStream(0), (grid,),  # noqa: E731
                                                rms_norm_sweep, args)
                        out.fill_(float("nan"))
                        run()
                        torch.cuda.synchronize()
                        assert (out.float() - ref.float()).abs().max() < 0.05, (m, n, tma, tile_m, label)
                        us = graph_us(run)
                        results.append((us, f"tma_store={tma} lat={lat} tile_m={tile_m} grid={label}"))
        results.sort()
        gbs = lambda us: 4 * m * n / us / 1e3  # noqa: E731
        print(f"{m} x {n}: best {results[0][0]:.1f} µs ({100 * gbs(results[0][0]) / peak:.0f}%) {results[0][1]}; "
              f"2nd {results[1][0]:.1f} {results[1][1]}; worst {results[-1][0]:.1f} {results[-1][1]}", flush=True)


if __name__ == "__main__":
    main()
