"""One 8B-wide decoder layer's decode step in a CUDA graph: the device time a compiled server pays per layer.

    python -m benchmarks.decode_layer [--family llama] [--kv 1024] [--batches 1,32]
                                      [--out benchmarks/results/<gpu>/decode_layer[_<family>].md]
    python -m benchmarks.decode_layer --tiny      (CPU: a tiny layer, KV 16, batches 1 and 4, no graphs)

Layer 0 of a one-layer random checkpoint of `--family` (llama, mistral, qwen2, qwen3, gemma3) at 8B widths (hidden
4096, 32 heads, 8 kv heads, head_dim 128, intermediate 14336), bf16, forward of one new token per sequence over a StaticCache holding `--kv` tokens. Configs:
plain transformers eager and under torch.compile (Inductor), ours (KernelConfig with the package's
recommended_mapping: RMSNorm, fused norm + MLP, RoPE) eager and under torch.compile, ours + decoder (the same with
decoder=True: the DecoderLayer kernel, residual add + post_attention_layernorm in one add_rms_norm, merged MLP; the
run refuses when layer 0 does not run it) eager and under torch.compile, ours + decoder + qkv (also q_proj, k_proj
and v_proj as one GEMM: QKVAttention), the same as ours + decoder with the MLP's residual add inside
the down_proj GEMM (`decoder.RESIDUAL_IN_DOWN_PROJ`: addmm with beta=1, the sum rounded once, so not bit for bit
plain), Liger-Kernel's patch (RoPE, RMSNorm, SwiGLU; last, as it patches transformers process-wide). Each of ours
also runs under torch.compile with `_op.COMPILE_REFERENCE_TOKENS = 64`: Inductor traces the ops' references at
decode sizes and fuses them with their neighbours.

One cache per batch, prefilled by the plain layer and sized kv + 1, so the new token (position kv) attends to every
slot without a mask; every call first resets the cache's position counter (a one-element fill, in every config's
time). Device µs: harness.device_us (one CUDA graph of 20 layer calls, median replay / 20). Parity: relative L2
error of each config's output against plain eager on the same cache.
"""
from __future__ import annotations

import importlib

import torch

from . import harness as h


def prefilled(model, batches, kv: int) -> dict:
    """Per batch: (StaticCache prefilled by `model`'s layer 0, the new token's hidden states, its (cos, sin))."""
    from transformers import StaticCache

    torch.manual_seed(0)
    found = {}
    with torch.no_grad():
        for b in batches:
            cache = StaticCache(config=model.config, max_cache_len=kv + 1)
            x = torch.randn(b, kv + 1, model.config.hidden_size, device=h.DEVICE, dtype=model.dtype)
            positions = torch.arange(kv + 1, device=h.DEVICE).expand(b, -1)
            gemma3 = model.config.model_type.startswith("gemma3")  # one rotary per layer type
            cos, sin = model.model.rotary_emb(x, positions, *([model.config.layer_types[0]] if gemma3 else []))
            model.model.layers[0](x[:, :kv], past_key_values=cache, position_embeddings=(cos[:, :kv], sin[:, :kv]))
            found[b] = (cache, x[:, kv:].contiguous(), (cos[:, kv:].contiguous(), sin[:, kv:].contiguous()))
    return found


def measure(layer, inputs: dict, kv: int, want: dict) -> dict:
    """{batch: (device µs per layer forward, relative error against `want`, which the first config fills)}."""
    found = {}
    with torch.no_grad():
        for b, (cache, x, pos) in inputs.items():
            cached = cache.layers[0]

            def step():
                cached.cumulative_length.fill_(kv)
                if hasattr(cached, "cumulative_length_int"):  # a sliding-window layer (Gemma3's 0) counts on the host too
                    cached.cumulative_length_int = kv
                return layer(x, past_key_values=cache, position_embeddings=pos)

            out = step().float()
            ref = want.setdefault(b, out)
            found[b] = (h.device_us(step), ((out - ref).norm() / ref.norm()).item())
    return found


def report(results: dict, notes: list[str], args, kv: int) -> str:
    size = "tiny" if args.tiny else "8B"
    batches = list(next(iter(results.values())))
    base = {b: results["plain eager"][b][0] for b in batches}
    comp = {b: results["plain torch.compile"][b][0] for b in batches}
    rows = [[name, *(f"{r[b][0]:.1f}" for b in batches), " / ".join(f"{base[b] / r[b][0]:.2f}x" for b in batches),
             " / ".join(f"{comp[b] / r[b][0]:.2f}x" for b in batches), " / ".join(f"{r[b][1]:.1e}" for b in batches)]
            for name, r in results.items()]
    per = " / ".join(f"batch {b}" for b in batches)
    return "\n".join([
        h.header(f"One decoder layer's decode step ({args.family}, {size} widths), device time in a CUDA graph",
                 args),
        f"bf16, KV cache {kv} tokens (StaticCache), one new token per sequence; µs per layer forward (CUDA graph of "
        f"20 calls, median). Ours: KernelConfig(recommended_mapping('{args.family}', repo)); ours + decoder: the same with "
        "decoder=True.\n",
        *h.table(["config", *(f"batch {b} µs" for b in batches), f"vs plain eager ({per})",
                  f"vs plain compile ({per})", f"rel err vs plain eager ({per})"], rows),
        "", *(f"- {n}" for n in notes)]) + "\n"


def main(argv=None) -> None:
    def add(p):
        p.add_argument("--kv", type=int, default=1024, help="tokens in the KV cache")
        p.add_argument("--batches", default="1,32", help="comma list of batch sizes")
        p.add_argument("--family", default="llama", choices=["llama", "mistral", "qwen2", "qwen3", "gemma3"])

    args = h.arguments("benchmarks.decode_layer", __doc__, argv, add=add, out="decode_layer.md")
    kv, batches = (16, (1, 4)) if args.tiny else (args.kv, tuple(int(b) for b in args.batches.split(",")))
    torch._dynamo.config.recompile_limit = torch._dynamo.config.cache_size_limit = 64
    dtype = torch.bfloat16
    path = h.checkpoint(args.family, tiny=args.tiny, layers=1, dtype=dtype, cache=args.cache)
    results, want, notes = {}, {}, []
    print(f"[1/3] plain transformers, eager and torch.compile: {path.name}, KV {kv}, batches {batches}", flush=True)
    plain = h.load_model(path, dtype)
    inputs = prefilled(plain, batches, kv)
    results["plain eager"] = measure(plain.model.layers[0], inputs, kv, want)
    results["plain torch.compile"] = measure(h.compiled(plain.model.layers[0]), inputs, kv, want)
    print("[2/3] ours through KernelConfig (and + decoder, + qkv), eager and torch.compile", flush=True)
    configs = [("ours", {}, False), ("ours + decoder", {"decoder": True}, False),
               ("ours + decoder + qkv", {"decoder": True, "qkv": True}, False)]
    if args.family != "gemma3":  # the switch applies to the Llama form
        configs.append(("ours + decoder, residual in down_proj", {"decoder": True}, True))
    for name, options, in_down_proj in configs:
        with h.kernel_hub(args.kernel_root) as (repo, ck), ck.transformers_state_guard(), h.fallbacks(ck) as fell:
            model = h.load_model(path, dtype, ck.recommended_mapping(args.family, repo, **options))
            layers = h.kernel_layers(model, ck)
            if options:
                h.require_decoder_layers("decode_layer", name, layers, 1)
            decoder = importlib.import_module(f"{ck.__name__}.decoder")
            decoder.RESIDUAL_IN_DOWN_PROJ = in_down_proj  # issue 12's measurement switch (read when traced)
            try:
                results[f"{name} eager"] = measure(model.model.layers[0], inputs, kv, want)
                results[f"{name} torch.compile"] = measure(h.compiled(model.model.layers[0]), inputs, kv, want)
                if not in_down_proj:  # Inductor traces the references of calls up to 64 tokens
                    with h.compile_references(ck, 64):
                        results[f"{name} torch.compile, references <= 64 tokens"] = measure(
                            h.compiled(model.model.layers[0]), inputs, kv, want)
            finally:
                decoder.RESIDUAL_IN_DOWN_PROJ = False
            del model
        h.free()
        notes.append(f"{name}: {h.layer_list(layers)}; "
                     + (f"{len(fell)} fallback warning(s): " + "; ".join(fell) if fell else "no fallback"))
    print("[3/3] Liger-Kernel", flush=True)
    try:
        model = h.load_model(path, dtype)
        h.apply_liger(args.family, model)
        results["Liger-Kernel"] = measure(model.model.layers[0], inputs, kv, want)
    except ImportError as e:
        notes.append(f"Liger-Kernel skipped: {e}")
    del model
    h.free()
    text = report(results, notes, args, kv)
    h.write_report(args.out, text)
    if args.out:
        names = list(results)
        h.plot(args.out.with_suffix(".png"), [("speedup vs plain eager", names, {
            f"batch {b}": [results["plain eager"][b][0] / results[n][b][0] for n in names] for b in batches})],
            ylabel="plain eager µs / config µs")


if __name__ == "__main__":
    main()
