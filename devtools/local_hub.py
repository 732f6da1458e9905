"""Make the Hub repo id of this kernel resolve to a local `build/`, offline.

kernels' own override `LOCAL_KERNELS=<repo-id>=<path>` serves the files. A plain `"<repo-id>:Layer"` in a
KernelConfig means version 1, which kernels first resolves to a `v1` ref: offline, it reads that ref from the
Hub cache, so a cache with `refs/v1` is provided too (what a real download would have left behind).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .build import ROOT, build_config

REPO_ID = build_config()["general"]["hub"]["repo-id"]
VERSION = build_config()["general"]["version"]


@contextlib.contextmanager
def local_hub(repo_root: Path = ROOT):
    """Within the block, `REPO_ID` (any version or revision) loads from `repo_root/build`."""
    from huggingface_hub import constants

    saved = {k: os.environ.get(k) for k in ("LOCAL_KERNELS", "HF_HUB_OFFLINE", "KERNELS_CACHE")}
    saved_offline = constants.HF_HUB_OFFLINE
    with tempfile.TemporaryDirectory(prefix="kernels-cache-") as cache:
        refs = Path(cache) / f"kernels--{REPO_ID.replace('/', '--')}" / "refs"
        refs.mkdir(parents=True)
        (refs / f"v{VERSION}").write_text("local\n")
        os.environ.update(LOCAL_KERNELS=f"{REPO_ID}={repo_root}", HF_HUB_OFFLINE="1", KERNELS_CACHE=cache)
        constants.HF_HUB_OFFLINE = True  # read once at import by huggingface_hub; kernels reads the constant
        try:
            yield REPO_ID
        finally:
            constants.HF_HUB_OFFLINE = saved_offline
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
