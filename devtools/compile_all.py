"""Compile cuTile kernels of kernel-src/ to cubins on the CPU: the compile check, and the precompiled kernels.

    python -m devtools.compile_all [--all]              compile check (sm_80, sm_90, sm_100, sm_120)
    python -m devtools.compile_all --aot [--archs ...]  the precompiled set into the cubin cache (.cache/cubins)

Compile check: each kernel module lists its launches (`specializations(array)`: the same launch plans its launcher
runs, on stand-in tensors). By default sm_90 (Hopper, the first target) compiles all of them and the other targets
the first and last of each kernel; `--all` compiles every specialization for every target. A kernel that does not
compile exits non-zero.

Precompiled set (`aot_specs`): every launch plan the launchers make over `AOT_DOMAIN` (dtypes, widths, head dims,
all row counts, untuned and tuned GPUs), each compiled with explicit constraints (`_aot.ARRAY_CONSTRAINTS`) for
every arch in ARCHS; devtools/build.py packs them into the arch variants with a manifest.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import pkgutil
import sys
import time
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor

from .build import ROOT

TARGETS = ("sm_80", "sm_90", "sm_100", "sm_120")
PACKAGE = "cutile_tile"


def _load_modules():
    sys.path.insert(0, str(ROOT / "kernel-src"))
    pkg = importlib.import_module(PACKAGE)
    modules = [importlib.import_module(f"{PACKAGE}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]
    return [m for m in modules if hasattr(m, "specializations")]  # kernel modules (not the tuned table)


class Tensor:
    """Stands for a tensor in a kernel module's launch plans (`specializations(array)`)."""

    def __init__(self, dtype, shape):
        self.dtype, self.shape = dtype, tuple(shape)


def _constraints(plan) -> tuple:
    """(kernel, parameters) for export_kernel from a launch plan (kernel, grid, args): the precompiled set's
    constraints (`constraints_of`), so that the compile check compiles what the arch variants ship."""
    return plan[0], constraints_of(spec_of(plan))


def _specs(module) -> list:
    return [_constraints(plan) for plan in module.specializations(Tensor)]


def jobs(everything: bool) -> list[tuple[str, int, str]]:
    out = []
    for module in _load_modules():
        specs = _specs(module)
        for target in TARGETS:
            picks = range(len(specs)) if everything or target == "sm_90" else sorted({0, len(specs) - 1})
            out += [(module.__name__, i, target) for i in picks]
    return out


def compile_one(job: tuple[str, int, str]) -> tuple[str, float, int]:
    from cuda.tile.compilation import CallingConvention, KernelSignature, export_kernel

    module_name, index, target = job
    module = next(m for m in _load_modules() if m.__name__ == module_name)
    kernel, params = _specs(module)[index]
    name = kernel._annotated_function.pyfunc.__name__
    sig = KernelSignature(params, CallingConvention.cutile_python_v1()).with_mangled_symbol(name)
    t0 = time.perf_counter()
    buf = io.BytesIO()
    export_kernel(kernel, [sig], buf, gpu_code=target, output_format="cubin")
    label = f"{module_name.split('.')[-1]}.{name}#{index} {target}"
    return label, time.perf_counter() - t0, len(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every specialization for every target")
    args = parser.parse_args()
    todo = jobs(args.all)
    print(f"compile: {len(todo)} cubins ({', '.join(TARGETS)})", flush=True)
    failures = 0
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = [(job, pool.submit(compile_one, job)) for job in todo]
        for done, (job, fut) in enumerate(futures, 1):
            try:
                label, seconds, size = fut.result()
                print(f"compile: [{done}/{len(todo)}] {label}: {size / 1024:.0f} KiB in {seconds:.1f} s", flush=True)
            except Exception as e:  # report every failure, then fail
                failures += 1
                print(f"compile: [{done}/{len(todo)}] FAILED {job}: {type(e).__name__}: {e}", flush=True)
    print(f"compile: {len(todo) - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


# --- the precompiled set -----------------------------------------------------------------------------------------

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120")  # every target tileiras 13.4 compiles
# What the precompiled kernels cover; launches outside it (other widths, head dims, fp32 weights under bf16 inputs,
# unaligned views) take the JIT, or the reference without cuda.tile. Widths are the hidden sizes of the supported
# families rounded up to their tile (896 ... 8192) and their per-head q/k norms (128, 256); rows: every bucket.
AOT_DOMAIN = {
    "dtypes": ("bfloat16", "float16", "float32"),
    # powers of two (the tile widths) and the models' other hidden sizes, whose tuned rms_norm_bwd_split entries
    # compile per width (Gemma3 270M / 4B / 27B, Qwen2 1.5B, Qwen3 4B / 14B)
    "norm_widths": (128, 256, 512, 1024, 2048, 4096, 8192, 640, 1536, 2560, 5120, 5376),
    "gated_widths": tuple(2 ** k for k in range(4, 17)),
    "head_dims": (64, 128, 256),
    "heads": ((4, 2), (32, 8)),  # (q heads, kv heads): RoPE tiles of 8 heads
    "rows": tuple(2 ** j for j in range(21)),
    "sm_counts": (132,),  # untuned GPUs (other counts add no specialization: checked for 108 and 170)
}
GPU_ARCH = {"h100": "sm_90", "h200": "sm_90"}  # tuned GPU keys (tuned.py) -> their arch; others: every arch
AOT_CACHE = ROOT / ".cache" / "cubins"


def planning_modules() -> dict:
    """kernel-src's kernel modules loaded as the precompiled runtime loads them (cuda.tile stood in for, kernels
    are PlannedKernels): the launch plans the build enumerates are the runtime's."""
    aot = _aot_module()
    sys.path.insert(0, str(ROOT / "kernel-src"))
    importlib.import_module(PACKAGE)
    out = {}
    for path in sorted((ROOT / "kernel-src" / PACKAGE).glob("*.py")):
        if "import cuda.tile" in path.read_text():
            out[path.stem] = aot.load_planning_module(f"{PACKAGE}._planning_{path.stem}", path, path.stem)
    return out


@functools.cache
def _aot_module():
    """torch-ext's _aot.py on its own (it imports nothing from its package)."""
    path = ROOT / "torch-ext" / "cutile_kernels" / "_aot.py"
    spec = importlib.util.spec_from_file_location("_cutile_kernels_aot", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _gpus():
    tuned = importlib.import_module(f"{PACKAGE}.tuned")
    keys = sorted({key[0] for key in tuned.TABLE})
    return [("", n) for n in AOT_DOMAIN["sm_counts"]] + [(k, 132) for k in keys]


def aot_plans(modules: dict):
    """(gpu key, launch plan) of every launch the op launchers make over AOT_DOMAIN: the launchers' own calls of
    the kernel modules' launch builders, on stand-in tensors (kernel modules without a sweep here: their
    `specializations`)."""
    import torch

    T, f32 = Tensor, torch.float32
    dtypes = [getattr(torch, d) for d in AOT_DOMAIN["dtypes"]]
    rows = AOT_DOMAIN["rows"]
    for gpu in _gpus():
        if "rms_norm" in modules:
            norm = modules["rms_norm"]
            for n in AOT_DOMAIN["norm_widths"]:
                for m in rows:
                    for d in dtypes:
                        x, w = T(d, (m, n)), T(d, (n,))
                        for gemma in (False, True):
                            yield gpu, norm.forward_launch(x, w, x, 1e-6, gemma, gpu)
                            yield gpu, norm.add_forward_launch(x, x, w, x, x, 1e-6, gemma, gpu)
                            if gemma:  # Gemma3's sandwich and its last norm + residual add
                                yield gpu, norm.add_forward_launch(x, x, w, x, x, 1e-6, gemma, gpu, post_weight=w)
                                yield gpu, norm.norm_add_launch(x, x, w, x, 1e-6, gemma, gpu)
                            blocks = norm.backward_blocks(x, gpu)  # one block writes dw in the weight's dtype
                            dw = T(f32 if blocks > 1 else d, (blocks, n))
                            yield gpu, norm.backward_launch(x, w, x, x, dw, 1e-6, gemma, gpu)
                            yield gpu, norm.backward_launch(x, w, x, x, dw, 1e-6, gemma, gpu, dres=x)  # + residual
                            if blocks > 1:
                                yield gpu, norm.dw_sum_launch(dw, w)
                            if gemma:  # the sandwich's one-launch backward at decode sizes (None elsewhere)
                                rows_dw = T(f32 if m > 1 else d, (m, n))
                                plan = norm.sandwich_backward_launch(x, x, w, w, x, x, x, x, rows_dw, rows_dw,
                                                                     1e-6, gpu)
                                if plan is not None:
                                    yield gpu, plan
        if "gated_act" in modules:
            act = modules["gated_act"]
            for n in AOT_DOMAIN["gated_widths"]:
                for m in rows:
                    for d in dtypes:
                        x = T(d, (m, n))
                        for name in act.ACTIVATIONS:
                            yield gpu, act.forward_launch(x, x, x, name, gpu)
                            yield gpu, act.backward_launch(x, x, x, x, x, name, gpu)
        if "rope" in modules:
            rope = modules["rope"]
            for hd in AOT_DOMAIN["head_dims"]:
                for hq, hk in AOT_DOMAIN["heads"]:
                    for s in rows[:17]:
                        for d in dtypes:
                            q, k, cs = T(d, (1, hq, s, hd)), T(d, (1, hk, s, hd)), T(d, (1, s, hd))
                            yield gpu, rope.forward_launch(q, k, cs, cs, q, k, gpu)
                            if d is not f32:  # float32 cos/sin (a float32 model under autocast): float32 outputs
                                cs32, q32, k32 = T(f32, cs.shape), T(f32, q.shape), T(f32, k.shape)
                                yield gpu, rope.forward_launch(q, k, cs32, cs32, q32, k32, gpu)
                            for gemma in (False, True):  # q_norm / k_norm + RoPE (Qwen3, Gemma3)
                                w = T(d, (hd,))
                                yield gpu, rope.qk_norm_launch(q, k, w, w, cs, cs, q, k, 1e-6, gemma, gpu)
    for stem, module in modules.items():
        if stem not in ("rms_norm", "gated_act", "rope") and hasattr(module, "specializations"):
            yield ("", 132), from_specializations
            for plan in module.specializations(T):
                yield ("", 132), plan


from_specializations = None  # marker between the sweeps and the modules' own lists (skipped)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One precompiled specialization: kernel (module stem, function, hints JSON) and per parameter
    ("array", dtype, ndim) | ("int32",) | ("float32",) | ("constant", value)."""
    module: str
    kernel: str
    hints: str
    params: tuple

    @property
    def name(self) -> str:
        digest = hashlib.sha256(json.dumps([self.module, self.kernel, self.hints, self.params]).encode())
        return f"{self.kernel}-{digest.hexdigest()[:16]}"


def spec_of(plan) -> Spec:
    """The Spec of a launch plan (kernel, grid, args) as the runtime keys it (_aot.kernel_identity)."""
    aot = _aot_module()
    kernel, _, args = plan
    module, name, hints = aot.kernel_identity(kernel)
    pyfunc = kernel.pyfunc if hasattr(kernel, "pyfunc") else kernel._annotated_function.pyfunc
    params = []
    for arg, p in zip(args, inspect.signature(pyfunc).parameters.values()):
        marks = getattr(p.annotation, "__metadata__", ())
        if any(type(m).__name__ == "ConstantAnnotation" for m in marks):
            params.append(("constant", arg))
        elif isinstance(arg, Tensor) or hasattr(arg, "data_ptr"):  # a stand-in or a real tensor
            params.append(("array", str(arg.dtype).removeprefix("torch."), len(arg.shape)))
        else:
            params.append(("float32",) if isinstance(arg, float) else ("int32",))
    return Spec(module, name, hints, tuple(params))


def aot_specs() -> dict[Spec, tuple[str, ...]]:
    """Every precompiled specialization and the archs it is compiled for (a tuned GPU's plans: its arch only)."""
    out: dict[Spec, set] = {}
    for gpu, plan in aot_plans(planning_modules()):
        if plan is None:
            continue
        archs = (GPU_ARCH[gpu[0]],) if gpu[0] in GPU_ARCH else ARCHS
        out.setdefault(spec_of(plan), set()).update(archs)
    return {spec: tuple(a for a in ARCHS if a in archs) for spec, archs in out.items()}


def compiler_version() -> str | None:
    """cuda-tile and tileiras versions (part of every cubin's cache key), or None when either is missing. tileiras
    is the pip package's, or, where the toolkit is not a pip package (a tileiras on PATH, as cuda.tile also
    accepts), the version `tileiras --version` prints."""
    import re
    import shutil
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    try:
        tile = version("cuda-tile")
    except PackageNotFoundError:
        return None
    try:
        tileiras = version("nvidia-cuda-tileiras")
    except PackageNotFoundError:
        exe = shutil.which("tileiras")
        printed = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout if exe else ""
        found = re.search(r"V(\d+\.\d+\.\d+)", printed)
        if found is None:
            return None
        tileiras = found.group(1)
    return f"cuda-tile {tile}, tileiras {tileiras}"


def source_digests() -> dict[str, str]:
    """sha256 of each kernel module (the manifest records them; the runtime checks them)."""
    aot = _aot_module()
    return {p.stem: aot.source_digest(p) for p in sorted((ROOT / "kernel-src" / PACKAGE).glob("*.py"))
            if "import cuda.tile" in p.read_text()}


def cubin_path(spec: Spec, arch: str, digests: dict, compiler: str, cache: Path = AOT_CACHE) -> Path:
    """Where the cache keeps `spec`'s cubin for `arch`: keyed by the spec, the kernel module's and the package
    constants' sources, the constraints and the compiler."""
    aot = _aot_module()
    init = (ROOT / "kernel-src" / PACKAGE / "__init__.py").read_bytes()
    key = json.dumps([spec.name, digests[spec.module], hashlib.sha256(init).hexdigest(), aot.ARRAY_CONSTRAINTS,
                      compiler, arch])
    return cache / arch / f"{spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.cubin"


def constraints_of(spec: Spec) -> list:
    """export_kernel's parameter constraints for `spec` (imports cuda.tile): _aot.ARRAY_CONSTRAINTS for arrays."""
    import cuda.tile as ct
    from cuda.tile.compilation import ArrayConstraint, ScalarConstraint

    c = _aot_module().ARRAY_CONSTRAINTS
    params = []
    for p in spec.params:
        if p[0] == "array":
            dtype, ndim = getattr(ct, p[1]), p[2]
            itemsize = _aot_module()._ITEMSIZE[p[1]]
            divisor = c["stride_divisible_by_bytes"] // itemsize
            params.append(ArrayConstraint(
                dtype, ndim, index_dtype=getattr(ct, c["index_dtype"]),
                stride_lower_bound_incl=c["stride_lower_bound_incl"], alias_groups=tuple(c["alias_groups"]),
                may_alias_internally=c["may_alias_internally"],
                stride_constant=(None,) * (ndim - 1) + (c["last_stride"],),
                stride_divisible_by=(divisor,) * (ndim - 1) + (1,),
                shape_divisible_by=(1,) * (ndim - 1) + (c["last_dim_divisible_by_bytes"] // itemsize,),
                base_addr_divisible_by=c["base_addr_divisible_by"]))
        elif p[0] == "constant":
            params.append(p[1])
        else:
            params.append(ScalarConstraint(getattr(ct, p[0])))
    return params


def signature_of(spec: Spec):
    from cuda.tile.compilation import CallingConvention, KernelSignature

    return KernelSignature(constraints_of(spec), CallingConvention.cutile_python_v1()).with_mangled_symbol(
        spec.kernel)


def export(spec: Spec, arch: str, sig=None) -> bytes:
    """The cubin of `spec` for `arch`: for its signature (`signature_of`) or for `sig`."""
    from cuda.tile.compilation import export_kernel

    _load_modules()  # kernel-src on sys.path
    kernel = getattr(importlib.import_module(f"{PACKAGE}.{spec.module}"), spec.kernel)
    hints = json.loads(spec.hints)
    kernel = kernel.replace_hints(**hints) if hints else kernel
    buf = io.BytesIO()
    export_kernel(kernel, [sig or signature_of(spec)], buf, gpu_code=arch, output_format="cubin")
    return buf.getvalue()


def compile_spec(job: tuple[Spec, str, str]) -> tuple[str, float, int]:
    """Compile `spec` for `arch` into `path` (worker process): (symbol, seconds, bytes)."""
    spec, arch, path = job
    sig = signature_of(spec)
    t0 = time.perf_counter()
    cubin = export(spec, arch, sig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_bytes(cubin)
    Path(f"{path}.symbol").write_text(sig.symbol)
    tmp.replace(path)  # atomic: a cache entry is complete or absent (the symbol is written first)
    return sig.symbol, time.perf_counter() - t0, len(cubin)


def compile_aot(archs, specs: dict | None = None, cache: Path = AOT_CACHE, workers: int | None = None,
                log=print) -> int:
    """Compile the precompiled set's missing cubins for `archs` into `cache`; the number of failures."""
    specs = aot_specs() if specs is None else specs
    digests, compiler = source_digests(), compiler_version()
    todo = [(spec, arch, str(cubin_path(spec, arch, digests, compiler, cache)))
            for spec, spec_archs in specs.items() for arch in archs if arch in spec_archs]
    todo = [job for job in todo if not Path(job[2]).exists()]
    log(f"compile: {len(todo)} cubins to compile ({len(specs)} specializations; {', '.join(archs)})")
    failures = 0
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        futures = [(job, pool.submit(compile_spec, job)) for job in todo]
        for done, (job, fut) in enumerate(futures, 1):
            try:
                _, seconds, size = fut.result()
                if done % 25 == 0 or done == len(todo):
                    log(f"compile: [{done}/{len(todo)}] {job[0].kernel} {job[1]}: {size // 1024} KiB, {seconds:.1f} s")
            except Exception as e:  # report every failure, then fail
                failures += 1
                log(f"compile: [{done}/{len(todo)}] FAILED {job[0]} {job[1]}: {type(e).__name__}: {e}")
    return failures


if __name__ == "__main__":  # last: main uses the precompiled set's constraints defined above
    main()
