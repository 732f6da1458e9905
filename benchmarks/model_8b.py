"""An 8B-shaped Llama (2 layers, random weights, bf16) with every kernel: how many cuTile compiles loading
and running it triggers, the cold compile time, and prefill / decode time against the plain model.

    python benchmarks/model_8b.py [--layers 2] [--out benchmarks/results/<gpu>/model_8b.md]

Compiles are counted by wrapping cuda.tile's JIT entry point; the disk cache is turned off
(CUDA_TILE_CACHE_DIR=off) so every count is a cold compile.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["CUDA_TILE_CACHE_DIR"] = "off"
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from devtools.build import ROOT  # noqa: E402
from devtools.checkpoints import make_checkpoint  # noqa: E402
from devtools.local_hub import local_hub  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128)


def main():
    import cuda.tile._compile as tile_compile
    from transformers import AutoModelForCausalLM, KernelConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    compiles = []
    original = tile_compile.compile_tile

    def counted(*a, **kw):
        t0 = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            compiles.append(time.perf_counter() - t0)

    tile_compile.compile_tile = counted
    path = make_checkpoint("llama", Path(tempfile.gettempdir()) / f"llama-8b-{args.layers}l",
                           num_hidden_layers=args.layers, dtype=torch.bfloat16, **SHAPE)
    kw = dict(dtype=torch.bfloat16, device_map="cuda")
    plain = AutoModelForCausalLM.from_pretrained(path, **kw)
    with local_hub(ROOT) as hub:
        mapping = {"RMSNorm": f"{hub}:RMSNorm", "rotary_pos_emb": f"{hub}:ApplyRotaryPosEmb",
                   (("RMSNorm", "model.layers.*.post_attention_layernorm"), ("MLP", "model.layers.*.mlp")):
                       f"{hub}:RMSNormMLP"}
        model = AutoModelForCausalLM.from_pretrained(path, use_kernels=True,
                                                     kernel_config=KernelConfig(mapping, inherit_mapping=False), **kw)
        lines = [f"# 8B-shaped Llama, {args.layers} layers, bf16, sdpa\n",
                 f"{torch.cuda.get_device_name()}, torch {torch.__version__}; kernels: RMSNorm, "
                 "RMSNormMLP (fused post-attention norm + merged gate_up MLP), ApplyRotaryPosEmb\n"]
        after_load = len(compiles)
        with torch.no_grad():
            for n in (7, 100, 2048, 333):
                ids = torch.randint(0, 32000, (1, n), device="cuda")
                t0 = time.perf_counter()
                model(ids)
                torch.cuda.synchronize()
                lines.append(f"- first prefill of {n} tokens: {len(compiles)} compiles so far, "
                             f"{time.perf_counter() - t0:.2f} s")
            gen = dict(max_new_tokens=32, do_sample=False, pad_token_id=0)
            ids = torch.randint(0, 32000, (1, 64), device="cuda")
            same = torch.equal(model.generate(ids, **gen), plain.generate(ids, **gen))
            lines.append(f"- after 32 decode steps: {len(compiles)} compiles in all ({after_load} while loading), "
                         f"cold compile time {sum(compiles):.1f} s total, median {statistics.median(compiles):.2f} s; "
                         f"greedy tokens identical to plain: {same}\n")

            def timed(fn, reps=10):
                fn()
                torch.cuda.synchronize()
                ts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    ts.append((time.perf_counter() - t0) * 1e3)
                return statistics.median(ts)

            prefill = torch.randint(0, 32000, (1, 2048), device="cuda")
            lines.append("| | plain ms | kernels ms | speedup |\n|---|---|---|---|")
            for label, fn_plain, fn_kernel in (
                    ("prefill 1x2048", lambda: plain(prefill), lambda: model(prefill)),
                    ("generate 64 tokens (ms/token)", lambda: plain.generate(ids, max_new_tokens=64, min_new_tokens=64,
                                                                             do_sample=False, pad_token_id=0),
                     lambda: model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                            pad_token_id=0))):
                reps = 5 if "generate" in label else 10
                a, b = timed(fn_plain, reps), timed(fn_kernel, reps)
                div = 64 if "generate" in label else 1
                lines.append(f"| {label} | {a / div:.2f} | {b / div:.2f} | {a / b:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
