"""Precompiled cuTile kernels: cubins that the build compiled for each launch plan (`tile/*.py`), loaded and
launched through the CUDA driver (libcuda via ctypes), with no cuda.tile and no compiler at run time.

Layout in an arch variant (devtools/build.py writes it): `cubins/manifest.json` lists, per specialization,
the kernel (module, function, compiler hints), its parameters (array dtype and rank, scalar type, or the value of a
ct.Constant) and, per GPU arch (sm_XY), a cubin file and its symbol. Every array parameter was compiled with the
constraints in `ARRAY_CONSTRAINTS`; `Function.launch` checks them per call and declines inputs outside them (the
caller then takes the JIT, or the reference).

Calling convention `cutile_python_v1` (the cubin's parameters, in order): per array its base pointer, shape and
strides (int32 each, the compiled index width); per scalar its value (int32 or float32); ct.Constant parameters are
compiled in. The block has exactly the threads the cubin requires (its REQNTID, `required_threads`); there is no
dynamic shared memory.

Launch plans come from the same kernel modules as the JIT's. Without cuda.tile they are loaded with a stand-in for
it (`load_planning_module`): `@ct.kernel` then gives a `PlannedKernel` (function + hints), enough to pick a cubin;
kernel bodies never run on the host.
"""
from __future__ import annotations

import builtins
import ctypes
import hashlib
import importlib.util
import json
import struct
import sys
import types
import typing
import warnings
from pathlib import Path

# The constraints every precompiled array parameter was compiled with (and that Function.launch checks): 16-byte
# aligned base, unit last stride, 16-byte-divisible other strides and a last dimension of whole 16-byte units (what
# TMA and vector accesses need; torch allocations and the launchers' views of 16-byte-multiple rows meet them), no
# internal overlap, int32 shapes and strides. The JIT makes these assumptions when an input meets them (cext:
# compute_array_specialization_bits; it asks 16 elements of a dimension). Without the last dimension's divisibility
# tileiras emits 16-bit scalar global loads and stores instead of 128-bit ones (SASS of every op), which made the
# cubins up to 5x slower than the JIT on an H100. Row counts stay free, so that one cubin serves every row count.
ARRAY_CONSTRAINTS = {"base_addr_divisible_by": 16, "stride_divisible_by_bytes": 16, "last_stride": 1,
                     "last_dim_divisible_by_bytes": 16, "index_dtype": "int32", "may_alias_internally": False,
                     "stride_lower_bound_incl": 0, "alias_groups": []}
# cuda.tile's CompilerOptions defaults: hints equal to these are not part of a specialization's identity.
DEFAULT_HINTS = {"num_ctas": None, "occupancy": None, "opt_level": 3, "num_worker_warps": None}
MANIFEST = "manifest.json"
FORMAT = 2  # manifest layout and cubin packing (2: xz); a build of another format is ignored
INT32_MAX = 2**31 - 1


# --- launch planning without cuda.tile -------------------------------------------------------------------------

class ConstantAnnotation:
    """Marks a ct.Constant parameter (cuda.tile names its marker class the same)."""


class PlannedKernel:
    """A `@ct.kernel` function of a kernel module loaded for planning: what identifies its cubins."""

    def __init__(self, pyfunc, module: str, hints: dict):
        self.pyfunc, self.module, self.hints = pyfunc, module, hints

    def replace_hints(self, **hints) -> "PlannedKernel":
        return PlannedKernel(self.pyfunc, self.module, {**self.hints, **hints})

    def __repr__(self):
        return f"PlannedKernel({self.module}.{self.pyfunc.__name__}, {self.hints})"


class _Opaque:
    """Any other cuda.tile attribute used at a kernel module's top level (ct.PaddingMode.ZERO, ct.float32, ...)."""

    def __getattr__(self, name):
        return _Opaque()

    def __call__(self, *args, **kwargs):
        return _Opaque()

    def __getitem__(self, item):
        return _Opaque()


def _planning_cuda_tile(module_stem: str) -> types.ModuleType:
    ct = types.ModuleType("cuda.tile", "Stand-in for cuda.tile while planning launches of precompiled kernels.")

    def kernel(function=None, /, **hints):
        if function is None:
            return lambda f: PlannedKernel(f, module_stem, hints)
        return PlannedKernel(function, module_stem, hints)

    class Constant:
        def __class_getitem__(cls, item):
            return typing.Annotated[item, ConstantAnnotation()]

    ct.kernel, ct.Constant = kernel, Constant
    ct.__getattr__ = lambda name: _Opaque()
    return ct


def load_planning_module(name: str, path: Path, stem: str) -> types.ModuleType:
    """Load kernel module `path` as `name` (a module of the kernel package, so its relative imports work) with
    `import cuda.tile` answered by a stand-in: its launch plans work, its kernels are PlannedKernels. The module
    is registered in sys.modules under `name`."""
    ct = _planning_cuda_tile(stem)
    cuda = types.ModuleType("cuda")
    cuda.tile = ct

    def import_(module, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (module == "cuda.tile" or module.startswith("cuda.tile.")):
            return ct if fromlist else cuda
        return builtins.__import__(module, globals, locals, fromlist, level)

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__builtins__ = {**vars(builtins), "__import__": import_}
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def kernel_identity(kernel) -> tuple[str, str, str]:
    """(module stem, function name, hints as canonical JSON) of a PlannedKernel or a cuda.tile kernel: the part of
    a manifest key that the kernel object itself decides."""
    if hasattr(kernel, "_annotated_function"):  # a cuda.tile kernel (the JIT's modules were imported)
        import dataclasses

        pyfunc, hints = kernel._annotated_function.pyfunc, dataclasses.asdict(kernel._compiler_options)
        module = pyfunc.__module__.rsplit(".", 1)[-1]
    else:
        pyfunc, hints, module = kernel.pyfunc, kernel.hints, kernel.module
    hints = {k: v for k, v in sorted(hints.items()) if k not in DEFAULT_HINTS or DEFAULT_HINTS[k] != v}
    return module, pyfunc.__name__, json.dumps(hints, sort_keys=True)


def source_digest(path: Path) -> str:
    """What a cubin's kernel module is identified by (the manifest records it; a mismatch disables its cubins)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def param_layout(params) -> str:
    """The struct format (native alignment, as the driver lays out kernel parameters) of a manifest entry's
    parameters under cutile_python_v1: per array a pointer then ndim shapes and ndim strides (int32); per scalar
    its value; constants take no space."""
    fmt = "@"
    for p in params:
        if p[0] == "array":
            fmt += "P" + "i" * (2 * p[2])
        elif p[0] in ("int32", "float32"):
            fmt += {"int32": "i", "float32": "f"}[p[0]]
    return fmt


# --- the CUDA driver through ctypes -----------------------------------------------------------------------------

_MAX_THREADS_PER_BLOCK = 0  # CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK


class Driver:
    """The few libcuda entry points the precompiled launch needs."""

    def __init__(self):
        lib = ctypes.CDLL("libcuda.so.1")
        vp = ctypes.c_void_p
        self.lib = lib
        # cuLaunchKernel without argtypes (a fresh function object: lib[...] is not cached): it runs on every
        # launch, and converting 11 arguments through argtypes took 0.7 of 3.6 us per launch (CPU, a no-op
        # stand-in library). So the caller passes the handle and stream as c_void_p and the rest as ints < 2**31.
        self.launch_kernel = lib["cuLaunchKernel"]
        self.launch_kernel.restype = ctypes.c_int
        lib.cuModuleLoadData.argtypes = [ctypes.POINTER(vp), ctypes.c_char_p]
        lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(vp), vp, ctypes.c_char_p]
        lib.cuFuncGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, vp]
        lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(vp), ctypes.c_int]
        lib.cuCtxPushCurrent_v2.argtypes = [vp]
        lib.cuCtxPopCurrent_v2.argtypes = [ctypes.POINTER(vp)]
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        self._contexts: dict[int, int] = {}

    def error_name(self, result: int) -> str:
        name = ctypes.c_char_p()
        self.lib.cuGetErrorName(result, ctypes.byref(name))
        return f"{(name.value or b'?').decode()} ({result})"

    def check(self, result: int, what: str) -> None:
        if result:
            raise RuntimeError(f"cutile_kernels: {what} failed: {self.error_name(result)}")

    def context(self, index: int) -> int:
        """The primary context of GPU `index` (torch's), retained once."""
        if index not in self._contexts:
            dev, ctx = ctypes.c_int(), ctypes.c_void_p()
            self.check(self.lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
            self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
            self._contexts[index] = ctx.value
        return self._contexts[index]

    def push(self, index: int) -> None:
        self.check(self.lib.cuCtxPushCurrent_v2(self.context(index)), "cuCtxPushCurrent")

    def pop(self) -> None:
        self.check(self.lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p())), "cuCtxPopCurrent")

    def load(self, index: int, image: bytes, symbol: str) -> tuple[int, int]:
        """(CUfunction, its threads per block) of `symbol` in cubin `image`, loaded into GPU `index`'s primary
        context."""
        module, function, threads = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_int()
        self.push(index)
        try:
            self.check(self.lib.cuModuleLoadData(ctypes.byref(module), image), "cuModuleLoadData")
            self.check(self.lib.cuModuleGetFunction(ctypes.byref(function), module, symbol.encode()),
                       f"cuModuleGetFunction({symbol})")
            self.check(self.lib.cuFuncGetAttribute(ctypes.byref(threads), _MAX_THREADS_PER_BLOCK, function),
                       "cuFuncGetAttribute")
        finally:
            self.pop()
        return function.value, required_threads(image, symbol) or threads.value


def required_threads(image: bytes, symbol: str) -> int | None:
    """The block size a cubin's kernel `symbol` was compiled for (EIATTR_REQNTID in its `.nv.info.<symbol>`
    section; x only, cuTile blocks are one-dimensional), or None. The driver's MAX_THREADS_PER_BLOCK is not it: that
    is the register limit (256 for a 255-register kernel), and a launch with any other count than REQNTID fails
    with CUDA_ERROR_INVALID_VALUE."""
    if image[:4] != b"\x7fELF" or image[4] != 2:  # ELF64 only
        return None
    shoff, = struct.unpack_from("<Q", image, 0x28)
    entsize, count, names = struct.unpack_from("<HHH", image, 0x3A)
    sections = [struct.unpack_from("<I4xQ8xQQ", image, shoff + i * entsize) for i in range(count)]
    strtab = sections[names][2]
    wanted = b".nv.info." + symbol.encode() + b"\0"
    for name, _, offset, size in sections:
        if image[strtab + name:strtab + name + len(wanted)] != wanted:
            continue
        pos = offset
        while pos + 4 <= offset + size:  # entries: format, attribute, then a u16 value or a u16 size + data
            fmt, attr, value = struct.unpack_from("<BBH", image, pos)
            if fmt == 4:  # EIFMT_SVAL
                if attr == 0x10 and value >= 4:  # EIATTR_REQNTID: x, y, z
                    return struct.unpack_from("<I", image, pos + 4)[0]
                pos += 4 + value
            else:
                pos += 4
    return None


class _ParamBuffer:
    """One argument block: the packed parameters and the kernelParams array pointing into it."""

    def __init__(self, layout: str):
        self.storage = ctypes.create_string_buffer(max(8, struct.calcsize(layout)))
        base = ctypes.addressof(self.storage)
        offsets, fmt = [], "@"
        for code in layout[1:]:  # the offset of each parameter under native alignment
            offsets.append(struct.calcsize(fmt + code) - struct.calcsize(code))
            fmt += code
        self.params = (ctypes.c_void_p * max(1, len(offsets)))(*[base + o for o in offsets])


class Function:
    """One precompiled specialization on one GPU: checks a launch's arrays against ARRAY_CONSTRAINTS, packs the
    arguments and launches on the given stream. Loaded on first use."""

    def __init__(self, driver: Driver, index: int, path: Path, symbol: str, params: list):
        self.driver, self.index, self.path, self.symbol = driver, index, path, symbol
        self.layout = param_layout(params)
        self.values = _values_function(params)
        self.handle = None
        self.failed = None  # the driver's error name once a launch of this cubin failed
        self._buffers: list[_ParamBuffer] = []  # free argument blocks (one per concurrent launch)

    def _load(self) -> None:
        image = self.path.read_bytes()
        if self.path.suffix == ".xz":
            import lzma

            image = lzma.decompress(image)
        handle, self.threads = self.driver.load(self.index, image, self.symbol)
        self.handle = ctypes.c_void_p(handle)

    def launch(self, grid: tuple, args, stream: int) -> bool:
        """Launch on `stream` (the current stream of GPU `index`; the caller makes sure it is); False when the
        arguments are outside the compiled constraints or the driver refused this cubin (nothing launched)."""
        if self.failed:
            return False
        values = self.values(args)
        if values is None:
            return False
        if self.handle is None:
            self._load()
        buffers = self._buffers
        buf = buffers.pop() if buffers else _ParamBuffer(self.layout)
        try:
            struct.pack_into(self.layout, buf.storage, 0, *values)
        except struct.error:  # a shape, stride or int scalar outside int32: not what was compiled
            buffers.append(buf)
            return False
        x, y, z = (*grid, 1, 1)[:3]
        stream = ctypes.c_void_p(stream)
        result = self.driver.launch_kernel(self.handle, x, y, z, self.threads, 1, 1, 0, stream, buf.params, None)
        if result:  # e.g. no or another context current on this thread: launch in the GPU's primary context
            self.driver.push(self.index)
            try:
                result = self.driver.launch_kernel(self.handle, x, y, z, self.threads, 1, 1, 0, stream,
                                                   buf.params, None)
            finally:
                self.driver.pop()
        buffers.append(buf)
        if result:  # never again for this cubin: the caller takes the JIT (or the reference), with a warning
            self.failed = self.driver.error_name(result)
            warnings.warn(f"cutile_kernels: the precompiled {self.symbol} failed to launch ({self.failed}); "
                          "its launches go to the cuTile JIT (or the reference) from now on", RuntimeWarning,
                          stacklevel=4)
            return False
        return True


def _values_function(params):
    """`values(args)`: the parameter values of a launch's `args` in packing order (per array its data pointer,
    shape and strides; scalars as they are; constants skipped), or None when an array is outside ARRAY_CONSTRAINTS
    (16-byte-aligned base, strides and last dimension of whole 16-byte units, last stride 1, no two indices on one
    element).
    Generated per manifest entry, unrolled over its parameters: it runs on every launch (with the generated launch
    key, a launch took 27 % less host time than with loops over the parameters; CPU, fake driver). The shape and
    stride checks are remembered per layout (every array's shape and strides): a model repeats a few, and RoPE's
    six arrays took 4.7 µs a launch to check on CPU without it (the base alignment is checked on every call)."""
    lines, out, align, layout, key, c = [], [], [], [], [], ARRAY_CONSTRAINTS
    for i, p in enumerate(params):
        if p[0] == "constant":
            continue
        if p[0] != "array":
            out.append(f"a[{i}]")
            continue
        ndim, itemsize = p[2], _ITEMSIZE[p[1]]
        lines.append(f"    t = a[{i}]; s{i} = t.stride(); p{i} = t.data_ptr(); h{i} = t.shape")
        align.append(f"p{i} % {c['base_addr_divisible_by']}")
        checks = [f"len(s{i}) != {ndim}", f"s{i}[{ndim - 1}] != {c['last_stride']}",
                  f"h{i}[{ndim - 1}] % {c['last_dim_divisible_by_bytes'] // itemsize}"]
        checks += [f"s{i}[{d}] % {c['stride_divisible_by_bytes'] // itemsize}" for d in range(ndim - 1)]
        if ndim == 2:
            checks.append(f"(s{i}[0] < h{i}[1] and h{i}[0] > 1)")
        elif ndim > 2:
            checks.append(f"not _disjoint(h{i}, s{i})")
        layout += checks
        key += [f"h{i}", f"s{i}"]
        out += [f"p{i}", f"*h{i}", f"*s{i}"]
    if align:
        lines.append(f"    if {' or '.join(align)}: return None")
        lines += [f"    key = ({', '.join(key)},)", "    ok = _layouts.get(key)", "    if ok is None:",
                  f"        ok = not ({' or '.join(layout)})",
                  "        if len(_layouts) < 1024:", "            _layouts[key] = ok",
                  "    if not ok: return None"]
    lines.append(f"    return ({', '.join(out)}{',' if len(out) == 1 else ''})")
    return _generated("values", lines, _layouts={})


def _generated(name: str, body: list[str], **names):
    """The function `name(a)` with the given body lines (source generated here, from a manifest entry); `names`
    are its globals besides _disjoint."""
    namespace = {"_disjoint": _disjoint, **names}
    exec("\n".join([f"def {name}(a):", *body]), namespace)
    return namespace[name]


def _disjoint(shape, strides) -> bool:
    """No two in-bounds indices reach one element (what may_alias_internally=False promises). Runs once per
    layout: `values` remembers its verdict."""
    span = 1
    for stride, size in sorted((s, n) for s, n in zip(strides, shape) if n > 1):
        if stride < span:
            return False
        span = stride * size
    return True


_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int32": 4, "int64": 8, "int8": 1,
             "uint8": 1, "bool": 1}


# --- the manifest: which cubin serves a launch --------------------------------------------------------------------

def arch_for(capability: tuple[int, int], archs) -> str | None:
    """The cubin arch that runs on a GPU of `capability`: the same one, else the newest of the same major version
    and a lower minor one (a cubin runs on later minor versions of its major: sm_80 on sm_86 and sm_89)."""
    major, minor = capability
    fits = [a for a in archs if int(a[3:-1]) == major and int(a[-1]) <= minor]
    return max(fits, key=lambda a: int(a[-1])) if fits else None


class _KernelCubins:
    """The manifest's specializations of one kernel (module, function, hints) for one GPU: parameter positions
    and, per launch key (array dtypes and constant values in parameter order), its Function."""

    def __init__(self, params: list):
        self.functions: dict[tuple, Function] = {}
        # key(args): the arrays' dtypes, then the constants; generated like Function.values (it runs on every launch)
        items = [f"a[{i}].dtype" for i, p in enumerate(params) if p[0] == "array"]
        items += [f"a[{i}]" for i, p in enumerate(params) if p[0] == "constant"]
        self.key = _generated("key", [f"    return ({', '.join(items)},)"])


class Precompiled:
    """The cubins of one variant that run on GPU `index`: `launch` serves a launch plan when a cubin matches its
    kernel and arguments (True), else does nothing (False)."""

    def __init__(self, directory: Path, index: int, capability: tuple[int, int], driver: Driver | None = None):
        import torch

        manifest = json.loads((directory / MANIFEST).read_text())
        # cubins of another format, or compiled under other constraints than the per-call checks below ask for
        # (a checkout's stale build/): none, since a looser check would hand them arrays they assume away
        usable = manifest.get("format") == FORMAT and manifest.get("constraints") == ARRAY_CONSTRAINTS
        self.arch = arch_for(capability, manifest["archs"]) if usable else None
        self.index = index
        self._kernels: dict[tuple, _KernelCubins] = {}
        self._by_object: dict = {}  # kernel object -> _KernelCubins or None (no cubin for it)
        if self.arch is None:
            return
        self.driver = driver or Driver()
        package = directory.parent
        current = {m: source_digest(package / "tile" / f"{m}.py") == digest
                   for m, digest in manifest["modules"].items()}  # a kernel edited after the build: no cubins
        dtypes = {name: getattr(torch, name) for name in _ITEMSIZE}
        for entry in manifest["kernels"]:
            cubin = entry["cubins"].get(self.arch)
            if cubin is None or not current.get(entry["module"]):
                continue
            params = entry["params"]
            group = self._kernels.setdefault((entry["module"], entry["kernel"], entry["hints"]),
                                             _KernelCubins(params))
            key = (*[dtypes[p[1]] for p in params if p[0] == "array"],
                   *[p[1] for p in params if p[0] == "constant"])
            group.functions[key] = Function(self.driver, index, directory / cubin, entry["symbol"], params)

    def __bool__(self):
        return bool(self._kernels)

    def modules(self) -> set[str]:
        return {module for module, _, _ in self._kernels}

    def launch(self, kernel, grid: tuple, args, stream: int) -> bool:
        try:
            group = self._by_object[kernel]
        except KeyError:
            group = self._by_object[kernel] = self._kernels.get(kernel_identity(kernel))
        if group is None:
            return False
        function = group.functions.get(group.key(args))
        return function is not None and function.launch(grid, args, stream)


def find(package_dir: Path, index: int, capability: tuple[int, int]) -> Precompiled | None:
    """The precompiled kernels of the package at `package_dir` for GPU `index`, or None (no cubins for its arch,
    none shipped, or CUTILE_KERNELS_PRECOMPILED=0)."""
    import os

    directory = package_dir / "cubins"
    if os.environ.get("CUTILE_KERNELS_PRECOMPILED", "1") == "0" or not (directory / MANIFEST).is_file():
        return None
    found = Precompiled(directory, index, capability)
    return found if found else None


def load_planning_modules(package: str, package_dir: Path) -> None:
    """Make the kernel modules of `<package>.tile` (those that import cuda.tile) importable without cuda.tile: the
    op modules import them for their launch plans. Modules already imported (with cuda.tile) stay."""
    import importlib

    importlib.import_module(f"{package}.tile")
    for path in sorted((package_dir / "tile").glob("*.py")):
        name = f"{package}.tile.{path.stem}"
        if name not in sys.modules and "import cuda.tile" in path.read_text():
            load_planning_module(name, path, path.stem)


_JIT_KERNELS: dict = {}


def jit_kernel(kernel, package: str, package_dir: Path):
    """The cuda.tile kernel of a PlannedKernel (its module loaded once more, with cuda.tile, beside the planning
    one); a cuda.tile kernel as it is. Raises ImportError without cuda.tile."""
    if hasattr(kernel, "_annotated_function"):
        return kernel
    if kernel not in _JIT_KERNELS:
        import cuda.tile  # noqa: F401  (raises ImportError here, before anything is registered)

        name = f"{package}.tile._jit_{kernel.module}"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, package_dir / "tile" / f"{kernel.module}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        real = getattr(module, kernel.pyfunc.__name__)
        _JIT_KERNELS[kernel] = real.replace_hints(**kernel.hints) if kernel.hints else real
    return _JIT_KERNELS[kernel]
