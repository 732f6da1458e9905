import importlib
import shutil
from pathlib import Path

import pytest
import torch

from devtools.build import build
from devtools.checkpoints import ALL_FAMILIES, make_checkpoint
from devtools.local_hub import local_hub

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
