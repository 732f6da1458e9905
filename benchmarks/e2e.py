"""End to end: plain transformers vs cuTile kernels (KernelConfig) vs Liger-Kernel, several families, one
combined table and one plot.

    python benchmarks/e2e.py --out benchmarks/results/<gpu>/e2e [--families llama,qwen3,mistral,gemma3]
                             [--size 8b] [--layers 4] [--tokens 2048] [--liger|--no-liger]

Writes `<out>.md` (versions line, one row per family), `<out>.png` (speedup vs plain) and `<out>.json` (the
raw numbers). Each family is `python -m devtools.demo --json ...` in a fresh process: Liger patches
transformers' modeling modules process-wide and a kernel load leaves transformers state behind, so no family
may see another's patches (and each process starts with an empty GPU).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from devtools.build import ROOT, build  # noqa: E402
from devtools.demo import fmt, plot_speedups, speedups  # noqa: E402

COLUMNS = ["family", "plain prefill tok/s", "ours", "Liger", "plain decode ms/tok", "ours", "Liger",
           "speedup prefill (ours / Liger)", "speedup decode (ours / Liger)", "max logit diff (ours / Liger)",
           "greedy identical (ours / Liger)"]


def row(r: dict) -> str:
    p, o, lg = r["plain"], r["ours"], r["liger"] or {}
    (po, do), (pl, dl) = speedups(r, "ours"), speedups(r, "liger")
    cells = [r["family"], f"{p['prefill_tok_s']:.0f}", f"{o['prefill_tok_s']:.0f}",
             fmt(lg.get("prefill_tok_s"), ".0f"),
             f"{p['decode_ms']:.3f}", f"{o['decode_ms']:.3f}", fmt(lg.get("decode_ms"), ".3f"),
             f"{po:.2f}x / {fmt(pl, '.2f', 'x')}", f"{do:.2f}x / {fmt(dl, '.2f', 'x')}",
             f"{o['max_logit_diff']:.2e} / {fmt(lg.get('max_logit_diff'), '.2e')}",
             f"{o['greedy_identical']} / {lg.get('greedy_identical', 'n/a')}"]
    return "| " + " | ".join(cells) + " |"


def report(results: list[dict], failed: list[str]) -> list[str]:
    r0, v = results[0], results[0]["versions"]
    n = r0["decode_tokens"]
    kinds = "/".join(sorted({r["kind"] for r in results}))
    lines = [f"# End to end: plain vs cuTile kernels vs Liger-Kernel ({r0['size']}-shaped, {r0['layers']} layers, "
             "random weights)\n",
             f"{v['gpu']}; torch {v['torch']} (CUDA {v['cuda']}), transformers {v['transformers']}, "
             f"kernels {v['kernels']}, cuda.tile {v['cuda-tile']}, liger-kernel {v['liger-kernel']}\n",
             f"{r0['dtype']}; {r0['tokens']}-token prefill (tokens/s of the median forward); decode ms/token = "
             f"(generate({n}) - generate(1)) / {n - 1}, medians. Ours: {', '.join(r0['kernels'])} ({kinds}); "
             "Liger: RoPE, RMSNorm, SwiGLU/GEGLU, no loss kernels. Parity against plain: max |logits - plain| "
             "over the prompt, greedy 16-token generation.\n",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [row(r) for r in results]
    notes = [f"{r['family']}: Liger {r['liger_note']}" for r in results if r["liger_note"]]
    for note in sorted({n for r in results for n in r["notes"]}):
        notes.append(f"{note} ({', '.join(r['family'] for r in results if note in r['notes'])})")
    notes += [f"{f}: FAILED (see the run's log)" for f in failed]
    return lines + ([""] + [f"- {n}" for n in notes] if notes else [])


def main() -> None:
    parser = argparse.ArgumentParser(description="plain vs cuTile kernels vs Liger-Kernel, several families")
    parser.add_argument("--out", type=Path, required=True, help="path stem: writes <out>.md, .png and .json")
    parser.add_argument("--families", default="llama,qwen3,mistral,gemma3")
    parser.add_argument("--size", choices=["tiny", "8b"], help="default: 8b on a GPU, tiny on CPU")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, help="prompt length (default 2048 GPU, 64 CPU)")
    parser.add_argument("--kernels", default="norm,fused,rope")
    parser.add_argument("--liger", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on with CUDA when liger_kernel imports")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "checkpoints")
    args = parser.parse_args()
    build(ROOT / "build")  # the demo serves the repo id from build/: make it this checkout
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    common = ["--layers", str(args.layers), "--kernels", args.kernels, "--cache", str(args.cache)]
    common += ["--size", args.size] if args.size else []
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stem = args.out.with_suffix("") if args.out.suffix in (".md", ".png", ".json") else args.out
    lines = report(results, failed)
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    Path(f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_speedups(Path(f"{stem}.png"), results)
    print("\n".join(lines) + f"\n[e2e] wrote {stem}.md/.png/.json in {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        raise SystemExit(f"e2e: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
