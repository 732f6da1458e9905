"""The README's main job runs end to end on CPU and reports exact parity; it refuses to report a speedup when the
selected kernels replace nothing; its report and the end-to-end benchmark (benchmarks/e2e.py) have the expected
rows and columns."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from devtools import demo
from devtools.build import ROOT, build


@pytest.fixture(scope="module")
def repo_build():
    """The demo serves the repo id from this checkout's build/: make it current."""
    build(ROOT / "build")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small CPU machines run other jobs beside the tests
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.mark.parametrize("family,kernels,layers", [
    ("qwen3", "norm,fused,rope", {"RMSNorm": 7, "RMSNormMLP": 2, "ApplyRotaryPosEmb": 1}),  # q_norm/k_norm too
    ("gemma3", "norm,fused,rope", {"GemmaRMSNorm": 11, "GemmaRMSNormMLP": 2, "ApplyRotaryPosEmb": 1}),
    ("mistral", "mlp", {"SwiGLUMLP": 2}),
    # decoder: fused becomes the merged MLP (add_rms_norm is the norm before it); the norms keep their kernel
    ("llama", "norm,fused,rope,decoder", {"DecoderLayer": 2, "RMSNorm": 5, "SwiGLUMLP": 2, "ApplyRotaryPosEmb": 1}),
    # qkv: one q/k/v GEMM per layer; Qwen3's q_norm/k_norm and RoPE inside it as qk_norm_rope (the modules stay)
    ("qwen3", "norm,fused,rope,decoder,qkv", {"DecoderLayer": 2, "QKVAttention": 2, "RMSNorm": 9, "SwiGLUMLP": 2,
                                              "ApplyRotaryPosEmb": 1})])
def test_demo_reports_parity(tmp_path, capsys, repo_build, cache, family, kernels, layers):
    demo.main(["--family", family, "--kernels", kernels, "--no-liger", "--cache", str(cache),
               "--out", str(tmp_path / "report"), "--json", str(tmp_path / "r.json")])
    assert "max |logits - plain| = 0.000e+00; greedy 16 tokens identical: True" in capsys.readouterr().out
    md = (tmp_path / "report" / "demo.md").read_text().splitlines()
    assert md[0].endswith("| plain | kernels (reference path) | speedup | Liger | Liger speedup |")
    for label in ("prefill tokens/s", "decode ms/token"):
        cells = next(line for line in md if line.startswith(f"| {label} |")).strip("|").split("|")
        assert len(cells) == 6 and [c.strip() for c in cells[4:]] == ["n/a", "n/a"]
    assert "Liger: n/a (skipped (--no-liger))" in md
    assert (tmp_path / "report" / "demo.png").stat().st_size < 60_000
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["family"] == family and result["liger"] is None and result["kernel_layers"] == layers
    assert result["ours"]["max_logit_diff"] == 0.0 and result["ours"]["greedy_identical"] is True
    # CPU timings are noise (a busy machine can even make decode negative): only check that they are numbers
    assert all(math.isfinite(result[who][k]) for who in ("plain", "ours") for k in ("prefill_tok_s", "decode_ms"))


def test_demo_refuses_two_mlp_kernels():
    with pytest.raises(SystemExit, match="choose one of mlp and fused"):
        demo.main(["--kernels", "mlp,fused"])


@pytest.mark.parametrize("family,kernels,message", [
    ("llama", (), "no kernel applied for an empty selection: the selected kernels replace nothing in this llama"),
    ("gemma3", ("mlp",), "--kernels mlp: .*Gemma3"),  # Gemma3 has no merged MLP kernel: nothing to swap in
])
def test_demo_refuses_when_no_kernel_applies(repo_build, cache, family, kernels, message):
    """A selection that replaces nothing would time the plain model twice and call the ratio a speedup."""
    with pytest.raises(SystemExit, match=message):
        demo.measure(family, kernels=kernels, liger=False, cache=cache)


def test_e2e_combined_table(tmp_path, cache):
    """One tiny family through benchmarks.e2e (its own demo subprocess): one table, one plot, the numbers."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.e2e", "--tiny", "--families", "llama", "--no-liger",
                          "--cache", str(cache), "--out", str(tmp_path / "res" / "e2e.md")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[e2e 1/1] llama" in out.stdout and "[3/6]" in out.stdout
    md = (tmp_path / "res" / "e2e.md").read_text()
    assert "torch 2." in md and "transformers 5." in md and "cuda.tile" in md and "liger-kernel" in md
    assert "`python -m benchmarks.e2e --tiny --families llama" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0].startswith("| family | plain prefill tok/s | ours | Liger | plain decode ms/tok | ours | Liger |")
    assert len(table) == 3 and table[2].startswith("| llama |")
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert len(cells) == len(table[0].strip("|").split("|")) == 11
    assert cells[3] == cells[6] == "n/a" and cells[9] == "0.00e+00 / n/a" and cells[10] == "True / n/a"
    assert "- llama: kernel layers ApplyRotaryPosEmb x1, RMSNorm x3, RMSNormMLP x2, 0 cuTile compiles" in md
    assert (tmp_path / "res" / "e2e.png").stat().st_size < 60_000
    assert json.loads((tmp_path / "res" / "e2e.json").read_text())[0]["family"] == "llama"
