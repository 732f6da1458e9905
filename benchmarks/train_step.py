"""One training step (forward + loss.backward(), no optimizer) of an 8B-shaped model: plain transformers, our
cuTile kernels (KernelConfig, then model.train()) and Liger-Kernel's patching, in one run.

    python benchmarks/train_step.py [--family llama|qwen3|mistral|gemma3] [--layers 4] [--out train_step.md]
    python benchmarks/train_step.py --tiny          # CPU check: tiny config, 64 tokens, few steps

Widths of devtools.demo.SIZE_8B, random weights, bf16, batch 1 x 2048 tokens, labels = input ids. A step is
zero_grad(set_to_none) + forward + backward; there is no optimizer, so the weights (and the loss) are the same
every step and the gradients can be compared. Per config: median step time (CUDA events, 3 warm-up, 10 reps),
peak memory of one step (max_memory_allocated after reset_peak_memory_stats, weights included, one model on the
GPU at a time), the loss, and the largest relative L2 error of a few gradients against plain. Liger patches
transformers process-wide, so it runs last. --kernel-root: a directory with build/ (default: this checkout).

Ours runs twice. transformers 5.22 registers a KernelConfig's repos for Mode.INFERENCE only (the model is in eval
at load), and kernels does not fall back from TRAINING to INFERENCE, so after model.train() every layer runs
transformers' own forward whatever the layers declare. The second row first calls the package's
enable_training(model), which registers them as Mode.FALLBACK: kernels then
keeps a layer in training when it declares has_backward = True. Each row reports the forwards that layer 0 runs
and the "running the PyTorch reference" warnings (each op warns once per process and reason).
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import logging
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from devtools.build import ROOT  # noqa: E402
from devtools.checkpoints import make_checkpoint  # noqa: E402
from devtools.demo import LIGER_NAME, SIZE_8B, apply_liger, emit, fallback_notes, kernel_mapping  # noqa: E402
from devtools.local_hub import local_hub  # noqa: E402
from devtools.timing import median_ms  # noqa: E402

BOUND = 3e-2  # relative L2 error of a bf16 gradient against plain


def watched(model, family: str) -> dict:
    """A few gradients to compare, found by name (our fused MLP moves down_proj into the norm's slot)."""
    params, last = dict(model.named_parameters()), model.config.num_hidden_layers - 1
    norm = "pre_feedforward_layernorm" if family == "gemma3" else "post_attention_layernorm"
    down = next(n for n in params if n.startswith("model.layers.0.") and n.endswith("down_proj.weight"))
    names = {"embed_tokens": "model.embed_tokens.weight", "layers.0.input_layernorm":
             "model.layers.0.input_layernorm.weight", f"layers.0.{norm}": f"model.layers.0.{norm}.weight",
             "layers.0 down_proj": down, f"layers.{last}.q_proj": f"model.layers.{last}.self_attn.q_proj.weight",
             "final norm": "model.norm.weight"}
    return {label: params[name] for label, name in names.items()}


def measure(model, ids, args, device: str) -> dict:
    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss

    ms = median_ms(step, device=device, warmup=args.warmup, reps=args.reps)
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loss = step().item()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    grads = {k: p.grad.detach().float().cpu() for k, p in watched(model, args.family).items()}
    return dict(ms=ms, peak=peak, loss=loss, grads=grads)


def forwards(model) -> str:
    """Which forward each patched module of layer 0 runs after model.train() (kernels sets instance forwards)."""
    seen = {}
    for m in model.model.layers[0].modules():
        for name, f in getattr(m, "_kernel_funcs", {}).items():  # functions (RoPE), kernels' use_kernelized_func
            qual = getattr(f.forward, "__func__", f.forward).__qualname__
            seen[name] = "transformers' function" if qual.endswith("Func.forward") else qual
        fn = getattr(m.forward, "__func__", m.forward)
        if "forward" in m.__dict__ or "cutile" in (fn.__module__ or ""):
            seen[type(m).__name__] = fn.__qualname__
    return ", ".join(f"{k} -> {v}" for k, v in seen.items()) or "(none patched)"


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()  # a no-op without CUDA


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=["llama", "qwen3", "mistral", "gemma3"], default="llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--tiny", action="store_true", help="tiny config, 64 tokens, 2 warm-up, 5 reps (CPU check)")
    p.add_argument("--kernel-root", type=Path, default=ROOT, help="a directory with build/")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "checkpoints")
    p.add_argument("--out", type=Path, help="write the markdown table here")
    args = p.parse_args()
    args.warmup, args.reps = (2, 5) if args.tiny else (3, 10)
    tokens = 64 if args.tiny else args.tokens
    logging.getLogger("kernels").setLevel(logging.ERROR)
    from transformers import AutoModelForCausalLM, KernelConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, size = torch.bfloat16, ("tiny" if args.tiny else "8b")
    shape = {} if args.tiny else SIZE_8B
    path = make_checkpoint(args.family, args.cache / f"{args.family}-{size}-{args.layers}l", dtype=dtype,
                           num_hidden_layers=args.layers, **shape)
    placement = {"device_map": "cuda"} if device == "cuda" else {}
    ids = torch.randint(0, 256 if args.tiny else SIZE_8B["vocab_size"], (1, tokens),
                        generator=torch.Generator().manual_seed(0)).to(device)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    title = (f"{args.family}, {size} widths, {args.layers} layers, 1x{tokens} tokens, bf16, {gpu}, "
             f"torch {torch.__version__}; step = forward + loss.backward() (no optimizer)"
             + ("; CPU check only, times not meaningful" if device == "cpu" else ""))
    print(f"[1/5] plain transformers: {title}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement).train()
    results = {"plain": measure(model, ids, args, device)}
    del model
    free()

    import kernels

    with local_hub(args.kernel_root) as repo:
        ck = kernels.get_kernel(repo, version=1)
        mapping = kernel_mapping(args.family, ["norm", "fused", "rope"], repo)
        if device == "cpu":  # transformers refuses "cpu" in a KernelConfig; lift that one check on CPU
            import transformers.utils.kernel_config as kc

            kc.KERNELS_SUPPORTED_DEVICE_TYPES.append("cpu")
        for step, name in ((2, "ours"), (3, "ours+train")):
            print(f"[{step}/5] our kernels through KernelConfig, "
                  + ("enable_training(model), " if name == "ours+train" else "") + "then model.train()")
            with ck.transformers_state_guard(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_kernels=True, **placement,
                                                             kernel_config=KernelConfig(mapping, inherit_mapping=False))
                if name == "ours+train":
                    ck.enable_training(model)
                model.train()
                results[name] = measure(model, ids, args, device)
                results[name]["ran"] = forwards(model)
                del model
                free()
            notes = results[name]["notes"] = fallback_notes(caught)
            print(f"      layer-0 forwards in train(): {results[name]['ran']}\n      {len(notes)} 'running the "
                  "PyTorch reference' RuntimeWarning(s)" + "".join(f"\n        - {n}" for n in notes))

    liger_label = "Liger-Kernel"
    print(f"[4/5] Liger-Kernel (apply_liger_kernel_to_{LIGER_NAME[args.family]}: rope, rms_norm, "
          f"{'geglu' if args.family == 'gemma3' else 'swiglu'}; no cross-entropy patches)")
    liger_note = None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement)
        apply_liger(args.family, model)  # imports liger_kernel: ImportError when it is not installed
        liger_label = f"Liger-Kernel {importlib.metadata.version('liger-kernel')}"
        results["liger"] = measure(model.train(), ids, args, device)
        del model
        free()
    except ImportError as e:
        liger_note = f"liger-kernel not installed: skipped ({e})"
    except Exception as e:  # noqa: BLE001 - keep the other rows when Liger does not fit this transformers
        liger_note = f"liger-kernel failed: skipped ({type(e).__name__}: {e})"
    print(f"      {liger_note or 'done'}")

    print("[5/5] results")
    rows = [f"**{title}**", "", "| config | step ms | speedup vs plain | peak GiB | loss | max grad rel err |",
            "|---|---|---|---|---|---|"]
    details, plain = [], results["plain"]
    for name, label in (("plain", "plain transformers"), ("ours", "cuTile kernels: KernelConfig + train()"),
                        ("ours+train", "cuTile kernels: + enable_training(model)"), ("liger", liger_label)):
        if (r := results.get(name)) is None:
            rows.append(f"| {label} | {liger_note} | | | | |")
            continue
        errs = {k: ((g - plain["grads"][k]).norm() / plain["grads"][k].norm()).item() for k, g in r["grads"].items()}
        worst = max(errs.values())
        peak = f"{r['peak']:.2f}" if r["peak"] is not None else "n/a (CPU)"
        rows.append(f"| {label} | {r['ms']:.1f} | {plain['ms'] / r['ms']:.2f}x | {peak} | {r['loss']:.4f} "
                    f"| {worst:.2e}{'' if worst <= BOUND else ' (over bound)'} |")
        if name != "plain":
            details.append(f"- {name}: |loss - plain| = {abs(r['loss'] - plain['loss']):.2e}; grad rel L2 error "
                           + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        if "ran" in r:
            details.append(f"- {name}: layer-0 forwards in train(): {r['ran']}; "
                           f"{len(r['notes'])} fallback warning(s)" + "".join(f"; {n}" for n in r["notes"]))
    details.append(f"- bound for a bf16 gradient: relative L2 error <= {BOUND:g}")
    emit("\n".join(rows + [""] + details) + "\n", args.out)


if __name__ == "__main__":
    main()
