"""The publishing workflow parses and calls commands that exist; the upload's dry run lists exactly the files."""
import re

import pytest
import yaml

from devtools import publish
from devtools.build import ROOT, variant_names

WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yaml"))


def test_workflows_parse_and_publish_has_the_steps():
    assert {w.name for w in WORKFLOWS} >= {"tests.yaml", "publish.yaml"}
    for w in WORKFLOWS:
        spec = yaml.safe_load(w.read_text())
        assert spec["jobs"], w
    steps = yaml.safe_load((ROOT / ".github/workflows/publish.yaml").read_text())["jobs"]["publish"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    for needed in ("cosign sign-blob", "devtools.publish --dry-run", "./dev build"):
        assert needed in runs
    # what is published is what the tests job built and tested: no second (kernel-builder) noarch build in place
    # of ours, and cosign 3 (installer v4), whose bundles kernels verifies
    assert "nix build" not in runs and "build/torch-cuda" not in runs
    assert any(s.get("uses", "").startswith("sigstore/cosign-installer@v4") for s in steps)
    # cubins only when asked for (until the GPU checks of the precompiled path pass), built before signing
    spec = yaml.safe_load((ROOT / ".github/workflows/publish.yaml").read_text())
    assert spec[True]["workflow_dispatch"]["inputs"]["cubins"]["default"] is False  # yaml reads `on:` as True
    names = [s.get("name", "") for s in steps]
    cubins = steps[names.index("Precompiled cubins")]
    assert "devtools.build --archs all" in cubins["run"] and "inputs.cubins" in cubins["if"]
    assert names.index("Precompiled cubins") < names.index("Sign each metadata.json")


@pytest.mark.parametrize("workflow", [w.name for w in WORKFLOWS])
def test_workflow_commands_exist(workflow):
    spec = yaml.safe_load((ROOT / ".github/workflows" / workflow).read_text())
    runs = "\n".join(s.get("run", "") for job in spec["jobs"].values() for s in job["steps"])
    for script in re.findall(r"(?:bash |\./)([\w./-]+)", runs):
        assert (ROOT / script).exists(), script
    for module in re.findall(r"-m (devtools\.\w+)", runs):
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), module


def test_dry_run_lists_exactly_the_files(kernel_repo, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build = kernel_repo / "build"
    (build / "torch-cpu" / "__pycache__").mkdir(exist_ok=True)
    (build / "torch-cpu" / "__pycache__" / "x.pyc").write_bytes(b"")  # never uploaded
    publish.main(["--dry-run", "--build", str(build), "--repo-id", "org/name"])
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("org/name@")]
    expected = {f"org/name@v1: build/{v}/{f.relative_to(build / v).as_posix()}" for v in variant_names()
                for f in (build / v).rglob("*") if f.is_file() and "__pycache__" not in f.parts}
    # benchmarks: only benchmark*.py, as kernel-builder uploads (the others import devtools/, not published)
    expected |= {f"org/name@v1: {f.relative_to(ROOT).as_posix()}" for f in (ROOT / "benchmarks").glob("benchmark*.py")}
    expected.add("org/name@main: README.md")
    assert sorted(listed) == sorted(expected)
    assert any(line.endswith("metadata.json") for line in listed)


def test_dry_run_refuses_an_empty_build(tmp_path):
    with pytest.raises(SystemExit, match="no variant"):
        publish.main(["--dry-run", "--build", str(tmp_path)])


def test_card_is_rendered():
    """The Hub page gets CARD.md rendered (kernel-builder's fill-card): no template syntax left, the repo id and
    version filled in, and every layer listed."""
    card = publish.render_card()
    assert "{{" not in card and "{%" not in card
    assert 'repo = "cutile-community/cutile-kernels"' in card and '"version": 1' in card
    for layer in ("RMSNorm", "GemmaRMSNorm", "SwiGLUMLP", "RMSNormMLP", "GemmaRMSNormMLP", "ApplyRotaryPosEmb"):
        assert f"- `{layer}`" in card


class FakeHub:
    """What upload() asks of huggingface_hub's HfApi, recording the commits."""

    def __init__(self, remote):
        self.remote, self.commits = remote, []

    def create_repo(self, *a, **k):
        pass

    def create_branch(self, *a, **k):
        pass

    def list_repo_files(self, repo_id, repo_type, revision):
        return self.remote.get(revision, [])

    def create_commit(self, repo_id, operations, repo_type, revision, commit_message):
        self.commits.append((revision, operations))


def test_upload_deletes_what_the_build_no_longer_produces(kernel_repo):
    """A variant (or file) on the Hub branch that this build does not produce is deleted in the same commit;
    main keeps its other files."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    uploads = publish.plan(kernel_repo / "build")
    gone = ["build/torch210-cxx11-cu128-x86_64-linux/__init__.py", "benchmarks/run_all.py"]
    kept = uploads["v1"][0][0]
    hub = FakeHub({"v1": [kept, ".gitattributes", *gone], "main": ["README.md", "other.md"]})
    publish.upload(uploads, "org/name", api=hub)
    ops = {}  # a branch's operations over its commits (a build with cubins takes several)
    for revision, commit in hub.commits:
        ops.setdefault(revision, []).extend(commit)
    assert sorted(o.path_in_repo for o in ops["v1"] if isinstance(o, CommitOperationDelete)) == sorted(gone)
    assert {o.path_in_repo for o in ops["v1"] if isinstance(o, CommitOperationAdd)} == {d for d, _ in uploads["v1"]}
    assert not [o for o in ops["main"] if isinstance(o, CommitOperationDelete)]
