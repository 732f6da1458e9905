"""Decoder layers with the residual add fused into the norm after it (issue 12): `DecoderLayer` (Llama, Mistral,
Qwen2, Qwen3) and `GemmaDecoderLayer` (Gemma3), each a kernel (forward only, what kernelize swaps in) beside its
Layout (what transformers builds in place of `<Family>DecoderLayer`).

The Layout builds the same children as transformers' decoder layer, from the family's modeling module, so every
child and checkpoint key stays as transformers has it (no conversion rule) and the other kernels of the same
KernelConfig still reach the children: RMSNorm, GemmaRMSNorm, the merged MLP (SwiGLUMLP), rotary_pos_emb. Its own
forward is transformers' (training, fallbacks); the kernel forward replaces

    hidden = residual + attn_out;  normed = post_attention_layernorm(hidden)      (Llama form)
    hidden = residual + post_attention_layernorm(attn_out);  normed = pre_feedforward_layernorm(hidden)  (Gemma3)

by one `add_rms_norm` (reads both inputs once, writes the sum and the normalized rows); Gemma3's whole sandwich
(post-attention norm, add, pre-feedforward norm) is one `sandwich_rms_norm`: the post-attention norm's output never
goes to memory, and its post-feedforward norm and last residual add are one `rms_norm_add`. The Llama form's MLP
residual add stays a torch add (it feeds the next layer's input norm), or,
with `RESIDUAL_IN_DOWN_PROJ` set (Llama form, a measurement switch), goes into the down_proj GEMM.

The layer also runs its attention's forward itself (`attention.run_attention`, the same code), so that a
DynamicCache grows in place (`attention.append_kv`), and in Qwen3 and Gemma3 with q_norm, k_norm and RoPE in one
`qk_norm_rope` launch instead of three; unless hooks on the attention module (output recorders, tensor
parallelism) need its own call, or (Qwen3, Gemma3) qk_norm_rope does not take its head_dim.

The fused norm+MLP keys (RMSNormMLP, GemmaRMSNormMLP) cannot join: transformers makes a `Fused<Family>DecoderLayer`
under the decoder layer's exact class name, which wins over this regex key, so the fused Layout refuses the pair
(checks.py). With a decoder layer, the merged MLP gives the same launches: add_rms_norm is the norm before it.
"""
from __future__ import annotations

import functools
import importlib

import torch
from torch import nn

from .attention import family_qk, qk_norm_rope_eps, run_attention, separate_projections, stands_in
from .checks import DECODER_FAMILIES, Layout, check_replacement
from .gated_act import gated_act
from .rms_norm import add_rms_norm, rms_norm_add, sandwich_rms_norm
from .rope import qk_norm_rope

try:  # the decoder layers' base: gradient checkpointing in __call__ (kernels alone loads this without transformers)
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:
    GradientCheckpointingLayer = nn.Module


def _modeling_module(site, config):
    """(the family's modeling module, its class-name prefix): from the class the Layout replaces, or (built by
    hand) from the config."""
    if site is not None and site.replaced:
        prefix = site.replaced[0].removesuffix("DecoderLayer")
    else:
        prefix = DECODER_FAMILIES.get(getattr(config, "model_type", None))
    family = prefix.lower()
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}"), prefix


# Measurement switch (issue 12): the MLP's residual add folded into the down_proj GEMM (torch.addmm with the
# residual, beta=1: one elementwise launch fewer per layer, and the sum rounded once instead of twice, so not bit
# for bit transformers'). Off until the profile says it is faster: `kernel.decoder.RESIDUAL_IN_DOWN_PROJ = True`.
RESIDUAL_IN_DOWN_PROJ = False


def _residual_plus_mlp(mlp: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + mlp(x); with RESIDUAL_IN_DOWN_PROJ the add happens inside the down_proj GEMM (a merged SwiGLUMLP
    or transformers' gate/up/down MLP without bias; any other MLP keeps the add)."""
    down = getattr(mlp, "down_proj", None)
    if not RESIDUAL_IN_DOWN_PROJ or not isinstance(down, nn.Linear) or down.bias is not None:
        return residual + mlp(x)
    if isinstance(getattr(mlp, "gate_up_proj", None), nn.Linear):  # SwiGLUMLPLayout
        h = gated_act(mlp.gate_up_proj(x), mlp.hidden_act)
    elif isinstance(getattr(mlp, "gate_proj", None), nn.Linear) and hasattr(mlp, "act_fn"):  # <Family>MLP
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    else:
        return residual + mlp(x)
    n = residual.shape[-1]
    return torch.addmm(residual.reshape(-1, n), h.reshape(-1, h.shape[-1]), down.weight.t()).view(residual.shape)


# The attention classes whose forward the layer runs itself (attention.run_attention reproduces transformers 5.22.2's
# five), so that the cache update is append_kv's: Llama form with the family's apply_rotary_pos_emb (the package's
# RoPE where the KernelConfig maps rotary_pos_emb), and Qwen3/Gemma3 with q_norm, k_norm and RoPE as one op.
ROTARY_ATTENTION = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention"})
QK_NORM_ATTENTION = {"Qwen3Attention": False, "Gemma3Attention": True}  # class name -> Gemma-form norms


def _fused_norm_form(attn: nn.Module, hidden_states, position_embeddings) -> tuple[float, bool] | None:
    """(eps, Gemma form) when the layer may run attn's forward itself with qk_norm_rope: a Qwen3/Gemma3 attention
    of a head_dim the kernel takes, with one eps for both norms, and no hooks that calling it would run (output
    recorders, TP, accelerate's device placement and offload); else None, and the module runs (its norms and RoPE:
    their own kernels or transformers')."""
    gemma = QK_NORM_ATTENTION.get(type(attn).__name__)
    if gemma is None or position_embeddings is None:
        return None
    if not stands_in(hidden_states, attn):
        return None
    eps = qk_norm_rope_eps(attn, hidden_states)
    return None if eps is None else (eps, gemma)


def _rotation(attn: nn.Module, hidden_states, position_embeddings):
    """How the layer rotates q and k when it runs attn's forward itself (`run_attention`), or None: attn is called
    (a hook on it, another class, a head_dim qk_norm_rope does not take)."""
    if type(attn).__name__ in ROTARY_ATTENTION:
        return family_qk if position_embeddings is not None and stands_in(hidden_states, attn) else None
    form = _fused_norm_form(attn, hidden_states, position_embeddings)
    return None if form is None else functools.partial(_qk_norm_rope, eps=form[0], gemma=form[1])


def _qk_norm_rope(attn, query, key, cos, sin, eps: float, gemma: bool):
    return qk_norm_rope(query, key, attn.q_norm.weight, attn.k_norm.weight, cos, sin, eps, gemma)


def _self_attention(layer: nn.Module, hidden_states, position_embeddings, attention_mask, position_ids,
                    past_key_values, **kwargs):
    """The decoder layer's `self_attn(...)` output: the attention forward run here (`_rotation`), else the module."""
    attn = layer.self_attn
    rotate = _rotation(attn, hidden_states, position_embeddings)
    if rotate is not None:
        # position_ids goes on to the attention function, as the module's call passes it (flash attention reads it)
        return run_attention(attn, hidden_states, position_embeddings, attention_mask, past_key_values,
                             separate_projections, rotate, position_ids=position_ids, **kwargs)[0]
    return attn(hidden_states=hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                position_ids=position_ids, past_key_values=past_key_values, **kwargs)[0]


class _DecoderLayerKernel(nn.Module):
    has_backward = True  # add_rms_norm's custom op has a registered backward; the rest is torch or other kernels
    can_torch_compile = True  # one custom op more, no graph break


# --- DecoderLayer: Llama, Mistral, Qwen2, Qwen3 ----------------------------------------------------------------

class DecoderLayer(_DecoderLayerKernel):
    """`<Family>DecoderLayer.forward` with `residual + attn_out` and post_attention_layernorm in one add_rms_norm."""

    input_layernorm: nn.Module
    self_attn: nn.Module
    post_attention_layernorm: nn.Module
    mlp: nn.Module

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        norm = self.post_attention_layernorm
        if not stands_in(hidden_states, norm):  # hooks on the norm, accelerate's offload or a device split: the
            return type(self).forward(self, hidden_states, attention_mask, position_ids, past_key_values, use_cache,
                                      position_embeddings, **kwargs)  # Layout's forward (transformers')
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = _self_attention(self, hidden_states, position_embeddings, attention_mask, position_ids,
                                        past_key_values, use_cache=use_cache, **kwargs)
        hidden_states, residual = add_rms_norm(hidden_states, residual, norm.weight, norm.variance_epsilon)
        return _residual_plus_mlp(self.mlp, hidden_states, residual)


class DecoderLayerLayout(Layout, GradientCheckpointingLayer):
    """LlamaDecoderLayer (MistralDecoderLayer, Qwen2DecoderLayer, Qwen3DecoderLayer) as transformers builds it:
    the same children from the same (possibly patched) classes of the family's modeling module."""

    def __init__(self, config, layer_idx: int):
        site = check_replacement(type(self), config, layer_idx)  # a Llama-form decoder layer only
        super().__init__()
        modeling, prefix = _modeling_module(site, config)
        self.hidden_size = config.hidden_size
        self.self_attn = getattr(modeling, f"{prefix}Attention")(config=config, layer_idx=layer_idx)
        self.mlp = getattr(modeling, f"{prefix}MLP")(config)
        norm = getattr(modeling, f"{prefix}RMSNorm")
        self.input_layernorm = norm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = norm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        """transformers 5.22.2's LlamaDecoderLayer.forward (the same in Mistral, Qwen2, Qwen3)."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


# --- GemmaDecoderLayer: Gemma3 (sandwich norms) ------------------------------------------------------------------

class GemmaDecoderLayer(_DecoderLayerKernel):
    """Gemma3DecoderLayer.forward with post_attention_layernorm(attn_out), the residual add and
    pre_feedforward_layernorm in one sandwich_rms_norm, and post_feedforward_layernorm(mlp_out) + residual in one
    rms_norm_add."""

    input_layernorm: nn.Module
    self_attn: nn.Module
    post_attention_layernorm: nn.Module
    pre_feedforward_layernorm: nn.Module
    mlp: nn.Module
    post_feedforward_layernorm: nn.Module

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None,
                past_key_values=None, **kwargs):
        post, pre = self.post_attention_layernorm, self.pre_feedforward_layernorm
        if not stands_in(hidden_states, post, pre, self.post_feedforward_layernorm):
            return type(self).forward(self, hidden_states, position_embeddings, attention_mask, position_ids,
                                      past_key_values, **kwargs)  # hooks on a norm, accelerate's offload or split
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = _self_attention(self, hidden_states, position_embeddings, attention_mask, position_ids,
                                        past_key_values, **kwargs)
        if post.eps == pre.eps:
            hidden_states, residual = sandwich_rms_norm(hidden_states, residual, post.weight, pre.weight, pre.eps)
        else:  # one kernel takes one eps (Gemma3's config gives both norms rms_norm_eps)
            hidden_states, residual = add_rms_norm(post(hidden_states), residual, pre.weight, pre.eps, True)
        norm = self.post_feedforward_layernorm
        return rms_norm_add(self.mlp(hidden_states), residual, norm.weight, norm.eps, True)


class GemmaDecoderLayerLayout(Layout, GradientCheckpointingLayer):
    """Gemma3DecoderLayer as transformers builds it (four Gemma3RMSNorm, or GemmaRMSNormLayout when keyed)."""

    def __init__(self, config, layer_idx: int):
        site = check_replacement(type(self), config, layer_idx)  # Gemma3DecoderLayer only
        super().__init__()
        modeling, prefix = _modeling_module(site, config)
        self.config = config
        self.hidden_size = config.hidden_size
        self.layer_idx = layer_idx
        self.self_attn = getattr(modeling, f"{prefix}Attention")(config=config, layer_idx=layer_idx)
        self.mlp = getattr(modeling, f"{prefix}MLP")(config)
        norm = getattr(modeling, f"{prefix}RMSNorm")
        self.input_layernorm = norm(self.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = norm(self.hidden_size, eps=config.rms_norm_eps)
        self.pre_feedforward_layernorm = norm(self.hidden_size, eps=config.rms_norm_eps)
        self.post_feedforward_layernorm = norm(self.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None,
                past_key_values=None, **kwargs):
        """transformers 5.22.2's Gemma3DecoderLayer.forward."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, **kwargs)
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.pre_feedforward_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.post_feedforward_layernorm(hidden_states)
        return residual + hidden_states
