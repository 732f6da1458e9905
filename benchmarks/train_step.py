"""One training step (forward + loss.backward(), no optimizer): plain transformers, our kernels, Liger-Kernel.

    python -m benchmarks.train_step [--family llama|qwen3|mistral|gemma3] [--layers 4] [--tokens 2048] [--decoder]
                                    [--qkv] [--out benchmarks/results/<gpu>/train_step_<family>.md]
    python -m benchmarks.train_step --tiny        (CPU: tiny config, 2 layers, 64 tokens, few steps)

8B widths (harness.SIZE_8B), random weights, bf16, batch 1, labels = input ids. A step is zero_grad(set_to_none) +
forward + backward; with no optimizer the weights (and the loss) stay the same, so the gradients can be compared.
Per config: median step time (harness.wall_ms, 3 warm-up, 10 reps), peak memory of one step (weights included,
one model on the GPU at a time), the loss, the largest relative L2 error of a few gradients against the float32
model's (plain bf16's own error sets the bound: 2x it + 0.01), and the host time of a step (median, until
backward() returns, before waiting for the GPU): where it comes near the step time, the GPU waits for Python.

Ours runs twice. transformers 5.22 maps a KernelConfig for the mode the model is loaded in (inference) and kernels
does not fall back from TRAINING to INFERENCE, so after model.train() every layer runs transformers' own forward.
The second row first calls the package's enable_training(model). Each row reports the kernel layers the model runs
in train() (harness.kernel_layers) and the package's fallback warnings. Liger patches transformers process-wide,
so it runs last: first its RoPE, RMSNorm and gated MLP, then (on a fresh model) also its fused linear
cross-entropy, Liger's default, against which enable_training's cross-entropy (cross_entropy.py) is measured.
"""
from __future__ import annotations

import statistics
import time

import torch

from . import harness as h

# A bf16 gradient's relative L2 error against the float32 model's may be at most 2x plain bf16's own, plus this
# (tests/test_training.py's bound): bf16 rounding differs in where it happens, not in how much
BOUND_FLOOR = 1e-2


def watched(model, family: str) -> dict:
    """A few gradients to compare, found by name (our fused MLP moves down_proj into the norm's slot; with q/k/v as
    one GEMM, q_proj's gradient is the first rows of qkv_proj's)."""
    params, last = dict(model.named_parameters()), model.config.num_hidden_layers - 1
    norm = "pre_feedforward_layernorm" if family == "gemma3" else "post_attention_layernorm"
    down = next(n for n in params if n.startswith("model.layers.0.") and n.endswith("down_proj.weight"))
    names = {"embed_tokens": "model.embed_tokens.weight", "layers.0.input_layernorm":
             "model.layers.0.input_layernorm.weight", f"layers.0.{norm}": f"model.layers.0.{norm}.weight",
             "layers.0 down_proj": down, "final norm": "model.norm.weight"}
    grads = {label: params[name].grad for label, name in names.items()}
    attn = f"model.layers.{last}.self_attn"
    q = params.get(f"{attn}.q_proj.weight")
    grads[f"layers.{last}.q_proj"] = q.grad if q is not None else \
        params[f"{attn}.qkv_proj.weight"].grad[:model.get_submodule(attn).qkv_split[0]]
    return {label: g.detach().float().cpu() for label, g in grads.items()}


def reference(path, ids, family: str) -> dict:
    """The float32 model's loss and watched gradients (one step, untimed): what every bf16 row is measured against."""
    model = h.load_model(path, torch.float32).train()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    loss = loss.item()
    grads = watched(model, family)
    del model
    h.free()
    return dict(loss=loss, grads=grads)


def measure(model, ids, args) -> dict:
    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss

    ms = h.wall_ms(step, warmup=2 if args.tiny else 3, reps=5 if args.tiny else 10)
    host = []  # until backward() returns, before the GPU is waited for: above the step's GPU time, host-bound
    for _ in range(5 if args.tiny else 10):
        h.sync()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
    h.sync()
    model.zero_grad(set_to_none=True)
    if h.DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loss = step().item()
    peak = torch.cuda.max_memory_allocated() / 2**30 if h.DEVICE == "cuda" else None
    grads = watched(model, args.family)
    return dict(ms=ms, host_ms=statistics.median(host), peak=peak, loss=loss, grads=grads)


def main(argv=None) -> None:
    def add(p):
        p.add_argument("--family", choices=["llama", "qwen3", "mistral", "gemma3"], default="llama")
        p.add_argument("--layers", type=int, default=4)
        p.add_argument("--tokens", type=int, default=2048)
        p.add_argument("--decoder", action="store_true", help="ours with decoder=True (the decoder layer kernel: the "
                       "residual adds and their gradients fused into the norms)")
        p.add_argument("--qkv", action="store_true", help="ours with qkv=True (QKVAttention: q, k and v from one GEMM, "
                       "forward and backward)")

    args = h.arguments("benchmarks.train_step", __doc__, argv, add=add, out="train_step.md")
    if args.out and args.out.name == "train_step.md":
        args.out = args.out.with_name(f"train_step_{args.family}{'_decoder' if args.decoder else ''}"
                                      f"{'_qkv' if args.qkv else ''}.md")
    (tokens, layers), dtype = (64, 2) if args.tiny else (args.tokens, args.layers), torch.bfloat16
    path = h.checkpoint(args.family, tiny=args.tiny, layers=layers, dtype=dtype, cache=args.cache)
    ids = torch.randint(0, (h.TINY if args.tiny else h.SIZE_8B).vocab, (1, tokens),
                        generator=torch.Generator().manual_seed(0)).to(h.DEVICE)
    title = (f"Training step, {args.family}, {path.name}, 1x{tokens} tokens, bf16, forward + loss.backward()"
             + (", ours with the decoder layer kernel" if args.decoder else "")
             + (", ours with q/k/v as one GEMM" if args.qkv else ""))
    print(f"[1/4] plain transformers (float32 for reference, then bf16): {title}", flush=True)
    results = {"fp32": reference(path, ids, args.family),
               "plain": measure(h.load_model(path, dtype).train(), ids, args)}
    h.free()
    with h.kernel_hub(args.kernel_root) as (repo, ck):
        for step, name in ((2, "ours"), (3, "ours+train")):
            print(f"[{step}/4] ours through KernelConfig, " + ("enable_training(model), " if name == "ours+train"
                                                                 else "") + "then model.train()", flush=True)
            with ck.transformers_state_guard(), h.fallbacks(ck) as notes:
                model = h.load_model(path, dtype, ck.recommended_mapping(args.family, repo, decoder=args.decoder,
                                                                         qkv=args.qkv))
                if name == "ours+train":
                    ck.enable_training(model)
                results[name] = measure(model.train(), ids, args)
                ran = h.kernel_layers(model, ck)
                del model
                h.free()
            results[name]["ran"] = h.layer_list(ran) or "none (transformers')"
            results[name]["notes"] = notes
            print(f"      kernel layers in train(): {results[name]['ran']}; {len(notes)} fallback warning(s)")
    liger_note = None
    for name, loss in (("liger", False), ("liger+loss", True)):
        print(f"[4/4] Liger-Kernel (apply_liger_kernel_to_{h.LIGER_NAME[args.family]}: rope, rms_norm, "
              f"{'geglu' if args.family == 'gemma3' else 'swiglu'}{', fused_linear_cross_entropy' if loss else ''})",
              flush=True)
        try:
            model = h.load_model(path, dtype)
            h.apply_liger(args.family, model, loss=loss)
            results[name] = measure(model.train(), ids, args)
            del model
            h.free()
        except ImportError as e:
            liger_note = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001 - keep the other rows when Liger does not fit this transformers
            liger_note = f"failed: {type(e).__name__}: {e}"
    h.write_report(args.out, report(results, title, args, liger_note))


def report(results: dict, title: str, args, liger_note: str | None) -> str:
    rows, details, fp32 = [], [], results["fp32"]
    errors = {name: {k: ((g - fp32["grads"][k]).norm() / fp32["grads"][k].norm()).item() for k, g in r["grads"].items()}
              for name, r in results.items() if name != "fp32"}
    bound = 2 * max(errors["plain"].values()) + BOUND_FLOOR
    for name, label in (("plain", "plain transformers"), ("ours", "cuTile kernels: KernelConfig + train()"),
                        ("ours+train", "cuTile kernels: + enable_training(model) (incl. its cross-entropy)"),
                        ("liger", "Liger-Kernel"), ("liger+loss", "Liger-Kernel + fused linear cross-entropy")):
        if (r := results.get(name)) is None:
            rows.append([label, liger_note, "", "", "", "", ""])
            continue
        worst = max(errors[name].values())
        rows.append([label, f"{r['ms']:.1f}", f"{r['host_ms']:.1f}", f"{results['plain']['ms'] / r['ms']:.2f}x",
                     h.fmt(r["peak"], ".2f"), f"{r['loss']:.4f}",
                     f"{worst:.2e}" + ("" if worst <= bound else " (over bound)")])
        details.append(f"- {name}: |loss - float32| = {abs(r['loss'] - fp32['loss']):.2e}, |loss - plain| = "
                       f"{abs(r['loss'] - results['plain']['loss']):.2e}; grad rel L2 error vs float32 "
                       + ", ".join(f"{k} {v:.1e}" for k, v in errors[name].items()))
        if "ran" in r:
            details.append(f"- {name}: kernel layers in train(): {r['ran']}; {len(r['notes'])} fallback "
                           "warning(s)" + "".join(f"; {n}" for n in r["notes"]))
    details.append(f"- float32 model: loss {fp32['loss']:.4f}; bound for a bf16 gradient: relative L2 error vs float32 "
                   f"<= 2x plain bf16's + {BOUND_FLOOR:g} = {bound:.2e}"
                   + ("; CPU run: times mean nothing" if h.DEVICE == "cpu" else ""))
    return "\n".join([h.header(title, args), *h.table(
        ["config", "step ms", "host ms", "speedup vs plain", "peak GiB", "loss", "max grad rel err vs float32"], rows),
        "", *details]) + "\n"


if __name__ == "__main__":
    main()
