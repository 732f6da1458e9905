"""Decode ms/token under torch.compile with a static cache: plain transformers against our kernels.

    python -m benchmarks.compiled_decode [--family llama|qwen3|mistral|gemma3] [--layers 4] [--decoder]
                                         [--out benchmarks/results/<gpu>/compiled_decode_<family>[_decoder].md]
    python -m benchmarks.compiled_decode --tiny     (CPU: tiny config, prompt 16, N = 8, aot_eager)

8B widths (harness.SIZE_8B), random weights, bf16, batch 1, prompt 64, N = 64 new tokens. Decoding goes through
transformers' own path: generate(..., past_key_values=StaticCache, compile_config=CompileConfig(mode=
"reduce-overhead")) compiles the decode step (prefill stays eager); one StaticCache per model, reset before each
call, so its buffers keep their addresses (CUDA graphs). Eager rows: the same generate with disable_compile=True.
ms/token = (t(N) - t(1)) / (N - 1), each t the median of 3 generate calls after 2 warm-up calls. Also: greedy
tokens of compiled ours == compiled plain, and graph breaks (Dynamo's counters while generating, and
torch._dynamo.explain on one decode forward). --decoder adds a row: ours with recommended_mapping's decoder=True
(the decoder layer kernel: residual add + the norm after it in one add_rms_norm; merged MLP), which must run in
every layer, and its own greedy check against compiled plain; --qkv one with decoder=True and qkv=True
(QKVAttention: q/k/v as one GEMM). --references TOKENS: ours under torch.compile
traces the ops' references for calls of at most TOKENS tokens (Inductor fuses them with their neighbours).
"""
from __future__ import annotations

import torch

from . import harness as h


def decode(model, ids, n: int, compile_config) -> tuple[float, torch.Tensor]:
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
        t = {k: h.wall_ms(lambda: run(k), warmup=2, reps=3) for k in (1, n)}
    return (t[n] - t[1]) / (n - 1), tokens


def measure(model, ids, n: int, compile_config) -> dict:
    from torch._dynamo.utils import counters

    eager, eager_tokens = decode(model, ids, n, None)
    torch._dynamo.reset()
    counters.clear()
    compiled, tokens = decode(model, ids, n, compile_config)
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


def main(argv=None) -> None:
    def add(p):
        p.add_argument("--family", choices=["llama", "qwen3", "mistral", "gemma3"], default="llama")
        p.add_argument("--layers", type=int, default=4)
        p.add_argument("--prompt", type=int, default=64)
        p.add_argument("--new", type=int, default=64, help="N new tokens")
        p.add_argument("--backend", help="torch.compile backend (default: inductor on a GPU, aot_eager on CPU)")
        p.add_argument("--mode", default="reduce-overhead", help="inductor mode ('default': no CUDA graphs)")
        p.add_argument("--decoder", action="store_true", help="add a row: ours with decoder=True")
        p.add_argument("--qkv", action="store_true", help="add a row: ours with decoder=True and qkv=True")
        p.add_argument("--references", type=int, default=None, metavar="TOKENS",
                       help="ours under torch.compile traces the ops' references for calls of at most TOKENS tokens "
                            "(_op.COMPILE_REFERENCE_TOKENS; default: the package's)")

    args = h.arguments("benchmarks.compiled_decode", __doc__, argv, add=add, out="compiled_decode.md")
    if args.out and args.out.name == "compiled_decode.md":
        args.out = args.out.with_name(f"compiled_decode_{args.family}{'_decoder' if args.decoder else ''}"
                                      f"{'' if args.references is None else f'_refs{args.references}'}.md")
    from transformers import CompileConfig

    prompt, n, layers = (16, 8, 2) if args.tiny else (args.prompt, args.new, args.layers)
    backend = args.backend or ("inductor" if h.DEVICE == "cuda" else "aot_eager")
    # mode (reduce-overhead: CUDA graphs) is an inductor option; other backends take no mode.
    compile_config = CompileConfig(backend=backend, mode=args.mode if backend == "inductor" else None)
    compile_config._compile_all_devices = h.DEVICE == "cpu" or None  # generate compiles only on accelerators
    dtype = torch.bfloat16
    path = h.checkpoint(args.family, tiny=args.tiny, layers=layers, dtype=dtype, cache=args.cache)
    ids = torch.randint(0, (h.TINY if args.tiny else h.SIZE_8B).vocab, (1, prompt),
                        generator=torch.Generator().manual_seed(0)).to(h.DEVICE)
    title = (f"Decode under torch.compile, {args.family}, {path.name}, bf16, prompt {prompt}, N = {n}; "
             f"backend={backend}, mode={compile_config.mode}, static cache"
             + ("" if args.references is None else f"; ours traces references up to {args.references} tokens"))
    print(f"[1/3] plain transformers: {title}", flush=True)
    results = {"plain": measure(h.load_model(path, dtype), ids, n, compile_config)}
    h.free()
    configs = {"ours": {}} | ({"ours + decoder": {"decoder": True}} if args.decoder else {}) | (
        {"ours + decoder + qkv": {"decoder": True, "qkv": True}} if args.qkv else {})
    labels = {"ours": "cuTile kernels (KernelConfig)", "ours + decoder": "cuTile kernels + decoder (KernelConfig)",
              "ours + decoder + qkv": "cuTile kernels + decoder + qkv (KernelConfig)"}
    fell, applied = {}, {}
    for name, options in configs.items():
        print(f"[2/3] {name} through KernelConfig (norm, fused, rope{''.join(f', {o}' for o in options)})", flush=True)
        with h.kernel_hub(args.kernel_root) as (repo, ck), ck.transformers_state_guard(), h.fallbacks(ck) as notes:
            # the guard also undoes the RoPE kernel on exit: measure inside
            model = h.load_model(path, dtype, ck.recommended_mapping(args.family, repo, **options))
            applied[name] = h.kernel_layers(model, ck)
            if options:
                h.require_decoder_layers("compiled_decode", name, applied[name], model.config.num_hidden_layers)
            with h.compile_references(ck, args.references):
                results[name] = measure(model, ids, n, compile_config)
            del model
        fell[name] = notes
        h.free()
    plain, same = results["plain"], {}
    for name in configs:
        ours = results[name]
        same[name] = torch.equal(plain["tokens"], ours["tokens"])
        if not same[name] and plain["tokens"].shape == ours["tokens"].shape:
            first = (plain["tokens"] != ours["tokens"]).nonzero()[0, -1].item() - prompt
            same[name] = f"False (first difference at new token {first})"
        print(f"[3/3] greedy {n} tokens, compiled {name} == compiled plain: {same[name]}", flush=True)
    rows = [[label, f"{r['eager']:.2f}", f"{r['compiled']:.2f}", f"{r['eager'] / r['compiled']:.2f}x",
             f"{plain['compiled'] / r['compiled']:.2f}x", f"{r['graphs']} / {r['breaks']}", r["explain"]]
            for label, r in [("plain transformers", plain), *((labels[c], results[c]) for c in configs)]]
    details = [f"- greedy tokens, compiled {name} == compiled plain: {same[name]}; compiled == eager: plain "
               f"{plain['eager_same']}, {name} {results[name]['eager_same']}" for name in configs]
    details.append("- graphs / breaks: Dynamo's unique_graphs and graph_break counters over all compiled generate "
                   "calls (more graphs than breaks + 1 means recompiles)")
    details += [f"- {name}: graph-break reasons while generating: {'; '.join(r['reasons'])}"
                for name, r in results.items() if r["reasons"]]
    details += [f"- {name}: {h.layer_list(applied[name])}; {len(fell[name])} fallback warning(s)"
                + "".join(f"; {m}" for m in fell[name]) + ("; CPU run: times mean nothing" if h.DEVICE == "cpu" else "")
                for name in configs]
    h.write_report(args.out, "\n".join([h.header(title, args), *h.table(
        ["config", "eager ms/token", "compiled ms/token", "compile speedup", "vs plain compiled",
         "graphs / breaks (generate)", "explain (one decode forward)"], rows), "", *details]) + "\n")


if __name__ == "__main__":
    main()
