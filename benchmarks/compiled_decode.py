"""Decode ms/token under torch.compile with a static cache, plain transformers against our cuTile kernels.

    python benchmarks/compiled_decode.py [--family llama|qwen3|mistral|gemma3] [--layers 4] [--out decode.md]
    python benchmarks/compiled_decode.py --tiny     # CPU check: tiny config, short prompt, few tokens

8B-shaped (devtools.demo.SIZE_8B widths), random weights, bf16, batch 1, prompt 64, N = 64 new tokens. Decoding
goes through transformers' own path: generate(..., past_key_values=StaticCache, compile_config=CompileConfig(
mode="reduce-overhead")) compiles the decode step (prefill stays eager); one StaticCache per model, reset before
each call, so its buffers keep their addresses (CUDA graphs). Eager rows: the same generate with
disable_compile=True. ms/token = (t(N) - t(1)) / (N - 1), each t the median of 3 generate calls after 2 warm-up
calls. Also: greedy tokens of compiled ours == compiled plain, and graph breaks (Dynamo's counters while
generating, and torch._dynamo.explain on one decode forward). --kernel-root: a directory with build/.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from devtools.build import ROOT  # noqa: E402
from devtools.checkpoints import make_checkpoint  # noqa: E402
from devtools.demo import SIZE_8B, emit, fallback_notes, kernel_mapping  # noqa: E402
from devtools.local_hub import local_hub  # noqa: E402
from devtools.timing import median_ms  # noqa: E402


def decode(model, ids, n: int, device: str, compile_config) -> tuple[float, torch.Tensor]:
    """(ms/token, the greedy tokens of an n-token generate), compiled when compile_config is given."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + n)
    gen = dict(do_sample=False, pad_token_id=0, past_key_values=cache, compile_config=compile_config,
               disable_compile=compile_config is None)

    def run(k: int) -> torch.Tensor:
        cache.reset()
        return model.generate(ids, max_new_tokens=k, min_new_tokens=k, **gen)

    with torch.no_grad():
        tokens = run(n)
        t = {k: median_ms(lambda: run(k), device=device, warmup=2, reps=3) for k in (1, n)}
    return (t[n] - t[1]) / (n - 1), tokens


def measure(model, ids, args, device: str, compile_config) -> dict:
    from torch._dynamo.utils import counters

    eager, eager_tokens = decode(model, ids, args.new, device, None)
    torch._dynamo.reset()
    counters.clear()
    compiled, tokens = decode(model, ids, args.new, device, compile_config)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    return dict(eager=eager, compiled=compiled, tokens=tokens, eager_same=torch.equal(tokens, eager_tokens),
                graphs=graphs, breaks=breaks, reasons=sorted(counters["graph_break"]), explain=explain(model, ids))


def explain(model, ids) -> str:
    """torch._dynamo.explain on one decode forward (one token after an eager prefill into a StaticCache)."""
    from transformers import StaticCache

    try:
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 1)
        with torch.no_grad():
            nxt = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            out = torch._dynamo.explain(model)(nxt, past_key_values=cache, use_cache=True)
        reasons = "; ".join(sorted({str(getattr(b, "reason", b)).splitlines()[0] for b in out.break_reasons}))
        return f"{out.graph_count} graph(s), {out.graph_break_count} break(s)" + (f": {reasons}" if reasons else "")
    except Exception as e:  # noqa: BLE001 - a report line, not a failed benchmark
        return f"explain failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=["llama", "qwen3", "mistral", "gemma3"], default="llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=64, help="N new tokens")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (inductor also works on CPU)")
    p.add_argument("--mode", default="reduce-overhead", help="inductor mode ('default': no CUDA graphs)")
    p.add_argument("--tiny", action="store_true", help="tiny config, prompt 16, N = 8 (CPU check)")
    p.add_argument("--kernel-root", type=Path, default=ROOT, help="a directory with build/")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "checkpoints")
    p.add_argument("--out", type=Path, help="write the markdown table here")
    args = p.parse_args()
    if args.tiny:
        args.prompt, args.new = 16, 8
    logging.getLogger("kernels").setLevel(logging.ERROR)
    from transformers import AutoModelForCausalLM, CompileConfig, KernelConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = args.backend
    # mode (reduce-overhead: CUDA graphs) is an inductor option; other backends take no mode.
    compile_config = CompileConfig(backend=backend, mode=args.mode if backend == "inductor" else None)
    compile_config._compile_all_devices = device == "cpu" or None  # generate compiles only on accelerators
    dtype, size = torch.bfloat16, ("tiny" if args.tiny else "8b")
    path = make_checkpoint(args.family, args.cache / f"{args.family}-{size}-{args.layers}l", dtype=dtype,
                           num_hidden_layers=args.layers, **({} if args.tiny else SIZE_8B))
    placement = {"device_map": "cuda"} if device == "cuda" else {}
    ids = torch.randint(0, 256 if args.tiny else SIZE_8B["vocab_size"], (1, args.prompt),
                        generator=torch.Generator().manual_seed(0)).to(device)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    title = (f"{args.family}, {size} widths, {args.layers} layers, bf16, {gpu}, torch {torch.__version__}; "
             f"prompt {args.prompt}, N = {args.new}; compile: backend={backend}, mode={compile_config.mode}, "
             "static cache" + ("; CPU check only, times not meaningful" if device == "cpu" else ""))
    print(f"[1/4] plain transformers: {title}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement)
    results = {"plain": measure(model, ids, args, device, compile_config)}
    del model

    import kernels

    print("[2/4] our kernels through KernelConfig (norm, fused, rope)")
    with local_hub(args.kernel_root) as repo, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck = kernels.get_kernel(repo, version=1)
        mapping = kernel_mapping(args.family, ["norm", "fused", "rope"], repo)
        with ck.transformers_state_guard():  # also undoes the RoPE kernel on exit: measure inside
            if device == "cpu":  # transformers refuses "cpu" in a KernelConfig; lift that one check on CPU
                import transformers.utils.kernel_config as kc

                kc.KERNELS_SUPPORTED_DEVICE_TYPES.append("cpu")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_kernels=True, **placement,
                                                         kernel_config=KernelConfig(mapping, inherit_mapping=False))
            results["ours"] = measure(model, ids, args, device, compile_config)
            del model
    notes = fallback_notes(caught)
    print(f"      {len(notes)} 'running the PyTorch reference' RuntimeWarning(s)"
          + "".join(f"\n        - {n}" for n in notes))

    print("[3/4] checks")
    plain, ours = results["plain"], results["ours"]
    same = torch.equal(plain["tokens"], ours["tokens"])
    if not same and plain["tokens"].shape == ours["tokens"].shape:
        first = (plain["tokens"] != ours["tokens"]).nonzero()[0, -1].item() - args.prompt
        same = f"False (first difference at new token {first})"
    print(f"      greedy {args.new} tokens, compiled ours == compiled plain: {same}")

    print("[4/4] results")
    rows = [f"**{title}**", "", "| config | eager ms/token | compiled ms/token | compile speedup | vs plain compiled "
            "| graphs / breaks (generate) | explain (one decode forward) |", "|---|---|---|---|---|---|---|"]
    for name, label in (("plain", "plain transformers"), ("ours", "cuTile kernels (KernelConfig)")):
        r = results[name]
        rows.append(f"| {label} | {r['eager']:.2f} | {r['compiled']:.2f} | {r['eager'] / r['compiled']:.2f}x "
                    f"| {plain['compiled'] / r['compiled']:.2f}x | {r['graphs']} / {r['breaks']} | {r['explain']} |")
    details = [f"- greedy tokens, compiled ours == compiled plain: {same}; compiled == eager: plain "
               f"{plain['eager_same']}, ours {ours['eager_same']}",
               "- graphs / breaks: Dynamo's unique_graphs and graph_break counters over all compiled generate calls "
               "(more graphs than breaks + 1 means recompiles)"]
    details += [f"- {name}: graph-break reasons while generating: {'; '.join(r['reasons'])}"
                for name, r in results.items() if r["reasons"]]
    details.append(f"- ours: {len(notes)} fallback warning(s)" + "".join(f"; {n}" for n in notes))
    emit("\n".join(rows + [""] + details) + "\n", args.out)


if __name__ == "__main__":
    main()
