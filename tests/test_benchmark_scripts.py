"""The GPU benchmark scripts run end to end on CPU (--tiny): their tables have a row per configuration, and ours
runs our layers in training after enable_training. CPU times mean nothing; the checks are about what ran."""
import os
import subprocess
import sys

from devtools.build import ROOT


def run(script, *args, tmp_path):
    out = tmp_path / "table.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CUDA_HOME", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out.read_text(), proc.stdout


def test_train_step_tiny(tmp_path):
    table, log = run("train_step.py", "--family", "qwen3", tmp_path=tmp_path)
    for row in ("| plain transformers |", "| cuTile kernels: KernelConfig + train() |",
                "| cuTile kernels: + enable_training(model) |", "Liger"):
        assert row in table, row
    # without enable_training transformers' forwards run in train(); with it, ours
    assert "RMSNormMLP.forward" in log and "ApplyRotaryPosEmb.forward" in log
    assert "ours+train: |loss - plain| = 0.00e+00" in table


def test_compiled_decode_tiny(tmp_path):
    table, _ = run("compiled_decode.py", "--family", "llama", tmp_path=tmp_path)
    assert "| plain transformers |" in table and "| cuTile kernels (KernelConfig) |" in table
    assert "0 break(s)" in table and "compiled ours == compiled plain: True" in table
