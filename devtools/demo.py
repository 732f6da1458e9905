"""The main job: build (and cache) a local checkpoint, load it plain, with cuTile kernels and with Liger-Kernel,
compare, time.

    python -m devtools.demo [--family llama|mistral|qwen2|qwen3|gemma3] [--size tiny|8b] [--layers N]
                            [--kernels norm,fused,rope[,decoder]] [--liger|--no-liger] [--out DIR] [--json FILE]

The kernel model loads the way a user loads it from the Hub, through
    from_pretrained(path, use_kernels=True, kernel_config=KernelConfig(recommended_mapping(family, repo, ...)))
with the repo id served from this checkout's build/ (LOCAL_KERNELS), inside the package's
transformers_state_guard. transformers refuses "cpu" in a KernelConfig; on CPU the demo lifts that one check
(the kernels then run their exact PyTorch reference). After loading, the demo counts the modules that run one of
the package's layers and refuses to measure when a selected kernel replaces nothing (`--kernels ''`, or a kernel
the family does not have): that would time the plain model twice. `decoder` adds the decoder layer (residual add +
the norm after it as one add_rms_norm; recommended_mapping's decoder=True, which turns `fused` into the merged MLP).

--liger (default: on with CUDA when liger_kernel imports) also times a fresh plain instance patched by
Liger-Kernel's apply_liger_kernel_to_<family> (RoPE, RMSNorm, SwiGLU/GEGLU; no loss kernels).

Reports: parity (max |logits - plain|, greedy generation agreement), prefill tokens/s and decode ms/token, the
kernel layers in the model and the cuTile JIT compiles (CUDA_TILE_CACHE_DIR=off makes them cold), as a table on
stdout and, with --out, `demo.md` and `demo.png`; --json writes the numbers (benchmarks/e2e.py collects them).
`measure()` is the whole measurement, for callers in Python.
"""
from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import torch

from benchmarks import harness as h

from .checkpoints import ALL_FAMILIES

KERNELS = ("norm", "mlp", "fused", "rope", "decoder", "qkv")
# Timing effort: decode = (generate(n) - generate(1)) / (n - 1), each the median of `decode_reps` runs.
EFFORT = {"cuda": dict(prefill_reps=20, decode_reps=10, new_tokens=64),
          "cpu": dict(prefill_reps=5, decode_reps=3, new_tokens=32)}
GREEDY = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)


def timings(model, ids) -> dict:
    """Prefill tokens/s (median forward) and decode ms/token from generate(): (time(n) - time(1)) / (n - 1)."""
    effort = EFFORT[h.DEVICE]
    n = effort["new_tokens"]
    with torch.no_grad():
        prefill_ms = h.wall_ms(lambda: model(ids), warmup=3, reps=effort["prefill_reps"])
        runs = {k: h.wall_ms(lambda: model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                                    pad_token_id=0), warmup=2, reps=effort["decode_reps"])
                for k in (1, n)}
    return {"prefill_tok_s": ids.numel() / prefill_ms * 1e3, "decode_ms": (runs[n] - runs[1]) / (n - 1)}


def parity(model, ids, want, want_tokens) -> dict:
    with torch.no_grad():
        diff = (model(ids).logits.float() - want).abs().max().item()
        same = torch.equal(model.generate(ids[:, :32], **GREEDY), want_tokens)
    return {"max_logit_diff": diff, "greedy_identical": same}


def applied_layers(model, ck, mapping: dict) -> dict:
    """The package's layers the loaded model runs, by name; refuses (SystemExit) when a selected one is absent."""
    found = h.kernel_layers(model, ck)
    selected = {(v[0] if isinstance(v, tuple) else v).split(":")[-1] for v in mapping.values()}  # "<repo>:<Layer>"
    missing = sorted(selected - set(found))
    if not found or missing:
        raise SystemExit(f"demo: no kernel applied for {', '.join(missing) or 'an empty selection'}: the selected "
                         f"kernels replace nothing in this {model.config.model_type} model, so there is nothing to "
                         f"measure (the model runs {dict(found) or 'no kernel layer'})")
    return dict(found)


def measure(family: str = "llama", *, size: str | None = None, layers: int = 2,
            kernels: tuple[str, ...] = ("norm", "fused", "rope"), tokens: int | None = None,
            liger: bool | None = None, cache: Path = h.CACHE) -> dict:
    """Plain, cuTile kernels (KernelConfig) and, with `liger`, Liger-Kernel on one random checkpoint: parity
    against plain and timings. Returns plain JSON-able numbers (see `table`)."""
    if unknown := set(kernels) - set(KERNELS):
        raise SystemExit(f"demo: unknown kernels {sorted(unknown)} (choose from {', '.join(KERNELS)})")
    if "mlp" in kernels and "fused" in kernels:
        raise SystemExit("demo: choose one of mlp and fused (both rewrite the MLP weights)")
    device, size = h.DEVICE, size or ("8b" if h.DEVICE == "cuda" else "tiny")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    liger_note = ("skipped (--no-liger)" if liger is False else "no CUDA" if device != "cuda"
                  else "liger_kernel does not import" if not h.peer("liger_kernel.transformers") else "")
    liger = not liger_note if liger is None else liger
    tokens = tokens or (2048 if device == "cuda" else 64)
    with h.kernel_hub() as (repo, ck):
        try:
            mapping = ck.recommended_mapping(family, repo, norm="norm" in kernels, rope="rope" in kernels,
                                             mlp="fused" if "fused" in kernels else "merged" if "mlp" in kernels
                                             else None, decoder="decoder" in kernels, qkv="qkv" in kernels)
        except ValueError as e:  # e.g. no merged MLP for Gemma3: refuse before any work
            raise SystemExit(f"demo: --kernels {','.join(kernels)}: {e}") from None
        path = h.checkpoint(family, tiny=size == "tiny", layers=layers, dtype=dtype, cache=cache)
        print(f"[1/6] checkpoint {path.name}: {family}, {size}, random weights, {device}, {dtype}", flush=True)
        plain = h.load_model(path, dtype)
        ids = torch.randint(0, plain.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
        timed_ids = ids[:, : min(tokens, 512)] if device == "cpu" else ids
        with torch.no_grad():
            want = plain(ids).logits.float()  # before the kernel load: transformers shares the RoPE function
            want_tokens = plain.generate(ids[:, :32], **GREEDY)
        print("[2/6] plain: reference logits and timing", flush=True)
        result = dict(family=family, name=path.name, size=size, layers=plain.config.num_hidden_layers, tokens=tokens,
                      device=device, dtype=str(dtype).removeprefix("torch."), kernels=list(kernels),
                      decode_tokens=EFFORT[device]["new_tokens"], versions=h.versions(), plain=timings(plain, timed_ids))
        del plain
        with ck.transformers_state_guard(), h.fallbacks(ck) as notes, h.tile_compiles() as compiles:
            model = h.load_model(path, dtype, mapping)
            result["kernel_layers"] = applied_layers(model, ck, mapping)
            ours = parity(model, ids, want, want_tokens)
            print(f"[3/6] kernels loaded through KernelConfig: {result['kernel_layers']}\n"
                  f"      parity: max |logits - plain| = {ours['max_logit_diff']:.3e}; "
                  f"greedy 16 tokens identical: {ours['greedy_identical']}", flush=True)
            print("[4/6] kernels: timing (median; decode from generate)", flush=True)
            result["ours"] = dict(ours, **timings(model, timed_ids))
            del model
    result.update(kind="cuTile" if device == "cuda" and not notes else "reference path", notes=notes,
                  compiles=len(compiles), compile_s=sum(compiles))

    # Liger patches transformers' modeling modules process-wide (classes, apply_rotary_pos_emb): it goes LAST,
    # after plain and ours are measured, on a fresh plain instance.
    result["liger"], result["liger_note"] = None, liger_note
    if liger:
        try:
            model = h.load_model(path, dtype)
            h.apply_liger(family, model)
            theirs = parity(model, ids, want, want_tokens)
            print(f"[5/6] Liger-Kernel {result['versions']['liger-kernel']} patched; parity: max |logits - plain| = "
                  f"{theirs['max_logit_diff']:.3e}; greedy 16 tokens identical: {theirs['greedy_identical']}; "
                  "timing", flush=True)
            result["liger"], result["liger_note"] = dict(theirs, **timings(model, timed_ids)), ""
        except Exception as e:  # noqa: BLE001 - report it and keep the plain/kernels results
            traceback.print_exc()
            result["liger_note"] = f"failed: {type(e).__name__}: {e}"[:300]
    if not result["liger"]:
        print(f"[5/6] Liger: {result['liger_note']}", flush=True)
    return result


def table(result: dict) -> list[str]:
    """The demo's markdown table: plain | kernels | speedup | Liger | Liger speedup, then the parity lines."""
    p, o, lg = result["plain"], result["ours"], result["liger"] or {}
    rows = [[label, f"{p[key]:{spec}}", f"{o[key]:{spec}}", h.fmt(h.speedups(result, "ours")[i], ".2f", "x"),
             h.fmt(lg.get(key), spec), h.fmt(h.speedups(result, "liger")[i], ".2f", "x")]
            for i, (label, key, spec) in enumerate([("prefill tokens/s", "prefill_tok_s", ".0f"),
                                                    ("decode ms/token", "decode_ms", ".3f")])]
    lines = h.table([f"{result['name']} ({result['versions']['gpu']}, {result['tokens']} tokens)", "plain",
                     f"kernels ({result['kind']})", "speedup", "Liger", "Liger speedup"], rows)
    lines.append("")
    for who, r in (("kernels", o), ("Liger", lg)):
        lines.append(f"{who}: max |logits - plain| = {r['max_logit_diff']:.3e}; greedy tokens identical: "
                     f"{r['greedy_identical']}" if r else f"{who}: n/a ({result['liger_note']})")
    lines.append(f"kernel layers: {result['kernel_layers']}; cuTile compiles: {result['compiles']} "
                 f"({result['compile_s']:.1f} s)")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="cuTile kernels through the Kernel Hub: parity and speed")
    parser.add_argument("--family", choices=ALL_FAMILIES, default="llama")
    parser.add_argument("--size", choices=["tiny", "8b"], help="default: 8b on a GPU, tiny on CPU")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--kernels", default="norm,fused,rope", help=f"comma list of {', '.join(KERNELS)}")
    parser.add_argument("--tokens", type=int, default=None, help="prompt length (default 2048 GPU, 64 CPU)")
    parser.add_argument("--liger", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure Liger-Kernel (default: on with CUDA when liger_kernel imports)")
    parser.add_argument("--cache", type=Path, default=h.CACHE)
    parser.add_argument("--out", type=Path, help="write demo.md and demo.png here")
    parser.add_argument("--json", type=Path, help="write the measured numbers here")
    args = parser.parse_args(argv)
    result = measure(args.family, size=args.size, layers=args.layers, tokens=args.tokens, liger=args.liger,
                     kernels=tuple(k.strip() for k in args.kernels.split(",") if k.strip()), cache=args.cache)
    print("[6/6] results")
    h.write_report(args.out and args.out / "demo.md", "\n".join(table(result)) + "\n")
    print("".join(f"      note: {n}\n" for n in result["notes"]), end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.out:
        h.plot_speedups(args.out / "demo.png", [result])


if __name__ == "__main__":
    main()
