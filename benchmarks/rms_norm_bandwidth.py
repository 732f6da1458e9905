"""RMSNorm on one GPU: cuTile against torch eager and torch.compile, with the copy bandwidth as the ceiling.

    python benchmarks/rms_norm_bandwidth.py [--out benchmarks/results/<gpu>/rms_norm.md]

Every implementation is checked against the float64 reference on the same inputs before it is timed.
Times are medians of CUDA events over several rotated input sets (so large shapes do not hit in L2).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from devtools.build import ROOT  # noqa: E402

SHAPES = [(1, 4096), (16, 4096), (64, 4096), (512, 4096), (4096, 4096), (8192, 4096), (32768, 4096),
          (8192, 1024), (4096, 2560), (4096, 5120), (4096, 8192), (131072, 128)]


def median_us(fn, sets, reps=50):
    for i in range(5):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = sets[i % len(sets)]
        s.record()
        fn(*args)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = median_us(lambda: b.copy_(a), [()], reps=20)
    return 2 * a.numel() / us / 1e3  # GB/s, read + write


def main():
    import kernels

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ck = kernels.get_local_kernel(ROOT)
    eps = 1e-6
    compiled = torch.compile(ck.rms_norm_reference, dynamic=False)
    peak = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    import cuda.tile as ct
    import transformers

    head = (f"{gpu}, torch {torch.__version__}, transformers {transformers.__version__}, kernels "
            f"{kernels.__version__}, cuda.tile {ct.__version__}, python {platform.python_version()}; bf16; "
            f"copy bandwidth {peak:.0f} GB/s")
    rows = ["| rows x hidden | cuTile µs | eager µs | torch.compile µs | cuTile GB/s | % of copy | vs best peer |",
            "|---|---|---|---|---|---|---|"]
    print(head)
    for m, n in SHAPES:
        nsets = max(1, min(8, (256 << 20) // (m * n * 2)))
        sets = [(torch.randn(m, n, device="cuda", dtype=torch.bfloat16),
                 (1 + 0.1 * torch.randn(n, device="cuda")).to(torch.bfloat16)) for _ in range(nsets)]
        x, w = sets[0]
        ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps) * w.double()
        impls = {"cutile": lambda x, w: ck.rms_norm_cutile(x, w, eps),
                 "eager": lambda x, w: ck.rms_norm_reference(x, w, eps),
                 "compile": lambda x, w: compiled(x, w, eps)}
        for name, fn in impls.items():
            err = ((fn(x, w).double() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"{name} {m}x{n}: rel err {err}"
        t = {name: median_us(fn, sets) for name, fn in impls.items()}
        gbs = 2 * m * n * 2 / t["cutile"] / 1e3
        best = min(t["eager"], t["compile"])
        line = (f"| {m} x {n} | {t['cutile']:.1f} | {t['eager']:.1f} | {t['compile']:.1f} | {gbs:.0f} | "
                f"{100 * gbs / peak:.0f}% | {best / t['cutile']:.2f}x |")
        rows.append(line)
        print(line, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# RMSNorm forward\n\n{head}\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
