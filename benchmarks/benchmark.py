"""Kernel Hub benchmark (kernels convention): `kernels benchmark ./ ` runs it against the local build/.

Each workload checks the kernel against the PyTorch reference (verify_*) and times it. The runner loads this
file on its own (not as part of the `benchmarks` package), so it imports nothing from here.
"""
import torch
from kernels.benchmark import Benchmark

# workload -> (rows, hidden): a decode batch, a prefill, Qwen3's q_norm (4096 tokens x 32 heads, head_dim 128)
WORKLOADS = {"decode": (16, 4096), "prefill": (8192, 4096), "qk_norm": (4096 * 32, 128)}


class RMSNormBenchmark(Benchmark):
    seed = 0

    def _make(self, rows: int, hidden: int):
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.x = torch.randn(rows, hidden, device=self.device, dtype=dtype)
        self.w = (1 + 0.1 * torch.randn(hidden, device=self.device)).to(dtype)

    def _run(self):
        self.out = self.kernel.rms_norm(self.x, self.w, 1e-6)

    def _reference(self):
        return self.kernel.rms_norm_reference(self.x, self.w, 1e-6)


for _name, _shape in WORKLOADS.items():  # setup_<workload>, benchmark_<workload>, verify_<workload>
    setattr(RMSNormBenchmark, f"setup_{_name}", lambda self, shape=_shape: self._make(*shape))
    setattr(RMSNormBenchmark, f"benchmark_{_name}", RMSNormBenchmark._run)
    setattr(RMSNormBenchmark, f"verify_{_name}", RMSNormBenchmark._reference)
