"""Cold start: from_pretrained plus the first forward, each configuration in a fresh process (issue 13).

    python -m devtools.build --archs sm_90 && python -m benchmarks.cold_start [--layers 4] [--tokens 128]
                                                  [--out benchmarks/results/<gpu>/cold_start.md]
    python -m benchmarks.cold_start --tiny        (CPU: tiny checkpoint, 2 layers, 16 tokens; plumbing only)

The Llama checkpoint of 8B widths (harness.SIZE_8B, random weights, bf16), loaded as devtools.demo loads it: plain,
or through KernelConfig(recommended_mapping("llama", repo)) with the repo id served from `--kernel-root`/build.
Every row is a new Python process (a cold CUDA context, no kernel module loaded yet) that times from_pretrained
(for ours, kernels.get_kernel too), the first forward of a 1 x tokens prefill and the median of 3 later ones (each
synchronized), and reports JSON on stdout. Rows: plain transformers; ours with the build's precompiled cubins
(default environment); the same in a process where `import cuda.tile` fails (as in tests/test_aot.py); ours through
the cuTile JIT (CUTILE_KERNELS_PRECOMPILED=0) with an empty CUDA_TILE_CACHE_DIR (every compile cold, as with `off`;
it fills the cache) and once more with that cache warm. The precompiled rows run with CUDA_TILE_CACHE_DIR=off, so
a launch that falls to the JIT shows as a cold compile.

The table's columns are defined under its title (DEFINITIONS). kernel set-up = (first - later forward) of the row
- (first - later forward) of plain: what our first forward costs beyond plain's own first-call work (cuBLAS,
allocator). Issue 13's goal: under 0.5 s with the cubins, where the JIT spends seconds.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import harness as h

MARK = "COLD_START_JSON "
DEFINITIONS = ("Seconds, each row a new process. load: from_pretrained (ours: and kernels.get_kernel); first / later "
               "forward: the first prefill and the median of the next 3, synchronized; kernel set-up: (first - later) "
               "of the row - (first - later) of plain; cuTile compiles: compile_tile calls (their seconds; with a warm "
               "cache, disk-cache hits); cubin launches: Precompiled.launch calls a cubin served / all; rms_norm host "
               "µs: one warm call of the package's rms_norm (16 x hidden) back to back, the cubin launch path against "
               "ct.launch; process: the whole child, interpreter start to exit; vs plain: load + first of the row - "
               "that of plain.\n")
BLOCK = """
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "cuda.tile" or name.startswith("cuda.tile."):
            raise ImportError("cuda.tile is blocked in this process")
sys.meta_path.insert(0, Block())
"""
# (name, label, env, block cuda.tile)
CONFIGS = [("plain", "plain transformers", {}, False),
           ("cubins", "ours: precompiled cubins", {"CUDA_TILE_CACHE_DIR": "off"}, False),
           ("cubins-no-tile", "ours: precompiled cubins, no cuda.tile", {"CUDA_TILE_CACHE_DIR": "off"}, True),
           ("jit-cold", "ours: cuTile JIT, cold compiles", {"CUTILE_KERNELS_PRECOMPILED": "0",
                                                            "CUDA_TILE_CACHE_DIR": "<empty dir>"}, False),
           ("jit-warm", "ours: cuTile JIT, warm compile cache", {"CUTILE_KERNELS_PRECOMPILED": "0",
                                                                 "CUDA_TILE_CACHE_DIR": "<that dir>"}, False)]


def child(config: str, path: str, tokens: int, root: str, tiny: bool) -> None:
    """One configuration, in this (fresh) process: prints its numbers as one JSON line."""
    if tiny:
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if h.DEVICE == "cuda" else torch.float32
    launches, compiles = {"served": 0, "asked": 0}, {}
    with contextlib.ExitStack() as stack:

        class CountCompiles:  # harness.tile_compiles from when cuda.tile._compile is imported, if ever (importing
            def find_spec(self, name, path=None, target=None):  # it here would cost the cubin rows nothing)
                if name != "cuda.tile._compile":
                    return None
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                load = spec.loader.exec_module

                def exec_module(module):
                    load(module)
                    compiles["times"] = stack.enter_context(h.tile_compiles())

                spec.loader.exec_module = exec_module
                return spec

        sys.meta_path.insert(sys.meta_path.index(importlib.machinery.PathFinder), CountCompiles())
        t0, mapping, ck = time.perf_counter(), None, None
        if config != "plain":
            repo, ck = stack.enter_context(h.kernel_hub(Path(root)))
            stack.enter_context(ck.transformers_state_guard())
            notes = stack.enter_context(h.fallbacks(ck))
            aot = importlib.import_module(f"{ck.__name__}._aot")
            original = aot.Precompiled.launch

            def counted(self, *args):
                served = original(self, *args)
                launches["asked"], launches["served"] = launches["asked"] + 1, launches["served"] + served
                return served

            aot.Precompiled.launch = counted
            mapping = ck.recommended_mapping("llama", repo)
        model = h.load_model(Path(path), dtype, mapping).eval()
        h.sync()
        load = time.perf_counter() - t0
        ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        ids, forwards = ids.to(h.DEVICE), []
        with torch.no_grad():
            for _ in range(4):
                t0 = time.perf_counter()
                model(ids)
                h.sync()
                forwards.append(time.perf_counter() - t0)
        layers, imported = h.kernel_layers(model, ck) if ck else {}, "cuda.tile" in sys.modules
        compile_times, host = list(compiles.get("times", [])), None  # (the host timing below may compile once)
        if ck:  # host time of one op call once warm: the cubin launch path against ct.launch (the JIT rows)
            aot.Precompiled.launch = original
            x = torch.randn(16, model.config.hidden_size, device=h.DEVICE, dtype=dtype)
            w = torch.randn(model.config.hidden_size, device=h.DEVICE, dtype=dtype)
            host = h.host_us(ck.rms_norm, (x, w, 1e-6), n=20 if tiny else 2000)
    try:  # (after the timing) the blocked process cannot
        importable = bool(importlib.import_module("cuda.tile"))
    except ImportError:
        importable = False
    print(MARK + json.dumps(dict(load=load, first=forwards[0], later=statistics.median(forwards[1:]),
                                 compiles=len(compile_times), compile_s=sum(compile_times),
                                 **launches, layers=dict(layers), notes=notes if ck else [],
                                 tile_imported=imported, tile_importable=importable, host_us=host)), flush=True)


def spawn(config: str, env: dict, block: bool, args, path) -> dict:
    """`config` in a new interpreter; its JSON line, with the process's wall seconds."""
    code = (f"import sys\n{BLOCK if block else ''}from benchmarks import cold_start\n"
            f"cold_start.child({config!r}, {str(path)!r}, {args.tokens}, {str(args.kernel_root)!r}, {args.tiny})\n")
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code], cwd=h.ROOT, env=dict(os.environ, **env), stdout=subprocess.PIPE,
                         text=True)
    wall = time.perf_counter() - t0
    lines = run.stdout.splitlines()
    print("\n".join(f"      {line}" for line in lines if not line.startswith(MARK)), flush=True)
    found = [json.loads(line[len(MARK):]) for line in lines if line.startswith(MARK)]
    if run.returncode or not found:
        raise SystemExit(f"cold_start: {config} failed (exit code {run.returncode}; its stderr is above)")
    return dict(found[-1], process=wall)


def main(argv=None) -> None:
    def add(p):
        p.add_argument("--layers", type=int, default=4)
        p.add_argument("--tokens", type=int, help="prefill length (default 128 GPU, 16 CPU)")

    args = h.arguments("benchmarks.cold_start", __doc__, argv, add=add, out="cold_start.md")
    args.tokens = args.tokens or (16 if args.tiny else 128)
    layers = 2 if args.tiny else args.layers
    dtype = torch.bfloat16 if h.DEVICE == "cuda" else torch.float32
    path = h.checkpoint("llama", tiny=args.tiny, layers=layers, dtype=dtype, cache=args.cache)  # made before timing
    for f in path.glob("*.safetensors"):  # into the page cache: the first row must not pay the disk alone
        with f.open("rb") as file:
            while file.read(1 << 26):
                pass
    cubins = sorted(p.parent.parent.name for p in (args.kernel_root / "build").glob("torch2*/cubins/manifest.json"))
    results = {}
    with tempfile.TemporaryDirectory(prefix="cold-start-tile-cache-") as cache:
        for i, (name, label, env, block) in enumerate(CONFIGS, 1):
            env = {k: cache if v.startswith("<") else v for k, v in env.items()}
            print(f"[{i}/{len(CONFIGS)}] {label}: fresh process, {env or 'default environment'}", flush=True)
            results[name] = spawn(name, env, block, args, path)
    h.write_report(args.out, report(results, path.name, cubins, args))


def report(results: dict, name: str, cubins: list[str], args) -> str:
    plain, rows, notes = results["plain"], [], []
    for config, label, env, block in CONFIGS:
        r = results[config]
        setup = (r["first"] - r["later"]) - (plain["first"] - plain["later"])
        rows.append([label, ", ".join(f"{k}={v}" for k, v in env.items()) or "default", f"{r['load']:.2f}",
                     f"{r['first']:.3f}", f"{r['later']:.4f}", f"{r['load'] + r['first']:.2f}",
                     "—" if config == "plain" else f"{r['load'] + r['first'] - plain['load'] - plain['first']:+.2f}",
                     "—" if config == "plain" else f"{setup:.3f}", f"{r['compiles']} ({r['compile_s']:.1f} s)",
                     f"{r['served']}/{r['asked']}", h.fmt(r["host_us"], ".2f"), f"{r['process']:.1f}"])
        if config != "plain":
            notes.append(f"- {label}: kernel layers {h.layer_list(r['layers']) or 'none'}; "
                         f"cuda.tile imported: {r['tile_imported']} (importable: {r['tile_importable']}); "
                         f"{len(r['notes'])} fallback warning(s)" + "".join(f"; {n}" for n in r["notes"]))
    notes.append(f"- build variants with cubins: {', '.join(cubins) or 'none (build with --archs sm_XY)'}"
                 + ("; CPU run: times mean nothing (the kernels run their references)" if h.DEVICE == "cpu" else ""))
    title = f"Cold start: from_pretrained + first forward, {name}, 1x{args.tokens} tokens, each row a fresh process"
    return "\n".join([h.header(title, args), DEFINITIONS, *h.table(
        ["config", "env", "load s", "first forward s", "later forward s", "load + first s", "vs plain s",
         "kernel set-up s", "cuTile compiles", "cubin launches", "rms_norm host µs", "process s"], rows), "",
        *notes]) + "\n"


if __name__ == "__main__":
    main()
