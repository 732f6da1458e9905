"""The repository is a Kernel Hub repository that kernels 0.17.2 accepts, and build/ holds loadable variants."""
import json
import sys
import warnings

import kernels
import pytest
import torch
from kernels._rust import Build, Digest, DigestAlgorithm, Metadata
from kernels.resolver import resolve_local_kernel

from devtools.build import ROOT, variant_names


def test_build_toml_is_accepted_by_kernels_parser():
    general = Build.open(ROOT).general
    assert sorted(str(b) for b in general.backends) == ["cpu", "cuda"]
    text = (ROOT / "build.toml").read_text()
    assert "edition = 5" in text and "[torch-noarch]" in text and "repo-id" in text


def test_build_toml_with_an_unknown_key_is_rejected(tmp_path):
    # proves the test above runs the strict parser (deny_unknown_fields), not a lenient one
    (tmp_path / "build.toml").write_text((ROOT / "build.toml").read_text() + "\n[torch-noarch.extra]\n")
    with pytest.raises(Exception):
        Build.open(tmp_path)


def test_every_variant_is_built(kernel_repo):
    built = sorted(p.name for p in (kernel_repo / "build").iterdir())
    assert built == sorted(variant_names())
    assert {"torch-cuda", "torch-cpu", "torch211-cxx11-cu130-x86_64-linux",
            "torch213-cxx11-cu130-x86_64-linux"} <= set(built)


@pytest.mark.parametrize("variant", variant_names())
def test_metadata_is_accepted_and_declares_no_cuda_tile(kernel_repo, variant):
    path = kernel_repo / "build" / variant / "metadata.json"
    meta = Metadata.read_from_file(path)
    assert str(meta.name) == "cutile-kernels" and meta.version == 1
    raw = json.loads(path.read_text())
    assert {"name", "id", "version", "license", "python-depends", "backend"} <= raw.keys()
    assert not any("tile" in dep for dep in raw["python-depends"])
    assert raw["backend"]["type"] == ("cpu" if variant == "torch-cpu" else "cuda")


@pytest.mark.parametrize("variant", variant_names())
def test_digest_matches_the_files(kernel_repo, variant):
    vdir = kernel_repo / "build" / variant
    recorded = json.loads((vdir / "metadata.json").read_text())["digest"]["files"]
    assert dict(Digest.hash_variant(DigestAlgorithm.SHA256, vdir).files) == recorded
    assert "tile/rms_norm.py" in recorded  # kernel-src/ reached the package


def test_resolver_picks_the_cpu_variant_on_cpu_torch(kernel_repo):
    if torch.cuda.is_available() or torch.version.cuda:
        pytest.skip("a CUDA torch selects a CUDA variant")
    assert resolve_local_kernel(kernel_repo, backend=None).variant_str == "torch-cpu"


@pytest.mark.parametrize("variant", variant_names())
def test_every_variant_loads_with_get_local_kernel(kernel_repo, variant):
    module = kernels.get_local_kernel(kernel_repo / "build" / variant)
    meta = json.loads((kernel_repo / "build" / variant / "metadata.json").read_text())
    assert module.__name__ == meta["id"]
    assert issubclass(module.layers.RMSNorm, torch.nn.Module)


def test_kernel_loads_without_cuda_tile(kernel_repo, monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.tile", None)  # makes `import cuda.tile` raise ImportError
    module = kernels.get_local_kernel(kernel_repo / "build" / "torch-cuda")
    x = torch.randn(3, 16)
    w = torch.randn(16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", module.CutileFallbackWarning)
        assert torch.equal(module.rms_norm(x, w, 1e-6), module.rms_norm_reference(x, w, 1e-6))


def test_missing_cuda_tile_is_reported_with_install_hint(ck, monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.tile", None)
    ck._runtime.cutile_import_error.cache_clear()
    try:
        reason = ck._runtime.cutile_import_error()
    finally:
        ck._runtime.cutile_import_error.cache_clear()
    assert reason and "pip install cuda-tile==1.7.0" in reason


@pytest.mark.parametrize("variant", variant_names())
def test_precompiled_kernels_only_in_the_arch_variants(kernel_repo, variant):
    """Every variant ships the precompiled launcher (_aot.py); cubins and the metadata's `precompiled` entry (the
    archs held) only in the CUDA 13 arch variants, and only for archs compiled into the cubin cache."""
    vdir = kernel_repo / "build" / variant
    meta = json.loads((vdir / "metadata.json").read_text())
    assert (vdir / "_aot.py").is_file()
    if "precompiled" in meta:
        assert variant not in ("torch-cuda", "torch-cpu")
        manifest = json.loads((vdir / meta["precompiled"]["manifest"]).read_text())
        assert manifest["archs"] == meta["precompiled"]["archs"] and manifest["kernels"]
        assert "backend" in meta and "archs" not in meta["backend"]  # kernels would refuse other GPUs (JIT runs)
    else:
        assert not (vdir / "cubins").exists()
