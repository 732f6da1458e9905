"""The main job: build a small local checkpoint, load it plain and with the cuTile RMSNorm kernel, compare.

    python -m devtools.demo [--family llama|mistral|qwen2|qwen3] [--device auto|cuda|cpu]

On a GPU the kernel loads the way a user loads it from the Hub:
    from_pretrained(path, use_kernels=True, kernel_config=KernelConfig({"RMSNorm": "<repo-id>:RMSNorm"}))
with the repo id served from this checkout's build/ (LOCAL_KERNELS). transformers refuses "cpu" in a
KernelConfig, so on CPU the demo uses kernels' own route, kernelize(model, device="cpu"), which picks the
torch-cpu variant (the exact PyTorch reference).
"""
from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import torch

from .build import ROOT
from .checkpoints import FAMILIES, make_checkpoint
from .local_hub import local_hub
from .timing import median_ms

# A GPU-sized checkpoint: 8B-model widths, two layers (random weights, about 0.8 GB in bf16).
GPU_SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128)


def load_with_kernel(path: Path, repo_id: str, device: str, dtype):
    from kernels import LayerRepository, Mode, kernelize, use_kernel_mapping
    from transformers import AutoModelForCausalLM, KernelConfig

    if device == "cuda":
        config = KernelConfig({"RMSNorm": f"{repo_id}:RMSNorm"}, inherit_mapping=False)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cuda", use_kernels=True,
                                                    kernel_config=config), "from_pretrained + KernelConfig"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    mapping = {"RMSNorm": {"cpu": LayerRepository(repo_id, layer_name="RMSNorm", version=1)}}
    with use_kernel_mapping(mapping, inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE, device="cpu")
    return model, 'kernelize(device="cpu") (transformers refuses "cpu" in KernelConfig)'


def main() -> None:
    parser = argparse.ArgumentParser(description="cuTile RMSNorm through the Kernel Hub: parity and timing")
    parser.add_argument("--family", choices=FAMILIES, default="llama")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "checkpoints")
    args = parser.parse_args()
    # kernels logs every registered layer without a mapping (rotary_pos_emb, SiLU): expected here, not news
    logging.getLogger("kernels").setLevel(logging.ERROR)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = GPU_SHAPE if device == "cuda" else {}
    from transformers import AutoModelForCausalLM

    path = make_checkpoint(args.family, args.cache / f"{args.family}-{device}", **shape)
    print(f"[1/4] checkpoint: {path} ({args.family}, random weights, {device}, {dtype})")
    placement = {"device_map": "cuda"} if device == "cuda" else {}  # device_map needs accelerate
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement)
    with local_hub(ROOT) as repo_id, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, route = load_with_kernel(path, repo_id, device, dtype)
        print(f"[2/4] loaded {repo_id}:RMSNorm through {route}")
        ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
        with torch.no_grad():
            diff = (model(ids).logits.float() - plain(ids).logits.float()).abs().max().item()
            gen = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
            same = torch.equal(model.generate(ids[:, :32], **gen), plain.generate(ids[:, :32], **gen))
        print(f"[3/4] parity: max |logits - plain| = {diff:.3e}; greedy 16 tokens identical: {same}")
        with torch.no_grad():
            t_plain = median_ms(lambda: plain(ids), device=device)
            t_kernel = median_ms(lambda: model(ids), device=device)
    paths = sorted({str(w.message) for w in caught if "running the PyTorch reference" in str(w.message)})
    kind = "cuTile" if device == "cuda" and not paths else "reference path"
    print(f"[4/4] timing (forward of 256 tokens, median): plain {t_plain:.2f} ms, with kernel ({kind}) "
          f"{t_kernel:.2f} ms")
    for p in paths:
        print(f"      note: {p}")


if __name__ == "__main__":
    main()
