"""Where a forward's time goes, plain and with our kernels: cuTile kernels, GEMMs, attention, and every other
kernel by name, with launch counts, and on a GPU where it waited for the host. Its table decides what to fuse
next.

    python -m benchmarks.coverage --family llama|mistral|qwen2|qwen3|gemma3 [--layers 4] [--prefill 2048]
                                  [--decoder] [--qkv]
    python -m benchmarks.coverage --family llama --train     (one training step of 1 x --prefill tokens instead)
    python -m benchmarks.coverage ... --trace   (also each profiled step's Chrome trace with the host's operators)
    python -m benchmarks.coverage --tiny      (CPU: a tiny model, the profiler's CPU operator times)

An 8B-wide random checkpoint of the family (harness.MODELS widths), bf16. Two steps, each profiled once after a
warm-up with torch.profiler: prefill (1 x --prefill tokens) and one decode step (one token over a DynamicCache of
the prefill). Plain transformers, then ours (KernelConfig with recommended_mapping; --decoder: with decoder=True,
the decoder layer kernel in every layer, profiled as "ours + decoder"; --qkv: with qkv=True, QKVAttention).
--train profiles one training step instead (forward with labels + loss.backward(), no optimizer, as
benchmarks.train_step): plain in train(), ours after enable_training(model), which is what runs our backward
kernels. On a GPU the times are device times of CUDA kernels (sum over launches); on CPU, self times of top-level
operators. Writes coverage_<family>[_decoder][_qkv][_train].md (shares per category, the top kernels by time,
launches per step, wall time; on a GPU the time it idled between kernels and its longest waits) and a stacked bar
chart (.png).
"""
from __future__ import annotations

import collections
import re
import time

import torch

from . import harness as h

# kernel name -> category, first match wins (device kernel names on a GPU, aten operator names on CPU)
CATEGORIES = [
    ("ours (cuTile)", r"rms_norm_fwd|rms_norm_row|rms_norm_bwd|gated_act_fwd|gated_act_row|gated_act_bwd|"
                      r"rope_fwd|rope_row|"
                      r"add_rms_norm_fwd|rms_norm_add_fwd|rms_norm_add_row|qk_norm_rope|cross_entropy_fwd|"
                      r"cross_entropy_bwd|"
                      r"cutile_kernels"),
    # attention before GEMM: cuDNN's attention kernels carry 'sm90_' in their names; its decode attention ends in
    # a `cudnn::fusion::lean_reduction_kernel`
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product|cudnn::fusion::lean_reduction"),
    # the loss of a training step: log-softmax and NLL over the vocabulary, forward and backward
    ("loss", r"softmax|nll_loss|cross_entropy"),
    # cuBLASLt's split-K GEMMs (decode) finish in a splitKreduce_kernel launch of their own
    ("GEMM", r"gemm|gemv|nvjet|cutlass|xmma|sm90_|matmul|splitKreduce|aten::mm|aten::addmm|aten::linear|aten::bmm|"
             r"mmBackward"),
    ("copies, casts", r"copy|cat|CatArray|cast|aten::to$|contiguous|transpose|clone"),
    ("elementwise", r"elementwise|vectorized|add|mul|silu|gelu|rsqrt|pow|mean|reduce|neg|where|embedding|index"),
]


def category(name: str) -> str:
    return next((c for c, pat in CATEGORIES if re.search(pat, name, re.IGNORECASE)), "other")


def profile(step, trace=None) -> tuple[dict[str, tuple[float, int]], float, dict | None]:
    """({kernel or operator name: (µs, launches)}, wall ms, GPU idle (`idle`; None on CPU)) of one call of `step`
    after a warm-up. `trace`: also write a Chrome trace there (.json.gz) of one more call, with the host's operators
    (recording them slows the host, so the figures come from the call without them)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step()
    h.sync()
    activities = [ProfilerActivity.CUDA] if h.DEVICE == "cuda" else [ProfilerActivity.CPU]
    if trace:
        with torch_profile(activities={ProfilerActivity.CPU, *activities}) as traced:
            step()
            h.sync()
        traced.export_chrome_trace(str(trace))
    with torch_profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        h.sync()
        wall = (time.perf_counter() - t0) * 1e3
    found: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    spans = []
    for e in prof.events():
        if h.DEVICE == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = e.device_time
            spans.append((e.time_range.start, e.time_range.end, e.name))
        else:
            if e.cpu_parent is not None:  # top-level operators only, so nothing counts twice
                continue
            us = e.self_cpu_time_total + sum(c.cpu_time_total for c in e.cpu_children)
        found[e.name][0] += us
        found[e.name][1] += 1
    return {k: (v[0], v[1]) for k, v in found.items()}, wall, idle(spans) if spans else None


def idle(spans: list[tuple[float, float, str]], top: int = 8) -> dict:
    """Where the GPU waited between its first and last kernel of a step (for the host, or for a sync), from the
    kernels' (start µs, end µs, name): {"span", "idle" (µs), "gaps": the `top` largest gaps as (µs, kernel before,
    kernel after)}. Kernels on several streams may overlap: a gap is time no kernel runs."""
    spans = sorted(spans)
    gaps, end, last = [], spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            gaps.append((start - end, last, name))
        if stop > end:
            end, last = stop, name
    return {"span": end - spans[0][0], "idle": sum(g for g, _, _ in gaps),
            "gaps": sorted(gaps, key=lambda g: -g[0])[:top]}


def steps(model, prompt: int):
    """(prefill, decode) callables on fixed inputs; decode appends one token per call to a cache filled by one
    prefill, as generation does (the warm-up and profiled calls add a few tokens to the `prompt` held). Not cropped
    back between calls: a crop makes the next step copy the layer's cache into new buffers under append_kv (our
    attention's cache update), which generation does only after assisted decoding rejects drafts."""
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=h.DEVICE)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache, use_cache=True)

    def prefill():
        with torch.no_grad():
            model(ids)

    def decode():
        with torch.no_grad():
            model(ids[:, -1:], past_key_values=cache, use_cache=True)

    decode.cache = cache  # for the report: which layers grew in place
    return {"prefill": prefill, "decode": decode}


def train_steps(model, tokens: int):
    """{"train": one training step}: zero_grad, forward with labels = the inputs, loss.backward()."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=h.DEVICE)

    def train():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    return {"train": train}


def trace_path(args, config: str, step: str):
    return args.out.with_name(f"{args.out.stem}_{config}_{step}.json.gz") if args.trace and args.out else None


def summarize(kernels: dict[str, tuple[float, int]]) -> dict[str, float]:
    shares = collections.Counter()
    for name, (us, _) in kernels.items():
        shares[category(name)] += us
    return dict(shares)


def report(results: dict, notes: list[str], args, family: str) -> str:
    ours = ("with our kernels" + (" + decoder layer (decoder=True)" if args.decoder else "")
            + (" + q/k/v as one GEMM (qkv=True)" if args.qkv else ""))
    what = "training step" if args.train else "forward"
    steps_said = (f"one training step of 1 x {args.prefill} tokens (forward + loss.backward(); ours after "
                  "enable_training)" if args.train else f"prefill 1 x {args.prefill}, one decode step over its cache")
    lines = [h.header(f"Coverage of {family}'s {what}: where the time goes, plain and {ours}", args),
             f"{'tiny' if args.tiny else '8B'} widths, {args.layers} layers, bf16; {steps_said}. {'CUDA kernel device times' if h.DEVICE == 'cuda' else 'CPU operator times'}"
             " from torch.profiler, one profiled call after a warm-up.\n"]
    cats = [c for c, _ in CATEGORIES] + ["other"]
    rows = []
    for (config, step), (kernels, wall, gpu_idle) in results.items():
        total = sum(us for us, _ in kernels.values()) or 1.0
        shares = summarize(kernels)
        rows.append([config, step, f"{total:.0f}", str(sum(n for _, n in kernels.values())), f"{wall:.2f}",
                     f"{gpu_idle['idle']:.0f}" if gpu_idle else "–",
                     *(f"{100 * shares.get(c, 0) / total:.1f} %" for c in cats)])
    lines += h.table(["config", "step", "time µs", "launches", "wall ms", "GPU idle µs", *cats], rows)
    if any(gpu_idle for _, _, gpu_idle in results.values()):
        lines += ["", "GPU idle µs: time between the step's first and last kernel in which no kernel runs (the GPU "
                  "waits for the host, or for a sync); wall ms also holds the time before the first kernel and after "
                  "the last."]
    for (config, step), (kernels, _, gpu_idle) in results.items():
        total = sum(us for us, _ in kernels.values()) or 1.0
        top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:args.top]
        lines += ["", f"**{config}, {step}**: the {len(top)} largest of {len(kernels)} kernels", "",
                  *h.table(["kernel", "category", "µs", "%", "launches"],
                           [[f"`{name[:90]}`", category(name), f"{us:.1f}", f"{100 * us / total:.1f}", str(n)]
                            for name, (us, n) in top])]
        if gpu_idle and gpu_idle["gaps"]:
            lines += ["", f"{config}, {step}: the GPU idle {gpu_idle['idle']:.0f} µs of a {gpu_idle['span']:.0f} µs "
                      f"span; its {len(gpu_idle['gaps'])} longest waits", "",
                      *h.table(["µs", "after kernel", "before kernel"],
                               [[f"{us:.1f}", f"`{before[:60]}`", f"`{after[:60]}`"]
                                for us, before, after in gpu_idle["gaps"]])]
    lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    def add(p):
        p.add_argument("--family", default="llama", choices=sorted(h.LIGER_NAME))
        p.add_argument("--layers", type=int, default=4)
        p.add_argument("--prefill", type=int, default=2048)
        p.add_argument("--top", type=int, default=12, help="kernels listed per step")
        p.add_argument("--decoder", action="store_true", help="ours with decoder=True (the decoder layer kernel)")
        p.add_argument("--qkv", action="store_true", help="ours with qkv=True (QKVAttention: q, k, v from one GEMM)")
        p.add_argument("--train", action="store_true", help="profile one training step instead of prefill + decode")
        p.add_argument("--trace", action="store_true", help="also write each profiled step's Chrome trace with the "
                       "host's operators (<out>_<config>_<step>.json.gz; open in Perfetto)")

    args = h.arguments("benchmarks.coverage", __doc__, argv, add=add, out="coverage.md")
    if args.tiny:
        args.prefill, args.layers = min(args.prefill, 32), min(args.layers, 2)
    elif args.out.name == "coverage.md":
        args.out = args.out.with_name(f"coverage_{args.family}{'_decoder' if args.decoder else ''}"
                                      f"{'_qkv' if args.qkv else ''}"
                                      f"{'_train' if args.train else ''}.md")
    dtype = torch.bfloat16
    path = h.checkpoint(args.family, tiny=args.tiny, layers=args.layers, dtype=dtype, cache=args.cache)
    results, notes = {}, []
    make_steps = train_steps if args.train else steps
    model = h.load_model(path, dtype)
    if args.train:
        model.train()
    for step, fn in make_steps(model, args.prefill).items():
        results[("plain", step)] = profile(fn, trace_path(args, "plain", step))
    del model
    h.free()
    ours = "ours" + (" + decoder" if args.decoder else "") + (" + qkv" if args.qkv else "")
    with h.kernel_hub(args.kernel_root) as (repo, ck), ck.transformers_state_guard(), h.fallbacks(ck) as fell:
        model = h.load_model(path, dtype, ck.recommended_mapping(args.family, repo, decoder=args.decoder,
                                                                     qkv=args.qkv))
        if args.train:
            ck.enable_training(model).train()
        applied = h.kernel_layers(model, ck)
        if args.decoder:
            h.require_decoder_layers("coverage", ours, applied, model.config.num_hidden_layers)
        fns = make_steps(model, args.prefill)
        for step, fn in fns.items():
            results[(ours, step)] = profile(fn, trace_path(args, "ours", step))
        del model
    h.free()
    notes.append(f"{ours}: {h.layer_list(applied)}; "
                 + (f"{len(fell)} fallback warning(s): " + "; ".join(fell) if fell else "no fallback"))
    if "decode" in fns:
        layers = fns["decode"].cache.layers
        grown = sum("_cutile_kv" in vars(layer) for layer in layers)
        notes.append(f"{ours}, decode: {grown} of {len(layers)} cache layers in append_kv's buffers (the others "
                     "append with torch.cat)")
    h.write_report(args.out, report(results, notes, args, args.family))
    if args.out:
        cats = [c for c, _ in CATEGORIES] + ["other"]
        labels = [f"{c}\n{s}" for c, s in results]
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=80)
        bottom = [0.0] * len(results)
        for c in cats:
            ys = [summarize(k).get(c, 0) / 1e3 for k, _, _ in results.values()]
            ax.bar(labels, ys, bottom=bottom, label=c)
            bottom = [b + y for b, y in zip(bottom, ys)]
        ax.set_ylabel("ms per step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
