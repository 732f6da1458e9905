"""The main job: build (and cache) a local checkpoint, load it plain and with cuTile kernels, compare, time.

    python -m devtools.demo [--family llama|mistral|qwen2|qwen3|gemma3] [--size tiny|8b] [--layers N]
                            [--kernels norm,fused,rope] [--out DIR]

The kernel model loads the way a user loads it from the Hub, through
    from_pretrained(path, use_kernels=True, kernel_config=KernelConfig({...}))
with the repo id served from this checkout's build/ (LOCAL_KERNELS), inside the package's
transformers_state_guard. transformers refuses "cpu" in a KernelConfig; on CPU the demo lifts that one check
(the kernels then run their exact PyTorch reference) and says so.

Reports: parity (max |logits - plain|, greedy generation agreement), prefill tokens/s and decode ms/token,
as a table on stdout and, with --out, `demo.md` and `demo.png`.
"""
from __future__ import annotations

import argparse
import logging
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


def timings(model, ids, device: str, new_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode ms/token) — decode from generate(): (time(n) - time(1)) / (n - 1)."""
    from tqdm import tqdm

    gen = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        prefill_ms = median_ms(lambda: model(ids), device=device, warmup=2, reps=5)
        runs = {}
        for n in tqdm((1, new_tokens), desc="      decode", leave=False):
            runs[n] = median_ms(lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen),
                                device=device, warmup=1, reps=3)
    return ids.numel() / prefill_ms * 1e3, (runs[new_tokens] - runs[1]) / (new_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description="cuTile kernels through the Kernel Hub: parity and speed")
    parser.add_argument("--family", choices=ALL_FAMILIES, default="llama")
    parser.add_argument("--size", choices=["tiny", "8b"], help="default: 8b on a GPU, tiny on CPU")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--kernels", default="norm,fused,rope", help=f"comma list of {', '.join(KERNELS)}")
    parser.add_argument("--tokens", type=int, default=None, help="prompt length (default 2048 GPU, 64 CPU)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "checkpoints")
    parser.add_argument("--out", type=Path, help="write demo.md and demo.png here")
    args = parser.parse_args()
    logging.getLogger("kernels").setLevel(logging.ERROR)  # "no mapping for SiLU" notes: expected, not news
    from transformers import AutoModelForCausalLM, KernelConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size or ("8b" if device == "cuda" else "tiny")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kernels_used = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if unknown := set(kernels_used) - set(KERNELS):
        raise SystemExit(f"demo: unknown kernels {sorted(unknown)} (choose from {', '.join(KERNELS)})")
    shape = dict(SIZE_8B, num_hidden_layers=args.layers) if size == "8b" else {}
    tokens = args.tokens or (2048 if device == "cuda" else 64)

    name = f"{args.family}-{size}-{args.layers}l" if size == "8b" else f"{args.family}-tiny"
    path = make_checkpoint(args.family, args.cache / name, dtype=dtype, **shape)
    print(f"[1/5] checkpoint {path.name}: {args.family}, {size}, random weights, {device}, {dtype}")
    placement = {"device_map": "cuda"} if device == "cuda" else {}  # device_map needs accelerate
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement)
    ids = torch.randint(0, plain.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    with torch.no_grad():
        want = plain(ids).logits.float()  # before the kernel load: transformers shares the RoPE function
        want_tokens = plain.generate(ids[:, :32], max_new_tokens=16, do_sample=False, pad_token_id=0)
    plain_speed = timings(plain, ids[:, : min(tokens, 512)] if device == "cpu" else ids, device, 32)

    import kernels

    with local_hub(ROOT) as repo, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck = kernels.get_kernel(repo, version=1)
        mapping = kernel_mapping(args.family, kernels_used, repo)
        with ck.transformers_state_guard():
            if device == "cpu":
                import transformers.utils.kernel_config as kc

                kc.KERNELS_SUPPORTED_DEVICE_TYPES.append("cpu")
                print("      (CPU: transformers refuses 'cpu' in a KernelConfig; the demo lifts that check)")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_kernels=True, **placement,
                                                         kernel_config=KernelConfig(mapping, inherit_mapping=False))
            print(f"[2/5] loaded through KernelConfig: {', '.join(str(k) for k in mapping)}")
            with torch.no_grad():
                diff = (model(ids).logits.float() - want).abs().max().item()
                same = torch.equal(model.generate(ids[:, :32], max_new_tokens=16, do_sample=False, pad_token_id=0),
                                   want_tokens)
            print(f"[3/5] parity: max |logits - plain| = {diff:.3e}; greedy 16 tokens identical: {same}")
            print("[4/5] timing (median; decode from generate)")
            kernel_speed = timings(model, ids[:, : min(tokens, 512)] if device == "cpu" else ids, device, 32)
    notes = sorted({str(w.message) for w in caught if "running the PyTorch reference" in str(w.message)})
    kind = "cuTile" if device == "cuda" and not notes else "reference path"
    rows = [("prefill tokens/s", plain_speed[0], kernel_speed[0], kernel_speed[0] / plain_speed[0]),
            ("decode ms/token", plain_speed[1], kernel_speed[1], plain_speed[1] / kernel_speed[1])]
    table = [f"| {name} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, {tokens} tokens) "
             f"| plain | kernels ({kind}) | speedup |", "|---|---|---|---|"]
    table += [f"| {label} | {a:.1f} | {b:.1f} | {s:.2f}x |" for label, a, b, s in rows]
    print("[5/5] results\n" + "\n".join(table))
    for note in notes:
        print(f"      note: {note}")
    if args.out:
        write_report(args.out, table, rows, diff, same)


def write_report(out: Path, table: list[str], rows, diff: float, same: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.md").write_text("\n".join(table) + f"\n\nmax |logits - plain| = {diff:.3e}; "
                                 f"greedy tokens identical: {same}\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("      (matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(4, 2.6), dpi=80)
    ax.bar([r[0] for r in rows], [r[3] for r in rows], color=["#4c72b0", "#dd8452"])
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("speedup vs plain")
    fig.tight_layout()
    fig.savefig(out / "demo.png")
    print(f"      wrote {out / 'demo.md'} and {out / 'demo.png'}")


if __name__ == "__main__":
    main()
