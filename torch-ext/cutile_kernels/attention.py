"""Attention with q, k and v from one GEMM: `QKVAttention` (kernel, forward only) and `QKVAttentionLayout` (what
transformers builds in place of LlamaAttention, MistralAttention, Qwen2Attention, Qwen3Attention, Gemma3Attention).

In a decode step k_proj and v_proj are narrow GEMMs (8B: 4096 -> 1024) that cuBLAS runs split-K with a reduce launch
each; one `qkv_proj` (hidden -> (q_heads + 2 kv_heads) * head_dim) reads the hidden states once and launches once.
q, k and v are views of its output. Everything after the projection is the family's attention forward (transformers
5.22.2): its norms, RoPE, cache update and attention function. The kernel forward runs Qwen3's and Gemma3's q_norm,
k_norm and RoPE as one `qk_norm_rope` (head dims the kernel takes), else the modules' norms and the package's RoPE.

The Layout keeps `o_proj` and, for Qwen3/Gemma3, `q_norm`/`k_norm` from the family's own classes, so their keys stay
and the other keys of the same KernelConfig still reach them (RMSNorm, GemmaRMSNorm). Its conversion rules
concatenate q_proj, k_proj, v_proj at load; save_pretrained splits qkv_proj back by the model's head counts
(`SplitQKV`). Tensor parallelism is refused: the families' plans shard q/k/v colwise, and transformers' packed style
splits a merged weight into equal parts, which GQA's [q | k | v] is not.
"""
from __future__ import annotations

import functools
import importlib
import sys
from typing import NamedTuple

import torch
from torch import nn

from .checks import DECODER_FAMILIES, Layout, _patch_keys, check_replacement, refuse, refuse_quantized
from .parallel import sharded_load
from .rope import apply_rotary_pos_emb, head_dim_supported, qk_norm_rope


class _Family(NamedTuple):
    """What differs between the five attention modules (transformers 5.22.2)."""

    module: str  # the modeling module (its apply_rotary_pos_emb, eager_attention_forward, RMSNorm)
    qkv_bias: bool | str  # a fixed bias flag of q/k/v_proj, or the config attribute holding it
    o_bias: bool | str
    norm: str | None  # the class of q_norm / k_norm (Qwen3, Gemma3), None without them
    window: str | None  # "config": config.sliding_window on every layer (Mistral); "layer": by config.layer_types;
    # None: no sliding_window argument (Llama)


def _family(name: str, **kw) -> _Family:
    return _Family(f"transformers.models.{name}.modeling_{name}", **kw)


FAMILIES = {
    "LlamaAttention": _family("llama", qkv_bias="attention_bias", o_bias="attention_bias", norm=None, window=None),
    "MistralAttention": _family("mistral", qkv_bias=False, o_bias=False, norm=None, window="config"),
    "Qwen2Attention": _family("qwen2", qkv_bias=True, o_bias=False, norm=None, window="layer"),
    "Qwen3Attention": _family("qwen3", qkv_bias="attention_bias", o_bias="attention_bias", norm="Qwen3RMSNorm",
                              window="layer"),
    "Gemma3Attention": _family("gemma3", qkv_bias="attention_bias", o_bias="attention_bias", norm="Gemma3RMSNorm",
                               window="layer"),
}
GEMMA_NORMS = {"Gemma3Attention"}  # x̂·(1+w) q/k norms


def merged_qkv_rules() -> list:
    """Checkpoint -> Layout: `self_attn.{q,k,v}_proj.{weight,bias}` concatenated into `self_attn.qkv_proj`; o_proj
    and the norms keep their keys. transformers reverses them on save_pretrained (SplitQKV).

    Scope: every `self_attn.q_proj` of the checkpoint; in the five families' *ForCausalLM that is the decoder's
    attention only (a multimodal checkpoint's vision tower would match too: the key is for the text models)."""
    try:
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # kernels also loads this package without transformers: then no Layout is used
        return []
    return [WeightConverter([f"self_attn.{x}_proj.{p}" for x in "qkv"], f"self_attn.qkv_proj.{p}",
                            operations=[ConcatenateQKV()]) for p in ("weight", "bias")]


def qkv_sizes(config, total: int) -> list[int]:
    """The q, k and v rows of a qkv_proj weight or bias with `total` rows, from the model's head counts."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim, rest = divmod(total, heads + 2 * kv_heads)
    if rest:
        raise ValueError(f"cutile_kernels: a qkv_proj of {total} rows is not (num_attention_heads {heads} + "
                         f"2 * num_key_value_heads {kv_heads}) heads of one size")
    return [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]


try:  # kernels also loads this package without transformers
    from transformers.core_model_loading import Concatenate, ConversionOps
except ImportError:
    Concatenate = None

if Concatenate is not None:
    class ConcatenateQKV(Concatenate):
        """[q_proj | k_proj | v_proj] along dim 0. Concatenate's own reverse is an equal Chunk, wrong under GQA
        (q has more heads than k and v): this one reverses to SplitQKV."""

        def __init__(self):
            super().__init__(dim=0)

        def convert(self, input_dict, source_patterns, target_patterns, full_layer_name=None, model=None,
                    **kwargs):
            if model is not None and full_layer_name:
                check_merged_into_layout(model, full_layer_name)
            return super().convert(input_dict, source_patterns, target_patterns, **kwargs)

        @property
        def reverse_op(self) -> ConversionOps:
            return SplitQKV()

    class SplitQKV(ConversionOps):
        """qkv_proj -> q_proj, k_proj, v_proj (save_pretrained), split by the sizes `qkv_sizes` reads from the
        config transformers passes (the model's own, `revert_weight_conversion`). Why the config and not sizes
        seen at load: the rules are class attributes shared by every model loaded in the process (transformers
        copies them per key), so a size remembered on load would be the last model's; the config is the saved
        model's, and the Layout built qkv_proj from the same head counts ((heads + 2 kv_heads) * head_dim rows),
        so the split is exact for any head_dim, weight or bias."""

        dim = 0

        @torch.no_grad
        def convert(self, input_dict, source_patterns, target_patterns, config=None, **kwargs):
            tensors = next(iter(input_dict.values()))
            tensor = tensors[0] if isinstance(tensors, list) else tensors
            parts = torch.split(tensor, qkv_sizes(config, tensor.shape[0]), dim=0)
            return {target: part.contiguous() for target, part in zip(target_patterns, parts)}

        @property
        def reverse_op(self) -> ConversionOps:
            return ConcatenateQKV()


def check_merged_into_layout(model: nn.Module, param_name: str) -> None:
    """Raises unless `param_name` (<attention>.qkv_proj.weight or .bias, what the rule built) belongs to a
    QKVAttentionLayout. The rule matches every `self_attn.q_proj` of a checkpoint; a multimodal checkpoint's vision
    tower (Gemma3's SigLIP) has those too, and its merged weight would load into nothing: transformers would only warn
    and leave the tower's projections random. Raised inside the conversion, transformers fails the load."""
    attention = param_name.rsplit(".", 2)[0]
    try:
        found = type(model.get_submodule(attention))
    except AttributeError:
        found = None
    if not getattr(found, "_cutile_kernels_layout", False):
        raise ValueError(f"cutile_kernels: the QKVAttention key merges q_proj, k_proj and v_proj of every "
                         f"self_attn in the checkpoint, and {attention} is "
                         f"{found.__name__ if found else 'not in the model'}, not a QKVAttentionLayout (a vision "
                         "tower of a multimodal checkpoint?): the key is for the text models; drop it here.")


def _family_name(layer: nn.Module) -> str:
    """The attention class `layer` is or stands for (a Layout's `attention_class`, read from its __dict__: nn.Module's
    __getattr__ raises, slowly, where an attribute is missing)."""
    return layer.__dict__.get("attention_class") or type(layer).__name__


def _modeling(layer: nn.Module):
    return sys.modules[FAMILIES[_family_name(layer)].module]


def family_qk(layer, query, key, cos, sin):
    """The family's own q_norm / k_norm (modules, where it has them) and apply_rotary_pos_emb, on (B, H, S, D)
    views."""
    if layer._modules.get("q_norm") is not None:
        query, key = layer.q_norm(query), layer.k_norm(key)
    return _modeling(layer).apply_rotary_pos_emb(query, key, cos, sin)


def norm_eps(norm: nn.Module):
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", None))


def _plain_forward(m: nn.Module) -> bool:
    """m's forward is its class's or one of this package's kernels (kernelize binds either on the instance), not a
    wrapper that must run: transformers' TP styles (replicated_with_grad_allreduce registers the weight's gradient
    all-reduce in its wrapper) and accelerate (`_hf_hook`) replace forward on the instance."""
    bound = m.__dict__.get("forward")
    if bound is None:
        return True
    func = getattr(bound, "__func__", None)
    return func is type(m).forward or getattr(func, "__module__", "").startswith(__package__ + ".")


def stands_in(x: torch.Tensor, *modules: nn.Module) -> bool:
    """Whether a kernel forward may do these child modules' work without calling them (reading their weights
    itself): no hook or forward wrapper that calling a module would run, so none is skipped (a user's forward or
    backward hooks, output recorders, TP, DeepSpeed ZeRO-3's parameter gathering, accelerate), and their weights
    on x's device and loaded (accelerate's device_map may place a child on a device of its own, or offload it:
    meta until its hook runs). Otherwise the modules are called (transformers' forward)."""
    g = nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks \
            or g._global_backward_pre_hooks:
        return False
    for m in modules:
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks \
                or not _plain_forward(m):
            return False
        w = m._parameters.get("weight")  # not getattr: nn.Module's __getattr__ costs a µs, raising where none
        if w is not None and (w.is_meta or w.device != x.device):
            return False
    return True


def qk_norm_rope_eps(attn: nn.Module, x: torch.Tensor) -> float | None:
    """The eps qk_norm_rope runs attn's q_norm and k_norm with on x (one for both, a head_dim the kernel takes, and
    the op may stand in for the norm modules: `stands_in`); None when it cannot, and the norm modules and RoPE
    run."""
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is None or k_norm is None or not head_dim_supported(getattr(attn, "head_dim", 0)):
        return None
    eps = norm_eps(q_norm)
    if eps is None or norm_eps(k_norm) != eps or not stands_in(x, q_norm, k_norm):
        return None
    return eps


# Room a cache buffer gets past its contents when append_kv (re)allocates it: an eighth of its length, at least
# KV_MIN_SPARE and at most KV_SPARE tokens. A buffer grows (one copy of the layer's cache) when the room is used up:
# every 16 to 256 decode steps, each copy amortized over as many; unused room is at most 12.5 % of the cache or 16
# tokens per layer, K and V each.
KV_SPARE = 256
KV_MIN_SPARE = 16
# Layers holding fewer tokens than this (with the new ones) keep torch.cat: its copy is small there (8B widths, 512
# tokens: 2 MB per layer, a few µs), while the buffers' bookkeeping costs a few µs of host time per layer and step
# (CPU: 12.8 against 9.3 µs), which an eager decode step of a short context, bound by the host, pays in full.
KV_MIN_LENGTH = 512


def append_kv(cache, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
    """`cache.update(key_states, value_states, layer_idx)`: the layer's keys and values so far followed by these,
    (B, H, S, D), stored in the cache as transformers 5.22.2 stores them.

    A plain DynamicCache layer appends with torch.cat, which copies the layer's whole cache at every decode step: on
    an H100 (8B widths, a 2048-token cache) 8 copies of 4 MB per 4-layer step, 121 of its 999 µs of GPU time, and
    they grow with the context. Here such a layer's keys and values are prefixes of buffers with room for more
    tokens (KV_SPARE): a step copies only its own tokens, and a buffer grows (one copy) when full. The layer's
    tensors are views with the values and shapes torch.cat gives (strided over the room), and a position once written
    is never written again, so every tensor the cache handed out keeps its values as after torch.cat; after a crop,
    a reorder (beam search), a reset or anything else that replaces them, the next step copies into new buffers.
    A sliding-window layer (Mistral's, Gemma3's local ones) grows the same way until it holds its window (less
    one token), from where its update keeps the window with torch.cat. Other caches and layers (static, quantized,
    offloaded, a subclass, a sliding layer recording its past for assisted decoding), layers of fewer than
    KV_MIN_LENGTH tokens, grad mode (training, or a forward outside no_grad) and torch.compile (whose graphs cannot
    hold this state) go through `cache.update`."""
    layer = _growable_layer(cache, layer_idx, key_states, value_states)
    if layer is None:
        return cache.update(key_states, value_states, layer_idx)
    k_buffer, v_buffer, length, keys, values = layer.__dict__.get("_cutile_kv") or _NO_BUFFERS
    new = key_states.shape[2]
    if k_buffer is None or layer.keys is not keys or layer.values is not values or length + new > k_buffer.shape[2] \
            or k_buffer.is_inference() and not torch.is_inference_mode_enabled():
        # not what the last append left (a first step, a crop, a reorder, a reset), full, or made under
        # torch.inference_mode and written outside it (which PyTorch refuses): new buffers
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        keys, values = layer.keys, layer.values
        length = keys.shape[2] if keys.dim() == 4 else 0
        k_buffer, v_buffer = _grown(keys, key_states, length), _grown(values, value_states, length)
    k_buffer.narrow(2, length, new).copy_(key_states)
    v_buffer.narrow(2, length, new).copy_(value_states)
    layer.keys, layer.values = keys, values = k_buffer.narrow(2, 0, length + new), v_buffer.narrow(2, 0, length + new)
    layer._cutile_kv = (k_buffer, v_buffer, length + new, keys, values)
    if "cumulative_length" in layer.__dict__:  # a sliding-window layer, still short of its window: update's count
        layer.cumulative_length += new
    return keys, values


_NO_BUFFERS = (None, None, 0, None, None)


def _growable_layer(cache, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
    """The cache's layer `layer_idx` when append_kv may grow it in place (a transformers DynamicLayer, or a
    DynamicSlidingWindowLayer short of its window, of a cache whose update is Cache.update, no offloading, eager,
    grad mode off, KV_MIN_LENGTH tokens or more, keys and values alike and matching what the layer holds: what
    torch.cat would refuse or promote goes to its call), else None.
    Grad mode off (generate's no_grad, inference_mode): autograd may have saved an earlier view for backward, which
    an in-place write into its buffer would invalidate. It runs in every layer of every decode step: the length
    first, then a few attribute reads."""
    if torch.is_grad_enabled() or not _plain_cache(type(cache)) or cache.offloading or layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[layer_idx]
    _, full, sliding = _cache_classes()
    if type(layer) is not full and (type(layer) is not sliding or layer.record_past):
        return None
    keys, shape = layer.keys, key_states.shape
    if len(shape) != 4:
        return None
    held = keys.shape if layer.is_initialized and keys.dim() == 4 else None
    length = (held[2] if held is not None else 0) + shape[2]
    if length < KV_MIN_LENGTH or torch.compiler.is_compiling() or type(layer) is sliding and (
            length > layer.sliding_window - 1 or layer.cumulative_length != length - shape[2]):
        # buffers left from before a reset, a crop to fewer tokens or a full window: torch.cat holds the layer now
        layer.__dict__.pop("_cutile_kv", None)
        return None
    dtype, device = key_states.dtype, key_states.device
    if value_states.shape[:3] != shape[:3] or value_states.dtype != dtype or value_states.device != device:
        return None
    if held is None:  # not initialized, or lazy_initialization's empty 1-d tensors
        return layer if not layer.is_initialized or not keys.numel() and keys.dtype == dtype \
            and keys.device == device else None
    values = layer.values
    if held[0] != shape[0] or held[1] != shape[1] or held[3] != shape[3] or keys.dtype != dtype \
            or keys.device != device or values.shape[:3] != held[:3] or values.shape[3] != value_states.shape[3] \
            or values.dtype != dtype or values.device != device:
        return None
    return layer


@functools.cache
def _cache_classes():
    from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

    return Cache, DynamicLayer, DynamicSlidingWindowLayer


@functools.cache
def _plain_cache(cls) -> bool:
    """A cache class whose update is transformers' Cache.update (DynamicCache; not a subclass that changes it)."""
    cache = _cache_classes()[0]
    return issubclass(cls, cache) and cls.update is cache.update


def _grown(held: torch.Tensor, new: torch.Tensor, length: int) -> torch.Tensor:
    """A buffer (B, H, capacity, D) for `length` held positions, the new ones and room past them (KV_SPARE),
    holding the first `length`."""
    b, h, n, d = new.shape
    needed = length + n
    buffer = new.new_empty((b, h, needed + min(KV_SPARE, max(KV_MIN_SPARE, needed // 8)), d))
    if length:
        buffer.narrow(2, 0, length).copy_(held)
    return buffer


def attend(attn: nn.Module, query_states, key_states, value_states, attention_mask, past_key_values, input_shape,
           eager, **kwargs):
    """The rest of an attention forward (transformers 5.22.2) once q and k are rotated: the cache update, the
    config's attention function (`eager`, the family's eager_attention_forward, as its fallback) and o_proj;
    (output, attention weights)."""
    if past_key_values is not None:
        key_states, value_states = append_kv(past_key_values, key_states, value_states, attn.layer_idx)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    attn_output, attn_weights = attention_interface(
        attn, query_states, key_states, value_states, attention_mask,
        dropout=attn.attention_dropout if attn.training else 0.0, scaling=attn.scaling, **kwargs)
    return attn.o_proj(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights


def _kernel_qk(layer, query, key, cos, sin):
    """The same through the package's ops: qk_norm_rope where `qk_norm_rope_eps` allows, else the norm modules
    (their own kernels or transformers') and the RoPE op."""
    eps = qk_norm_rope_eps(layer, query)
    if eps is not None:
        return qk_norm_rope(query, key, layer.q_norm.weight, layer.k_norm.weight, cos, sin, eps,
                            layer.attention_class in GEMMA_NORMS)
    if layer.q_norm is not None:
        query, key = layer.q_norm(query), layer.k_norm(key)
    return apply_rotary_pos_emb(query, key, cos, sin)


def merged_projections(layer, hidden_states):
    """q, k and v as views of one qkv_proj GEMM's output (QKVAttentionLayout)."""
    return layer.qkv_proj(hidden_states).split(layer.qkv_split, dim=-1)


def separate_projections(layer, hidden_states):
    """q, k and v from the family's own q_proj, k_proj and v_proj (modules)."""
    return layer.q_proj(hidden_states), layer.k_proj(hidden_states), layer.v_proj(hidden_states)


def run_attention(layer, hidden_states, position_embeddings, attention_mask, past_key_values, project, rotate,
                  **kwargs):
    """`<Family>Attention.forward` (transformers 5.22.2) of the five families with `project` for the q, k and v
    projections, `rotate` for the q/k norms and RoPE, and `append_kv` for the cache update (in `attend`)."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, layer.head_dim)
    query, key, value = project(layer, hidden_states)
    query_states = query.view(hidden_shape).transpose(1, 2)
    key_states = key.view(hidden_shape).transpose(1, 2)
    value_states = value.view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query_states, key_states = rotate(layer, query_states, key_states, cos, sin)
    family = FAMILIES[_family_name(layer)]
    if family.window == "config":  # Mistral reads its config at each call
        kwargs["sliding_window"] = getattr(layer.config, "sliding_window", None)
    elif family.window == "layer":  # Llama passes none
        kwargs["sliding_window"] = layer.sliding_window
    return attend(layer, query_states, key_states, value_states, attention_mask, past_key_values, input_shape,
                  sys.modules[family.module].eager_attention_forward, **kwargs)


class QKVAttention(nn.Module):
    """The attention forward with one q/k/v GEMM and the package's norm+RoPE ops."""

    qkv_proj: nn.Linear
    o_proj: nn.Linear
    q_norm: nn.Module | None
    k_norm: nn.Module | None

    has_backward = True  # GEMMs and attention differentiate through torch, the norms and RoPE through their ops
    can_torch_compile = True

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        return run_attention(self, hidden_states, position_embeddings, attention_mask, past_key_values,
                             merged_projections, _kernel_qk, **kwargs)


def _flag(config, value: bool | str) -> bool:
    return bool(getattr(config, value, False)) if isinstance(value, str) else value


class QKVAttentionLayout(Layout):
    """`<Family>Attention` as transformers builds it, with q_proj, k_proj and v_proj as one `qkv_proj`; every other
    attribute the family's forward and attention functions read."""

    conversion_mapping = merged_qkv_rules()

    def __init__(self, config, layer_idx: int | None = None, *modules):  # a fusion (tuple) key: modules (refused)
        site = check_replacement(type(self), config, layer_idx, *modules)  # the five attention classes only
        refuse_quantized(type(self), config, "qkv_proj", site)
        sharding = sharded_load(config)
        if sharding is not None:
            keys = ", ".join(repr(k) for k in _patch_keys(type(self), site.replaced)) if site else ""
            key = f"KernelConfig key {keys} -> " if keys else ""
            refuse(f"{key}QKVAttention cannot load {sharding}: its qkv_proj concatenates q_proj, k_proj and v_proj, "
                   "which a sharded load splits each on its own (the tp plan: colwise), and transformers' packed "
                   "style splits a merged weight into equal parts, which [q | k | v] is not when q has more heads "
                   "than k and v. Drop the key from the KernelConfig under tp_plan (or fsdp_size); the rest of the "
                   "mapping loads as before.", site)
        super().__init__()
        name = site.replaced[0] if site is not None and site.replaced else \
            f"{DECODER_FAMILIES[config.model_type]}Attention"  # built by hand
        family = FAMILIES[name]
        modeling = importlib.import_module(family.module)  # imported already inside from_pretrained
        self.attention_class = name
        self.config = config
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx] if hasattr(config, "layer_types") else None
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        gemma = name in GEMMA_NORMS
        self.scaling = (config.query_pre_attn_scalar if gemma else self.head_dim) ** -0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = not config.use_bidirectional_attention if gemma else True
        if gemma:
            self.attn_logit_softcapping = config.attn_logit_softcapping
            self.is_sliding = self.layer_type == "sliding_attention"
        if family.window == "layer":
            self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None
        q, kv = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.qkv_split = (q, kv, kv)
        # Built empty (on meta inside from_pretrained): the values come from the checkpoint via conversion_mapping
        self.qkv_proj = nn.Linear(config.hidden_size, q + 2 * kv, bias=_flag(config, family.qkv_bias))
        self.o_proj = nn.Linear(q, config.hidden_size, bias=_flag(config, family.o_bias))
        if family.norm is None:
            self.q_norm = self.k_norm = None
        else:  # the family's class, as its attention calls it (a patched name builds the norm's Layout)
            norm = getattr(modeling, family.norm)
            if gemma:
                self.q_norm = norm(dim=config.head_dim, eps=config.rms_norm_eps)
                self.k_norm = norm(dim=config.head_dim, eps=config.rms_norm_eps)
            else:
                self.q_norm = norm(self.head_dim, eps=config.rms_norm_eps)
                self.k_norm = norm(self.head_dim, eps=config.rms_norm_eps)
        # the family's rotary_pos_emb registered as kernels' use_kernelized_func registers it on the family's module
        # (under its kernel_layer_name): KernelConfig's "rotary_pos_emb" key checks that the model has it, and
        # kernelize swaps its forward
        rope = modeling.apply_rotary_pos_emb
        name = getattr(rope, "__name__", None) or getattr(rope, "kernel_layer_name", None)
        self.__dict__.setdefault("_kernel_funcs", {})[name] = rope

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        return run_attention(self, hidden_states, position_embeddings, attention_mask, past_key_values,
                             merged_projections, family_qk, **kwargs)
