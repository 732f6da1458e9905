import importlib
import shutil
from pathlib import Path

import pytest
import torch

from devtools.build import build
from devtools.checkpoints import ALL_FAMILIES, make_checkpoint
from devtools.local_hub import local_hub

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# ||out - ref64|| / ||ref64|| bounds for one op: the kernels round where transformers does, so the error is about
# two roundings of the dtype (bf16: 2^-8 each, fp16: 2^-11) and float32 arithmetic for fp32.
GPU_REL_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.fixture(scope="session")
def ck_gpu(kernel_repo):
    """The kernel as kernels resolves it on this machine (a CUDA variant on a GPU)."""
    import kernels

    return kernels.get_local_kernel(kernel_repo)


def assert_gpu_parity(path, mapping: dict):
    """Load `path` plain and through KernelConfig(mapping) on the GPU in bf16; the kernel model must run cuTile
    (no fallback warning) and match: logits within 2e-2 relative, argmax agreeing on > 95 % of positions (the
    bound tests/test_gpu_layouts.py justifies). Returns the kernel model."""
    import warnings

    from transformers import AutoModelForCausalLM, KernelConfig

    kw = dict(dtype=torch.bfloat16, device_map="cuda")
    plain = AutoModelForCausalLM.from_pretrained(path, **kw)
    ids = torch.randint(0, plain.config.vocab_size, (2, 40), device="cuda")
    with torch.no_grad():
        want = plain(ids).logits.float()  # first: transformers' rotary function is shared by both models
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(
            path, use_kernels=True, kernel_config=KernelConfig(mapping, inherit_mapping=False), **kw)
        with torch.no_grad():
            got = model(ids).logits.float()
    fallbacks = [str(w.message) for w in caught if "running the PyTorch reference" in str(w.message)]
    assert not fallbacks, fallbacks
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-2, rel
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
    return model


@pytest.fixture(scope="session")
def kernel_repo(tmp_path_factory) -> Path:
    """A kernel repository root holding a fresh `build/` of this checkout."""
    root = tmp_path_factory.mktemp("kernel-repo")
    build(root / "build")
    shutil.copy(Path(__file__).parent.parent / "build.toml", root / "build.toml")
    return root


@pytest.fixture
def hub(kernel_repo):
    """The Hub repo id, resolved to `kernel_repo` (offline) while the test runs."""
    with local_hub(kernel_repo) as repo_id:
        yield repo_id


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: make_checkpoint(family, root / family) for family in ALL_FAMILIES}


@pytest.fixture
def cpu_kernel_config(monkeypatch):
    """transformers refuses "cpu" in a KernelConfig; tests of the KernelConfig route on CPU add it.

    This is the one patch of transformers in the tests: everything after the device check is transformers'
    own code path. On a GPU the same tests run unpatched (tests/test_gpu.py)."""
    kc = importlib.import_module("transformers.utils.kernel_config")
    monkeypatch.setattr(kc, "KERNELS_SUPPORTED_DEVICE_TYPES", [*kc.KERNELS_SUPPORTED_DEVICE_TYPES, "cpu"])


@pytest.fixture(autouse=True)
def transformers_state(kernel_repo):
    """Every test leaves transformers' global patches, conversion rules and recorders as it found them, through
    the package's own guard, so the suite does not depend on test order."""
    import kernels

    guard = kernels.get_local_kernel(kernel_repo / "build" / "torch-cpu").transformers_state_guard
    with guard():
        yield
