"""The README's main job runs end to end on CPU and reports exact parity."""
import subprocess
import sys

import pytest

from devtools.build import ROOT, build


@pytest.fixture(scope="module")
def repo_build():
    """The demo serves the repo id from this checkout's build/: make it current."""
    build(ROOT / "build")


@pytest.mark.parametrize("family,kernels", [("qwen3", "norm,fused,rope"), ("gemma3", "norm,fused,rope"),
                                            ("mistral", "mlp")])
def test_demo_reports_parity(tmp_path, repo_build, family, kernels):
    out = subprocess.run([sys.executable, "-m", "devtools.demo", "--family", family, "--kernels", kernels,
                          "--cache", str(tmp_path / "ck"), "--out", str(tmp_path / "report")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "max |logits - plain| = 0.000e+00; greedy 16 tokens identical: True" in out.stdout
    assert "| decode ms/token |" in (tmp_path / "report" / "demo.md").read_text()


def test_demo_refuses_two_mlp_kernels():
    out = subprocess.run([sys.executable, "-m", "devtools.demo", "--kernels", "mlp,fused"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "choose one of mlp and fused" in out.stderr
