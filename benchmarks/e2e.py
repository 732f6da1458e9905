"""End to end: plain transformers vs cuTile kernels (KernelConfig) vs Liger-Kernel, several families, one table.

    python -m benchmarks.e2e [--families llama,qwen3,mistral,gemma3] [--size 8b] [--layers 4] [--tokens 2048]
                             [--liger|--no-liger] [--out benchmarks/results/<gpu>/e2e.md]   (and e2e.png, e2e.json)

Each family is `python -m devtools.demo --json ...` in a fresh process: Liger patches transformers' modeling
modules process-wide and a kernel load leaves transformers state behind, so no family may see another's patches
(and each process starts with an empty GPU). --tiny: tiny checkpoints of 2 layers, the demo's CPU effort.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devtools.build import ROOT, build

from . import harness as h

COLUMNS = ["family", "plain prefill tok/s", "ours", "Liger", "plain decode ms/tok", "ours", "Liger",
           "speedup prefill (ours / Liger)", "speedup decode (ours / Liger)", "max logit diff (ours / Liger)",
           "greedy identical (ours / Liger)"]


def row(r: dict) -> list[str]:
    p, o, lg = r["plain"], r["ours"], r["liger"] or {}
    (po, do), (pl, dl) = h.speedups(r, "ours"), h.speedups(r, "liger")
    return [r["family"], f"{p['prefill_tok_s']:.0f}", f"{o['prefill_tok_s']:.0f}", h.fmt(lg.get("prefill_tok_s"), ".0f"),
            f"{p['decode_ms']:.3f}", f"{o['decode_ms']:.3f}", h.fmt(lg.get("decode_ms"), ".3f"),
            f"{po:.2f}x / {h.fmt(pl, '.2f', 'x')}", f"{do:.2f}x / {h.fmt(dl, '.2f', 'x')}",
            f"{o['max_logit_diff']:.2e} / {h.fmt(lg.get('max_logit_diff'), '.2e')}",
            f"{o['greedy_identical']} / {lg.get('greedy_identical', 'n/a')}"]


def report(results: list[dict], failed: list[str], args) -> str:
    r0 = results[0]
    n = r0["decode_tokens"]
    notes = [f"{r['family']}: Liger {r['liger_note']}" for r in results if r["liger_note"]]
    notes += [f"{r['family']}: kernel layers {h.layer_list(r['kernel_layers'])}, {r['compiles']} cuTile compiles "
              f"({r['compile_s']:.1f} s)" for r in results]
    for note in sorted({m for r in results for m in r["notes"]}):
        notes.append(f"{note} ({', '.join(r['family'] for r in results if note in r['notes'])})")
    notes += [f"{f}: FAILED (see the run's log)" for f in failed]
    return "\n".join([
        h.header(f"End to end: plain vs cuTile kernels vs Liger-Kernel ({r0['size']}-shaped, {r0['layers']} layers, "
                 "random weights)", args),
        f"{r0['dtype']}; {r0['tokens']}-token prefill (tokens/s of the median forward); decode ms/token = "
        f"(generate({n}) - generate(1)) / {n - 1}, medians. Ours: {', '.join(r0['kernels'])} "
        f"({'/'.join(sorted({r['kind'] for r in results}))}); Liger: RoPE, RMSNorm, SwiGLU/GEGLU, no loss kernels. "
        "Parity against plain: max |logits - plain| over the prompt, greedy 16-token generation.\n",
        *h.table(COLUMNS, [row(r) for r in results]), "", *(f"- {m}" for m in notes)]) + "\n"


def main(argv=None) -> None:
    def add(p):
        p.add_argument("--families", default="llama,qwen3,mistral,gemma3")
        p.add_argument("--size", choices=["tiny", "8b"], help="default: 8b on a GPU, tiny on CPU")
        p.add_argument("--layers", type=int, default=4)
        p.add_argument("--tokens", type=int, help="prompt length (default 2048 GPU, 64 CPU)")
        p.add_argument("--kernels", default="norm,fused,rope")
        p.add_argument("--liger", action=argparse.BooleanOptionalAction, default=None,
                       help="default: on with CUDA when liger_kernel imports")

    args = h.arguments("benchmarks.e2e", __doc__, argv, add=add, out="e2e.md", kernel_root=False)
    build(ROOT / "build")  # the demo serves the repo id from build/: make it this checkout
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    common = ["--layers", str(2 if args.tiny else args.layers), "--kernels", args.kernels, "--cache", str(args.cache)]
    common += ["--size", args.size or "tiny"] if args.size or args.tiny else []
    common += ["--tokens", str(args.tokens)] if args.tokens else []
    common += [] if args.liger is None else ["--liger" if args.liger else "--no-liger"]
    results, failed, t0 = [], [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        for i, family in enumerate(families, 1):
            print(f"[e2e {i}/{len(families)}] {family} ({time.perf_counter() - t0:.0f} s so far)", flush=True)
            out = Path(tmp) / f"{family}.json"
            run = subprocess.run([sys.executable, "-m", "devtools.demo", "--family", family, "--json", str(out),
                                  *common], cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            if run.returncode == 0 and out.exists():
                results.append(json.loads(out.read_text()))
            else:
                print(f"[e2e] {family} failed (exit code {run.returncode})", flush=True)
                failed.append(family)
    if not results:
        raise SystemExit("e2e: every family failed")
    h.write_report(args.out, report(results, failed, args))
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        h.plot_speedups(args.out.with_suffix(".png"), results)
    if failed:
        raise SystemExit(f"e2e: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
