"""Precompiled kernels (torch-ext/cutile_kernels/_aot.py, devtools/build.py --archs): on CPU, the launch plans made
without cuda.tile are the JIT's, every specialization of the precompiled set is compiled and listed in the
manifest, argument packing follows cuda.tile's signatures, and the per-call constraint checks decline what the
cubins were not compiled for, and the cubins' SASS accesses memory as the JIT's does. On a GPU (`gpu`): parity
with the JIT for every op and dtype (within the float64 bounds), and a model run in a process where cuda.tile
cannot be imported. Host time per call against ct.launch is a benchmark column (benchmarks/cold_start.py), not a
timed test."""
import ctypes
import dataclasses
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

from devtools import build as build_mod
from devtools import compile_all as ca
from devtools.build import ROOT
from ._helpers import GPU_REL_TOL, GRAD_REL_TOL, rel_err

aot = ca._aot_module()


def test_planning_without_cuda_tile_gives_the_jit_plans():
    """The sweep through the stand-in-loaded modules (the runtime's view) and through the cuda.tile modules (the
    compiler's) yields the same specializations, in the same order."""
    real = {m.__name__.rsplit(".", 1)[-1]: m for m in ca._load_modules()}
    planned = [ca.spec_of(p) for _, p in ca.aot_plans(ca.planning_modules()) if p is not None]
    compiled = [ca.spec_of(p) for _, p in ca.aot_plans(real) if p is not None]
    assert planned == compiled and len(set(planned)) > 100


def test_planning_modules_do_not_import_cuda_tile(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "cuda.tile" or name.startswith("cuda.tile."):
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(ROOT)!r})
        from devtools import compile_all as ca
        specs = ca.aot_specs()
        assert "cuda.tile" not in sys.modules and len(specs) > 100, len(specs)
        print(len(specs))
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, capture_output=True)


def test_default_hints_are_cuda_tiles():
    import dataclasses

    from cuda.tile._compiler_options import CompilerOptions

    assert {f.name: f.default for f in dataclasses.fields(CompilerOptions)} == aot.DEFAULT_HINTS


def test_kernel_identity_is_the_same_for_planned_and_cuda_tile_kernels():
    import cuda.tile as ct

    real = {m.__name__.rsplit(".", 1)[-1]: m for m in ca._load_modules()}
    planned = ca.planning_modules()
    for stem in ("rms_norm", "rope", "gated_act"):
        for name in dir(real[stem]):
            k = getattr(real[stem], name)
            if isinstance(k, ct.kernel):
                assert aot.kernel_identity(getattr(planned[stem], name)) == aot.kernel_identity(k)
    bwd = real["rms_norm"].with_hints(real["rms_norm"].rms_norm_bwd, 2)
    planned_bwd = planned["rms_norm"].with_hints(planned["rms_norm"].rms_norm_bwd, 2)
    assert aot.kernel_identity(bwd) == aot.kernel_identity(planned_bwd) == ("rms_norm", "rms_norm_bwd",
                                                                            '{"occupancy": 2}')


def _expected_layout(signature) -> list[tuple[int, int]]:
    """(offset, size) of each kernel parameter as cutile_python_v1 passes a signature's parameters: per array a
    pointer, then shape and strides of the index dtype; per scalar its dtype; constants nothing. C alignment."""
    from cuda.tile.compilation import ArrayConstraint, ScalarConstraint

    sizes = []
    for p in signature.parameters:
        if isinstance(p, ArrayConstraint):
            sizes += [8] + [p.index_dtype.bitwidth // 8] * (2 * p.ndim)
        elif isinstance(p, ScalarConstraint):
            sizes.append(p.dtype.bitwidth // 8)
    out, offset = [], 0
    for size in sizes:
        offset = -(-offset // size) * size
        out.append((offset, size))
        offset += size
    return out


def test_argument_packing_follows_the_signature():
    """For every specialization of the precompiled set: the packed layout (offsets the kernelParams point at) is
    the one cuda.tile's KernelSignature for those constraints implies, and the constraints are ARRAY_CONSTRAINTS."""
    from cuda.tile.compilation import ArrayConstraint

    for spec in ca.aot_specs():
        sig = ca.signature_of(spec)
        layout = aot.param_layout([list(p) for p in spec.params])
        buf = aot._ParamBuffer(layout)
        base = ctypes.addressof(buf.storage)
        offsets = [p - base for p in buf.params][:len(layout) - 1]
        assert [(o, struct.calcsize("@" + c)) for o, c in zip(offsets, layout[1:])] == _expected_layout(sig), spec
        for p in sig.parameters:
            if isinstance(p, ArrayConstraint):
                assert p.base_addr_divisible_by == 16 and p.stride_constant[-1] == 1
                assert not p.may_alias_internally and p.index_dtype.bitwidth == 32
                assert all(d * p.dtype.bitwidth // 8 == 16 for d in p.stride_divisible_by[:-1])
                assert p.shape_divisible_by[-1] * p.dtype.bitwidth // 8 == 16 and set(p.shape_divisible_by[:-1]) <= {1}
        assert sig.symbol and spec.kernel in sig.symbol


def test_packed_bytes_are_pointer_shape_stride_then_scalars():
    params = [["array", "bfloat16", 2], ["array", "float32", 1], ["int32"], ["float32"], ["constant", True]]
    x, w = torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(64)
    f = aot.Function(None, 0, None, "sym", params)
    values = f.values((x, w, 64, 0.5, True))
    assert values == (x.data_ptr(), 4, 64, 64, 1, w.data_ptr(), 64, 1, 64, 0.5)
    buf = aot._ParamBuffer(f.layout)
    struct.pack_into(f.layout, buf.storage, 0, *values)
    raw = bytes(buf.storage)
    assert struct.unpack_from("<Q4i", raw, 0) == (x.data_ptr(), 4, 64, 64, 1)
    assert struct.unpack_from("<Q2i", raw, 24) == (w.data_ptr(), 64, 1)
    assert struct.unpack_from("<if", raw, 40) == (64, 0.5)


class _FakeDriver:
    def __init__(self):
        self.launches = []

    def launch_kernel(self, handle, x, y, z, bx, by, bz, smem, stream, params, extra):
        # as libcuda's cuLaunchKernel is called (no argtypes): pointers as c_void_p, the rest as small ints
        assert isinstance(stream, ctypes.c_void_p) and all(type(v) is int and 0 <= v < 2**31
                                                            for v in (x, y, z, bx, by, bz, smem))
        self.launches.append((getattr(handle, "value", handle), (x, y, z), bx, stream.value or 0))
        return 0

    def check(self, result, what):
        assert result == 0


def _function(params):
    f = aot.Function(_FakeDriver(), 0, None, "sym", params)
    f.handle, f.threads = 1234, 256
    return f


def test_generated_checks_and_packing_agree_with_the_constraints_for_every_spec():
    """Function.values (generated per manifest entry) for every parameter list of the precompiled set: packs
    pointer, shape and strides of each array and the scalars, in order, for arrays inside ARRAY_CONSTRAINTS, and
    declines each kind of array outside them; the launch key names the arrays' dtypes and the constants."""
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for spec in ca.aot_specs():
        if spec.params in seen:
            continue
        seen.add(spec.params)
        f = aot.Function(None, 0, None, "sym", [list(p) for p in spec.params])
        args, want = [], []
        for p in spec.params:
            if p[0] == "array":
                shape = [int(torch.randint(1, 5, (1,), generator=gen)) * 8 for _ in range(p[2])]
                t = torch.empty(shape, dtype=getattr(torch, p[1]))
                args.append(t)
                want += [t.data_ptr(), *t.shape, *t.stride()]
            elif p[0] == "constant":
                args.append(p[1])
            else:
                args.append(7 if p[0] == "int32" else 0.5)
                want.append(args[-1])
        assert f.values(args) == tuple(want), spec
        group = aot._KernelCubins([list(p) for p in spec.params])
        assert group.key(args) == (*[a.dtype for a in args if isinstance(a, torch.Tensor)],
                                   *[p[1] for p in spec.params if p[0] == "constant"]), spec
        for i, p in enumerate(spec.params):
            if p[0] != "array":
                continue
            t = args[i]
            storage = torch.empty(t.numel() + 1, dtype=t.dtype)
            outside = [storage[1:].view(t.shape), t.transpose(0, -1) if p[2] > 1 else t[::2],
                       t.unsqueeze(0)]
            outside.append(t[..., :-1])  # a last dimension not in whole 16-byte units
            if p[2] > 1:  # rows overlapping; rows not in whole 16-byte units apart
                outside.append(torch.empty(t.shape[-1], dtype=t.dtype).expand(t.shape))
                outside.append(torch.empty(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype)[..., :-1])
            for bad in outside:
                assert f.values([*args[:i], bad, *args[i + 1:]]) is None, (spec, i, bad.shape, bad.stride())
    assert len(seen) > 10


def test_constraint_checks_decline_what_was_not_compiled():
    f = _function([["array", "bfloat16", 2], ["array", "bfloat16", 1], ["int32"]])
    x, w = torch.zeros(8, 64, dtype=torch.bfloat16), torch.zeros(64, dtype=torch.bfloat16)
    assert f.launch((3,), (x, w, 64), stream=7) and f.driver.launches == [(1234, (3, 1, 1), 256, 7)]
    storage = torch.zeros(8 * 64 + 8, dtype=torch.bfloat16)
    declined = {
        "misaligned base": (storage[1:513].view(8, 64), w, 64),
        "last dim strided": (torch.zeros(64, 8, dtype=torch.bfloat16).t(), w, 64),
        "row stride not 16-byte divisible": (torch.zeros(8, 33, dtype=torch.bfloat16)[:, :32], w, 64),
        "width not whole 16-byte units": (x[:, :60], w, 64),
        "overlapping rows": (torch.zeros(1, 64, dtype=torch.bfloat16).expand(8, 64), w, 64),
        "wrong rank": (torch.zeros(2, 4, 64, dtype=torch.bfloat16), w, 64),
        "int scalar past int32": (x, w, 2**31),
    }
    for _ in range(2):  # the second time from the layouts remembered by the first
        for what, args in declined.items():
            assert not f.launch((1,), args, stream=0), what
        assert f.launch((3,), (x, w, 64), stream=7)
    assert len(f.driver.launches) == 3
    assert f._buffers, "a declined launch returns its argument block"


def test_a_failed_launch_hands_over_to_the_jit_for_good():
    """A cubin the driver refuses to launch (even in the GPU's primary context) declines with a warning naming the
    driver's error, and is never tried again: the caller's JIT (or reference) path runs instead of an exception."""

    class Refusing(_FakeDriver):
        def launch_kernel(self, *args):
            super().launch_kernel(*args)
            return 1  # CUDA_ERROR_INVALID_VALUE

        def push(self, index):
            pass

        def pop(self):
            pass

        def error_name(self, result):
            return "CUDA_ERROR_INVALID_VALUE (1)"

    f = aot.Function(Refusing(), 0, None, "sym", [["array", "bfloat16", 2]])
    f.handle, f.threads = 1234, 256
    x = torch.zeros(8, 64, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="sym failed to launch .CUDA_ERROR_INVALID_VALUE"):
        assert not f.launch((1,), (x,), stream=0)
    tried = len(f.driver.launches)
    assert tried == 2  # as it is, then in the primary context
    assert not f.launch((1,), (x,), stream=0) and len(f.driver.launches) == tried


def test_oversized_index_is_declined():
    """Shapes or strides past int32 (the compiled index width) do not pack: the launch is declined."""

    class Huge:  # a tensor-like with a stride beyond int32 (no storage needed)
        shape, dtype = (2, 64), torch.bfloat16

        def stride(self):
            return (2**31, 1)

        def data_ptr(self):
            return 1 << 20

    f = _function([["array", "bfloat16", 2]])
    assert not f.launch((1,), (Huge(),), stream=0) and not f.driver.launches


def test_disjointness_matches_views():
    t = torch.zeros(2, 8, 4, 64)
    assert aot._disjoint(t.shape, t.stride()) and aot._disjoint(t.transpose(1, 2).shape, t.transpose(1, 2).stride())
    e = torch.zeros(1, 8, 1, 64).expand(2, 8, 4, 64)
    assert not aot._disjoint(e.shape, e.stride())


def test_arch_of_a_cubin_for_a_gpu():
    archs = ca.ARCHS
    assert aot.arch_for((9, 0), archs) == "sm_90" and aot.arch_for((8, 6), archs) == "sm_86"
    assert aot.arch_for((8, 7), archs) == "sm_86" and aot.arch_for((10, 3), archs) == "sm_100"
    assert aot.arch_for((11, 0), archs) is None and aot.arch_for((9, 0), ("sm_80",)) is None


CHEAP = ("gated_act_bwd", "rms_norm_row")  # the fastest kernels to compile (well under a second each)


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    """A build whose precompiled set is a cheap subset, really compiled for sm_80 and sm_90."""
    root = tmp_path_factory.mktemp("aot")
    specs = {}
    for s, a in ca.aot_specs().items():  # the first bf16 specialization of each cheap kernel
        if s.kernel in CHEAP and s.params[0][1] == "bfloat16" and s.kernel not in {k.kernel for k in specs}:
            specs[s] = a
    patch = pytest.MonkeyPatch()
    patch.setattr(ca, "aot_specs", lambda: specs)
    try:
        assert ca.compile_aot(("sm_80", "sm_90"), specs, cache=root / "cache", workers=2, log=lambda *a: None) == 0
        build_mod.build(root / "build", cache=root / "cache")
    finally:
        patch.undo()
    return root / "build", specs


def test_every_cubin_is_built_and_listed(small_build):
    out, specs = small_build
    for variant in ("torch211-cxx11-cu130-x86_64-linux", "torch213-cxx11-cu130-x86_64-linux"):
        vdir = out / variant
        manifest = json.loads((vdir / "cubins" / "manifest.json").read_text())
        meta = json.loads((vdir / "metadata.json").read_text())
        assert manifest["archs"] == meta["precompiled"]["archs"] == ["sm_80", "sm_90"]
        assert meta["precompiled"]["kernels"] == len(manifest["kernels"]) == len(specs)
        listed = {(e["module"], e["kernel"], e["hints"], tuple(map(tuple, e["params"]))) for e in manifest["kernels"]}
        assert listed == {(s.module, s.kernel, s.hints, s.params) for s in specs}
        for entry in manifest["kernels"]:
            assert sorted(entry["cubins"]) == ["sm_80", "sm_90"]
            for name in entry["cubins"].values():
                image = lzma.decompress((vdir / "cubins" / name).read_bytes())
                assert image[:4] == b"\x7fELF" and entry["symbol"].encode() in image
                # the launch's block size: compiled in, a whole number of warps (not the register limit)
                threads = aot.required_threads(image, entry["symbol"])
                assert threads and threads % 32 == 0 and threads <= 1024, (entry["kernel"], threads)
            assert entry["symbol"] == ca.signature_of(ca.Spec(entry["module"], entry["kernel"], entry["hints"],
                                                              tuple(map(tuple, entry["params"])))).symbol
        assert "cubins/manifest.json" in meta["digest"]["files"]
        assert manifest["modules"]["gated_act"] == aot.source_digest(vdir / "tile" / "gated_act.py")
    for variant in ("torch-cuda", "torch-cpu"):
        assert not (out / variant / "cubins").exists()
        assert "precompiled" not in json.loads((out / variant / "metadata.json").read_text())


def test_precompiled_lookup_serves_matching_launches_only(small_build):
    out, specs = small_build
    package = out / "torch211-cxx11-cu130-x86_64-linux"
    found = aot.Precompiled(package / "cubins", 0, (9, 0), driver=_FakeDriver())
    assert found.arch == "sm_90" and found
    spec = next(s for s in specs if s.kernel == "gated_act_bwd")
    module = ca.planning_modules()["gated_act"]
    t = torch.zeros(4, 1024, dtype=torch.bfloat16)
    kernel, grid, args = module.backward_launch(t, t, t, t, t, "silu" if spec.params[5][1] == 0 else
                                                "gelu_pytorch_tanh", ("", 132))
    function = next(iter(found._kernels.values())).functions
    for f in found._kernels[aot.kernel_identity(kernel)].functions.values():
        f.handle, f.threads = 99, 128
    assert function and found.launch(kernel, grid, args, stream=5)
    assert found.driver.launches[-1][0] == 99
    fp16 = torch.zeros(4, 1024, dtype=torch.float16)
    assert not found.launch(kernel, grid, (fp16,) * 5 + args[5:], stream=5)  # no fp16 cubin in this subset
    assert aot.Precompiled(package / "cubins", 0, (12, 0), driver=_FakeDriver()).arch is None


def test_cubins_of_other_constraints_or_format_are_not_used(small_build, tmp_path):
    """A manifest written under other array constraints (or another format) than this runtime checks serves
    nothing: the per-call checks would not guard what those cubins assume."""
    out, _ = small_build
    source = out / "torch211-cxx11-cu130-x86_64-linux" / "cubins"
    manifest = json.loads((source / aot.MANIFEST).read_text())
    for key, value in (("constraints", {**manifest["constraints"], "last_dim_divisible_by_bytes": 1}),
                       ("constraints", {k: v for k, v in manifest["constraints"].items()
                                        if k != "last_dim_divisible_by_bytes"}),
                       ("format", aot.FORMAT - 1)):
        copy = tmp_path / f"{key}-{len(str(value))}" / "cubins"
        shutil.copytree(source, copy)
        (copy / aot.MANIFEST).write_text(json.dumps({**manifest, key: value}))
        found = aot.Precompiled(copy, 0, (9, 0), driver=_FakeDriver())
        assert found.arch is None and not found, key
    assert aot.Precompiled(source, 0, (9, 0), driver=_FakeDriver())


def test_every_precompiled_spec_is_listed_for_every_arch(tmp_path, monkeypatch):
    """The full set (cubins stood in for by placeholders: compiling all is `python -m devtools.build --archs
    all`): every spec of every arch lands in the manifest of both arch variants."""
    specs, digests, compiler = ca.aot_specs(), ca.source_digests(), ca.compiler_version()
    for spec, archs in specs.items():
        for arch in archs:
            path = ca.cubin_path(spec, arch, digests, compiler, tmp_path / "cache")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\x7fELF placeholder")
            (path.parent / f"{path.name}.symbol").write_text(spec.kernel)
    build_mod.build(tmp_path / "build", cache=tmp_path / "cache")
    manifest = json.loads((tmp_path / "build" / "torch213-cxx11-cu130-x86_64-linux" / "cubins" /
                           "manifest.json").read_text())
    assert manifest["archs"] == list(ca.ARCHS)
    assert len(manifest["kernels"]) == len(specs)
    assert sum(len(e["cubins"]) for e in manifest["kernels"]) == sum(len(a) for a in specs.values())
    assert {"sm_90"} < {a for e in manifest["kernels"] for a in e["cubins"]}


def _nvdisasm() -> str:
    import nvidia  # the namespace package of NVIDIA's CUDA wheels (requirements.txt: nvidia-cuda-nvdisasm)

    found = [p for base in nvidia.__path__ for p in [Path(base) / "cu13" / "bin" / "nvdisasm"] if p.is_file()]
    assert found or shutil.which("nvdisasm"), "nvdisasm missing: pip install -r requirements.txt"
    return str(found[0]) if found else shutil.which("nvdisasm")


def _sass_accesses(cubin: bytes, path: Path) -> Counter:
    """Global-memory and TMA access instructions in a cubin's SASS (nvdisasm), by opcode with its modifiers."""
    path.write_bytes(cubin)
    sass = subprocess.run([_nvdisasm(), str(path)], capture_output=True, text=True, check=True).stdout
    return Counter(re.findall(r"\b(?:LDG|STG|UTMALDG|UTMASTG)[A-Z0-9.]*", sass))


def test_cubins_of_8b_launches_access_memory_as_the_jit_does(tmp_path):
    """SASS of the shipped cubins for the launches of an 8B model (bf16; tuned H100 and untuned plans): the same
    global and TMA accesses as the cubin the JIT compiles for those arrays (which assumes every dimension whose
    size is a multiple of 16 elements to be one, cext), and no 16-bit scalar ones. Without the last dimension's
    divisibility in our constraints, tileiras emitted LDG.E.U16/STG.E.U16 for every op where the JIT's code had
    LDG.E.128, and the cubins ran up to 5x slower than the JIT (H100, 2026-12-07)."""
    from cuda.tile.compilation import ArrayConstraint, CallingConvention, KernelSignature

    mods, T, bf = ca.planning_modules(), ca.Tensor, torch.bfloat16
    norm, gated, rope = mods["rms_norm"], mods["gated_act"], mods["rope"]
    shipped = ca.aot_specs()
    plans = []
    for gpu in (("h100", 132), ("", 132)):
        x16, x4k, w = T(bf, (16, 4096)), T(bf, (4096, 4096)), T(bf, (4096,))
        plans += [norm.forward_launch(x16, w, x16, 1e-6, False, gpu),
                  norm.forward_launch(x4k, w, x4k, 1e-6, False, gpu),
                  norm.add_forward_launch(x16, x16, w, x16, x16, 1e-6, False, gpu),
                  gated.forward_launch(T(bf, (16, 14336)), T(bf, (16, 14336)), T(bf, (16, 14336)), "silu", gpu)]
        q, k, cs = T(bf, (1, 32, 4096, 128)), T(bf, (1, 8, 4096, 128)), T(bf, (1, 4096, 128))
        plans.append(rope.forward_launch(q, k, cs, cs, q, k, gpu))
    checked = set()
    for i, plan in enumerate(plans):
        spec = ca.spec_of(plan)
        shapes = iter([a.shape for a in plan[2] if isinstance(a, ca.Tensor)])
        jit_params = [dataclasses.replace(p, shape_divisible_by=tuple(16 if n % 16 == 0 else 1 for n in next(shapes)))
                      if isinstance(p, ArrayConstraint) else p for p in ca.signature_of(spec).parameters]
        jit_sig = KernelSignature(jit_params, CallingConvention.cutile_python_v1()).with_mangled_symbol(spec.kernel)
        if (spec, jit_sig.symbol) in checked:
            continue
        checked.add((spec, jit_sig.symbol))
        assert spec in shipped, spec
        ours = _sass_accesses(ca.export(spec, "sm_90"), tmp_path / f"{i}.cubin")
        jit = _sass_accesses(ca.export(spec, "sm_90", jit_sig), tmp_path / f"{i}.jit.cubin")
        assert ours == jit, (spec.kernel, ours, jit)
        # rope_row (the H100's choice up to 4096 tokens since 2026-12-07) gathers cos and sin by index: 16-bit loads
        # by its design, in the JIT's code as well
        assert spec.kernel == "rope_row" or not [a for a in ours if a.endswith(".U16")], (spec.kernel, ours)
    assert len(checked) >= 5


def test_native_rotation_is_not_contracted(tmp_path):
    """rope_row's NATIVE form (tuner candidate (0, 0, 2)) rounds each product and the sum as transformers does:
    in its sm_90 SASS no fused multiply-add takes a register addend (bf16: HFMA2 only as a product, x*1 + y or a
    negation; fp32: no FFMA), which cuTile's front end would emit for a product feeding an add."""
    rope, T = ca.planning_modules()["rope"], ca.Tensor
    contracted = re.compile(r"\b[HF]FMA2?[.A-Z0-9_]* R\d+, -?\|?R\d+[.A-Z0-9_]*\|?, -?\|?R\d+[.A-Z0-9_]*\|?, -?R\d+")
    for dtype in (torch.bfloat16, torch.float32):
        q, k, cs = T(dtype, (1, 32, 1, 128)), T(dtype, (1, 8, 1, 128)), T(dtype, (1, 1, 128))
        path = tmp_path / f"{dtype}.cubin"
        path.write_bytes(ca.export(ca.spec_of((rope.rope_row, (1, 1), (q, k, cs, cs, q, k, 0, 64, 32, 8, True, True))),
                                   "sm_90"))
        sass = subprocess.run([_nvdisasm(), str(path)], capture_output=True, text=True, check=True).stdout
        assert "MUL2" in sass or "FMUL" in sass, dtype
        assert not contracted.findall(sass), (dtype, contracted.findall(sass)[:4])


def test_llama_norm_multiplies_by_its_weight_in_the_input_dtype(tmp_path):
    """RMSNorm's Llama form rounds the normalized rows to the input dtype and multiplies by a weight of that dtype
    there (packed HMUL2 in the sm_90 SASS: one rounding, as PyTorch's fp32 product rounded to bf16); with an fp32
    weight the product stays in fp32 (transformers promotes the output to fp32)."""
    norm, T = ca.planning_modules()["rms_norm"], ca.Tensor
    for w_dtype, packed in ((torch.bfloat16, True), (torch.float32, False)):
        x, w = T(torch.bfloat16, (1, 4096)), T(w_dtype, (4096,))
        plan = norm.forward_launch(x, w, T(torch.promote_types(w_dtype, x.dtype), (1, 4096)), 1e-6, False, ("", 132))
        path = tmp_path / f"{w_dtype}.cubin"
        path.write_bytes(ca.export(ca.spec_of(plan), "sm_90"))
        sass = subprocess.run([_nvdisasm(), str(path)], capture_output=True, text=True, check=True).stdout
        assert ("HMUL2.BF16" in sass) is packed, w_dtype


def test_residual_add_after_a_llama_norm_is_not_contracted(tmp_path):
    """rms_norm_add's Llama form (`residual + w * normed`, both in bf16) rounds the weight product before the add,
    as transformers does: in its sm_90 SASS no bf16 FMA takes a register addend (cuTile contracts a product that
    feeds an add)."""
    norm, T = ca.planning_modules()["rms_norm"], ca.Tensor
    contracted = re.compile(r"\bHFMA2[.A-Z0-9_]* R\d+, -?\|?R\d+[.A-Z0-9_]*\|?, -?\|?R\d+[.A-Z0-9_]*\|?, -?R\d+")
    for rows in (1, 4096):  # the one-row kernel and the tiled one
        x, w = T(torch.bfloat16, (rows, 2560)), T(torch.bfloat16, (2560,))
        kernel, grid, args = norm.norm_add_launch(x, x, w, x, 1e-6, False, ("", 132))
        path = tmp_path / f"{rows}.cubin"
        path.write_bytes(ca.export(ca.spec_of((kernel, grid, args)), "sm_90"))
        sass = subprocess.run([_nvdisasm(), str(path)], capture_output=True, text=True, check=True).stdout
        assert "HMUL2.BF16" in sass or "HFMA2.MMA.BF16" in sass, rows
        assert not contracted.findall(sass), (rows, contracted.findall(sass)[:4])


def test_a_warps_entry_compiles_its_block_size(monkeypatch):
    """A table entry's warps element (the one-row norms, the gated activation, rope_row) reaches the compiler: its
    cubin asks for 8 warps (REQNTID 256, which the cubin launcher uses) where cuTile's own choice is 4."""
    mods = ca.planning_modules()
    norm, act, rope = mods["rms_norm"], mods["gated_act"], mods["rope"]
    tuned, T = sys.modules[norm.lookup.__module__], ca.Tensor
    x, w, g = T(torch.bfloat16, (16, 4096)), T(torch.bfloat16, (4096,)), T(torch.bfloat16, (16, 14336))
    q, k, cs = T(torch.bfloat16, (1, 32, 16, 128)), T(torch.bfloat16, (1, 8, 16, 128)), T(torch.bfloat16, (1, 16, 128))
    for warps, threads in ((0, 128), (8, 256)):
        monkeypatch.setitem(tuned.TABLE, ("h100", "rms_norm", 2, 12, 5), (0, 0, False, False, warps))
        monkeypatch.setitem(tuned.TABLE, ("h100", "silu", 2, 14, 5), (1, 2048, False, 0, warps))
        for plan in (norm.forward_launch(x, w, x, 1e-6, False, ("h100", 132)),
                     act.forward_launch(g, g, g, "silu", ("h100", 132)),
                     rope.forward_launch(q, k, cs, cs, q, k, ("h100", 132), (0, 0, 2, warps))):
            spec = ca.spec_of(plan)
            assert aot.required_threads(ca.export(spec, "sm_90"), ca.signature_of(spec).symbol) == threads, spec
    # the backward is warp-specialized (256 threads by cuTile's choice): 8 worker warps are 384 with its producers
    rows = T(torch.bfloat16, (4096, 4096))
    for warps, threads in ((0, 256), (8, 384)):
        monkeypatch.setitem(tuned.TABLE, ("h100", "rms_norm_backward", 2, 12, 13), (2, 2, 0, 10, warps))
        blocks = norm.backward_blocks(rows, ("h100", 132))
        spec = ca.spec_of(norm.backward_launch(rows, w, rows, rows, T(torch.float32, (blocks, 4096)), 1e-6, False,
                                               ("h100", 132)))
        assert aot.required_threads(ca.export(spec, "sm_90"), ca.signature_of(spec).symbol) == threads, spec


def test_a_partial_cache_packs_no_arch(tmp_path):
    spec, archs = next(iter(ca.aot_specs().items()))
    path = ca.cubin_path(spec, archs[0], ca.source_digests(), ca.compiler_version(), tmp_path / "cache")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    build_mod.build(tmp_path / "build", cache=tmp_path / "cache")
    assert not (tmp_path / "build" / "torch211-cxx11-cu130-x86_64-linux" / "cubins").exists()


# --- GPU ------------------------------------------------------------------------------------------------------------

def _precompiled_or_skip(ck):
    index = torch.cuda.current_device()
    runtime = sys.modules[f"{ck.__name__}._runtime"]
    found = runtime.precompiled(index)
    if found is None:
        pytest.skip(f"no cubins for sm_{''.join(map(str, torch.cuda.get_device_capability(index)))} in the variant: "
                    "run `python -m devtools.build --archs sm_XY` first")
    return runtime, index, found


def _ops(ck, dtype, gen):
    """(name, thunk) per op over fresh random in-domain shapes (widths of AOT_DOMAIN, 16-byte-multiple rows)."""
    dev = "cuda"
    rows = int(torch.randint(1, 3000, (1,), generator=gen))
    width = int(ca.AOT_DOMAIN["norm_widths"][int(torch.randint(0, 7, (1,), generator=gen))])
    n = width - 8 * int(torch.randint(0, max(1, width // 16), (1,), generator=gen))
    x = torch.randn(rows, n, device=dev, dtype=dtype)
    r = torch.randn(rows, n, device=dev, dtype=dtype)
    w = torch.randn(n, device=dev, dtype=dtype)
    dy = torch.randn(rows, n, device=dev, dtype=dtype)
    inter = 8 * int(torch.randint(1, 2048, (1,), generator=gen))
    gu = torch.randn(rows, 2 * inter, device=dev, dtype=dtype)
    gdy = torch.randn(rows, inter, device=dev, dtype=dtype)
    hd = int(ca.AOT_DOMAIN["head_dims"][int(torch.randint(0, 3, (1,), generator=gen))])
    s = int(torch.randint(1, 600, (1,), generator=gen))
    q, k = torch.randn(2, 32, s, hd, device=dev, dtype=dtype), torch.randn(2, 8, s, hd, device=dev, dtype=dtype)
    cos, sin = torch.randn(2, s, hd, device=dev, dtype=dtype), torch.randn(2, s, hd, device=dev, dtype=dtype)
    wq, wk = torch.randn(hd, device=dev, dtype=dtype), torch.randn(hd, device=dev, dtype=dtype)
    # the loss: rows a multiple of 4 (16-byte int64 targets and fp32 row outputs), real vocabularies
    ce_rows = 4 * int(torch.randint(1, 256, (1,), generator=gen))
    vocab = (32000, 128256, 151936, 262208)[int(torch.randint(0, 4, (1,), generator=gen))]
    logits = torch.randn(ce_rows, vocab, device=dev, dtype=dtype) * 4
    target = torch.randint(0, vocab, (ce_rows,), device=dev)
    target[::5] = -100
    lse, dloss = torch.logsumexp(logits.float(), -1), torch.randn(ce_rows, device=dev)
    return {
        "rms_norm": lambda: ck.rms_norm(x, w, 1e-6),
        "gemma_rms_norm": lambda: ck.gemma_rms_norm(x, w, 1e-6),
        "add_rms_norm": lambda: ck.add_rms_norm(x, r, w, 1e-6),
        "sandwich_rms_norm": lambda: ck.sandwich_rms_norm(x, r, w, dy[0], 1e-6),
        "rms_norm_add": lambda: ck.rms_norm_add(x, r, w, 1e-6, True),
        "rms_norm_backward": lambda: ck.rms_norm_backward_cutile(x, w, dy, 1e-6, False),
        "rms_norm_backward + residual": lambda: ck.rms_norm_backward_cutile(x, w, dy, 1e-6, True, dres=r),
        # the sandwich's backward: one launch up to 64 rows (here at most 37), the two-launch path past them
        "sandwich_rms_norm_backward, decode": lambda: ck.sandwich_rms_norm_backward_cutile(
            *(t[:37] for t in (x, r)), w, w, *(t[:37] for t in (dy, r)), 1e-6),
        "sandwich_rms_norm_backward": lambda: ck.sandwich_rms_norm_backward_cutile(x, r, w, w, dy, r, 1e-6),
        "gated_act silu": lambda: ck.gated_act(gu, "silu"),
        "gated_act gelu": lambda: ck.gated_act(gu, "gelu_pytorch_tanh"),
        "gated_act_backward": lambda: ck.gated_act_backward_cutile(gu, gdy, "silu"),
        "rope": lambda: ck.apply_rotary_pos_emb(q, k, cos, sin),
        "rope_backward": lambda: ck.rope_backward_cutile(q, k, cos, sin),
        "rope, positions shared by the batch": lambda: ck.apply_rotary_pos_emb(q, k, cos[:1], sin[:1]),
        # a float32 model under autocast: 16-bit q and k, float32 cos/sin, float32 outputs (fp32: the plain case)
        "rope, float32 cos/sin": lambda: ck.apply_rotary_pos_emb(q, k, cos.float(), sin.float()),
        "qk_norm_rope": lambda: ck.qk_norm_rope(q, k, wq, wk, cos, sin, 1e-6, False),
        "qk_norm_rope gemma": lambda: ck.qk_norm_rope(q, k, wq, wk, cos, sin, 1e-6, True),
        "cross_entropy": lambda: ck.cross_entropy_cutile(logits, target, -100),
        "cross_entropy_backward": lambda: ck.cross_entropy_backward_cutile(logits, target, lse, dloss, -100),
    }


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_precompiled_matches_the_jit(ck_gpu, dtype, monkeypatch):
    """Every op over fresh random in-domain shapes is served by a cubin, and its outputs agree with the JIT's
    within the relative error each is allowed against float64 in the op's own tests. Not bit for bit: the JIT
    derives its constraints from the actual arrays (every dimension whose size is divisible by 16 elements), the
    cubins assume a last dimension of whole 16-byte units and nothing about row counts, so the two compile other
    code, which can reorder a reduction (H100: a float32 dweight summed over ~3000 rows differed by 1.5e-5)."""
    runtime, index, found = _precompiled_or_skip(ck_gpu)
    served = []
    original = type(found).launch

    def counting(self, kernel, grid, args, stream):
        ok = original(self, kernel, grid, args, stream)
        served.append(ok)
        return ok

    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    counts = {"bit-identical": 0, "close": 0}
    for trial in range(3):
        ops = _ops(ck_gpu, dtype, gen)
        for name, run in ops.items():
            served.clear()
            monkeypatch.setattr(type(found), "launch", counting)
            pre = run()
            torch.cuda.synchronize()
            monkeypatch.setattr(type(found), "launch", original)
            assert served and all(served), f"{name} {dtype}: not served by a cubin (outside the precompiled set?)"
            monkeypatch.setitem(runtime._PRECOMPILED, index, None)  # the JIT path
            jit = run()
            monkeypatch.setitem(runtime._PRECOMPILED, index, found)
            tol = (GRAD_REL_TOL if "backward" in name else GPU_REL_TOL)[dtype]
            for a, b in zip(pre if isinstance(pre, tuple) else (pre,), jit if isinstance(jit, tuple) else (jit,)):
                assert not a.isnan().any() and rel_err(a, b) < tol, f"{name} {dtype} trial {trial}: {rel_err(a, b):.1e}"
                counts["bit-identical" if torch.equal(a, b) else "close"] += 1
    print(f"\n{dtype}: {counts}")


@pytest.mark.gpu
def test_jit_signature_implies_the_compiled_constraints(ck_gpu):
    """For an aligned contiguous input, the signature the JIT derives assumes at least what the cubin was compiled
    with, so the cubin is valid wherever the JIT's would be (and the per-call checks ask no more)."""
    from cuda.tile.compilation import ArrayConstraint, CallingConvention, KernelSignature

    real = {m.__name__.rsplit(".", 1)[-1]: m for m in ca._load_modules()}
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    kernel, _, args = real["rms_norm"].forward_launch(x, w, torch.empty_like(x), 1e-6, False, ("", 132))
    jit = KernelSignature.from_kernel_args(kernel, args, CallingConvention.cutile_python_v1())
    ours = ca.signature_of(ca.spec_of((kernel, None, args)))
    for a, b in zip(jit.parameters, ours.parameters):
        assert type(a) is type(b)
        if isinstance(a, ArrayConstraint):
            assert a.dtype == b.dtype and a.ndim == b.ndim and a.index_dtype == b.index_dtype
            assert a.base_addr_divisible_by % b.base_addr_divisible_by == 0
            assert all(j % o == 0 for j, o in zip(a.stride_divisible_by, b.stride_divisible_by))
            assert all(j % o == 0 for j, o in zip(a.shape_divisible_by, b.shape_divisible_by))
            assert a.stride_constant[-1] == b.stride_constant[-1] == 1 and not a.may_alias_internally


@pytest.mark.gpu
def test_param_offsets_match_the_driver(ck_gpu):
    """cuFuncGetParamInfo (CUDA 12.4+) of every loaded function: the offsets and sizes our layout packs."""
    _, _, found = _precompiled_or_skip(ck_gpu)
    info = found.driver.lib.cuFuncGetParamInfo
    info.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t),
                     ctypes.POINTER(ctypes.c_size_t)]
    checked = 0
    for group in found._kernels.values():
        for f in list(group.functions.values())[:4]:
            f._load()
            buf = aot._ParamBuffer(f.layout)
            base = ctypes.addressof(buf.storage)
            ours = [(p - base, struct.calcsize("@" + c)) for p, c in zip(buf.params, f.layout[1:])]
            theirs = []
            for i in range(len(ours) + 1):
                off, size = ctypes.c_size_t(), ctypes.c_size_t()
                if info(f.handle, i, ctypes.byref(off), ctypes.byref(size)):
                    break
                theirs.append((off.value, size.value))
            assert theirs == ours, f.symbol
            checked += 1
    assert checked


@pytest.mark.gpu
def test_model_runs_the_kernels_where_cuda_tile_cannot_be_imported(kernel_repo, wide_checkpoints, tmp_path):
    """A subprocess whose `import cuda.tile` fails: a model loaded through KernelConfig runs the cuTile kernels
    (cubins; the profiler shows them), not the reference, and no fallback warning is issued."""
    if not list((kernel_repo / "build").glob("torch2*/cubins/manifest.json")):
        pytest.skip("no cubins in the build: run `python -m devtools.build --archs sm_XY` first")
    code = textwrap.dedent(f"""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "cuda.tile" or name.startswith("cuda.tile."):
                    raise ImportError("cuda.tile is blocked in this test")
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        from transformers import AutoModelForCausalLM, KernelConfig
        from devtools.local_hub import local_hub
        with local_hub({str(kernel_repo)!r}) as repo:
            import kernels
            ck = kernels.get_kernel(repo, version=1)
            warnings.simplefilter("error", ck.CutileFallbackWarning)  # a fallback to the reference fails the run
            config = KernelConfig(ck.recommended_mapping("llama", repo))
            model = AutoModelForCausalLM.from_pretrained({str(wide_checkpoints["llama"])!r}, use_kernels=True,
                                                         kernel_config=config, dtype=torch.bfloat16,
                                                         device_map="cuda").eval()
            ids = torch.randint(0, model.config.vocab_size, (2, 64), device="cuda")
            with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                model(ids)
                torch.cuda.synchronize()
        names = {{e.name for e in prof.events()}}
        cutile = sorted(n for n in names if any(k in n for k in ("rms_norm", "gated_act", "rope")))
        assert "cuda.tile" not in sys.modules, "cuda.tile was imported"
        assert cutile, sorted(names)[:20]
        print("kernels:", cutile)
    """)
    env = {k: v for k, v in os.environ.items()}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    print(run.stdout[-2000:])
    assert run.returncode == 0, run.stderr[-4000:]
