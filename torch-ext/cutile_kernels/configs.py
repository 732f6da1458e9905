"""The KernelConfig mapping this package recommends per model family (the README's table is generated from it).

    from transformers import KernelConfig
    config = KernelConfig(recommended_mapping("qwen3", "cutile-community/cutile-kernels"), inherit_mapping=False)
"""
from __future__ import annotations

# model_type (config.model_type) -> family; Gemma3ForCausalLM's text config is "gemma3_text"
FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3",
            "gemma3_text": "gemma3"}
_MLP_CLASS = {"llama": "LlamaMLP", "mistral": "MistralMLP", "qwen2": "Qwen2MLP", "qwen3": "Qwen3MLP"}
_ATTENTION_CLASS = {"llama": "LlamaAttention", "mistral": "MistralAttention", "qwen2": "Qwen2Attention",
                    "qwen3": "Qwen3Attention", "gemma3": "Gemma3Attention"}
MLP_CHOICES = ("fused", "merged", None)


def family_of(model_or_family) -> str:
    """'llama' | 'mistral' | 'qwen2' | 'qwen3' | 'gemma3' from a family name, a model or a config."""
    if isinstance(model_or_family, str):
        name = model_or_family.lower()
    else:
        config = getattr(model_or_family, "config", model_or_family)
        name = getattr(config, "model_type", None)
        if name is None:
            raise TypeError(f"cutile_kernels: expected a family name, a model or a config, got "
                            f"{type(model_or_family).__name__}")
    if name not in FAMILIES:
        raise ValueError(f"cutile_kernels: no recommended kernels for {name!r} (supported: "
                         f"{', '.join(sorted(set(FAMILIES.values())))})")
    return FAMILIES[name]


def fused_key(norm: str) -> tuple:
    """The n-to-1 KernelConfig key fusing `model.layers.*.<norm>` with the MLP after it."""
    return (("RMSNorm", f"model.layers.*.{norm}"), ("MLP", "model.layers.*.mlp"))


def recommended_mapping(model_or_family, repo: str, *, norm: bool = True, mlp: str | None = "fused",
                        rope: bool = True, decoder: bool = False, qkv: bool = False,
                        trust_remote_code: bool = False, version: int = 1) -> dict:
    """The KernelConfig mapping for `model_or_family` with kernels from `repo`.

    norm: every RMSNorm of the decoder (Llama form, or Gemma3's through its Layout).
    mlp: "fused" (the norm before the MLP and the MLP as one layer), "merged" (the MLP alone with one
        gate_up GEMM; not for Gemma3, whose MLP is only offered fused) or None.
    rope: transformers' rotary_pos_emb function.
    decoder: the decoder layer whose residual add and the norm after it are one add_rms_norm (DecoderLayer,
        GemmaDecoderLayer). Off by default: on an H100 it saves 3-5 % of an eager decode step and is level under
        torch.compile (README, decoder layer). The fused key patches the
        same decoder layer class, so with decoder=True, mlp="fused" means the decoder's fused norm followed by
        the merged MLP (Gemma3: its own MLP, there is no merged Gemma3 MLP).
    qkv: the attention with q_proj, k_proj and v_proj as one GEMM (QKVAttention; Qwen3/Gemma3 also run q_norm,
        k_norm and RoPE as one qk_norm_rope). Off by default: with decoder=True it is the fastest decode layer on an
        H100 for Llama, Qwen3 and Gemma3, but Qwen3's compiled generate was slower with it and prefill is not
        measured yet (README, q/k/v attention key). It composes with
        decoder=True (the decoder layer calls the attention module, which runs QKVAttention's forward); tensor
        parallelism refuses it.
    trust_remote_code: values as ("<repo>:<Layer>", {"version": version, "trust_remote_code": True}), the form
        transformers needs for a repo that is not a trusted publisher (plain strings otherwise).
    """
    family = family_of(model_or_family)
    if mlp not in MLP_CHOICES:
        raise ValueError(f"cutile_kernels: mlp={mlp!r}; choose one of {MLP_CHOICES}")
    gemma = family == "gemma3"
    mapping: dict = {}
    if norm:
        mapping.update({"^Gemma3RMSNorm$": f"{repo}:GemmaRMSNorm"} if gemma else {"RMSNorm": f"{repo}:RMSNorm"})
    if decoder:
        layer = "Gemma3DecoderLayer" if gemma else f"{_MLP_CLASS[family].removesuffix('MLP')}DecoderLayer"
        mapping[f"^{layer}$"] = f"{repo}:{'GemmaDecoderLayer' if gemma else 'DecoderLayer'}"
        if mlp == "fused":  # add_rms_norm is the norm before the MLP; the fusion key would shadow the decoder's
            mlp = None if gemma else "merged"
    if mlp == "fused":
        key = fused_key("pre_feedforward_layernorm" if gemma else "post_attention_layernorm")
        mapping[key] = f"{repo}:{'GemmaRMSNormMLP' if gemma else 'RMSNormMLP'}"
    elif mlp == "merged":
        if gemma:
            raise ValueError("cutile_kernels: Gemma3's MLP is offered fused with its norm only (mlp='fused')")
        mapping[f"^{_MLP_CLASS[family]}$"] = f"{repo}:SwiGLUMLP"
    if qkv:
        mapping[f"^{_ATTENTION_CLASS[family]}$"] = f"{repo}:QKVAttention"
    if rope:
        mapping["rotary_pos_emb"] = f"{repo}:ApplyRotaryPosEmb"
    if trust_remote_code:
        meta = {"version": version, "trust_remote_code": True}
        mapping = {key: (value, dict(meta)) for key, value in mapping.items()}
    return mapping
