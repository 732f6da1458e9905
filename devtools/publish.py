"""Upload the built variants, the benchmarks and the card to the Kernel Hub (what CI's publish job runs).

    python -m devtools.publish [--dry-run] [--build build] [--repo-id ORG/NAME] [--branch vN]

Like kernel-builder's upload: `build/<variant>/**` (with each metadata.json's cosign bundle, if signed) and
`benchmarks/` go to branch `v<version>` of the `kernel`-type repo `[general.hub] repo-id`; CARD.md goes to `main`
as README.md. `--dry-run` prints exactly the files it would upload, branch by branch, and touches nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .build import ROOT, build_config

SKIP = ("__pycache__", ".pyc")


def plan(build_dir: Path, root: Path = ROOT, version: int | None = None) -> dict[str, list[tuple[str, Path]]]:
    """{branch: [(path in repo, local file)]}, sorted; fails if build_dir holds no variant or variants disagree."""
    general = build_config()["general"]
    variants = sorted(p for p in build_dir.iterdir() if (p / "metadata.json").is_file()) if build_dir.is_dir() else []
    if not variants:
        raise SystemExit(f"publish: no variant with a metadata.json under {build_dir}: run `python -m devtools.build`")
    versions = {json.loads((v / "metadata.json").read_text())["version"] for v in variants}
    if len(versions) != 1:
        raise SystemExit(f"publish: variants disagree on version: {sorted(versions)}")
    version = versions.pop() if version is None else version
    branch = general.get("hub", {}).get("branch") or f"v{version}"
    files = [(f"build/{v.name}/{f.relative_to(v).as_posix()}", f) for v in variants for f in sorted(v.rglob("*"))
             if f.is_file() and not any(s in f.as_posix() for s in SKIP)]
    files += [(f.relative_to(root).as_posix(), f) for f in sorted((root / "benchmarks").rglob("*"))
              if f.is_file() and not any(s in f.as_posix() for s in SKIP)]
    return {branch: files, "main": [("README.md", root / "CARD.md")]}


def upload(uploads: dict[str, list[tuple[str, Path]]], repo_id: str) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="kernel", exist_ok=True)
    for branch, files in uploads.items():
        if branch != "main":
            api.create_branch(repo_id, branch=branch, repo_type="kernel", exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=dest, path_or_fileobj=str(src)) for dest, src in files]
        for start in range(0, len(ops), 1000):  # the Hub takes up to ~1000 operations per commit
            api.create_commit(repo_id, ops[start:start + 1000], repo_type="kernel", revision=branch,
                              commit_message=f"Upload cutile-kernels ({branch})")
        print(f"publish: uploaded {len(ops)} files to {repo_id}@{branch}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=ROOT / "build")
    parser.add_argument("--repo-id", default=build_config()["general"]["hub"]["repo-id"])
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    uploads = plan(args.build)
    if args.dry_run:
        for branch, files in uploads.items():
            for dest, _ in files:
                print(f"{args.repo_id}@{branch}: {dest}")
        print(f"publish: dry run, {sum(len(f) for f in uploads.values())} files, nothing uploaded")
        return
    upload(uploads, args.repo_id)


if __name__ == "__main__":
    sys.exit(main())
