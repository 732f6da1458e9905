"""Host time of one launch: the precompiled cubin path against cuTile's ct.launch (issue 13).

    python -m devtools.build --archs sm_90 && python -m benchmarks.launch_host [--out benchmarks/results/<gpu>/launch_host.md]
    python -m benchmarks.launch_host --tiny       (CPU: the op calls run their references; no launch rows)

For each op's decode call (8B widths, one row; RoPE one token), the launch plan it hands to `_runtime.launch`
(kernel, grid, arguments) is recorded once. Then, in interleaved rounds, each row enqueues `--calls` launches back
to back between two synchronizations and times only the enqueueing (a decode launch runs 2-3 µs on the GPU, less
than either path's host time, and 200 launches stay below the driver's queue depth, so no launch waits for the
GPU); the median over rounds, µs per launch:
  cubin       `Precompiled.launch`: the cubin lookup, the argument checks, packing and cuLaunchKernel (ctypes)
  ct.launch   cuTile's own launch of the JIT's kernel for the same plan (compiled before timing)
  op call     the public op (checks, output allocation, launch plan, launch), with the cubins and with the JIT.
The parts of the cubin path follow for the first op: the launch key, `values` (argument checks), `pack_into`, and
the bare driver call through ctypes: cuLaunchKernel as `CDLL` calls it (releasing the GIL) and as `PyDLL` (holding
it), cuLaunchKernelEx with its launch configuration built once (4 arguments instead of 11), and cuLaunchKernel of
the same cubin loaded as a cuLibrary kernel (as cuda.tile loads its own).
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import lzma
import statistics
import struct
import time
from pathlib import Path

import torch

from . import harness as h


def timed(fn, calls: int) -> float:
    """Seconds to enqueue `calls` back-to-back calls of `fn` (synchronized before, not waited for inside)."""
    h.sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - t0


def per_call_us(rows: dict, *, calls: int, rounds: int) -> dict:
    """{name: median µs per call} of rows {name: (context factory or None, fn)}, timed in interleaved rounds."""
    times = {name: [] for name in rows}
    for r in range(rounds + 1):  # round 0 warms up (compiles, allocator, lazy loads)
        for name, (context, fn) in rows.items():
            with (context or contextlib.nullcontext)():
                t = timed(fn, calls)
            if r:
                times[name].append(t / calls * 1e6)
    h.sync()
    return {name: statistics.median(v) for name, v in times.items()}


class LaunchConfig(ctypes.Structure):
    """CUlaunchConfig (cuda.h), without launch attributes."""
    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p), ("attrs", ctypes.c_void_p),
                ("num_attrs", ctypes.c_uint)]


class Recorder:
    """Stands in for a GPU's Precompiled: records each launch plan, then lets the real one launch it."""

    def __init__(self, inner):
        self.inner, self.plans = inner, []

    def launch(self, kernel, grid, args, stream) -> bool:
        self.plans.append((kernel, grid, args))
        return self.inner.launch(kernel, grid, args, stream)


def decode_calls(ck, shape: h.Shape) -> dict:
    """{op: the public call on one decode row of `shape`}, bf16."""
    dt = dict(device=h.DEVICE, dtype=torch.bfloat16)
    x, r, w = torch.randn(1, shape.hidden, **dt), torch.randn(1, shape.hidden, **dt), torch.randn(shape.hidden, **dt)
    gate_up = torch.randn(1, 2 * shape.intermediate, **dt)
    q = torch.randn(1, 1, shape.heads, shape.head_dim, **dt).transpose(1, 2)  # (B, H, S, D) as attention has them
    k = torch.randn(1, 1, shape.kv_heads, shape.head_dim, **dt).transpose(1, 2)
    cos, sin = torch.randn(1, 1, shape.head_dim, **dt), torch.randn(1, 1, shape.head_dim, **dt)
    return {"rms_norm": lambda: ck.rms_norm(x, w, 1e-6), "add_rms_norm": lambda: ck.add_rms_norm(x, r, w, 1e-6),
            "silu_mul": lambda: ck.gated_act(gate_up, "silu"),
            "rope": lambda: ck.apply_rotary_pos_emb(q, k, cos, sin)}


def plan_of(ck, call):
    """The launch plan (kernel, grid, args) of one call served by this GPU's cubins, or None (no cubins)."""
    runtime = importlib.import_module(f"{ck.__name__}._runtime")
    index = torch.cuda.current_device()
    found = runtime.precompiled(index)
    if found is None:
        return None
    runtime._PRECOMPILED[index] = recorder = Recorder(found)
    try:
        call()
    finally:
        runtime._PRECOMPILED[index] = found
    return recorder.plans[0] if recorder.plans else None


def launch_rows(ck, call, calls: int, rounds: int) -> tuple[dict, dict]:
    """({row: µs} for one op: cubin, ct.launch, op call with cubins / with the JIT; {part: µs} of the cubin path)."""
    op_rows = {"op call, cubins": (lambda: h.precompiled(ck, True), call),
               "op call, JIT": (lambda: h.precompiled(ck, False), call)}
    plan = plan_of(ck, call) if h.DEVICE == "cuda" else None
    if plan is None:
        return per_call_us(op_rows, calls=calls, rounds=rounds), {}
    import cuda.tile as ct

    runtime = importlib.import_module(f"{ck.__name__}._runtime")
    aot = importlib.import_module(f"{ck.__name__}._aot")
    kernel, grid, args = plan
    index = torch.cuda.current_device()
    cubins = runtime.precompiled(index)
    jit = aot.jit_kernel(kernel, ck.__name__, Path(ck.__file__).resolve().parent)
    stream = torch._C._cuda_getCurrentRawStream(index)
    group = cubins._by_object[kernel]
    function = group.functions[group.key(args)]
    values, buf = function.values(args), aot._ParamBuffer(function.layout)
    x, y, z = (*grid, 1, 1)[:3]
    gil_held = ctypes.PyDLL("libcuda.so.1")["cuLaunchKernel"]
    gil_held.restype = ctypes.c_int
    struct.pack_into(function.layout, buf.storage, 0, *values)

    def bare(entry, handle=function.handle):
        return lambda: entry(handle, x, y, z, function.threads, 1, 1, 0, ctypes.c_void_p(stream), buf.params, None)

    # the same cubin through the other driver entry points: cuLaunchKernelEx (4 arguments, the launch
    # configuration built once), and a cuLibrary kernel (how cuda.tile loads its cubins)
    lib = ctypes.CDLL("libcuda.so.1")
    launch_ex = lib["cuLaunchKernelEx"]
    launch_ex.restype = ctypes.c_int
    config = LaunchConfig(x, y, z, function.threads, 1, 1, 0, stream, None, 0)
    config_address = ctypes.c_void_p(ctypes.addressof(config))
    library, library_kernel = ctypes.c_void_p(), ctypes.c_void_p()
    image = function.path.read_bytes()
    image = lzma.decompress(image) if function.path.suffix == ".xz" else image
    loaded = (lib.cuLibraryLoadData(ctypes.byref(library), image, None, None, 0, None, None, 0) == 0
              and lib.cuLibraryGetKernel(ctypes.byref(library_kernel), library, function.symbol.encode()) == 0)

    main = per_call_us({"cubin": (None, lambda: cubins.launch(kernel, grid, args, stream)),
                        "ct.launch": (None, lambda: ct.launch(stream, grid, jit, args)), **op_rows},
                       calls=calls, rounds=rounds)
    parts = per_call_us({"launch key": (None, lambda: group.key(args)),
                         "values (argument checks)": (None, lambda: function.values(args)),
                         "pack_into": (None, lambda: struct.pack_into(function.layout, buf.storage, 0, *values)),
                         "bare cuLaunchKernel, CDLL (GIL released)": (None, bare(function.driver.launch_kernel)),
                         "bare cuLaunchKernel, PyDLL (GIL held)": (None, bare(gil_held)),
                         "bare cuLaunchKernelEx, configuration kept": (
                             None, lambda: launch_ex(config_address, function.handle, buf.params, None)),
                         **({"bare cuLaunchKernel of a cuLibrary kernel": (
                             None, bare(function.driver.launch_kernel, library_kernel))} if loaded else {})},
                        calls=calls, rounds=rounds)
    return main, parts


def report(results: dict, parts: dict, args, calls: int, rounds: int) -> str:
    cell = lambda r, k: h.fmt(r.get(k), ".2f")  # noqa: E731
    rows = [[op, cell(r, "cubin"), cell(r, "ct.launch"),
             h.fmt(r["cubin"] / r["ct.launch"] if "cubin" in r else None, ".2f", "x"),
             cell(r, "op call, cubins"), cell(r, "op call, JIT")] for op, r in results.items()]
    first = next(iter(results))
    return "\n".join([
        h.header("Host time per launch: precompiled cubins against ct.launch", args),
        f"bf16, decode shapes (8B widths, one row; RoPE one token). µs per call: {calls} calls enqueued back to back "
        f"between synchronizations, median of {rounds} interleaved rounds (see `benchmarks/launch_host.py`); n/a: "
        "no cubins for this GPU (or no GPU).\n",
        *h.table(["op", "cubin: Precompiled.launch µs", "ct.launch µs", "cubin / ct.launch",
                  "op call with cubins µs", "op call with JIT µs"], rows), "",
        f"Parts of the cubin path ({first}):", "",
        *(h.table(["part", "µs"], [[k, f"{v:.2f}"] for k, v in parts.items()]) if parts else ["n/a"])]) + "\n"


def main(argv=None) -> None:
    def add(p):
        p.add_argument("--calls", type=int, default=200, help="launches enqueued between synchronizations")
        p.add_argument("--rounds", type=int, default=25, help="interleaved rounds (median)")

    args = h.arguments("benchmarks.launch_host", __doc__, argv, add=add, out="launch_host.md")
    calls, rounds = (5, 2) if args.tiny else (args.calls, args.rounds)
    ck = h.local_kernel(args.kernel_root)
    results, parts = {}, {}
    for k, (op, call) in enumerate(decode_calls(ck, h.TINY if args.tiny else h.SIZE_8B).items(), 1):
        results[op], found = launch_rows(ck, call, calls, rounds)
        parts = parts or found
        print(f"[{k}/4] {op}: " + ", ".join(f"{name} {us:.2f} µs" for name, us in results[op].items()), flush=True)
    h.write_report(args.out, report(results, parts, args, calls, rounds))


if __name__ == "__main__":
    main()
