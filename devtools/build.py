"""Assemble `build/` from `torch-ext/` and `kernel-src/` without Nix.

    python -m devtools.build [--out build]

Variants: the noarch `torch-cuda` (what kernel-builder also produces), `torch-cpu` (the same package; on a CPU
every op takes its PyTorch reference path) and one arch variant per supported torch with CUDA 13, which kernels
prefers over `torch-cuda` and which makes a CUDA 12 system fail with a clear "no build variant" error.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# torch minor versions with a CUDA 13.0 build that this repository supports (the GPU machines run 2.11).
TORCH_CUDA13 = ("2.11", "2.13")


def build_config() -> dict:
    return tomllib.loads((ROOT / "build.toml").read_text())


def variant_names() -> list[str]:
    arch = [f"torch{v.replace('.', '')}-cxx11-cu130-x86_64-linux" for v in TORCH_CUDA13]
    return ["torch-cuda", "torch-cpu", *arch]


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "torch-ext", "kernel-src"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "local"
    return f"{rev}_dirty" if dirty else rev


def metadata(variant: str, general: dict, rev: str) -> dict:
    backend = "cpu" if variant.endswith("cpu") else "cuda"
    python_name = general["name"].replace("-", "_")
    # The id is the module's sys.modules key: one per variant, so two variants can live in one process.
    tag = variant.replace("torch-", "").split("-cxx11")[0].replace("-", "_")
    return {
        "name": general["name"],
        "id": f"_{python_name}_{tag}_{rev}",
        "version": general["version"],
        "license": general["license"],
        "python-depends": general.get("python-depends", []),
        "backend": {"type": backend},
    }


def add_digest(meta: dict, variant_dir: Path) -> None:
    """The file digest kernel-builder writes (kernels verifies it against signed metadata)."""
    from kernels._rust import Digest, DigestAlgorithm

    digest = Digest.hash_variant(DigestAlgorithm.SHA256, variant_dir)
    meta["digest"] = {"algorithm": "sha256", "files": dict(digest.files)}


def build(out: Path) -> list[Path]:
    general = build_config()["general"]
    package = ROOT / "torch-ext" / general["name"].replace("-", "_")
    rev = git_rev()
    if out.exists():
        shutil.rmtree(out)
    made = []
    for variant in variant_names():
        dest = out / variant
        # symlinks=False dereferences `tile/`, the link to kernel-src/: each variant is self-contained.
        shutil.copytree(package, dest, symlinks=False,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        meta = metadata(variant, general, rev)
        add_digest(meta, dest)
        (dest / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        made.append(dest)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build")
    args = parser.parse_args()
    for dest in build(args.out):
        print(f"build: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")


if __name__ == "__main__":
    main()
