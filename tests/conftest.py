"""Fixtures of the whole suite: the kernel repository built from this checkout, the kernel modules (`ck` on
CPU, `ck_gpu` as this machine resolves it, `ck_hub` through the Hub id), tiny checkpoints, and the autouse guards
that keep transformers' global state and the fallback warnings out of other tests. Helpers: tests/_helpers.py."""
import importlib
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from devtools.build import build
from devtools.checkpoints import ALL_FAMILIES, make_checkpoint
from devtools.local_hub import local_hub


def pytest_collection_modifyitems(config, items):
    """`gpu` tests (cuTile on a CUDA GPU) skip cleanly without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kernel_repo(tmp_path_factory) -> Path:
    """A kernel repository root holding a fresh `build/` of this checkout."""
    root = tmp_path_factory.mktemp("kernel-repo")
    build(root / "build")
    shutil.copy(Path(__file__).parent.parent / "build.toml", root / "build.toml")
    return root


@pytest.fixture
def ck(kernel_repo):
    """The torch-cpu variant (kernels' choice on a CPU torch): every op runs its exact PyTorch reference."""
    import kernels

    return kernels.get_local_kernel(kernel_repo / "build" / "torch-cpu")


@pytest.fixture(scope="session")
def ck_gpu(kernel_repo):
    """The kernel as kernels resolves it on this machine (a CUDA variant on a GPU)."""
    import kernels

    return kernels.get_local_kernel(kernel_repo)


@pytest.fixture
def device_ck(request, device):
    """The kernel for a test parametrized by `device` (tests/_helpers.py DEVICES)."""
    return request.getfixturevalue("ck_gpu" if device == "cuda" else "ck")


@pytest.fixture
def hub(kernel_repo):
    """The Hub repo id, resolved to `kernel_repo` (offline) while the test runs."""
    with local_hub(kernel_repo) as repo_id:
        yield repo_id


@pytest.fixture
def ck_hub(hub):
    """The module a KernelConfig naming `hub` takes its layers from."""
    import kernels

    return kernels.get_kernel(hub, version=1)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: make_checkpoint(family, root / family) for family in ALL_FAMILIES}


@pytest.fixture(scope="session")
def wide_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """head_dim 64 so every kernel (RoPE included) takes its cuTile path (GPU tests)."""
    root = tmp_path_factory.mktemp("wide")
    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return {f: make_checkpoint(f, root / f, **shape) for f in ("llama", "gemma3")}


@pytest.fixture
def cpu_kernel_config(monkeypatch):
    """transformers refuses "cpu" in a KernelConfig; tests of the KernelConfig route on CPU add it.

    This is the one patch of transformers in the tests: everything after the device check is transformers'
    own code path. On a GPU the same routes run unpatched (the `gpu` tests)."""
    kc = importlib.import_module("transformers.utils.kernel_config")
    monkeypatch.setattr(kc, "KERNELS_SUPPORTED_DEVICE_TYPES", [*kc.KERNELS_SUPPORTED_DEVICE_TYPES, "cpu"])


@pytest.fixture(autouse=True)
def transformers_state(ck):
    """Every test leaves transformers' global patches, conversion rules and recorders as it found them, through
    the package's own guard, so the suite does not depend on test order."""
    with ck.transformers_state_guard():
        yield


@pytest.fixture(autouse=True)
def quiet_fallbacks(ck, ck_gpu):
    """The fallback warning (CutileFallbackWarning, one class per loaded variant) is expected on CPU; tests that
    are about it catch it themselves (pytest.warns, tests/_helpers.py no_fallback)."""
    for module in {ck, ck_gpu}:
        warnings.filterwarnings("ignore", category=module.CutileFallbackWarning)
