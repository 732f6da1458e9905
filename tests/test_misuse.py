"""Misuse ends in a clear error, never in wrong numbers (issue 15): one test per finding.

1/5 ops: an unknown activation, an odd gated width, a weight not of the hidden size raise ValueError on the
    functional ops and through the custom ops.
2/3/5 keys: each Layout checks, when transformers builds it, what it replaces, and refuses naming the key, the class
    it found and the key to use (Gemma form on Llama-form norms, fusions on the wrong norm or family, the merged
    MLPs together, Gemma3 with the Llama keys, a fused key for a single-module layer and the reverse).
4   process state: a plain load after a kernel load in the same process gets plain modules without the guard;
    leftovers of a load that failed after registering are refused at the next load, naming the guard.
    enable_training on a model whose KernelConfig was never applied raises the intended ValueError.
6   a quantized load: the Layouts that concatenate checkpoint weights refuse it.
7   accelerate (the README example's device_map=) is a requirement.

The unguarded behaviour runs inside one test (the autouse guard only restores at its end).
"""
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, KernelConfig

from devtools.checkpoints import make_checkpoint

from ._helpers import IDS, layouts, load, logits, plain

ROOT = Path(__file__).resolve().parent.parent


def fused(norm: str) -> tuple:
    return (("RMSNorm", f"model.layers.*.{norm}"), ("MLP", "model.layers.*.mlp"))


def entry(key, value: str) -> str:
    """How a refusal writes a KernelConfig entry it recommends."""
    return re.escape(f"{{{key!r}: \"{value}\"}}".replace("'", '"'))


def assert_process_clean(checkpoints) -> None:
    """A plain load after a refusal builds plain modules with every weight (no Layout, no conversion)."""
    for family in ("llama", "gemma3"):
        model = AutoModelForCausalLM.from_pretrained(checkpoints[family], output_loading_info=True)
        assert not any(model[1].values()), model[1]
        assert not layouts(model[0])


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory) -> Path:
    """Olmo2: post-norm (post_attention_layernorm normalizes the attention output)."""
    return make_checkpoint("olmo2", tmp_path_factory.mktemp("olmo2") / "olmo2")


# --- findings 1 and 5: the ops -------------------------------------------------------------------------------

@pytest.mark.parametrize("act", ["relu", "SiLU", "gelu"])
def test_gated_act_unknown_activation_raises(ck, act):
    x = torch.randn(4, 128)
    accepted = r"only \['gelu_pytorch_tanh', 'silu'\]"
    with pytest.raises(ValueError, match=rf"activation '{act}' is not supported \({accepted}"):
        ck.gated_act(x, act)
    with pytest.raises(ValueError, match=accepted):
        ck._ops.ops.gated_act(x, act)


def test_gated_act_odd_width_raises(ck):
    x = torch.randn(4, 127)
    for call in (lambda: ck.gated_act(x, "silu"), lambda: ck._ops.ops.gated_act(x, "silu")):
        with pytest.raises(ValueError, match="last dimension of gate_up is 127; it must be even"):
            call()


@pytest.mark.parametrize("shape", [(1,), (32,), (64, 1)])
def test_rms_norm_weight_not_of_the_hidden_size_raises(ck, shape):
    """(1,) would broadcast into wrong numbers; the others into a torch shape error."""
    x, w = torch.randn(4, 64), torch.randn(shape)
    calls = [lambda: ck.rms_norm(x, w, 1e-6), lambda: ck.gemma_rms_norm(x, w, 1e-6),
             lambda: ck._ops.ops.rms_norm(x, w, 1e-6, False), lambda: ck._ops.ops.rms_norm(x, w, 1e-6, True)]
    for call in calls:
        with pytest.raises(ValueError, match=re.escape(f"the weight has shape {shape}") + r".*must be \(64,\)"):
            call()


# --- findings 2, 3 and 5: keys on the wrong module -----------------------------------------------------------

def test_gemma_form_on_llama_norms_is_refused(checkpoints, hub, cpu_kernel_config):
    """Finding 2: the Gemma form x̂·(1+w) on Llama-form weights loaded cleanly with logits off by ~0.7."""
    cases = [("llama", "RMSNorm", "LlamaRMSNorm"), ("qwen3", "^Qwen3RMSNorm$", "Qwen3RMSNorm")]
    for family, key, found in cases:
        with pytest.raises(ValueError) as e:
            load(checkpoints[family], {key: f"{hub}:GemmaRMSNorm"})
        message = str(e.value)
        assert f"KernelConfig key {key!r} -> GemmaRMSNorm hits {found}" in message
        assert re.search(entry("RMSNorm", f"{hub}:RMSNorm"), message), message
    assert_process_clean(checkpoints)


def test_fusion_on_a_post_norm_family_is_refused(olmo2, checkpoints, hub, cpu_kernel_config):
    """Finding 3: RMSNormMLP on Olmo2's post_attention_layernorm loaded cleanly with logits off by ~0.9."""
    with pytest.raises(ValueError, match=r"found Olmo2DecoderLayer \(post_attention_layernorm: Olmo2RMSNorm, mlp: "
                                         r"Olmo2MLP\): .*a post-norm layer.*remove the key"):
        load(olmo2, {fused("post_attention_layernorm"): f"{hub}:RMSNormMLP"})
    assert_process_clean(checkpoints)


@pytest.mark.parametrize("family,norm,kernel,right", [
    ("llama", "input_layernorm", "RMSNormMLP", "post_attention_layernorm"),
    ("gemma3", "input_layernorm", "GemmaRMSNormMLP", "pre_feedforward_layernorm"),
    ("gemma3", "post_feedforward_layernorm", "GemmaRMSNormMLP", "pre_feedforward_layernorm"),
])
def test_fusion_on_the_wrong_norm_is_refused(checkpoints, hub, cpu_kernel_config, family, norm, kernel, right):
    """Finding 3: loaded "with missing/unexpected keys" (transformers' load report only), then wrong weights."""
    with pytest.raises(ValueError) as e:
        load(checkpoints[family], {fused(norm): f"{hub}:{kernel}"})
    message = str(e.value)
    assert re.search(rf"found \w+DecoderLayer \({norm}: \w+RMSNorm, mlp: \w+MLP\): in \w+DecoderLayer the norm "
                     rf"before the MLP is {right}", message), message
    assert re.search(entry(fused(right), f"{hub}:{kernel}"), message), message
    assert_process_clean(checkpoints)


def test_fused_layer_of_the_other_family_is_refused(checkpoints, hub, cpu_kernel_config):
    """Finding 5: Gemma3 with the Llama keys raised "'Gemma3RMSNorm' object has no attribute 'variance_epsilon'";
    GemmaRMSNormMLP on Llama is the mirror case."""
    llama_keys = {"RMSNorm": f"{hub}:RMSNorm", fused("post_attention_layernorm"): f"{hub}:RMSNormMLP"}
    with pytest.raises(ValueError) as e:
        load(checkpoints["gemma3"], llama_keys)
    assert "found Gemma3DecoderLayer (post_attention_layernorm: Gemma3RMSNorm, mlp: Gemma3MLP)" in str(e.value)
    assert re.search(entry(fused("pre_feedforward_layernorm"), f"{hub}:GemmaRMSNormMLP"), str(e.value))
    with pytest.raises(ValueError, match=r"found LlamaDecoderLayer .*GemmaRMSNormMLP fuses the norm before the MLP "
                                         r"of Gemma3DecoderLayer only\. For LlamaDecoderLayer use"):
        load(checkpoints["llama"], {fused("post_attention_layernorm"): f"{hub}:GemmaRMSNormMLP"})
    assert_process_clean(checkpoints)


@pytest.mark.parametrize("order", ["merged first", "fused first"])
def test_merged_and_fused_mlp_together_are_refused(checkpoints, hub, cpu_kernel_config, order):
    """Finding 5: raised "'SwiGLUMLPLayout' object has no attribute 'gate_proj'", then every later load did too."""
    from transformers.models.llama import modeling_llama

    classes = modeling_llama.LlamaMLP, modeling_llama.LlamaDecoderLayer
    items = [("^LlamaMLP$", f"{hub}:SwiGLUMLP"), (fused("post_attention_layernorm"), f"{hub}:RMSNormMLP")]
    mapping = dict(items if order == "merged first" else items[::-1])
    with pytest.raises(ValueError, match=r"mlp: SwiGLUMLPLayout\): the MLP is already replaced by SwiGLUMLP\. "
                                         r"SwiGLUMLP and RMSNormMLP both rewrite the MLP's weights; use one of them"):
        load(checkpoints["llama"], mapping)
    assert (modeling_llama.LlamaMLP, modeling_llama.LlamaDecoderLayer) == classes  # apply_patches left them patched
    assert_process_clean(checkpoints)
    model, info = load(checkpoints["llama"], {"^LlamaMLP$": f"{hub}:SwiGLUMLP"})  # and the corrected config loads
    assert not any(info.values()) and layouts(model)


def test_merged_mlp_on_another_mlp_is_refused(checkpoints, hub, cpu_kernel_config):
    """An unanchored "MLP" key reaches Gemma3MLP (and vision MLPs): SwiGLUMLP is for the Llama-form MLPs."""
    with pytest.raises(ValueError, match=r"KernelConfig key 'MLP' -> SwiGLUMLP hits Gemma3MLP; .*For Gemma3MLP use "
                                         + entry(fused("pre_feedforward_layernorm"), f"{hub}:GemmaRMSNormMLP")):
        load(checkpoints["gemma3"], {"MLP": f"{hub}:SwiGLUMLP"})
    assert_process_clean(checkpoints)


@pytest.mark.parametrize("family,key,layer,message", [
    ("llama", fused("post_attention_layernorm"), "SwiGLUMLP",
     "SwiGLUMLP replaces one module, but a fusion (tuple) key handed it LlamaRMSNorm and LlamaMLP"),
    ("gemma3", fused("pre_feedforward_layernorm"), "GemmaRMSNorm",
     "GemmaRMSNorm replaces one module, but a fusion (tuple) key handed it Gemma3RMSNorm and Gemma3MLP"),
    ("llama", "^LlamaMLP$", "RMSNormMLP", "RMSNormMLP fuses a norm with the MLP after it and takes a tuple key"),
])
def test_layer_with_the_other_kind_of_key_is_refused(checkpoints, hub, cpu_kernel_config, family, key, layer,
                                                     message):
    """Before: TypeErrors from the Layout's __init__ (or a zeros(module) call) that named no key."""
    with pytest.raises(ValueError, match=re.escape(message)):
        load(checkpoints[family], {key: f"{hub}:{layer}"})
    assert_process_clean(checkpoints)


@pytest.mark.parametrize("key", ["RMSNorm", "^Gemma3RMSNorm$"])
def test_llama_form_never_runs_on_gemma_norms(checkpoints, hub, cpu_kernel_config, key):
    """The stateless RMSNorm reaches only classes registered as "RMSNorm" (none is Gemma-form): on Gemma3 the
    key matches nothing and transformers refuses it."""
    with pytest.raises(ValueError, match=re.escape(f"Layer {key} is not registered in the model")):
        load(checkpoints["gemma3"], {key: f"{hub}:RMSNorm"})


def test_checks_do_not_touch_the_kernel_forwards(ck):
    """The checks run when a Layout is built; the kernel layers' forwards stay as they were (no per-call cost)."""
    import inspect

    for name in ("RMSNorm", "GemmaRMSNorm", "SwiGLUMLP", "RMSNormMLP", "GemmaRMSNormMLP", "DecoderLayer",
                 "GemmaDecoderLayer", "QKVAttention"):
        source = inspect.getsource(getattr(ck.layers, name).forward)
        assert "check" not in source and "_site" not in source, name


# --- finding 4: process state --------------------------------------------------------------------------------

def test_plain_load_after_gemma_kernel_load_is_plain(checkpoints, hub, cpu_kernel_config):
    """Before: a later plain Llama got GemmaRMSNormLayout (max logit difference 0.69, no report)."""
    want = logits(plain(checkpoints["llama"]))
    model, info = load(checkpoints["gemma3"], {"RMSNorm": f"{hub}:GemmaRMSNorm"})  # valid for Gemma3 itself
    assert not any(info.values()) and layouts(model)
    later, info = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], output_loading_info=True)
    assert not any(info.values()) and not layouts(later)
    assert torch.equal(logits(later), want)


def test_plain_load_after_unanchored_mlp_key_is_plain(checkpoints, hub, cpu_kernel_config):
    """Before: a later plain Qwen3 got SwiGLUMLPLayout with missing gate_up_proj weights."""
    want = logits(plain(checkpoints["qwen3"]))
    load(checkpoints["llama"], {"MLP": f"{hub}:SwiGLUMLP"})
    later, info = AutoModelForCausalLM.from_pretrained(checkpoints["qwen3"], output_loading_info=True)
    assert not any(info.values()) and not layouts(later)
    assert torch.equal(logits(later), want)


def test_plain_load_after_fused_load_is_plain_with_hidden_states(checkpoints, hub, cpu_kernel_config):
    """Before: a later plain Qwen3 got the fused layers (and its recorders named the fused class); the kernel
    model loaded first keeps its outputs and saves its original keys."""
    want = logits(plain(checkpoints["qwen3"]))
    model, _ = load(checkpoints["qwen3"], {"RMSNorm": f"{hub}:RMSNorm",
                                           fused("post_attention_layernorm"): f"{hub}:RMSNormMLP"})
    later, info = AutoModelForCausalLM.from_pretrained(checkpoints["qwen3"], output_loading_info=True)
    assert not any(info.values()) and not layouts(later)
    with torch.no_grad():
        assert len(later(IDS, output_hidden_states=True).hidden_states) == 3
        assert len(model(IDS, output_hidden_states=True).hidden_states) == 3
    assert torch.equal(logits(later), want) and torch.equal(logits(model), want)


def test_leftovers_of_a_failed_load_are_refused_once_naming_the_guard(checkpoints, hub, cpu_kernel_config):
    """A load that fails after transformers registered its patches (here transformers' own check: the key hits
    nothing in Qwen3) leaves them behind; the next load that would build the Layout refuses, naming the guard,
    and removes them: the load after is plain."""
    want = logits(plain(checkpoints["llama"]))
    with pytest.raises(ValueError, match="Layer SwiGLUMLP is not registered"):
        load(checkpoints["qwen3"], {"^LlamaMLP$": f"{hub}:SwiGLUMLP"})
    with pytest.raises(ValueError, match=r"this load builds SwiGLUMLPLayout in place of LlamaMLP although its "
                                         r"KernelConfig does not ask for SwiGLUMLP.*transformers_state_guard\(\)"):
        AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    later, info = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], output_loading_info=True)
    assert not any(info.values()) and not layouts(later)
    assert torch.equal(logits(later), want)


@pytest.fixture(scope="module")
def quantized(checkpoints, tmp_path_factory) -> Path:
    """The tiny Llama checkpoint declared FP8-quantized: on CPU transformers builds the model with its
    quantization_config set (and dequantizes), which is what every quantized load gives the Layouts."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("quantized") / "llama-fp8"
    shutil.copytree(checkpoints["llama"], path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("options,kernel,merged", [({}, "RMSNormMLP", "gate_up_proj"),
                                                   (dict(mlp="merged"), "SwiGLUMLP", "gate_up_proj"),
                                                   (dict(mlp=None, qkv=True), "QKVAttention", "qkv_proj")])
def test_merging_layouts_refuse_a_quantized_load(quantized, checkpoints, hub, ck_hub, cpu_kernel_config, options,
                                                 kernel, merged):
    """The Layouts that concatenate checkpoint weights refuse a quantized model (its checkpoint stores them packed,
    and the merged Linear would keep random values); the keys that merge nothing load it."""
    with pytest.raises(ValueError, match=f"{kernel} cannot load a quantized model \\(quant_method=fp8\\): it builds "
                                         f"{merged} by concatenating checkpoint weights"):
        load(quantized, ck_hub.recommended_mapping("llama", hub, **options))
    assert_process_clean(checkpoints)
    model, info = load(quantized, ck_hub.recommended_mapping("llama", hub, mlp=None, decoder=True))
    assert not any(info.values()) and layouts(model)


def test_enable_training_on_an_unapplied_kernel_config(ck, checkpoints, hub):
    """Before: "'str' object has no attribute 'items'"."""
    model = plain(checkpoints["llama"])
    for mapping in ({"RMSNorm": f"{hub}:RMSNorm"}, {"RMSNorm": {"cuda": f"{hub}:RMSNorm"}}):
        model.kernel_config = KernelConfig(mapping)
        with pytest.raises(ValueError, match=r"the model's KernelConfig was not applied \('RMSNorm' maps to .*"
                                             r"use_kernels=True, kernel_config=config"):
            ck.enable_training(model)


# --- finding 7: requirements -----------------------------------------------------------------------------------

def test_accelerate_is_required_for_the_readme_example():
    """The README's example loads with device_map=, which needs accelerate."""
    requirements = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^accelerate\b", requirements, re.M)
    readme = (ROOT / "README.md").read_text()
    assert "device_map=" in readme
    assert re.search(r"pip install [^\n]*\baccelerate\b", readme)
    import accelerate  # noqa: F401  (installed by ./dev from requirements.txt)


def test_readme_what_happens_when_table_quotes_the_errors():
    """The README's "What happens when" table quotes what the code raises (kept in step with the tests above)."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### What happens when"):]
    quoted = [
        "KernelConfig key 'RMSNorm' -> GemmaRMSNorm hits LlamaRMSNorm; GemmaRMSNorm computes Gemma3's x̂·(1+w) and "
        "replaces Gemma3RMSNorm only. For LlamaRMSNorm use {\"RMSNorm\": \"<repo>:RMSNorm\"}.",
        "Layer RMSNorm is not registered in the model",
        "found Gemma3DecoderLayer (post_attention_layernorm: Gemma3RMSNorm, mlp: Gemma3MLP): RMSNormMLP fuses the norm "
        "before the MLP of LlamaDecoderLayer, MistralDecoderLayer, Qwen2DecoderLayer, Qwen3DecoderLayer only.",
        "Olmo2DecoderLayer normalizes the output of attention and of the MLP (a post-norm layer), not the MLP's input.",
        "in LlamaDecoderLayer the norm before the MLP is post_attention_layernorm (LlamaMLP after it)",
        "the MLP is already replaced by SwiGLUMLP. SwiGLUMLP and RMSNormMLP both rewrite the MLP's weights",
        "KernelConfig key 'MLP' -> SwiGLUMLP hits Gemma3MLP",
        "this KernelConfig also asks for DecoderLayer, and both replace LlamaDecoderLayer",
        "KernelConfig key 'DecoderLayer' -> DecoderLayer hits Gemma3DecoderLayer; DecoderLayer is the decoder layer of "
        "Llama, Mistral, Qwen2 and Qwen3 only.",
        "SwiGLUMLP replaces one module, but a fusion (tuple) key handed it LlamaRMSNorm and LlamaMLP",
        "KernelConfig key '^LlamaAttention$' -> QKVAttention cannot load under tensor parallelism (tp_size=2)",
        "SwiGLUMLP cannot load a quantized model (quant_method=fp8): it builds gate_up_proj by concatenating "
        "checkpoint weights at load",
        "Drop the key from the KernelConfig under tp_plan",
        "KernelConfig key 'Attention' -> QKVAttention hits Olmo2Attention; QKVAttention merges the q, k and v "
        "projections of LlamaAttention, MistralAttention, Qwen2Attention, Qwen3Attention and Gemma3Attention only. "
        "This package has no layer for Olmo2Attention",
        "activation 'relu' is not supported (only ['gelu_pytorch_tanh', 'silu'])",
        "the last dimension of gate_up is 127; it must be even",
        "the weight has shape (32,), the input (4, 64); the weight must be (64,)",
        "this load builds SwiGLUMLPLayout in place of LlamaMLP although its KernelConfig does not ask for SwiGLUMLP",
        "the model's KernelConfig was not applied",
        "running the PyTorch reference because cuda.tile cannot be imported",
        "the GPU is sm_75 and cuTile needs sm_80 or newer",
        "dtype torch.float64 is not handled (only torch.bfloat16, torch.float16, torch.float32)",
        "the hidden size 20480 is wider than 16384",
    ]
    for text in quoted:
        assert text in table, text
