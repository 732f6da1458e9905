"""Host time per call of a decode-sized RMSNorm (16 x 4096, bf16): where does the time of one call go?

    python benchmarks/host_overhead.py

Times 2000 back-to-back calls from Python (perf_counter, one synchronize at the end) for each layer of the
call path, so the difference between lines is the cost that layer adds.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from devtools.build import ROOT  # noqa: E402


def per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main():
    import cuda.tile as ct
    import kernels

    ck = kernels.get_local_kernel(ROOT)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    ck.rms_norm_cutile(x, w, 1e-6)  # imports tile/ and compiles
    tile = sys.modules[f"{ck.__name__}.tile.rms_norm"]
    out = torch.empty_like(x)
    stream = torch.cuda.current_stream()
    args = (x, w, out, 4096, 1e-6, False, 1, 4096)
    with torch.no_grad():
        rows = {
            "ct.launch, prebuilt args": lambda: ct.launch(stream, (16,), tile.rms_norm_fwd, args),
            "ct.launch, current_stream() each call": lambda: ct.launch(torch.cuda.current_stream(), (16,),
                                                                        tile.rms_norm_fwd, args),
            "ct.launch, raw current stream each call": lambda: ct.launch(torch._C._cuda_getCurrentRawStream(0),
                                                                          (16,), tile.rms_norm_fwd, args),
            "ct.launch, new out each call": lambda: ct.launch(stream, (16,), tile.rms_norm_fwd,
                                                               (x, w, torch.empty_like(x), 4096, 1e-6, False, 1, 4096)),
            "rms_norm_cutile (launcher)": lambda: ck.rms_norm_cutile(x, w, 1e-6),
            "rms_norm (checks + launcher)": lambda: ck.rms_norm(x, w, 1e-6),
            "torch eager reference": lambda: ck.rms_norm_reference(x, w, 1e-6),
            "torch.empty_like only": lambda: torch.empty_like(x),
        }
        print(f"{torch.cuda.get_device_name()}, 16 x 4096 bf16, host µs per call over 2000 calls")
        for name, fn in rows.items():
            print(f"{per_call_us(fn):8.1f}  {name}", flush=True)
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2000):
            ck.rms_norm_cutile(x, w, 1e-6)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
