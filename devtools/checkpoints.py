"""Tiny random checkpoints of the target families, built and saved locally (no Hub access exists here)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # Llama-form RMSNorm, SwiGLU MLP
ALL_FAMILIES = (*FAMILIES, "gemma3")  # gemma3: Gemma3ForCausalLM (model_type gemma3_text)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def config_for(family: str, **overrides):
    from transformers import AutoConfig

    kwargs = {**TINY, **overrides}
    if family in ("qwen3", "gemma3"):
        kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    if family == "gemma3":
        return AutoConfig.for_model("gemma3_text", **kwargs)
    return AutoConfig.for_model(family, **kwargs)


def randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm weights start at one; random ones make a wrong weight use visible in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))


def make_checkpoint(family: str, dest: Path, *, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Save a random `<family>ForCausalLM` under `dest` (reused when its config is unchanged)."""
    from transformers import AutoModelForCausalLM

    config = config_for(family, **overrides)
    stamp = json.dumps({"config": config.to_diff_dict(), "seed": seed, "dtype": str(dtype)}, sort_keys=True)
    if (dest / "model.safetensors").exists() and (dest / "stamp.json").exists() \
            and (dest / "stamp.json").read_text() == stamp:
        return dest
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    randomize_norms(model, generator)
    model.save_pretrained(dest)
    (dest / "stamp.json").write_text(stamp)
    return dest
