"""The main job: build (and cache) a local checkpoint, load it plain, with cuTile kernels and with Liger-Kernel,
compare, time.

    python -m devtools.demo [--family llama|mistral|qwen2|qwen3|gemma3] [--size tiny|8b] [--layers N]
                            [--kernels norm,fused,rope] [--liger|--no-liger] [--out DIR] [--json FILE]

The kernel model loads the way a user loads it from the Hub, through
    from_pretrained(path, use_kernels=True, kernel_config=KernelConfig({...}))
with the repo id served from this checkout's build/ (LOCAL_KERNELS), inside the package's
transformers_state_guard. transformers refuses "cpu" in a KernelConfig; on CPU the demo lifts that one check
(the kernels then run their exact PyTorch reference) and says so.

--liger (default: on with CUDA when liger_kernel imports) also times a fresh plain instance patched by
Liger-Kernel's apply_liger_kernel_to_<family> (RoPE, RMSNorm, SwiGLU/GEGLU; no loss kernels).

Reports: parity (max |logits - plain|, greedy generation agreement), prefill tokens/s and decode ms/token,
as a table on stdout and, with --out, `demo.md` and `demo.png`; --json writes the numbers (benchmarks/e2e.py
collects them). `measure()` is the whole measurement, for callers in Python.
"""
from __future__ import annotations

import argparse
import json
import logging
import traceback
import warnings
from pathlib import Path

import torch

from .build import ROOT
from .checkpoints import ALL_FAMILIES, make_checkpoint
from .local_hub import local_hub
from .timing import median_ms

# 8B-model widths (Llama-3-8B-like), random weights; --layers sets the depth.
SIZE_8B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128)
KERNELS = ("norm", "mlp", "fused", "rope")
LIGER_NAME = dict(llama="llama", mistral="mistral", qwen2="qwen2", qwen3="qwen3", gemma3="gemma3_text")
# Timing effort: decode = (generate(n) - generate(1)) / (n - 1), each the median of `decode_reps` runs.
EFFORT = {"cuda": dict(prefill_reps=20, decode_reps=10, new_tokens=64),
          "cpu": dict(prefill_reps=5, decode_reps=3, new_tokens=32)}
GREEDY = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)


def kernel_mapping(family: str, kernels: list[str], repo: str) -> dict:
    """The README's recommended KernelConfig entries for `family`."""
    gemma = family == "gemma3"
    norm = "pre_feedforward_layernorm" if gemma else "post_attention_layernorm"
    entries = {
        "norm": {"^Gemma3RMSNorm$": f"{repo}:GemmaRMSNorm"} if gemma else {"RMSNorm": f"{repo}:RMSNorm"},
        "mlp": {} if gemma else {f"^{dict(llama='Llama', mistral='Mistral', qwen2='Qwen2', qwen3='Qwen3')[family]}"
                                 "MLP$": f"{repo}:SwiGLUMLP"},
        "fused": {(("RMSNorm", f"model.layers.*.{norm}"), ("MLP", "model.layers.*.mlp")):
                  f"{repo}:{'GemmaRMSNormMLP' if gemma else 'RMSNormMLP'}"},
        "rope": {"rotary_pos_emb": f"{repo}:ApplyRotaryPosEmb"},
    }
    if "mlp" in kernels and "fused" in kernels:
        raise SystemExit("demo: choose one of mlp and fused (both rewrite the MLP weights)")
    mapping = {}
    for k in kernels:
        mapping.update(entries[k])
    return mapping


def fallback_notes(caught) -> list[str]:
    """The kernels' one-time "running the PyTorch reference" warnings among recorded warnings."""
    return sorted({str(w.message) for w in caught if "running the PyTorch reference" in str(w.message)})


def emit(text: str, out: Path | None) -> None:
    """Print a benchmark's report and, with --out, write it there too."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"      wrote {out}")
    print(text)


def liger_importable() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # ImportError, or Triton failing to initialise
        return False
    return True


def apply_liger(family: str, model) -> None:
    """Liger-Kernel's own patch of a loaded model: RoPE, RMSNorm and the gated MLP; no loss kernels."""
    import liger_kernel.transformers as lt

    mlp = {"geglu": True} if family == "gemma3" else {"swiglu": True}
    getattr(lt, f"apply_liger_kernel_to_{LIGER_NAME[family]}")(
        model=model, rope=True, rms_norm=True, cross_entropy=False, fused_linear_cross_entropy=False, **mlp)


def timings(model, ids, device: str) -> dict:
    """Prefill tokens/s (median forward) and decode ms/token from generate(): (time(n) - time(1)) / (n - 1)."""
    from tqdm import tqdm

    effort = EFFORT[device]
    n = effort["new_tokens"]
    gen = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        prefill_ms = median_ms(lambda: model(ids), device=device, warmup=3, reps=effort["prefill_reps"])
        runs = {}
        for k in tqdm((1, n), desc="      decode", leave=False):
            runs[k] = median_ms(lambda: model.generate(ids, max_new_tokens=k, min_new_tokens=k, **gen),
                                device=device, warmup=2, reps=effort["decode_reps"])
    return {"prefill_tok_s": ids.numel() / prefill_ms * 1e3, "decode_ms": (runs[n] - runs[1]) / (n - 1)}


def parity(model, ids, want, want_tokens) -> dict:
    with torch.no_grad():
        diff = (model(ids).logits.float() - want).abs().max().item()
        same = torch.equal(model.generate(ids[:, :32], **GREEDY), want_tokens)
    return {"max_logit_diff": diff, "greedy_identical": same}


def versions(device: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("transformers", "kernels", "cuda-tile", "liger-kernel"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "not installed"
    return dict(found, torch=torch.__version__, cuda=torch.version.cuda or "none",
                gpu=torch.cuda.get_device_name() if device == "cuda" else "CPU")


def measure(family: str = "llama", *, size: str | None = None, layers: int = 2,
            kernels: tuple[str, ...] = ("norm", "fused", "rope"), tokens: int | None = None,
            liger: bool | None = None, cache: Path = ROOT / ".cache" / "checkpoints") -> dict:
    """Plain, cuTile kernels (KernelConfig) and, with `liger`, Liger-Kernel on one random checkpoint: parity
    against plain and timings. Returns plain JSON-able numbers (see `table`)."""
    from transformers import AutoModelForCausalLM, KernelConfig

    logging.getLogger("kernels").setLevel(logging.ERROR)  # "no mapping for SiLU" notes: expected, not news
    if unknown := set(kernels) - set(KERNELS):
        raise SystemExit(f"demo: unknown kernels {sorted(unknown)} (choose from {', '.join(KERNELS)})")
    kernel_mapping(family, list(kernels), "repo")  # refuses a bad choice before any work
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = size or ("8b" if device == "cuda" else "tiny")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    liger_note = ("skipped (--no-liger)" if liger is False else "no CUDA" if device != "cuda"
                  else "liger_kernel does not import" if not liger_importable() else "")
    liger = not liger_note if liger is None else liger
    shape = dict(SIZE_8B, num_hidden_layers=layers) if size == "8b" else {}
    tokens = tokens or (2048 if device == "cuda" else 64)
    name = f"{family}-{size}-{layers}l" if size == "8b" else f"{family}-tiny"
    path = make_checkpoint(family, cache / name, dtype=dtype, **shape)
    print(f"[1/6] checkpoint {path.name}: {family}, {size}, random weights, {device}, {dtype}", flush=True)
    placement = {"device_map": "cuda"} if device == "cuda" else {}  # device_map needs accelerate
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement)
    ids = torch.randint(0, plain.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    timed_ids = ids[:, : min(tokens, 512)] if device == "cpu" else ids
    with torch.no_grad():
        want = plain(ids).logits.float()  # before the kernel load: transformers shares the RoPE function
        want_tokens = plain.generate(ids[:, :32], **GREEDY)
    print("[2/6] plain: reference logits and timing", flush=True)
    result = dict(family=family, name=name, size=size, layers=plain.config.num_hidden_layers, tokens=tokens,
                  device=device, dtype=str(dtype).removeprefix("torch."), kernels=list(kernels),
                  decode_tokens=EFFORT[device]["new_tokens"], versions=versions(device),
                  plain=timings(plain, timed_ids, device))
    del plain

    import kernels as hub_kernels

    with local_hub(ROOT) as repo, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck = hub_kernels.get_kernel(repo, version=1)
        mapping = kernel_mapping(family, list(kernels), repo)
        with ck.transformers_state_guard():
            if device == "cpu":
                import transformers.utils.kernel_config as kc

                kc.KERNELS_SUPPORTED_DEVICE_TYPES.append("cpu")
                print("      (CPU: transformers refuses 'cpu' in a KernelConfig; the demo lifts that check)")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_kernels=True, **placement,
                                                         kernel_config=KernelConfig(mapping, inherit_mapping=False))
            ours = parity(model, ids, want, want_tokens)
            print(f"[3/6] kernels loaded through KernelConfig: {', '.join(str(k) for k in mapping)}\n"
                  f"      parity: max |logits - plain| = {ours['max_logit_diff']:.3e}; "
                  f"greedy 16 tokens identical: {ours['greedy_identical']}", flush=True)
            print("[4/6] kernels: timing (median; decode from generate)", flush=True)
            result["ours"] = dict(ours, **timings(model, timed_ids, device))
            del model
    notes = fallback_notes(caught)
    result.update(kind="cuTile" if device == "cuda" and not notes else "reference path", notes=notes)

    # Liger patches transformers' modeling modules process-wide (classes, apply_rotary_pos_emb): it goes LAST,
    # after plain and ours are measured, on a fresh plain instance.
    result["liger"], result["liger_note"] = None, liger_note
    if liger:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement)
            apply_liger(family, model)
            theirs = parity(model, ids, want, want_tokens)
            print(f"[5/6] Liger-Kernel {result['versions']['liger-kernel']} patched; parity: max |logits - plain| = "
                  f"{theirs['max_logit_diff']:.3e}; greedy 16 tokens identical: {theirs['greedy_identical']}; "
                  "timing", flush=True)
            result["liger"], result["liger_note"] = dict(theirs, **timings(model, timed_ids, device)), ""
        except Exception as e:  # report it and keep the plain/kernels results
            traceback.print_exc()
            result["liger_note"] = f"failed: {type(e).__name__}: {e}"[:300]
    if not result["liger"]:
        print(f"[5/6] Liger: {result['liger_note']}", flush=True)
    return result


def speedups(result: dict, who: str) -> tuple[float | None, float | None]:
    """(prefill, decode) speedup of `who` ("ours" or "liger") over plain; None where not measured."""
    r, p = result.get(who), result["plain"]
    if not r:
        return None, None
    return r["prefill_tok_s"] / p["prefill_tok_s"], p["decode_ms"] / r["decode_ms"]


def fmt(x, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def table(result: dict) -> list[str]:
    """The demo's markdown table: plain | kernels | speedup | Liger | Liger speedup, then the parity lines."""
    p, o, lg = result["plain"], result["ours"], result["liger"] or {}
    head = (f"| {result['name']} ({result['versions']['gpu']}, {result['tokens']} tokens) | plain "
            f"| kernels ({result['kind']}) | speedup | Liger | Liger speedup |")
    lines = [head, "|---|---|---|---|---|---|"]
    for i, (label, key, spec) in enumerate([("prefill tokens/s", "prefill_tok_s", ".0f"),
                                            ("decode ms/token", "decode_ms", ".3f")]):
        lines.append(f"| {label} | {p[key]:{spec}} | {o[key]:{spec}} | {speedups(result, 'ours')[i]:.2f}x "
                     f"| {fmt(lg.get(key), spec)} | {fmt(speedups(result, 'liger')[i], '.2f', 'x')} |")
    lines.append("")
    for who, r in (("kernels", o), ("Liger", lg)):
        lines.append(f"{who}: max |logits - plain| = {r['max_logit_diff']:.3e}; greedy tokens identical: "
                     f"{r['greedy_identical']}" if r else f"{who}: n/a ({result['liger_note']})")
    return lines


def plot_speedups(path: Path, results: list[dict]) -> bool:
    """Grouped bars of speedup vs plain (kernels, Liger) per result, prefill and decode side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("      (matplotlib not installed: no plot)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.0 * len(results), 2.8), dpi=80, sharey=True)
    x = range(len(results))
    series = [s for s in (("ours", "cuTile kernels", "#4c72b0"), ("liger", "Liger", "#dd8452"))
              if any(r.get(s[0]) for r in results)]
    w = 0.76 / len(series)
    for i, (ax, title) in enumerate(zip(axes, ("prefill", "decode"))):
        for j, (who, label, color) in enumerate(series):
            vals = [speedups(r, who)[i] for r in results]
            at = [k + (j + 0.5 - len(series) / 2) * w for k in x]
            bars = ax.bar(at, [v or float("nan") for v in vals], width=w, color=color, label=None if i else label)
            ax.bar_label(bars, labels=[fmt(v, ".2f") if v else "" for v in vals], fontsize=6, padding=1)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(list(x), [r["family"] for r in results], fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("speedup vs plain")
    axes[0].set_ylim(0, 1.15 * max(v for r in results for s in series for v in speedups(r, s[0]) if v))
    fig.legend(loc="upper center", ncols=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description="cuTile kernels through the Kernel Hub: parity and speed")
    parser.add_argument("--family", choices=ALL_FAMILIES, default="llama")
    parser.add_argument("--size", choices=["tiny", "8b"], help="default: 8b on a GPU, tiny on CPU")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--kernels", default="norm,fused,rope", help=f"comma list of {', '.join(KERNELS)}")
    parser.add_argument("--tokens", type=int, default=None, help="prompt length (default 2048 GPU, 64 CPU)")
    parser.add_argument("--liger", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure Liger-Kernel (default: on with CUDA when liger_kernel imports)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "checkpoints")
    parser.add_argument("--out", type=Path, help="write demo.md and demo.png here")
    parser.add_argument("--json", type=Path, help="write the measured numbers here")
    args = parser.parse_args()
    result = measure(args.family, size=args.size, layers=args.layers, tokens=args.tokens, liger=args.liger,
                     kernels=tuple(k.strip() for k in args.kernels.split(",") if k.strip()), cache=args.cache)
    lines = table(result)
    print("[6/6] results\n" + "\n".join(lines))
    for note in result["notes"]:
        print(f"      note: {note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "demo.md").write_text("\n".join(lines) + "\n")
        plotted = plot_speedups(args.out / "demo.png", [result])
        print(f"      wrote {args.out / 'demo.md'}" + (f" and {args.out / 'demo.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
