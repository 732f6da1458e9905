"""What every benchmark shares: model shapes, timing, copy bandwidth, the kernel under test, peers, reports.

Scripts run from the repository root as `python -m benchmarks.<name>`; `--tiny` runs tiny shapes on CPU (no graphs;
the tests run it). Reports go to `benchmarks/results/<gpu>/` (`gpu_slug()`), headed by `header()`. Timing on a GPU
(model: Liger-Kernel's benchmark/scripts/utils.py): `device_us` replays a CUDA graph of back-to-back calls rotating
through input sets (`input_sets`: large inputs miss L2), the kernels alone; `host_us` times back-to-back Python calls,
what eager decoding pays; `wall_ms` is the median synchronized call; `copy_gbs` the copy bandwidth, once a process.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib
import logging
import math
import platform
import re
import statistics
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from devtools.build import ROOT
from devtools.checkpoints import make_checkpoint
from devtools.local_hub import local_hub

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / ".cache" / "checkpoints"


# --- model shapes (from each model's config.json on the Hub) ---------------------------------------------------

@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    act: str = "silu"

    def config(self) -> dict:
        """As transformers config keys (what devtools.checkpoints.make_checkpoint overrides)."""
        return dict(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                    num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, head_dim=self.head_dim)


GELU = "gelu_pytorch_tanh"
MODELS = {
    "llama3-8b": Shape(4096, 14336, 32, 8, 128, 128256),
    "mistral-7b": Shape(4096, 14336, 32, 8, 128, 32000),  # v0.1: Llama-3-8B's widths with a 32000 vocab
    "qwen2-7b": Shape(3584, 18944, 28, 4, 128, 152064),
    "qwen3-8b": Shape(4096, 12288, 32, 8, 128, 151936),
    "qwen3-4b": Shape(2560, 9728, 32, 8, 128, 151936),
    "llama3-70b": Shape(8192, 28672, 64, 8, 128, 128256),
    "gemma3-4b": Shape(2560, 10240, 8, 4, 256, 262208, GELU),
    "gemma3-12b": Shape(3840, 15360, 16, 8, 256, 262208, GELU),
    "gemma3-27b": Shape(5376, 21504, 32, 16, 128, 262208, GELU),
}
# "8B widths" wherever a benchmark builds a whole model (random weights; every family gets these widths).
SIZE_8B = MODELS["mistral-7b"]
TINY = Shape(64, 160, 4, 2, 16, 256)  # devtools.checkpoints.TINY
ROWS = (1, 16, 64, 512, 4096, 32768)  # tokens in flight: decode batches to long prefills


def widths(attr: str, *, gemma: bool) -> list[int]:
    """The distinct values of `attr` over the registry's Gemma3 (or other) models."""
    return sorted({getattr(s, attr) for name, s in MODELS.items() if name.startswith("gemma") == gemma})


def checkpoint(family: str, *, tiny: bool, layers: int, dtype, cache: Path = CACHE) -> Path:
    """A random `family` checkpoint of 8B widths (or tiny), saved once under `cache`."""
    size = "tiny" if tiny else "8b"
    return make_checkpoint(family, cache / f"{family}-{size}-{layers}l", dtype=dtype, num_hidden_layers=layers,
                           **({} if tiny else SIZE_8B.config()))


# --- timing ------------------------------------------------------------------------------------------------------

def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    """Return what dropped models held (one model on the GPU at a time)."""
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _median_us(fn, args=(), reps: int = 10) -> float:
    """Median µs of synchronized single calls: CUDA events on a GPU, perf_counter on CPU."""
    times = []
    for _ in range(reps):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def wall_ms(fn, *, warmup: int = 3, reps: int = 10) -> float:
    for _ in range(warmup):
        fn()
    sync()
    return _median_us(fn, reps=reps) / 1e3


def device_us(fn, sets=((),), *, calls: int = 20, reps: int = 15) -> float:
    """µs per call of `fn(*args)`, args rotating through `sets` (see the module docstring); CPU: wall median."""
    for args in sets:  # warm-up: compiles and autotuning happen before capture
        fn(*args)
    if DEVICE != "cuda":
        return _median_us(fn, sets[0], reps=5)
    sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*sets[i % len(sets)])
    graph.replay()
    return _median_us(graph.replay, reps=reps) / calls


@contextlib.contextmanager
def compile_references(ck, tokens: int | None):
    """Inside, `ck`'s ops trace their PyTorch references under torch.compile for calls of at most `tokens` tokens
    (its `_op.COMPILE_REFERENCE_TOKENS`, read when a call is traced; None: the package's own value). Dynamo's
    caches are reset around a change, so no compiled code of the other routing is reused."""
    op = importlib.import_module(f"{ck.__name__}._op")
    default = op.COMPILE_REFERENCE_TOKENS
    if tokens is None or tokens == default:
        yield
        return
    op.COMPILE_REFERENCE_TOKENS = tokens
    torch._dynamo.reset()
    try:
        yield
    finally:
        op.COMPILE_REFERENCE_TOKENS = default
        torch._dynamo.reset()


@contextlib.contextmanager
def side_stream():
    """Work inside runs on one non-default CUDA stream, which the current stream then waits for (CPU: nothing)."""
    if DEVICE != "cuda":
        yield
        return
    side, current = _side_stream(), torch.cuda.current_stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


@functools.cache
def _side_stream():
    return torch.cuda.Stream()


def host_us(fn, args=(), *, n: int = 1000, batches: int = 5) -> float:
    """µs per back-to-back call of `fn(*args)`: the median over `batches` timed batches of n / batches calls (one
    batch disturbed by another process on the host moves the median little: on an H100 host, two cold_start rows
    timing the same JIT path in one batch each read 24 and 37 µs)."""
    for _ in range(min(n, 20)):
        fn(*args)
    sync()
    per = max(1, n // batches)
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(per):
            fn(*args)
        sync()
        times.append((time.perf_counter() - t0) / per * 1e6)
    return statistics.median(times)


@functools.cache
def copy_gbs() -> float:
    """Device-to-device copy bandwidth in GB/s (read + write; 1 GiB on a GPU)."""
    a = torch.empty(1 << (30 if DEVICE == "cuda" else 24), dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    # ten back-to-back copies between two events (as the committed tables of 2026-11-22/23 measured it: the same
    # copies replayed from a CUDA graph read ~20 % lower on an H100)
    return 2 * a.numel() * 10 / _median_us(lambda: [b.copy_(a) for _ in range(10)], reps=3) / 1e3


def pct_of_copy(nbytes: float, us: float) -> float:
    """Bytes an op must move in `us`, as a percentage of the copy bandwidth."""
    return 100 * nbytes / us / 1e3 / copy_gbs()


def set_count(nbytes: float, *, budget: float = 256e6, most: int = 4) -> int:
    """How many independent inputs of `nbytes` (bytes a call moves) cover `budget` bytes, so that rotating through
    them misses L2 (at most `most`). run_all and the tuner both rotate this many: a tuned choice wins under the
    conditions its row is reported in."""
    return max(1, min(most, math.ceil(budget / max(nbytes, 1))))


def input_sets(make, nbytes: float) -> list:
    """`set_count(nbytes)` independent inputs from `make()`."""
    return [make() for _ in range(set_count(nbytes))]


# --- the kernel under test -----------------------------------------------------------------------------------

def local_kernel(root: Path = ROOT):
    """The package from `root/build` as kernels resolves it on this machine (a CUDA variant on a GPU)."""
    import kernels

    return kernels.get_local_kernel(root)


@contextlib.contextmanager
def precompiled(ck, on: bool):
    """Inside, `ck`'s launches take its precompiled cubins (`on`; yields whether this GPU has any) or the cuTile
    JIT (off; yields False). On CPU: False."""
    if DEVICE != "cuda":
        yield False
        return
    runtime = importlib.import_module(f"{ck.__name__}._runtime")
    index = torch.cuda.current_device()
    found = runtime.precompiled(index)
    runtime._PRECOMPILED[index] = found if on else None
    try:
        yield on and found is not None
    finally:
        runtime._PRECOMPILED[index] = found


@contextlib.contextmanager
def cpu_kernel_config():
    """transformers refuses "cpu" in a KernelConfig; on CPU this lifts that one check within the block (the
    kernels then run their exact PyTorch reference). Nothing changes on a GPU."""
    import transformers.utils.kernel_config as kc

    lift = DEVICE == "cpu" and "cpu" not in kc.KERNELS_SUPPORTED_DEVICE_TYPES
    if lift:
        kc.KERNELS_SUPPORTED_DEVICE_TYPES.append("cpu")
    try:
        yield
    finally:
        if lift:
            kc.KERNELS_SUPPORTED_DEVICE_TYPES.remove("cpu")


@contextlib.contextmanager
def kernel_hub(root: Path = ROOT):
    """Within: the Hub repo id served from `root/build` (offline) and the CPU check lifted; yields (repo, package
    as transformers loads it)."""
    import kernels

    logging.getLogger("kernels").setLevel(logging.ERROR)  # "no mapping for SiLU" notes: expected, not news
    with local_hub(root) as repo, cpu_kernel_config():
        yield repo, kernels.get_kernel(repo, version=1)


@contextlib.contextmanager
def fallbacks(ck):
    """Collects the package's CutileFallbackWarning messages (one per op and reason per process) into the
    yielded list, at the end of the block."""
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ck.CutileFallbackWarning)
        yield notes
    notes += sorted({str(w.message) for w in caught if issubclass(w.category, ck.CutileFallbackWarning)})


def load_model(path: Path, dtype, mapping: dict | None = None):
    """`from_pretrained` onto this machine's device; with `mapping`, through KernelConfig(mapping)."""
    from transformers import AutoModelForCausalLM, KernelConfig

    kw = {"device_map": "cuda"} if DEVICE == "cuda" else {}  # device_map needs accelerate
    if mapping is not None:
        kw.update(use_kernels=True, kernel_config=KernelConfig(mapping, inherit_mapping=False))
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)


def kernel_layers(model, ck) -> Counter:
    """How many modules (and transformers' kernelizable functions, e.g. rotary_pos_emb) of `model` run a forward
    of `ck`'s layers. kernelize binds `layer.forward` on each module it replaces (the original class's forward when
    it falls back), and a model's functions sit in its modules' `_kernel_funcs`."""
    layers = {getattr(ck.layers, name).forward: name for name in ck.layers.__all__}
    found, seen = Counter(), set()
    for module in model.modules():
        for obj in (module, *getattr(module, "_kernel_funcs", {}).values()):
            fn = getattr(obj.__dict__.get("forward"), "__func__", None)
            if id(obj) not in seen and fn in layers:  # not a Layout's own (reference) forward
                found[layers[fn]] += 1
            seen.add(id(obj))
    return found


def layer_list(layers: dict) -> str:
    """kernel_layers' count as text: "RMSNorm x5, SwiGLUMLP x2"."""
    return ", ".join(f"{k} x{n}" for k, n in sorted(layers.items()))


def require_decoder_layers(script: str, config: str, layers: dict, expected: int) -> None:
    """Stop `script` when not all `expected` decoder layers of `config` run the decoder layer kernel: its row would
    time ours without it again."""
    found = sum(n for k, n in layers.items() if k.endswith("DecoderLayer"))
    if found != expected:
        raise SystemExit(f"{script}: {config}: {found} of {expected} decoder layers run the decoder layer kernel "
                         f"({layer_list(layers)})")


@contextlib.contextmanager
def tile_compiles():
    """Seconds of each cuTile JIT compile within the block, in the yielded list (empty without cuda.tile).
    CUDA_TILE_CACHE_DIR=off in the environment makes every one cold."""
    times: list[float] = []
    try:
        import cuda.tile._compile as tile_compile
    except Exception:  # noqa: BLE001 - no cuda.tile here: nothing compiles
        yield times
        return
    original = tile_compile.compile_tile

    def counted(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - t0)

    tile_compile.compile_tile = counted
    try:
        yield times
    finally:
        tile_compile.compile_tile = original


# --- peers: each optional, skipped with a note when it does not import -------------------------------------------

LIGER_NAME = dict(llama="llama", mistral="mistral", qwen2="qwen2", qwen3="qwen3", gemma3="gemma3_text")


@functools.cache
def peer(module: str):
    """`module` imported, or None after a printed note (Liger-Kernel, TileGym: optional)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - ImportError, or Triton failing to initialise without a GPU
        print(f"      skipped {module}: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}")
        return None


def compiled(fn):
    """torch.compile as a peer: Inductor on a GPU; on CPU aot_eager (same graphs, no C++ build: the tiny runs)."""
    return torch.compile(fn, dynamic=False, backend="inductor" if DEVICE == "cuda" else "aot_eager")


def apply_liger(family: str, model, loss: bool = False) -> None:
    """Liger-Kernel's own patch of a loaded model: RoPE, RMSNorm and the gated MLP; with `loss` also its fused
    linear cross-entropy (Liger's default: the LM head and the loss in chunks, no logits for the loss). Raises
    ImportError without liger_kernel. It patches transformers' modules process-wide: run it last."""
    lt = peer("liger_kernel.transformers")
    if lt is None:
        raise ImportError("liger_kernel does not import")
    mlp = {"geglu": True} if family == "gemma3" else {"swiglu": True}
    getattr(lt, f"apply_liger_kernel_to_{LIGER_NAME[family]}")(
        model=model, rope=True, rms_norm=True, cross_entropy=False, fused_linear_cross_entropy=loss, **mlp)


# --- the demo's results (devtools.demo.measure; benchmarks.e2e collects them) -------------------------------------

def speedups(result: dict, who: str) -> tuple[float | None, float | None]:
    """(prefill, decode) speedup of `who` ("ours" or "liger") over plain; None where not measured."""
    r, p = result.get(who), result["plain"]
    if not r:
        return None, None
    return r["prefill_tok_s"] / p["prefill_tok_s"], p["decode_ms"] / r["decode_ms"]


def plot_speedups(path: Path, results: list[dict]) -> bool:
    """Speedup over plain of ours and Liger per family, prefill and decode side by side."""
    series = [(who, label) for who, label in (("ours", "cuTile kernels"), ("liger", "Liger"))
              if any(r.get(who) for r in results)]
    return plot(path, [(title, [r["family"] for r in results], {label: [speedups(r, who)[i] for r in results]
                                                                 for who, label in series})
                       for i, title in enumerate(("prefill", "decode"))], ylabel="speedup vs plain")


# --- reports -------------------------------------------------------------------------------------------------------

def versions() -> dict:
    found = dict(gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU", torch=torch.__version__,
                 cuda=torch.version.cuda or "none", python=platform.python_version())
    for dist in ("cuda-tile", "transformers", "kernels", "liger-kernel", "tilegym"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "not installed"
    return found


def gpu_slug() -> str:
    """'h100', 'h200', ... from the device name ('cpu' without CUDA): the results folder."""
    name = versions()["gpu"]
    found = re.search(r"\b([A-Z]{1,3}\d{2,4})\b", name)
    return found.group(1).lower() if found else re.sub(r"\W+", "_", name.lower()).strip("_")


def header(title: str, args) -> str:
    """The first lines of every result file: title, GPU and versions, the command that wrote it, the date."""
    v = versions()
    command = " ".join([f"python -m {args.script}", *args.argv])
    return (f"# {title}\n\n{v['gpu']}; torch {v['torch']} (CUDA {v['cuda']}), cuda.tile {v['cuda-tile']}, "
            f"transformers {v['transformers']}, kernels {v['kernels']}, liger-kernel {v['liger-kernel']}, "
            f"tilegym {v['tilegym']}, python {v['python']}; `{command}`, {datetime.date.today().isoformat()}\n")


def arguments(script: str, doc: str, argv, add=None, *, out: str, kernel_root: bool = True) -> argparse.Namespace:
    """The options every script takes (--tiny, --out, --kernel-root, --cache) plus `add(parser)`'s; --out defaults
    to benchmarks/results/<gpu>/<out> (none with --tiny)."""
    p = argparse.ArgumentParser(prog=f"python -m {script}", description=doc.strip().splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU, few repetitions (what the tests run)")
    p.add_argument("--out", type=Path, help=f"the markdown report (default: benchmarks/results/<gpu>/{out})")
    if kernel_root:  # (benchmarks.e2e runs the demo, which serves this checkout's build/)
        p.add_argument("--kernel-root", type=Path, default=ROOT, help="a directory with build/ (default: here)")
    p.add_argument("--cache", type=Path, default=CACHE, help="where random checkpoints are kept")
    if add:
        add(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.script, args.argv = script, argv
    if args.out is None and not args.tiny:
        args.out = RESULTS / gpu_slug() / out
    return args


def table(columns: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def fmt(x, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def write_report(out: Path | None, text: str) -> None:
    """Print a report and, with `out`, write it there too."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"      wrote {out}")


def plot(path: Path, panels, *, ylabel: str, logx: bool = False, ref: float = 1.0) -> bool:
    """Panels side by side, each (title, xs, {label: [y per x]}): grouped bars over the xs as categories, or lines
    over numeric xs (logx, base 2). A dashed line at `ref`. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("      (matplotlib not installed: no plot)")
        return False
    width = 5 * len(panels) if logx else 1.2 + len(panels) * (0.5 + 0.6 * max(len(p[1]) for p in panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4 if logx else 3.2), dpi=80, squeeze=False)
    for ax, (title, xs, series) in zip(axes[0], panels):
        for j, (label, ys) in enumerate(series.items()):
            ys = [math.nan if y is None else y for y in ys]
            if logx:
                ax.plot(xs, ys, marker="o", label=label)
                continue
            w = 0.8 / len(series)
            bars = ax.bar([i + (j + 0.5 - len(series) / 2) * w for i in range(len(xs))], ys, width=w, label=label)
            ax.bar_label(bars, labels=[fmt(y, ".2f") for y in ys], fontsize=6, padding=1)
        if logx:
            ax.set_xscale("log", base=2)
        else:
            ax.set_xticks(range(len(xs)), [str(x) for x in xs], fontsize=8)
        ax.axhline(ref, color="gray", ls="--", lw=0.8)
        ax.set_title(title, fontsize=9)
    axes[0][0].set_ylabel(ylabel, fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncols=min(len(labels), 5) or 1, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.05 * (1 + (len(labels) - 1) // 5)))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"      wrote {path}")
    return True
