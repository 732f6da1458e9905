"""Compile every cuTile kernel of kernel-src/ to cubins for sm_80, sm_90, sm_100 and sm_120, on the CPU.

    python -m devtools.compile_all [--all]

Each kernel module lists its launches (`specializations(array)`: the same launch plans its launcher runs, on
stand-in tensors). By default sm_90 (Hopper, the
first target) compiles all of them and the other targets the first and last of each kernel; `--all` compiles
every specialization for every target. A kernel that does not compile exits non-zero.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import io
import os
import pkgutil
import sys
import time
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
    """(kernel, parameters) for export_kernel from a launch plan (kernel, grid, args): tensors become array
    constraints, ct.Constant parameters keep their value, other scalars become typed scalar constraints."""
    import typing

    import cuda.tile as ct
    import torch
    from cuda.tile.compilation import ArrayConstraint, ScalarConstraint

    dtypes = {torch.bfloat16: ct.bfloat16, torch.float16: ct.float16, torch.float32: ct.float32}
    kernel, _, args = plan
    params = []
    for arg, p in zip(args, inspect.signature(kernel._annotated_function.pyfunc).parameters.values()):
        if isinstance(arg, Tensor):  # what the launchers pass: unit last stride, no aliasing
            ndim = len(arg.shape)
            params.append(ArrayConstraint(dtypes[arg.dtype], ndim, index_dtype=ct.int32, stride_lower_bound_incl=0,
                                          alias_groups=(), may_alias_internally=False,
                                          stride_constant=(None,) * (ndim - 1) + (1,)))
        elif typing.get_origin(p.annotation) is typing.Annotated:  # ct.Constant[...]
            params.append(arg)
        else:
            params.append(ScalarConstraint(ct.float32 if isinstance(arg, float) else ct.int32))
    return kernel, params


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


if __name__ == "__main__":
    main()
