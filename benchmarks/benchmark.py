"""Kernel Hub benchmark (kernels convention): `kernels benchmark ./ ` runs it against the local build/.

Each workload checks the kernel against the PyTorch reference (verify_*) and times it.
"""
import torch
from kernels.benchmark import Benchmark


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

    def setup_decode(self):
        self._make(16, 4096)

    def benchmark_decode(self):
        self._run()

    def verify_decode(self):
        return self._reference()

    def setup_prefill(self):
        self._make(8192, 4096)

    def benchmark_prefill(self):
        self._run()

    def verify_prefill(self):
        return self._reference()

    def setup_qk_norm(self):
        self._make(4096 * 32, 128)  # Qwen3 q_norm: 4096 tokens x 32 heads, head_dim 128

    def benchmark_qk_norm(self):
        self._run()

    def verify_qk_norm(self):
        return self._reference()
