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
    for needed in ("nix build", "cosign sign-blob", "devtools.publish --dry-run", "./dev build"):
        assert needed in runs


@pytest.mark.parametrize("workflow", [w.name for w in WORKFLOWS])
def test_workflow_commands_exist(workflow):
    spec = yaml.safe_load((ROOT / ".github/workflows" / workflow).read_text())
    runs = "\n".join(s.get("run", "") for job in spec["jobs"].values() for s in job["steps"])
    for script in re.findall(r"(?:bash |\./)([\w./-]+)", runs):
        assert (ROOT / script).exists(), script
    for module in re.findall(r"-m (devtools\.\w+)", runs):
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), module


def test_dry_run_lists_exactly_the_files(kernel_repo, capsys, tmp_path):
    build = kernel_repo / "build"
    (build / "torch-cpu" / "__pycache__").mkdir(exist_ok=True)
    (build / "torch-cpu" / "__pycache__" / "x.pyc").write_bytes(b"")  # never uploaded
    publish.main(["--dry-run", "--build", str(build), "--repo-id", "org/name"])
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("org/name@")]
    expected = {f"org/name@v1: build/{v}/{f.relative_to(build / v).as_posix()}" for v in variant_names()
                for f in (build / v).rglob("*") if f.is_file() and "__pycache__" not in f.parts}
    expected |= {f"org/name@v1: {f.relative_to(ROOT).as_posix()}" for f in (ROOT / "benchmarks").rglob("*")
                 if f.is_file() and "__pycache__" not in f.parts}
    expected.add("org/name@main: README.md")
    assert sorted(listed) == sorted(expected)
    assert any(line.endswith("metadata.json") for line in listed)


def test_dry_run_refuses_an_empty_build(tmp_path):
    with pytest.raises(SystemExit, match="no variant"):
        publish.main(["--dry-run", "--build", str(tmp_path)])
