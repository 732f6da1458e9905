"""Upload the built variants, the benchmarks and the card to the Kernel Hub (what CI's publish job runs).

    python -m devtools.publish [--dry-run] [--build build] [--repo-id ORG/NAME]

Like kernel-builder's upload: `build/<variant>/**` (with each metadata.json's cosign bundle, if signed) and
`benchmarks/benchmark*.py` go to branch `v<version>` of the `kernel`-type repo `[general.hub] repo-id`, and files
on that branch that this build no longer produces are deleted in the same commit (a removed variant stops
serving old code); CARD.md, rendered (repo id, version, layers, functions), goes to `main` as README.md.
`--dry-run` prints exactly what it would upload and, where the repo can be read, delete, and touches nothing.
Needs `HF_TOKEN` with write access to the repo (and, for a first upload, the right to create kernel repos in its
organisation).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .build import ROOT, build_config

SKIP = ("__pycache__", ".pyc")


def render_card(root: Path = ROOT, build_dir: Path | None = None) -> str:
    """CARD.md with its template filled (jinja2, as kernel-builder's fill-card): repo id, version, and the layers
    and public functions of the package."""
    import ast

    import jinja2

    general = build_config()["general"]
    package = root / "torch-ext" / general["name"].replace("-", "_")
    exported = lambda path: next(  # noqa: E731  the names in a module's __all__
        ast.literal_eval(n.value) for n in ast.parse(path.read_text()).body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__all__")
    layers = sorted(exported(package / "layers.py"))
    functions = sorted(f for f in exported(package / "__init__.py") if f != "layers" and f[:1].islower())
    template = jinja2.Template((root / "CARD.md").read_text(), undefined=jinja2.StrictUndefined,
                               keep_trailing_newline=True)
    return template.render(repo_id=general["hub"]["repo-id"], version=general["version"], layers=layers,
                           functions=functions)


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
    # kernel-builder uploads these only: the other scripts import devtools/, which is not published
    files += [(f.relative_to(root).as_posix(), f) for f in sorted((root / "benchmarks").glob("benchmark*.py"))]
    return {branch: files, "main": [("README.md", render_card(root).encode())]}


def stale(uploads: dict, remote: dict[str, list[str]]) -> dict[str, list[str]]:
    """{branch: files on the Hub branch that this upload does not produce} (main keeps what else it has)."""
    return {branch: sorted(set(remote.get(branch, [])) - {dest for dest, _ in files} - {".gitattributes"})
            for branch, files in uploads.items() if branch != "main"}


def remote_files(api, repo_id: str, branches) -> dict[str, list[str]]:
    """The files on each existing branch of the repo (none for a new repo or branch)."""
    from huggingface_hub.utils import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    out = {}
    for branch in branches:
        try:
            out[branch] = api.list_repo_files(repo_id, repo_type="kernel", revision=branch)
        except (RepositoryNotFoundError, RevisionNotFoundError, HfHubHTTPError):
            out[branch] = []
    return out


def upload(uploads: dict[str, list[tuple[str, Path]]], repo_id: str, api=None) -> None:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = api or HfApi()
    api.create_repo(repo_id, repo_type="kernel", exist_ok=True)
    deletions = stale(uploads, remote_files(api, repo_id, uploads))
    for branch, files in uploads.items():
        if branch != "main":
            api.create_branch(repo_id, branch=branch, repo_type="kernel", exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=dest, path_or_fileobj=src if isinstance(src, bytes) else str(src))
               for dest, src in files]
        ops += [CommitOperationDelete(path_in_repo=path) for path in deletions.get(branch, [])]
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
        try:  # what the upload would delete, where the repo can be read (no token needed for a public one)
            from huggingface_hub import HfApi

            deletions = stale(uploads, remote_files(HfApi(), args.repo_id, uploads))
        except Exception as e:  # offline
            deletions = {}
            print(f"publish: the Hub is not reachable ({type(e).__name__}): deletions not listed")
        for branch, paths in deletions.items():
            for path in paths:
                print(f"{args.repo_id}@{branch}: delete {path}")
        print(f"publish: dry run, {sum(len(f) for f in uploads.values())} files, nothing uploaded")
        return
    upload(uploads, args.repo_id)


if __name__ == "__main__":
    sys.exit(main())
