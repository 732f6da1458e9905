"""What the per-op test files share: dtypes, devices and tolerances, the poisoned-output float64 check, the
no-fallback guard, and the loaders and checks of whole models (fixtures live in conftest.py)."""
from __future__ import annotations

import contextlib
import importlib
import json
import random
import warnings

import pytest
import torch

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# The matrix runs on both: the torch-cpu variant (the exact reference) and, marked `gpu`, the machine's variant
# (cuTile). A test parametrized by `device` gets the kernel for it from the `device_ck` fixture.
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]
# The kernels_ci subset runs on whatever this machine has.
CI_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# ||out - ref64|| / ||ref64|| bounds for one op: the kernels round where transformers does, so the error is about
# two roundings of the dtype (bf16: 2^-8 each, fp16: 2^-11) and float32 arithmetic for fp32.
GPU_REL_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
# the same for gradients against float64 autograd (a backward rounds its inputs, its partial sums and dx)
GRAD_REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}

IDS = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))

# The Layout cases: recommended_mapping's options for each (RoPE is tested in test_rope.py).
LAYOUT_OPTIONS = {"norm": dict(mlp=None), "mlp": dict(norm=False, mlp="merged"), "fused": dict(norm=False),
                  "norm+fused": {}}


def fresh_rng() -> tuple[int, random.Random]:
    """A fresh seed (for the failure message) and its generator: every run draws new random shapes."""
    seed = random.randrange(2**31)
    return seed, random.Random(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def poisoned(shape, like: torch.Tensor) -> torch.Tensor:
    """An output buffer of NaNs: any element a kernel fails to write stays NaN."""
    return torch.full(tuple(shape), float("nan"), dtype=like.dtype, device=like.device)


def assert_close_to_float64(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, where: str) -> None:
    """Every element written (no NaN left from a poisoned buffer) and within GPU_REL_TOL of float64."""
    if out.is_cuda:
        torch.cuda.synchronize()
    assert not out.isnan().any(), f"unwritten or NaN outputs: {where}"
    err = rel_err(out, ref64)
    assert err < GPU_REL_TOL[dtype], f"{where}: rel err {err:.2e}"


def assert_grads_close(pairs, dtype: torch.dtype, where) -> None:
    """(got, float64 autograd) gradient pairs within GRAD_REL_TOL."""
    for got, want in pairs:
        assert rel_err(got, want) < GRAD_REL_TOL[dtype], where


def tune_everywhere(ck, monkeypatch, ops, config, widths, dtype_sizes=(2,)) -> None:
    """This GPU's launch table (the variant's tile/tuned.py) holds `config` for `ops` at every width bucket in
    `widths`, element size in `dtype_sizes` and row bucket, also where an exact width of such a bucket has entries
    of its own (the lookup tries those first): what the tuner may write, run before it is chosen; undone after the
    test."""
    tuned = importlib.import_module(f"{ck.__name__}.tile.tuned")
    gpu = tuned.gpu_key(torch.cuda.get_device_name())
    for op in ops:
        for size in dtype_sizes:
            for width_bucket in widths:
                exact = {k[3] for k in tuned.TABLE if k[:3] == (gpu, op, size) and not tuned.is_bucket(k[3])
                         and (k[3] - 1).bit_length() == width_bucket}
                for width in (width_bucket, *exact):
                    for rows_bucket in range(1, 18):
                        monkeypatch.setitem(tuned.TABLE, (gpu, op, size, width, rows_bucket), config)


def reset_fallback_warnings(ck) -> None:
    """Forget which fallbacks `ck` has already warned about (it warns once per op and reason)."""
    ck._runtime._warned.clear()


@contextlib.contextmanager
def no_fallback(ck, on: bool = True):
    """Inside, a fallback of `ck` to its PyTorch reference raises: the public functions must take cuTile (`on`
    False: a no-op, for the CPU side of a matrix)."""
    with warnings.catch_warnings():
        if on:
            reset_fallback_warnings(ck)
            warnings.simplefilter("error", ck.CutileFallbackWarning)
        yield


def layout_mapping(ck, family: str, repo: str, case: str) -> dict:
    return ck.recommended_mapping(family, repo, rope=False, **LAYOUT_OPTIONS[case])


def load(path, mapping: dict):
    """(model, loading info) through from_pretrained(use_kernels=True, kernel_config=KernelConfig(mapping))."""
    from transformers import AutoModelForCausalLM, KernelConfig

    return AutoModelForCausalLM.from_pretrained(path, use_kernels=True, kernel_config=KernelConfig(mapping),
                                                output_loading_info=True)


def plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def layouts(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("Layout")]


def checkpoint_keys(path) -> set:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def check_layout_model(ck_hub, path, mapping: dict, device: str, tmp_path) -> None:
    """A mapping with Layouts through from_pretrained(kernel_config=...). On a GPU: assert_gpu_parity. On CPU
    (transformers' "cpu" refusal lifted by the cpu_kernel_config fixture): it loads with no missing or unexpected
    key, kernelize bound the kernel class's forward to each Layout, the logits equal the plain model's exactly,
    and save_pretrained writes the original checkpoint keys back, which plain transformers reloads with the same
    logits."""
    from transformers import AutoModelForCausalLM

    if device == "cuda":
        assert_gpu_parity(ck_hub, path, mapping)
        return
    want = logits(plain(path))
    model, info = load(path, mapping)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    found = layouts(model)
    assert found
    for m in found:
        kernel_cls = getattr(ck_hub.layers, type(m).__name__.removesuffix("Layout"))
        assert m.forward.__func__ is kernel_cls.forward
    assert torch.equal(logits(model), want)

    model.save_pretrained(tmp_path)
    assert checkpoint_keys(tmp_path) == checkpoint_keys(path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == \
        json.loads((path / "config.json").read_text())["architectures"]
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(logits(reloaded), want)


def assert_gpu_parity(ck_hub, path, mapping: dict):
    """Load `path` plain and through KernelConfig(mapping) on the GPU in bf16; the kernel model (layers from
    `ck_hub`) must run cuTile (no fallback warning) and match: logits within 2e-2 relative, argmax agreeing on
    > 95 % of positions. Returns the kernel model.

    Why 2e-2: the kernels round exactly where transformers does, so the remaining difference between kernel and
    plain models comes from the merged gate_up GEMM (cuBLAS may pick another reduction order for N = 2I than for
    N = I) and fp32 rsqrt/exp approximations: bf16 outputs then differ by about one bf16 ulp (2^-8 ≈ 4e-3
    relative) in some elements, which two layers of a random model carry to a logit relative error ~1e-2."""
    from transformers import AutoModelForCausalLM, KernelConfig

    kw = dict(dtype=torch.bfloat16, device_map="cuda")
    reference = AutoModelForCausalLM.from_pretrained(path, **kw)
    ids = torch.randint(0, reference.config.vocab_size, (2, 40), device="cuda")
    want = logits(reference, ids).float()  # first: transformers' rotary function is shared by both models
    with no_fallback(ck_hub):
        model = AutoModelForCausalLM.from_pretrained(
            path, use_kernels=True, kernel_config=KernelConfig(mapping, inherit_mapping=False), **kw)
        got = logits(model, ids).float()
    rel = rel_err(got, want)
    assert rel < 2e-2, rel
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
    return model


def recorded_launches(ck, module: str, monkeypatch) -> list:
    """The argument tuples that the launchers of `ck.<module>` hand to `launch`, recorded instead of launched, with
    launch plans for a stand-in GPU: the launchers' glue on CPU."""
    launching = importlib.import_module(f"{ck.__name__}.{module}")
    plans = []
    monkeypatch.setattr(launching, "launch", lambda index, kernel, grid, args: plans.append(args))
    monkeypatch.setattr(launching, "gpu", lambda index: ("test", 132))
    return plans


def assert_compiles_like_eager(model, hub, layers: dict, fullgraph: bool = False) -> None:
    """kernelize `model` in TORCH_COMPILE mode with `layers` ({mapping key: layer name} from `hub`, on CPU); Dynamo
    finds no graph break and the compiled logits equal the eager ones."""
    from kernels import LayerRepository, Mode, kernelize, use_kernel_mapping

    mapping = {key: {"cpu": LayerRepository(hub, layer_name=layer, version=1)} for key, layer in layers.items()}
    with use_kernel_mapping(mapping, inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE | Mode.TORCH_COMPILE, device="cpu")
    ids = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        want = model(ids).logits
        explanation = torch._dynamo.explain(model)(ids)
        got = torch.compile(model, fullgraph=fullgraph, backend="aot_eager")(ids).logits
    assert explanation.graph_break_count == 0, [str(r)[:300] for r in explanation.break_reasons]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
