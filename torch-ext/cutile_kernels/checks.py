"""Load-time checks of the Layouts, and the process-wide state transformers keeps after a kernel load.

transformers builds a Layout in place of what a KernelConfig key names: a Layout key is a regex over class names
(the Layout replaces every class it matches), a fusion key hands the Layout the original child modules. Nothing
in that tells a Layout whether the key was right, so each Layout checks, once, when it is built (no check per
forward call):
  - which classes it replaces: the names under which the modeling file that builds it sees the Layout class
    (transformers' `apply_patches` binds the Layout to the replaced class's name there);
  - for a fusion, the modules it receives and the decoder layer building it (that frame's `self`): the family,
    and which of the layer's children the norm is;
  - whether the load building it asked for it (the KernelConfig of the enclosing `from_pretrained`): a Layout
    built by a load that did not is a leftover of an earlier load.
A refusal raises ValueError naming the key, the class found and the key to use, after undoing what transformers
registered for this package (so the next load starts clean).

transformers keeps a kernel load's class patches, conversion rules and output recorders process-wide, and leaves
its modules' classes patched when building a model raises. `after_load`, the Layouts' `kernel_condition` (kernels
calls it for each Layout when transformers kernelizes the loaded model), removes this package's share, so a later
plain load builds plain modules. The loaded model needs none of it by then: its conversions for save_pretrained
are its own, and output recorders match by isinstance, so the original classes still record the fused layers.
"""
from __future__ import annotations

import re
import sys

from torch import nn

from .configs import fused_key
from .isolation import _model_classes, transformers_modules

PACKAGE = __name__.rpartition(".")[0]
LLAMA_FORM = ("Llama", "Mistral", "Qwen2", "Qwen3")  # the families of the Llama-form layers
SUPPORTED = "Llama, Mistral, Qwen2, Qwen3 and Gemma3"
# kernel -> the classes its Layout may replace (a Layout key)
REPLACES = {"GemmaRMSNorm": {"Gemma3RMSNorm"}, "SwiGLUMLP": {f"{f}MLP" for f in LLAMA_FORM},
            "DecoderLayer": {f"{f}DecoderLayer" for f in LLAMA_FORM}, "GemmaDecoderLayer": {"Gemma3DecoderLayer"},
            "QKVAttention": {f"{f}Attention" for f in (*LLAMA_FORM, "Gemma3")}}
# the decoder-layer kernels (decoder.py); model_type -> the class-name prefix of the family's modeling module
DECODERS = {"DecoderLayer": "Llama, Mistral, Qwen2 and Qwen3", "GemmaDecoderLayer": "Gemma3"}
# the Layouts whose class an output recorder names after a load (hidden states, attentions): see _with_replaced
RECORDED = (*DECODERS, "QKVAttention")
DECODER_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3": "Gemma3",
                    "gemma3_text": "Gemma3"}
# kernel -> decoder layer -> (the child that is the norm before the MLP, its classes, the MLP's class) (a fusion)
FUSES = {
    "RMSNormMLP": {f"{f}DecoderLayer": ("post_attention_layernorm", {f"{f}RMSNorm"}, f"{f}MLP") for f in LLAMA_FORM},
    "GemmaRMSNormMLP": {"Gemma3DecoderLayer": ("pre_feedforward_layernorm", {"Gemma3RMSNorm", "GemmaRMSNormLayout"},
                                               "Gemma3MLP")},
}
GUARD_HINT = ("load kernel models inside `transformers_state_guard()` (or each in its own process) to keep the "
              "process clean")

_DIRTY: set[str] = set()  # Layouts built since the last cleanup
_ORIGINALS: dict[tuple[str, str], type] = {}  # (module, name) -> the class transformers' apply_patches replaced


class Layout(nn.Module):
    """Base of this package's Layouts: marks them (across package copies) and cleans up after a load."""

    _cutile_kernels_layout = True  # underscored: transformers' dummy classes raise on other names

    @staticmethod
    def kernel_condition(module: nn.Module) -> bool:
        """kernels calls this for each Layout when it kernelizes a model (the end of from_pretrained)."""
        return after_load(module)


def after_load(module: nn.Module | None = None) -> bool:
    """After a load that built Layouts: remove what transformers registered for them process-wide."""
    if _DIRTY:
        _DIRTY.clear()
        reset_process_state()
    return True


# --- where a Layout is built --------------------------------------------------------------------------------

class Site:
    """The code building a Layout: its module, the names there bound to the Layout class (the classes it
    replaces), the module under construction (a fusion's decoder layer) and the enclosing load."""

    def __init__(self, module: str, replaced: list[str], parent, load):
        self.module, self.replaced, self.parent, self.load = module, replaced, parent, load


def _learn(originals: dict | None) -> None:
    """Remember the classes an apply_patches replaced (to put them back should a load fail to)."""
    _ORIGINALS.update({k: v for k, v in (originals or {}).items() if not _is_ours(v)})


def _ours(module_name: str) -> bool:
    return module_name == PACKAGE or module_name.startswith(PACKAGE + ".")


def _site(layout_cls: type) -> Site | None:
    """None when the Layout is built by code outside transformers (by hand: nothing to check against)."""
    frame = sys._getframe(1)
    try:
        while frame is not None and _ours(frame.f_globals.get("__name__", "")):
            frame = frame.f_back
        if frame is None or not frame.f_globals.get("__name__", "").startswith("transformers."):
            return None
        replaced = sorted(name for name, value in frame.f_globals.items() if value is layout_cls)
        parent = frame.f_locals.get("self")
        return Site(frame.f_globals["__name__"], replaced, parent if isinstance(parent, nn.Module) else None,
                    _enclosing_load(frame))
    finally:
        del frame


_UNKNOWN = object()


class _Load:
    """The from_pretrained call (if any) building the model, and the classes its apply_patches replaced."""

    def __init__(self, found: bool, kernel_config, use_kernels, originals: dict | None):
        self.found, self.kernel_config, self.use_kernels, self.originals = found, kernel_config, use_kernels, originals


def _apply_patches_originals(values) -> dict | None:
    for value in values:
        for cm in value if isinstance(value, (list, tuple)) else (value,):
            gen = getattr(cm, "gen", None) if type(cm).__name__ == "_GeneratorContextManager" else None
            if gen is not None and gen.gi_code.co_name == "apply_patches" and gen.gi_frame is not None:
                return gen.gi_frame.f_locals.get("original_classes")
    return None


def _enclosing_load(frame) -> _Load:
    originals = None
    try:
        while frame is not None:
            local = frame.f_locals
            if originals is None:
                originals = _apply_patches_originals(local.values())
            if frame.f_code.co_name == "from_pretrained" and \
                    frame.f_globals.get("__name__") == "transformers.modeling_utils":
                return _Load(True, local.get("kernel_config", _UNKNOWN), local.get("use_kernels", True), originals)
            frame = frame.f_back
        return _Load(False, None, False, originals)
    finally:
        del frame


def _layer_names(kernel_config) -> dict[str, str]:
    """Layer name -> repo of every value of a KernelConfig mapping (as given, or as transformers rewrote it)."""
    found: dict[str, str] = {}

    def add(value):
        if isinstance(value, str):
            repo, _, layer = value.rpartition(":")
            found[layer] = repo
        elif isinstance(value, tuple) and value:
            add(value[0])
        elif isinstance(value, dict):
            for v in value.values():
                add(v)
        elif isinstance(getattr(value, "layer_name", None), str):
            found[value.layer_name] = str(getattr(value, "_repo_id", None) or getattr(value, "repo_path", "<repo>"))

    mapping = getattr(kernel_config, "kernel_mapping", None)
    for v in (mapping.values() if isinstance(mapping, dict) else ()):
        add(v)
    return found


# --- refusals ------------------------------------------------------------------------------------------------

def _entry(key, repo: str, kernel: str) -> str:
    return f'{{{key!r}: "{repo}:{kernel}"}}'.replace("'", '"')


def advice(found: str, repo: str = "<repo>") -> str:
    """The KernelConfig entry this package offers for class `found`, or why there is none."""
    for f in LLAMA_FORM:
        if found == f"{f}RMSNorm":
            return f"for {found} use {_entry('RMSNorm', repo, 'RMSNorm')}"
        if found in (f"{f}MLP", f"{f}DecoderLayer"):
            return (f"for {found} use {_entry(f'^{f}MLP$', repo, 'SwiGLUMLP')} or the fused "
                    f"{_entry(fused_key('post_attention_layernorm'), repo, 'RMSNormMLP')}")
    if found in REPLACES["QKVAttention"]:
        return f"for {found} use {_entry(f'^{found}$', repo, 'QKVAttention')}"
    if found in ("Gemma3RMSNorm", "GemmaRMSNormLayout"):
        return f"for Gemma3RMSNorm use {_entry('^Gemma3RMSNorm$', repo, 'GemmaRMSNorm')}"
    if found in ("Gemma3MLP", "Gemma3DecoderLayer"):
        return f"for {found} use {_entry(fused_key('pre_feedforward_layernorm'), repo, 'GemmaRMSNormMLP')}"
    return f"this package has no layer for {found} (it supports {SUPPORTED}): remove the key"


def decoder_advice(found: str, repo: str = "<repo>") -> str:
    """The decoder-layer key for class `found`, or why there is none."""
    if found == "Gemma3DecoderLayer":
        return f"for {found} use {_entry('^Gemma3DecoderLayer$', repo, 'GemmaDecoderLayer')}"
    if found in REPLACES["DecoderLayer"]:
        return f"for {found} use {_entry(f'^{found}$', repo, 'DecoderLayer')}"
    return f"this package has no decoder layer for {found} (it supports {SUPPORTED}): remove the key"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def refuse(message: str, site: Site | None = None) -> None:
    """Undo what the load registered for this package, put back every class its apply_patches replaced (which
    apply_patches itself does not when the model's construction raises), raise ValueError."""
    originals = site.load.originals if site is not None else None
    for (module, attr), cls in (originals or {}).items():
        if module in sys.modules and not _is_ours(cls):
            setattr(sys.modules[module], attr, cls)
    reset_process_state(originals)
    raise ValueError(f"cutile_kernels: {message}")


def refuse_quantized(layout_cls: type, config, merged: str, site: Site | None) -> None:
    """Refuse a Layout that concatenates checkpoint tensors at load (`merged`: what it builds) when the model loads
    quantized (`config.quantization_config`, which from_pretrained sets before it builds the model): a quantized
    checkpoint stores those tensors packed (qweight, scales, ...) under keys the rules do not take, and the
    quantizer swaps nn.Linear for its own layers, so the merged Linear would keep its random initialization."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return
    method = (quantization.get("quant_method") if isinstance(quantization, dict)
              else getattr(quantization, "quant_method", None))
    kernel = layout_cls.__name__.removesuffix("Layout")
    refuse(f"{kernel} cannot load a quantized model (quant_method={getattr(method, 'value', method)}): it builds "
           f"{merged} by concatenating checkpoint weights at load, which a quantized checkpoint stores in its own "
           f"packed form, so {merged} would stay uninitialized. Drop the {kernel} key; the norm, RoPE and "
           "decoder-layer keys merge no weights.", site)


def _stale(site: Site, kernel: str, found: str) -> None:
    load = site.load
    if load.kernel_config is _UNKNOWN:  # a transformers whose from_pretrained has no such local: cannot tell
        return
    if not (load.found and load.kernel_config is not None and load.use_kernels
            and kernel in _layer_names(load.kernel_config)):
        refuse(f"this load builds {kernel}Layout in place of {found} although its KernelConfig does not ask for "
               f"{kernel}: transformers kept the class patches and conversion rules of an earlier kernel load in "
               f"this process, and this model would load with wrong weights or forwards. They are removed now, so "
               f"loading again works; {GUARD_HINT}.", site)


def _repo(site: Site, kernel: str) -> str:
    config = site.load.kernel_config
    return "<repo>" if config is None or config is _UNKNOWN else _layer_names(config).get(kernel, "<repo>")


def _patch_keys(layout_cls: type, names: list[str]) -> list[str]:
    from transformers import monkey_patching

    mapping = monkey_patching.get_patch_mapping()
    return [key for key, cls in mapping.items() if cls is layout_cls
            and any(monkey_patching._find_replacement_class(n, {key: cls}) is cls for n in names)]


def check_replacement(layout_cls: type, *arguments) -> Site | None:
    """For a Layout replacing one module (GemmaRMSNormLayout, SwiGLUMLPLayout): the classes it replaces."""
    kernel = layout_cls.__name__.removesuffix("Layout")
    site = _site(layout_cls)
    modules = [type(a).__name__ for a in arguments if isinstance(a, nn.Module)]
    if modules:  # transformers hands a Layout modules only for a fusion (tuple) key
        refuse(f"{kernel} replaces one module, but a fusion (tuple) key handed it {' and '.join(modules)}; "
               f"{kernel} takes a class-name key. {_sentence(advice(modules[-1]))}.", site)
    if site is None:
        return None
    _DIRTY.add(kernel)
    _learn(site.load.originals)
    found = ", ".join(site.replaced) or f"a class of {site.module}"
    _stale(site, kernel, found)
    wrong = [n for n in site.replaced if n not in REPLACES[kernel]] or ([] if site.replaced else [found])
    if wrong:
        keys = ", ".join(repr(k) for k in _patch_keys(layout_cls, wrong)) or "a key"
        what = {"GemmaRMSNorm": "computes Gemma3's x̂·(1+w) and replaces Gemma3RMSNorm only",
                "SwiGLUMLP": "merges the gate and up projections of LlamaMLP, MistralMLP, Qwen2MLP and Qwen3MLP "
                             "only",
                "QKVAttention": "merges the q, k and v projections of LlamaAttention, MistralAttention, "
                                "Qwen2Attention, Qwen3Attention and Gemma3Attention only",
                **{k: f"is the decoder layer of {families} only" for k, families in DECODERS.items()}}[kernel]
        hint = (decoder_advice if kernel in DECODERS else advice)(wrong[0], _repo(site, kernel))
        refuse(f"KernelConfig key {keys} -> {kernel} hits {', '.join(wrong)}; {kernel} {what}. "
               f"{_sentence(hint)}.", site)
    return site


def check_fusion(layout_cls: type, norm, mlp) -> Site | None:
    """For a fused Layout (RMSNormMLPLayout, GemmaRMSNormMLPLayout): the decoder layer, its norm and MLP."""
    kernel = layout_cls.__name__.removesuffix("Layout")
    site = _site(layout_cls)
    if not (isinstance(norm, nn.Module) and isinstance(mlp, nn.Module)):
        slot = next(iter(FUSES[kernel].values()))[0]
        refuse(f"{kernel} fuses a norm with the MLP after it and takes a tuple key, "
               f"{_entry(fused_key(slot), '<repo>', kernel)}; a class-name key handed it "
               f"{type(norm).__name__}", site)
    norm_cls, mlp_cls = type(norm).__name__, type(mlp).__name__
    parent = site.parent if site is not None else None
    layer = type(parent).__name__.removeprefix("Fused") if parent is not None else None
    slots = {m: n for n, m in parent.named_children()} if parent is not None else {}
    norm_slot, mlp_slot = slots.get(norm, "?"), slots.get(mlp, "?")
    if site is not None:
        _DIRTY.add(kernel)
        _learn(site.load.originals)
        _stale(site, kernel, f"{norm_slot} and {mlp_slot} of {layer}")
    repo = _repo(site, kernel) if site is not None else "<repo>"
    if layer is not None:
        found = (f"{_entry(fused_key(norm_slot), repo, kernel)} found {layer} ({norm_slot}: {norm_cls}, "
                 f"{mlp_slot}: {mlp_cls})")
    else:
        found = f"{kernel}Layout was given {norm_cls} and {mlp_cls}"
    decoders = sorted(set(DECODERS) & set(_layer_names(site.load.kernel_config))) if site is not None else []
    prefix = (layer or "LlamaDecoderLayer").removesuffix("DecoderLayer")
    mlp_instead = ("keep Gemma3MLP (remove the fusion key)" if kernel == "GemmaRMSNormMLP" else
                   f"use the merged MLP, {_entry(f'^{prefix}MLP$', repo, 'SwiGLUMLP')}, instead of the fusion key")
    if decoders:  # transformers patches the decoder layer's exact name for the fusion: the decoder key never applies
        refuse(f"{found}: this KernelConfig also asks for {decoders[0]}, and both replace {layer}: transformers "
               f"builds the fusion's {type(parent).__name__} (under the exact class name, which wins over the "
               f"decoder key's regex), so {decoders[0]} would never run. With a decoder layer, add_rms_norm is the "
               f"norm before the MLP: {mlp_instead}.", site)
    supported = FUSES[kernel]
    if mlp_cls in ("SwiGLUMLPLayout", "RMSNormMLPLayout", "GemmaRMSNormMLPLayout"):
        refuse(f"{found}: the MLP is already replaced by {mlp_cls.removesuffix('Layout')}. SwiGLUMLP and "
               f"{kernel} both rewrite the MLP's weights; use one of them ({advice(layer or 'LlamaMLP', repo)})",
               site)
    family = layer if layer is not None else next((name for name, (_, norms, m) in supported.items()
                                                   if norm_cls in norms and mlp_cls == m), None)
    if family not in supported:
        other = layer or norm_cls
        post_norm = parent is not None and not hasattr(parent, "input_layernorm") and norm_slot.startswith("post_")
        why = (f"{other} normalizes the output of attention and of the MLP (a post-norm layer), not the MLP's "
               "input" if post_norm else f"{kernel} fuses the norm before the MLP of {', '.join(supported)} only")
        refuse(f"{found}: {why}. {_sentence(advice(other, repo))}.", site)
    slot, norms, mlp_name = supported[family]
    if norm_cls not in norms or mlp_cls != mlp_name or (layer and (norm_slot != slot or mlp_slot != "mlp")):
        refuse(f"{found}: in {family} the norm before the MLP is {slot} ({mlp_name} after it); "
               f"use {_entry(fused_key(slot), repo, kernel)}.", site)
    return site


# --- process state -------------------------------------------------------------------------------------------

def _is_ours(cls) -> bool:
    """A Layout of this package (any copy), or the class transformers made to fuse one into a parent."""
    if not isinstance(cls, type):
        return False
    if getattr(cls, "_cutile_kernels_layout", False):
        return True
    for cell in getattr(cls.__dict__.get("__init__"), "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, type) and getattr(value, "_cutile_kernels_layout", False):
            return True
    return False


def _original(cls: type, where: tuple[str, str] | None = None) -> type | None:
    if not getattr(cls, "_cutile_kernels_layout", False):
        return cls.__bases__[0]  # a fused parent class: the class it was made from
    return _ORIGINALS.get(where) if where else None


def _rule_key(rule) -> tuple:
    return (type(rule).__name__, tuple(getattr(rule, "_original_source_patterns", None) or rule.source_patterns),
            tuple(getattr(rule, "_original_target_patterns", None) or rule.target_patterns))


def _our_rules() -> set[tuple]:
    from . import attention, mlp

    return {_rule_key(r) for module in (attention, mlp) for cls in vars(module).values() if isinstance(cls, type)
            for r in cls.__dict__.get("conversion_mapping", ())}


def reset_process_state(originals: dict | None = None) -> None:
    """Remove what transformers keeps process-wide for this package's Layouts: class patches, conversion rules,
    output recorders naming fused classes, and module classes left patched (put back from `originals`, the
    enclosing apply_patches' record, or an earlier one)."""
    from transformers import conversion_mapping, monkey_patching
    from transformers.modeling_utils import PreTrainedModel
    from transformers.utils import output_capturing

    _learn(originals)
    with monkey_patching._monkey_patch_lock:
        cache = monkey_patching._monkey_patch_mapping_cache
        for key in [k for k, v in cache.items() if _is_ours(v)]:
            del cache[key]
    rules, cache = _our_rules(), conversion_mapping._checkpoint_conversion_mapping_cache or {}
    for key in [k for k in conversion_mapping.USER_REGISTERED_MAPPINGS if isinstance(cache.get(k), list)]:
        kept = [r for r in cache[key] if _rule_key(r) not in rules]
        if len(kept) == len(cache[key]):
            continue
        if kept:
            cache[key] = kept
        else:
            del cache[key]
            conversion_mapping.USER_REGISTERED_MAPPINGS.discard(key)
    for module in transformers_modules():
        for attr, value in list(vars(module).items()):
            if _is_ours(value) and (original := _original(value, (module.__name__, attr))) is not None:
                setattr(module, attr, original)
    recorders = [(cls.__dict__["_can_record_outputs"], cls.__module__) for cls in _model_classes(PreTrainedModel)
                 if isinstance(cls.__dict__.get("_can_record_outputs"), dict)]
    registered = [(outputs, re.sub(r"^<class '(.*)\.\w+'>$", r"\1", str(owner)))
                  for owner, outputs in output_capturing._CAN_RECORD_REGISTRY.items()]
    for outputs, module_name in recorders + registered:
        for output, recorder in list((outputs or {}).items()):
            outputs[output] = _with_replaced_classes(_restore_recorder(recorder), module_name)


def _is_recorded_layout(cls) -> bool:
    return isinstance(cls, type) and getattr(cls, "_cutile_kernels_layout", False) and \
        cls.__name__.removesuffix("Layout") in RECORDED


def _with_replaced_classes(recorder, module_name: str):
    """A decoder or attention Layout recorder (patch_output_recorders put it in place of `<Family>DecoderLayer`,
    `<Family>Attention`) stays, for the loaded model's modules are Layouts, and the class it replaced joins it, for
    later plain models: outputs are recorded by isinstance, so each model matches one of the two."""
    items = recorder if isinstance(recorder, list) else [recorder]
    if not any(_is_recorded_layout(r) for r in items):
        return recorder
    module = sys.modules.get(module_name)

    def replaced(layout: type) -> list:
        return [c for name in sorted(REPLACES[layout.__name__.removesuffix("Layout")])
                if isinstance(c := _ORIGINALS.get((module_name, name)) or getattr(module, name, None), type)
                and not _is_ours(c)]

    flat = []
    for r in items:
        for c in ([*replaced(r), r] if _is_recorded_layout(r) else [r]):
            if c not in flat:
                flat.append(c)
    return flat


def _restore_recorder(recorder):
    if isinstance(recorder, list):
        return [_restore_recorder(r) for r in recorder]
    if isinstance(recorder, type):
        return (_original(recorder) or recorder) if _is_ours(recorder) else recorder
    target = getattr(recorder, "target_class", None)
    if _is_ours(target):
        recorder.target_class = _original(target) or target
    return recorder
