"""MLP variants of an 8B model (hidden 4096, intermediate 14336, bf16) at decode and prefill sizes.

    python benchmarks/mlp_variants.py [--out benchmarks/results/<gpu>/mlp_variants.md]

Separate vs merged gate/up GEMMs, torch vs cuTile gated activation, unfused vs fused RMSNorm -> MLP. Every
variant is checked against the plain transformers modules (float32 of the same bf16 weights) before timing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from devtools.build import ROOT  # noqa: E402
from devtools.timing import events_us, graph_us  # noqa: E402

ROWS = [1, 4, 16, 4096]


def main():
    import kernels
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ck = kernels.get_local_kernel(ROOT)
    mlp_mod = sys.modules[f"{ck.__name__}.mlp"]
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336)
    torch.manual_seed(0)
    dt = dict(device="cuda", dtype=torch.bfloat16)
    norm = LlamaRMSNorm(4096, eps=1e-5).to(**dt)
    mlp = LlamaMLP(cfg).to(**dt)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(4096))
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.normal_(0, 0.02)
    merged = mlp_mod.SwiGLUMLPLayout(cfg).to(**dt)
    fused = mlp_mod.RMSNormMLPLayout(norm, mlp).to(**dt)
    with torch.no_grad():
        for m in (merged, fused):
            m.gate_up_proj.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            m.down_proj.weight.copy_(mlp.down_proj.weight)
        fused.weight.copy_(norm.weight)
    variants = {
        "transformers MLP (2 GEMMs + torch act)": lambda x: mlp(x),
        "merged gate_up + torch act": lambda x: merged.forward(x),
        "merged gate_up + cuTile act (SwiGLUMLP)": lambda x: ck.layers.SwiGLUMLP.forward(merged, x),
        "transformers norm + MLP (unfused)": lambda x: mlp(norm(x)),
        "fused norm + MLP, cuTile (RMSNormMLP)": lambda x: ck.layers.RMSNormMLP.forward(fused, x),
    }
    gpu = torch.cuda.get_device_name()
    head = f"{gpu}, torch {torch.__version__}, bf16, hidden 4096, intermediate 14336; µs per call, median"
    lines = ["| variant | " + " | ".join(f"{r} rows (events / graph)" for r in ROWS) + " |",
             "|---|" + "---|" * len(ROWS)]
    print(head)
    with torch.no_grad():
        xs = {r: torch.randn(r, 4096, **dt) for r in ROWS}
        for name, fn in variants.items():
            cells = []
            for r in ROWS:
                x = xs[r]
                want = mlp(norm(x)) if "norm" in name else mlp(x)
                err = ((fn(x).float() - want.float()).norm() / want.float().norm()).item()
                assert err < 2e-2, f"{name} {r}: rel err {err}"
                cells.append(f"{events_us(lambda: fn(x)):.1f} / {graph_us(lambda: fn(x)):.1f}")
            line = f"| {name} | " + " | ".join(cells) + " |"
            lines.append(line)
            print(line, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# MLP variants\n\n{head}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
