"""The decoder-layer kernels (DecoderLayer for Llama, Mistral, Qwen2, Qwen3; GemmaDecoderLayer for Gemma3): the
residual add and the norm after it as one add_rms_norm, delivered through KernelConfig by their Layouts.

Each family's own decoder layer against ours (Layout built by hand, the kernel forward bound as kernelize binds
it) inside the family's model on the same weights and inputs: padding masks, DynamicCache and StaticCache over a
prefill and decode steps, sliding windows (Mistral, Qwen2, Gemma3's local/global layers): logits and caches equal
exactly on CPU (fp32; the ops run their exact references), within bf16 tolerance on a GPU. Then whole models
through from_pretrained(use_kernels=True, kernel_config=...) with the other recommended keys, save_pretrained,
enable_training (and gradient checkpointing), torch.compile(fullgraph=True), hidden-state recording and the
refusals (the fused norm+MLP key beside a decoder key; a decoder key on the wrong family)."""
import copy
import importlib
import re
from types import MethodType

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

from devtools.checkpoints import ALL_FAMILIES, config_for, make_checkpoint, randomize_norms

from ._helpers import (DEVICES, IDS, check_layout_model, layouts, load, logits, no_fallback, plain, rel_err)

# the window (4) is shorter than the prompts, so sliding layers mask differently from full ones
SLIDING = {"mistral": dict(sliding_window=4),
           "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
           "gemma3": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])}
DECODER = {f: ("GemmaDecoderLayer" if f == "gemma3" else "DecoderLayer") for f in ALL_FAMILIES}


def fused(norm: str) -> tuple:
    return (("RMSNorm", f"model.layers.*.{norm}"), ("MLP", "model.layers.*.mlp"))


def decoder_mapping(ck, family: str, repo: str, **options) -> dict:
    return ck.recommended_mapping(family, repo, decoder=True, **options)


def plain_model(family: str, device: str, dtype, **overrides):
    config = config_for(family, **{**SLIDING.get(family, {}), **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_norms(model, torch.Generator().manual_seed(1))
    return model.to(device=device, dtype=dtype).eval()


def with_our_layers(ck, model):
    """A copy of `model` whose decoder layers are our Layouts (same weights) running the kernel forward, bound as
    kernels' kernelize binds it."""
    ours = copy.deepcopy(model)
    name = DECODER["gemma3" if model.config.model_type == "gemma3_text" else "llama"]
    layout_cls, kernel_cls = getattr(ck.decoder, f"{name}Layout"), getattr(ck.layers, name)
    for i, layer in enumerate(ours.model.layers):
        new = layout_cls(model.config, i).to(device=model.device, dtype=model.dtype)
        # the same children, from the same classes, under the same keys
        assert [(n, type(m)) for n, m in new.named_children()] == [(n, type(m)) for n, m in layer.named_children()]
        assert {k: v.shape for k, v in new.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}
        new.load_state_dict(layer.state_dict())
        new.forward = MethodType(kernel_cls.forward, new)
        ours.model.layers[i] = new
    return ours


def make_cache(kind: str, model, batch: int):
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    return StaticCache(config=model.config, max_cache_len=32)


def run_steps(model, ids, mask, cache):
    """Prefill of all but the last 3 tokens, then one decode step per token (the mask grows with the cache)."""
    out, prefill = [], ids.shape[1] - 3
    with torch.no_grad():
        for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]:
            result = model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=cache, use_cache=True,
                           cache_position=torch.arange(start, stop, device=ids.device))
            out.append(result.logits)
    return out


def cache_tensors(cache) -> list:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_decoder_layer_matches_transformers(device_ck, device, family, cache):
    """Left padding in one row, prefill + 3 decode steps: every step's logits and the cache contents equal
    transformers' (CPU fp32: exactly; GPU bf16: the cuTile add_rms_norm, no fallback, within bf16 tolerance)."""
    check_against_transformers(device_ck, device, family, cache)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_fused_attention_matches_transformers(device_ck, device, family):
    """The same with head_dim 64, which qk_norm_rope takes (the tiny configs' 16 keeps the attention module)."""
    check_against_transformers(device_ck, device, family, "static", head_dim=64)


def check_against_transformers(device_ck, device, family, cache, **overrides):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    reference = plain_model(family, device, dtype, **overrides)
    ours = with_our_layers(device_ck, reference)
    ids = torch.randint(0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    want_cache, got_cache = make_cache(cache, reference, 2), make_cache(cache, ours, 2)
    want = run_steps(reference, ids, mask, want_cache)
    with no_fallback(device_ck, on=device == "cuda"):
        got = run_steps(ours, ids, mask, got_cache)
    pairs = list(zip(got, want)) + list(zip(cache_tensors(got_cache), cache_tensors(want_cache)))
    for g, w in pairs:
        if device == "cpu":
            assert torch.equal(g, w)
        else:
            assert rel_err(g.float(), w.float()) < 2e-2


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_window_is_in_effect(ck, family):
    """The parity above covers sliding windows only if they change the result: a copy with the window removed
    differs (so our layers pass the sliding masks through)."""
    reference = plain_model(family, "cpu", torch.float32)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    wide = copy.deepcopy(reference)
    wide.config.sliding_window = 64
    for layer in wide.model.layers:
        if getattr(layer.self_attn, "sliding_window", None):
            layer.self_attn.sliding_window = 64
    assert not torch.equal(logits(with_our_layers(ck, reference), ids), logits(with_our_layers(ck, wide), ids))
    assert torch.equal(logits(with_our_layers(ck, reference), ids), logits(reference, ids))


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_attention_norms_and_rope_are_one_op(ck, monkeypatch, family):
    """Qwen3's and Gemma3's layers run their attention through qk_norm_rope (once per layer and forward; the
    parity above covers its result); with a forward hook on an attention module (output recorders, TP) that
    layer calls the module itself, and the hook sees it; a head_dim the kernel does not take (the other tests'
    16) keeps the module."""
    assert ck.decoder._fused_norm_form(plain_model(family, "cpu", torch.float32).model.layers[0].self_attn,
                                       torch.ones(1), (torch.ones(1), torch.ones(1))) is None
    reference = plain_model(family, "cpu", torch.float32, head_dim=32)
    ours = with_our_layers(ck, reference)
    calls = []

    def counted(*args):  # on CPU the op runs its reference: count those calls (args[-1]: the Gemma form)
        calls.append(args[-1])
        return ck.rope.qk_norm_rope_reference(*args)

    monkeypatch.setattr(ck.rope.QK_NORM_ROPE, "reference", counted)
    want = logits(reference)
    assert torch.equal(logits(ours), want)
    assert calls == [family == "gemma3"] * len(ours.model.layers)
    calls.clear()
    hooked = []
    ours.model.layers[0].self_attn.register_forward_hook(lambda *_: hooked.append(True))
    assert torch.equal(logits(ours), want)
    assert hooked == [True] and len(calls) == len(ours.model.layers) - 1


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_layers_run_their_attention_with_the_growing_cache(ck, monkeypatch, family):
    """The layers run their attention's forward themselves (head_dim 32: Qwen3 through qk_norm_rope), so greedy
    generate keeps each full-attention layer's DynamicCache in append_kv's buffers, with plain transformers' tokens
    and logits (Qwen2's sliding layer: torch.cat); a forward hook on the last attention module makes that layer call
    the module (the hook runs once per step, and that layer's cache grows by torch.cat as in plain transformers)."""
    monkeypatch.setattr(ck.attention, "KV_MIN_LENGTH", 0)  # the tiny prompts are short
    reference = plain_model(family, "cpu", torch.float32, **({"head_dim": 32} if family == "qwen3" else {}))
    ours = with_our_layers(ck, reference)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                   return_dict_in_generate=True)
    hooked = []
    ours.model.layers[-1].self_attn.register_forward_hook(lambda *_: hooked.append(True))
    want, got = reference.generate(ids, **options), ours.generate(ids, **options)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))
    assert len(hooked) == 6
    full = [type(layer).__name__ == "DynamicLayer" for layer in got.past_key_values.layers]
    grown = ["_cutile_kv" in vars(layer) for layer in got.past_key_values.layers]
    assert full[:-1] == grown[:-1] and any(grown) and not grown[-1]


# per family: a norm child the decoder kernel's fused op stands in for, and that op (its reference runs on CPU)
BYPASSED = {"llama": ("post_attention_layernorm", "rms_norm", "ADD_RMS_NORM"),
            "qwen3": ("self_attn.q_norm", "rope", "QK_NORM_ROPE"),
            "gemma3": ("pre_feedforward_layernorm", "rms_norm", "SANDWICH_RMS_NORM")}


def counting_fused_op(ck, monkeypatch, family: str) -> list:
    """Record each call of the family's fused op in BYPASSED (on CPU the op runs its reference)."""
    _, module, op_name = BYPASSED[family]
    op = getattr(importlib.import_module(f"{ck.__name__}.{module}"), op_name)
    calls = []
    monkeypatch.setattr(op, "reference", lambda *a, f=op.reference: calls.append(1) or f(*a))
    return calls


@pytest.mark.parametrize("family", sorted(BYPASSED))
def test_hooks_on_a_fused_norm_still_run(ck, monkeypatch, family):
    """A forward hook on a norm whose work a decoder kernel does in a fused op (an activation probe, ZeRO-3's
    parameter gathering) runs, and sees what it sees in plain transformers: that layer calls its modules; the
    other layers keep the fused op. Before, the hook was skipped without a word. The same for a backward hook."""
    name = BYPASSED[family][0]
    reference = plain_model(family, "cpu", torch.float32, **({"head_dim": 32} if family == "qwen3" else {}))
    ours = with_our_layers(ck, reference)
    calls = counting_fused_op(ck, monkeypatch, family)
    seen = {}
    for label, model in (("plain", reference), ("ours", ours)):
        model.model.layers[0].get_submodule(name).register_forward_hook(
            lambda m, args, out, label=label: seen.setdefault(label, []).append(out))
    assert torch.equal(logits(ours), logits(reference))
    assert len(seen["ours"]) == len(seen["plain"]) == 1 and torch.equal(seen["ours"][0], seen["plain"][0])
    assert len(calls) == len(ours.model.layers) - 1
    grads = {}  # a full backward hook alone, on a fresh copy, also makes that layer call the norm
    for label, model in (("plain", reference), ("ours", with_our_layers(ck, reference))):
        model.model.layers[0].get_submodule(name).register_full_backward_hook(
            lambda m, grad_in, grad_out, label=label: grads.setdefault(label, []).append(grad_out[0]))
        model(IDS).logits.square().sum().backward()
    assert len(grads["ours"]) == len(grads["plain"]) == 1
    assert torch.allclose(grads["ours"][0], grads["plain"][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_attentions_are_recorded_through_the_fused_attention(ck, family):
    """output_attentions (eager attention) through layers whose attention the decoder kernel runs itself: the
    recorder's hooks on the attention modules make each layer call its module, so the weights equal plain's."""
    reference = plain_model(family, "cpu", torch.float32, head_dim=32)
    reference.config._attn_implementation = "eager"
    ours = with_our_layers(ck, reference)
    with torch.no_grad():
        want, got = (m(IDS, output_attentions=True).attentions for m in (reference, ours))
    assert len(got) == len(want) == len(reference.model.layers)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_fused_attention_passes_the_attention_function_what_the_module_passes(ck, family):
    """The attention function (here a registered one that records its keyword arguments, then runs sdpa) sees
    the same arguments from our layer's fused attention as from the attention module's own forward
    (position_ids included: flash attention reads it for packed sequences)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append({k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)} | {
            k: v.shape for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("cutile_test_recording", recording)
    reference = plain_model(family, "cpu", torch.float32, head_dim=32)
    ours = with_our_layers(ck, reference)
    for model in (reference, ours):
        model.config._attn_implementation = "cutile_test_recording"
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    want = logits(reference, ids)
    from_module, seen[:] = list(seen), []
    assert torch.equal(logits(ours, ids), want)
    assert seen == from_module and "position_ids" in seen[0]


def test_fused_attention_compiles_with_fullgraph(ck, monkeypatch):
    """Qwen3's and Gemma3's layers through qk_norm_rope (head_dim 64) compile with fullgraph=True (a graph break
    raises: the hook checks and the op are traceable), run the op once per layer and equal the eager forward."""
    calls = []

    def counted(*args):  # the custom op's body on CPU: its reference
        calls.append(args[-1])
        return ck.rope.qk_norm_rope_reference(*args)

    monkeypatch.setattr(ck.rope.QK_NORM_ROPE, "reference", counted)
    for family in ("qwen3", "gemma3"):
        reference = plain_model(family, "cpu", torch.float32, head_dim=64)
        ours = with_our_layers(ck, reference)
        ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(5))
        torch._dynamo.reset()
        with torch.no_grad():
            want = logits(ours, ids)
            calls.clear()
            got = torch.compile(ours, backend="aot_eager", fullgraph=True)(ids).logits
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), family
        assert len(calls) == len(ours.model.layers), family


def test_layout_reference_forward_is_transformers(ck):
    """The Layouts' own forward (training without enable_training, kernels' fallbacks) is transformers'."""
    for family in ("qwen3", "gemma3"):
        reference = plain_model(family, "cpu", torch.float32)
        ours = with_our_layers(ck, reference)
        for layer in ours.model.layers:
            del layer.forward  # back to the class's forward
        assert torch.equal(logits(ours), logits(reference))


# --- through KernelConfig ---------------------------------------------------------------------------------------

CASES = [pytest.param(family, case) for family in ALL_FAMILIES for case in ("decoder", "recommended")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family,case", CASES)
def test_kernel_config(ck_hub, checkpoints, hub, cpu_kernel_config, tmp_path, device, family, case):
    """The decoder key alone, and with every other recommended key (norms, merged MLP, RoPE): no missing or
    unexpected key, kernel forwards bound on every Layout (decoder layers, merged MLPs, Gemma3 norms), exact logits
    on CPU (bf16 tolerance on a GPU), save_pretrained writes the original keys, plain transformers reloads them."""
    # on a GPU the tiny checkpoints' head_dim 16 is below what the RoPE kernel takes (it would fall back):
    # RoPE with the decoder layers on a GPU is test_whole_model_with_every_kernel_on_gpu
    options = dict(norm=False, mlp=None, rope=False) if case == "decoder" else dict(rope=device == "cpu")
    mapping = decoder_mapping(ck_hub, family, hub, **options)
    check_layout_model(ck_hub, checkpoints[family], mapping, device, tmp_path)
    if device == "cpu":
        model, _ = load(checkpoints[family], mapping)
        layers = model.model.layers
        assert all(type(m).__name__ == f"{DECODER[family]}Layout" for m in layers)
        assert all(m.forward.__func__ is getattr(ck_hub.layers, DECODER[family]).forward for m in layers)
        if case == "recommended":  # the other kernels still reach the children
            norm = layers[0].input_layernorm
            want = ck_hub.layers.GemmaRMSNorm if family == "gemma3" else ck_hub.layers.RMSNorm
            assert norm.forward.__func__ is want.forward
            if family != "gemma3":
                assert layers[0].mlp.forward.__func__ is ck_hub.layers.SwiGLUMLP.forward


def test_a_forward_wrapper_makes_the_layer_call_the_module(ck):
    """stands_in: a forward bound on the instance that is the class's own or one of our kernels (what kernelize
    binds) lets a fused op stand in; any other (transformers' TP styles, accelerate) must be called."""
    norm = plain_model("llama", "cpu", torch.float32).model.layers[0].post_attention_layernorm
    x = torch.ones(2, norm.weight.shape[0])
    assert ck.attention.stands_in(x, norm)
    norm.forward = MethodType(type(norm).forward, norm)
    assert ck.attention.stands_in(x, norm)
    norm.forward = MethodType(ck.layers.RMSNorm.forward, norm)
    assert ck.attention.stands_in(x, norm)
    wrapped = norm.forward
    norm.forward = lambda *args, **kwargs: wrapped(*args, **kwargs)  # as ReplicatedWithGradAllReduce wraps it
    assert not ck.attention.stands_in(x, norm)


@pytest.mark.parametrize("family", sorted(BYPASSED))
def test_fused_ops_run_after_a_kernel_config_load(ck_hub, hub, cpu_kernel_config, tmp_path, monkeypatch, family):
    """Through from_pretrained with every recommended key (kernelize binds each norm's forward on the instance)
    every layer runs its fused op: the checks that make a layer call its modules instead (hooks, forward wrappers
    such as accelerate's or transformers' TP styles) stay quiet on a plain kernel load. head_dim 32: qk_norm_rope's."""
    path = make_checkpoint(family, tmp_path / "ckpt", head_dim=32)
    model, _ = load(path, decoder_mapping(ck_hub, family, hub))
    calls = counting_fused_op(ck_hub, monkeypatch, family)
    logits(model)
    assert len(calls) == len(model.model.layers)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_offloaded_by_accelerate(ck_hub, checkpoints, hub, cpu_kernel_config, tmp_path, family):
    """device_map="auto" with too little memory for the model: accelerate offloads parts of layers to disk (their
    weights on meta until their hooks run) and places children of one decoder layer apart. The kernel forwards read
    a child's weights only where they are in place, else call the modules (transformers' forward), so the logits
    equal plain transformers'; before, the fused norms read an offloaded norm's meta weight and failed."""
    from transformers import KernelConfig

    want = logits(plain(checkpoints[family]))
    model = AutoModelForCausalLM.from_pretrained(
        checkpoints[family], device_map="auto", max_memory={"cpu": "300KB"}, offload_folder=str(tmp_path),
        use_kernels=True, kernel_config=KernelConfig(decoder_mapping(ck_hub, family, hub, qkv=True)))
    assert "disk" in set(model.hf_device_map.values()) and any(p.is_meta for p in model.parameters())
    assert all(type(m).__name__ == f"{DECODER[family]}Layout" for m in model.model.layers)
    assert torch.equal(logits(model), want)


def test_recommended_mapping_with_decoder(ck):
    """decoder=True adds the anchored decoder key and trades the fusion key (which would shadow it) for the
    merged MLP (Gemma3: its own MLP); the default stays without the decoder layer."""
    assert not any("DecoderLayer" in str(k) for k in ck.recommended_mapping("llama", "r"))
    llama = ck.recommended_mapping("llama", "r", decoder=True)
    assert llama == {"RMSNorm": "r:RMSNorm", "^LlamaDecoderLayer$": "r:DecoderLayer", "^LlamaMLP$": "r:SwiGLUMLP",
                     "rotary_pos_emb": "r:ApplyRotaryPosEmb"}
    gemma = ck.recommended_mapping("gemma3", "r", decoder=True)
    assert gemma == {"^Gemma3RMSNorm$": "r:GemmaRMSNorm", "^Gemma3DecoderLayer$": "r:GemmaDecoderLayer",
                     "rotary_pos_emb": "r:ApplyRotaryPosEmb"}
    assert ck.recommended_mapping("qwen2", "r", decoder=True, mlp=None, norm=False, rope=False) == {
        "^Qwen2DecoderLayer$": "r:DecoderLayer"}


def test_hidden_states_recorded_for_ours_and_later_plain_models(checkpoints, hub, ck_hub, cpu_kernel_config):
    """transformers records hidden states by isinstance of the decoder-layer class, and its load points the
    recorder at our Layout: the package's cleanup keeps the Layout beside the original class, so the kernel
    model and a later plain model (no guard between them) both return every layer's hidden state."""
    for family in ("llama", "gemma3"):
        path = checkpoints[family]
        model, _ = load(path, decoder_mapping(ck_hub, family, hub, rope=False))
        later, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        assert not any(info.values()) and not layouts(later)
        reference = plain(path)
        with torch.no_grad():
            got = model(IDS, output_hidden_states=True).hidden_states
            after = later(IDS, output_hidden_states=True).hidden_states
            want = reference(IDS, output_hidden_states=True).hidden_states
        assert len(got) == len(after) == len(want) == model.config.num_hidden_layers + 1
        assert all(torch.equal(g, w) and torch.equal(a, w) for g, a, w in zip(got, after, want))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_enable_training(checkpoints, hub, ck_hub, cpu_kernel_config, family):
    """After enable_training, model.train() keeps the kernel forward (add_rms_norm's registered backward); loss
    and every gradient equal the plain model's, also with gradient checkpointing (our Layout is a
    GradientCheckpointingLayer like transformers' decoder layers)."""
    path = checkpoints[family]
    for checkpointing in (False, True):
        reference = plain(path)
        model, _ = load(path, decoder_mapping(ck_hub, family, hub, norm=False, mlp=None, rope=False))
        ck_hub.enable_training(model, loss=False)  # the layers alone: transformers' loss, so the loss is equal
        for m in (model, reference):
            if checkpointing:
                m.gradient_checkpointing_enable()
            m.train()
        kernel_forward = getattr(ck_hub.layers, DECODER[family]).forward
        assert all(layer.forward.__func__ is kernel_forward for layer in model.model.layers)
        out, ref = model(IDS, labels=IDS), reference(IDS, labels=IDS)
        out.loss.backward()
        ref.loss.backward()
        assert torch.equal(out.loss, ref.loss)
        want = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.allclose(p.grad, want[name].grad, rtol=1e-5, atol=1e-7), name


def test_torch_compile_fullgraph(checkpoints, hub, ck_hub, cpu_kernel_config):
    """kernelize in TORCH_COMPILE mode keeps the decoder kernel (can_torch_compile=True); a model forward
    compiles with fullgraph=True (a graph break raises) and equals the eager one."""
    from kernels import LayerRepository, Mode, kernelize, use_kernel_mapping

    for family in ("qwen3", "gemma3"):
        mapping = decoder_mapping(ck_hub, family, hub)
        model, _ = load(checkpoints[family], mapping)
        layers = {"DecoderLayer", "GemmaDecoderLayer", "RMSNorm", "GemmaRMSNorm", "SwiGLUMLP"}
        repos = {name: {"cpu": LayerRepository(hub, layer_name=name, version=1)} for name in layers}
        repos["rotary_pos_emb"] = {"cpu": LayerRepository(hub, layer_name="ApplyRotaryPosEmb", version=1)}
        with use_kernel_mapping(repos, inherit_mapping=False):
            kernelize(model, mode=Mode.INFERENCE | Mode.TORCH_COMPILE, device="cpu")
        kernel_forward = getattr(ck_hub.layers, DECODER[family]).forward
        assert all(layer.forward.__func__ is kernel_forward for layer in model.model.layers)
        ids = torch.randint(0, 256, (1, 11))
        torch._dynamo.reset()
        with torch.no_grad():
            want = model(ids).logits
            explanation = torch._dynamo.explain(model)(ids)
            got = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits
        assert explanation.graph_break_count == 0, [str(r)[:300] for r in explanation.break_reasons]
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


# --- refusals -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_decoder_with_the_fused_key_is_refused(checkpoints, hub, ck_hub, cpu_kernel_config, family):
    """transformers builds the fusion's Fused<Family>DecoderLayer under the decoder layer's exact class name, which
    wins over the decoder key's regex: the decoder layer would never run. The fused Layout refuses the pair,
    naming what to use instead, and leaves the process clean."""
    norm = "pre_feedforward_layernorm" if family == "gemma3" else "post_attention_layernorm"
    kernel = "GemmaRMSNormMLP" if family == "gemma3" else "RMSNormMLP"
    mapping = {**decoder_mapping(ck_hub, family, hub, norm=False, mlp=None, rope=False),
               fused(norm): f"{hub}:{kernel}"}
    with pytest.raises(ValueError) as e:
        load(checkpoints[family], mapping)
    message = str(e.value)
    assert f"this KernelConfig also asks for {DECODER[family]}" in message, message
    if family == "llama":
        assert '{"^LlamaMLP$": "' + hub + ':SwiGLUMLP"}' in message, message
    else:
        assert "keep Gemma3MLP" in message, message
    later, info = AutoModelForCausalLM.from_pretrained(checkpoints[family], output_loading_info=True)
    assert not any(info.values()) and not layouts(later)


@pytest.mark.parametrize("family,key,layer,found,right", [
    ("llama", "^LlamaDecoderLayer$", "GemmaDecoderLayer", "LlamaDecoderLayer", ("^LlamaDecoderLayer$", "DecoderLayer")),
    ("gemma3", "DecoderLayer", "DecoderLayer", "Gemma3DecoderLayer", ("^Gemma3DecoderLayer$", "GemmaDecoderLayer")),
])
def test_decoder_key_on_the_wrong_family_is_refused(checkpoints, hub, cpu_kernel_config, family, key, layer, found,
                                                    right):
    with pytest.raises(ValueError) as e:
        load(checkpoints[family], {key: f"{hub}:{layer}"})
    message = str(e.value)
    assert f"KernelConfig key {key!r} -> {layer} hits {found}" in message, message
    assert re.search(re.escape(f'{{"{right[0]}": "{hub}:{right[1]}"}}'), message), message
    later, info = AutoModelForCausalLM.from_pretrained(checkpoints[family], output_loading_info=True)
    assert not any(info.values()) and not layouts(later)


@pytest.mark.gpu
def test_whole_model_with_every_kernel_on_gpu(wide_checkpoints, hub, ck_hub):
    """head_dim 64: every kernel, RoPE included, takes its cuTile path; the decoder key with all the others."""
    from ._helpers import assert_gpu_parity

    for family in ("llama", "gemma3"):
        model = assert_gpu_parity(ck_hub, wide_checkpoints[family], decoder_mapping(ck_hub, family, hub))
        assert all(type(m).__name__ == f"{DECODER[family]}Layout" for m in model.model.layers)


class AddmmCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.addmm.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mlp", [None, "merged"])
def test_residual_in_down_proj_switch(checkpoints, hub, ck_hub, cpu_kernel_config, monkeypatch, mlp):
    """The measurement switch: each Llama-form layer adds its residual inside one more addmm (the down_proj GEMM),
    for transformers' MLP and the merged SwiGLUMLP; the logits stay within float32 rounding of transformers'."""
    path = checkpoints["llama"]
    want = logits(plain(path))
    model, _ = load(path, decoder_mapping(ck_hub, "llama", hub, norm=False, mlp=mlp, rope=False))
    counts = {}
    for switch in (False, True):
        monkeypatch.setattr(ck_hub.decoder, "RESIDUAL_IN_DOWN_PROJ", switch)
        with AddmmCalls() as calls:
            got = logits(model)
        counts[switch] = calls.count
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got, want) or switch
    assert counts[True] - counts[False] == model.config.num_hidden_layers, counts
