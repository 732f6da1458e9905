"""QKVAttention: q_proj, k_proj and v_proj as one qkv_proj GEMM in place of LlamaAttention, MistralAttention,
Qwen2Attention, Qwen3Attention and Gemma3Attention, delivered through KernelConfig by QKVAttentionLayout.

Each family's own attention against the Layout (built by hand on the same weights) running its reference forward
or the kernel forward (bound as kernelize binds it), inside the family's model: left padding, a prefill and decode
steps on DynamicCache and StaticCache, sliding windows (Mistral, Qwen2, Qwen3, Gemma3's local layers): logits and
caches equal exactly on CPU (fp32; the ops run their exact references). Then whole models through
from_pretrained(use_kernels=True, kernel_config=...) with the recommended key (alone, with the other keys, with the
decoder layer), save_pretrained writing the original unequal q/k/v keys, torch.compile(fullgraph=True), the
recorded attentions, and the refusals (a wrong class, tensor parallelism)."""
import copy
import re
from pathlib import Path
from types import MethodType

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, KernelConfig, StaticCache
from transformers.cache_utils import DynamicLayer

from devtools.checkpoints import ALL_FAMILIES, config_for, make_checkpoint, randomize_norms

from ._helpers import (IDS, assert_compiles_like_eager, assert_gpu_parity, check_layout_model, layouts, load,
                       logits, plain, rel_err)
from .test_tp import WORLD, _distributed_unavailable, _init, _report, _reports, _spawn

# the window (4) is shorter than the prompts, so sliding layers mask differently from full ones
SLIDING = {"mistral": dict(sliding_window=4),
           "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
           "qwen3": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
           "gemma3": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])}
ATTENTION = {"llama": "LlamaAttention", "mistral": "MistralAttention", "qwen2": "Qwen2Attention",
             "qwen3": "Qwen3Attention", "gemma3": "Gemma3Attention"}


def qkv_mapping(ck, family: str, repo: str, **options) -> dict:
    """The QKVAttention key alone (options: the other keys of recommended_mapping)."""
    return ck.recommended_mapping(family, repo, **{**dict(norm=False, mlp=None, rope=False), **options}, qkv=True)


def plain_model(family: str, **overrides):
    config = config_for(family, **{**SLIDING.get(family, {}), **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_norms(model, torch.Generator().manual_seed(1))
    with torch.no_grad():  # biases start at zero: random ones make a wrong bias split visible
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model.eval()


def merged_state(attn) -> dict:
    """The family attention's weights under the Layout's names: [q | k | v] concatenated, the rest unchanged."""
    state = {k: v for k, v in attn.state_dict().items() if not re.match(r"[qkv]_proj\.", k)}
    for p in ("weight", "bias"):
        if getattr(attn.q_proj, p) is not None:
            state[f"qkv_proj.{p}"] = torch.cat([getattr(getattr(attn, f"{x}_proj"), p) for x in "qkv"])
    return state


def with_our_attention(ck, model, kernel: bool):
    """A copy of `model` whose attention modules are QKVAttentionLayouts (same weights) running the reference
    forward, or (kernel) the kernel forward bound as kernelize binds it."""
    ours = copy.deepcopy(model)
    for i, layer in enumerate(ours.model.layers):
        new = ck.attention.QKVAttentionLayout(model.config, i)
        assert new.attention_class == type(layer.self_attn).__name__
        new.load_state_dict(merged_state(layer.self_attn))
        for name in ("head_dim", "num_key_value_groups", "scaling", "attention_dropout", "is_causal", "layer_idx",
                     "sliding_window", "attn_logit_softcapping", "is_sliding", "layer_type"):
            assert getattr(new, name, None) == getattr(layer.self_attn, name, None), name
        if kernel:
            new.forward = MethodType(ck.layers.QKVAttention.forward, new)
        layer.self_attn = new
    return ours


def make_cache(kind: str, model):
    return DynamicCache(config=model.config) if kind == "dynamic" else StaticCache(config=model.config,
                                                                                      max_cache_len=32)


def run_steps(model, ids, mask, cache):
    """Prefill of all but the last 3 tokens, then one decode step per token (the mask grows with the cache)."""
    out, prefill = [], ids.shape[1] - 3
    with torch.no_grad():
        for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]:
            result = model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=cache, use_cache=True,
                           cache_position=torch.arange(start, stop))
            out.append(result.logits)
    return out


def cache_tensors(cache) -> list:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("forward", ["layout", "kernel"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_attention_matches_transformers(ck, family, cache, forward):
    """Left padding in one row, prefill + 3 decode steps: every step's logits and the caches equal the family's
    own attention exactly (CPU fp32). The tiny configs are GQA (4 q heads, 2 kv heads) and, where the family has
    them, slide a window of 4 over 12 tokens on some layers; Qwen2's q/k/v biases are random."""
    reference = plain_model(family)
    assert reference.config.num_key_value_heads < reference.config.num_attention_heads
    if family in SLIDING:
        windows = [getattr(layer.self_attn, "sliding_window", reference.config.sliding_window)
                   for layer in reference.model.layers]
        assert 4 in windows
    ours = with_our_attention(ck, reference, kernel=forward == "kernel")
    ids = torch.randint(0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    want_cache, got_cache = make_cache(cache, reference), make_cache(cache, ours)
    want = run_steps(reference, ids, mask, want_cache)
    got = run_steps(ours, ids, mask, got_cache)
    for g, w in list(zip(got, want)) + list(zip(cache_tensors(got_cache), cache_tensors(want_cache))):
        assert torch.equal(g, w)


def kv(generator, length: int, batch: int = 2):
    """Random keys and values of `length` positions: (B, 2 kv heads, S, 8), and the keys as a transposed view (as
    the attention hands them over)."""
    keys = torch.randn(batch, length, 2, 8, generator=generator).transpose(1, 2)
    return keys, torch.randn(batch, 2, length, 8, generator=generator)


@torch.no_grad()
def test_append_kv_stores_what_dynamic_cache_update_stores(ck, monkeypatch):
    """append_kv against DynamicCache.update over 600 decode steps after a prefill (as generate runs: no_grad), with
    a crop, a beam-search reorder, a batch selection and repeat, a deep copy and a reset in between: after every
    step the returned and stored keys and values equal the reference's, every tensor returned earlier keeps its
    values (none is written twice), and the buffers grow once per 16 steps at most (an eighth of the length at
    least 16), not per step."""
    from transformers import AutoConfig

    attention = ck.attention
    monkeypatch.setattr(attention, "KV_MIN_LENGTH", 0)  # every layer length (the threshold's test is below)
    config = AutoConfig.for_model("llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  hidden_size=32, head_dim=8)
    g = torch.Generator().manual_seed(0)
    want, got = DynamicCache(config=config), DynamicCache(config=config)
    returned, buffers = [], set()

    def step(length: int, layer: int = 1):
        k, v = kv(g, length, batch=got.layers[layer].keys.shape[0] if got.layers[layer].is_initialized else 2)
        w, o = want.update(k, v, layer), attention.append_kv(got, k, v, layer)
        for a, b in zip(o + (got.layers[layer].keys, got.layers[layer].values), w * 2):
            assert torch.equal(a, b)
        returned.append((o[0], o[0].clone()))
        buffers.add(got.layers[layer]._cutile_kv[0].data_ptr())

    step(7)
    for _ in range(600):
        step(1)
    assert len(buffers) <= 607 // attention.KV_MIN_SPARE + 1
    for cache in (want, got):
        cache.crop(-5)
    step(1)
    beams = torch.tensor([1, 0])
    for cache in (want, got):
        cache.reorder_cache(beams)
    step(1)
    for cache in (want, got):
        cache.batch_repeat_interleave(2)
    step(1)
    for cache in (want, got):
        cache.batch_select_indices(torch.tensor([0, 3]))
    step(2)
    copied = copy.deepcopy(got)  # a copy grows apart from its original
    k, v = kv(g, 1, batch=2)
    w = want.update(k, v, 1)
    for cache in (copied, got):
        assert all(torch.equal(a, b) for a, b in zip(attention.append_kv(cache, k, v, 1), w))
    step(1)
    assert torch.equal(copied.layers[1].keys, w[0]) and torch.equal(copied.layers[1].values, w[1])
    for cache in (want, got):
        cache.reset()
    step(3)
    step(1)
    for tensor, values in returned:
        assert torch.equal(tensor, values)
    assert not got.layers[0].is_initialized and len(want.layers[1].keys[0, 0]) == 4


def test_append_kv_after_inference_mode(ck, monkeypatch):
    """A prefill under torch.inference_mode and decode steps under no_grad (buffers made in inference mode cannot
    be written outside it): the steps take new buffers and store what DynamicCache.update stores."""
    from transformers import AutoConfig

    attention = ck.attention
    monkeypatch.setattr(attention, "KV_MIN_LENGTH", 0)
    config = AutoConfig.for_model("llama", num_hidden_layers=1)
    g = torch.Generator().manual_seed(0)
    want, got = DynamicCache(config=config), DynamicCache(config=config)
    with torch.inference_mode():
        k, v = kv(g, 5)
        want.update(k, v, 0)
        attention.append_kv(got, k, v, 0)
        assert got.layers[0]._cutile_kv[0].is_inference()
    with torch.no_grad():
        for _ in range(3):
            k, v = kv(g, 1)
            for a, b in zip(attention.append_kv(got, k, v, 0), want.update(k, v, 0)):
                assert torch.equal(a, b)
    assert not got.layers[0]._cutile_kv[0].is_inference()


def test_append_kv_leaves_other_caches_to_their_update(ck, monkeypatch):
    """A sliding-window layer past its window, a static cache, grad mode (and, first, a cache without the layer
    yet): cache.update stores them as before, nothing of append_kv's on the layer; an offloading cache is not
    taken."""
    from transformers import AutoConfig

    attention = ck.attention
    monkeypatch.setattr(attention, "KV_MIN_LENGTH", 0)
    config = AutoConfig.for_model("mistral", num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                  hidden_size=32, head_dim=8, sliding_window=4)
    g = torch.Generator().manual_seed(0)
    cases = {"sliding": (DynamicCache(config=config), False),
             "static": (StaticCache(config=config, max_cache_len=16), False), "grad": (DynamicCache(), True)}
    for name, (cache, grad) in cases.items():
        reference = copy.deepcopy(cache)
        for length in (5, 1, 1):
            k, v = kv(g, length)
            with torch.set_grad_enabled(grad):
                got, want = attention.append_kv(cache, k.requires_grad_(grad), v, 0), reference.update(k, v, 0)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), name
        assert all("_cutile_kv" not in vars(layer) for layer in cache.layers), name
    offloading = DynamicCache(config=AutoConfig.for_model("llama", num_hidden_layers=1), offloading=True)
    with torch.no_grad():
        assert attention._growable_layer(offloading, 0, *kv(g, 1)) is None
        offloading.offloading = False
        assert attention._growable_layer(offloading, 0, *kv(g, 1)) is offloading.layers[0]


@torch.no_grad()
def test_append_kv_grows_a_sliding_layer_up_to_its_window(ck, monkeypatch):
    """A sliding-window layer (window 12) in buffers while it holds fewer than 11 tokens, then by its own update,
    which keeps the last 11: at every step the returned and stored tensors, the sequence length and the mask sizes
    equal DynamicCache.update's; a layer recording its past (assisted decoding) stays on update."""
    from transformers import AutoConfig

    attention = ck.attention
    monkeypatch.setattr(attention, "KV_MIN_LENGTH", 0)
    config = AutoConfig.for_model("mistral", num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                  hidden_size=32, head_dim=8, sliding_window=12)
    g = torch.Generator().manual_seed(0)
    want, got = DynamicCache(config=config), DynamicCache(config=config)
    assert type(got.layers[0]).__name__ == "DynamicSlidingWindowLayer"
    grown = []
    for length in (5,) + (1,) * 10:
        k, v = kv(g, length)
        w, o = want.update(k, v, 0), attention.append_kv(got, k, v, 0)
        for a, b in zip(o + (got.layers[0].keys, got.layers[0].values), w + (want.layers[0].keys,
                                                                          want.layers[0].values)):
            assert torch.equal(a, b)
        assert got.get_seq_length() == want.get_seq_length()
        assert got.layers[0].get_mask_sizes(1) == want.layers[0].get_mask_sizes(1)
        grown.append("_cutile_kv" in vars(got.layers[0]))
    assert grown == [True] * 7 + [False] * 4
    recording = DynamicCache(config=config)
    recording.layers[0].activate_past_recording()
    attention.append_kv(recording, *kv(g, 5), 0)
    assert "_cutile_kv" not in vars(recording.layers[0])


@torch.no_grad()
def test_append_kv_keeps_torch_cat_for_short_caches(ck, monkeypatch):
    """Below KV_MIN_LENGTH tokens a layer grows by torch.cat (update); the step that reaches it moves the layer into
    buffers, which later steps grow in place; a prefill that long starts in them; after a reset a short prompt goes
    back to torch.cat and the buffers are freed. Values as update's throughout."""
    from transformers import AutoConfig

    attention = ck.attention
    monkeypatch.setattr(attention, "KV_MIN_LENGTH", 8)
    config = AutoConfig.for_model("llama", num_hidden_layers=1)
    g = torch.Generator().manual_seed(0)
    for prefill, grown in ((5, [False, False, False, True, True, True]), (9, [True] * 6)):
        want, got = DynamicCache(config=config), DynamicCache(config=config)
        seen = []
        for length in (prefill, 1, 1, 1, 1, 1):
            k, v = kv(g, length)
            assert all(torch.equal(a, b) for a, b in zip(attention.append_kv(got, k, v, 0), want.update(k, v, 0)))
            seen.append("_cutile_kv" in vars(got.layers[0]))
        assert seen == grown, prefill
    for cache in (want, got):  # a reset, then a short prompt: torch.cat again, the old buffers let go
        cache.reset()
    k, v = kv(g, 3)
    assert all(torch.equal(a, b) for a, b in zip(attention.append_kv(got, k, v, 0), want.update(k, v, 0)))
    assert "_cutile_kv" not in vars(got.layers[0])


def counting_qk_norm_rope(ck, monkeypatch) -> list:
    """Record each qk_norm_rope call (on CPU the op runs its reference; the entry: the Gemma form)."""
    calls = []

    def counted(*args):
        calls.append(args[-1])
        return ck.rope.qk_norm_rope_reference(*args)

    monkeypatch.setattr(ck.rope.QK_NORM_ROPE, "reference", counted)
    return calls


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_kernel_runs_norms_and_rope_as_one_op(ck, monkeypatch, family):
    """With a head_dim the kernel takes (64), Qwen3's and Gemma3's q_norm, k_norm and RoPE run as one qk_norm_rope
    per layer inside QKVAttention, logits still exact; a layer whose k_norm has a forward hook calls its norms (the
    hook runs); head_dim 16 (the other tests) keeps the norm modules."""
    calls = counting_qk_norm_rope(ck, monkeypatch)
    reference = plain_model(family, head_dim=64)
    want = logits(reference)
    ours = with_our_attention(ck, reference, kernel=True)
    assert torch.equal(logits(ours), want)
    assert calls == [family == "gemma3"] * len(reference.model.layers)
    calls.clear()
    hooked = []
    ours.model.layers[0].self_attn.k_norm.register_forward_hook(lambda *_: hooked.append(True))
    assert torch.equal(logits(ours), want)
    assert hooked == [True] and len(calls) == len(reference.model.layers) - 1
    calls.clear()
    assert torch.equal(logits(with_our_attention(ck, reference, kernel=False)), want)  # the family's own modules
    small = plain_model(family)
    assert torch.equal(logits(with_our_attention(ck, small, kernel=True)), logits(small))
    assert calls == []


@pytest.mark.parametrize("case", ["qkv", "with the other keys"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_load_through_kernel_config(ck_hub, checkpoints, hub, cpu_kernel_config, tmp_path, family, case):
    """The recommended key: no missing or unexpected key, QKVAttention's forward bound, logits equal the plain
    model's, save_pretrained writes the original q_proj/k_proj/v_proj keys (GQA: k and v are half of q, so an equal
    split of qkv_proj would not give them back) and plain transformers reloads them with the same logits."""
    path = checkpoints[family]
    sizes = {k: v.shape for k, v in plain(path).state_dict().items() if ".0.self_attn." in k}
    assert sizes["model.layers.0.self_attn.q_proj.weight"][0] == 2 * sizes["model.layers.0.self_attn.k_proj.weight"][0]
    options = {} if case == "qkv" else dict(norm=True, mlp="fused", rope=True)  # every key recommended_mapping has
    mapping = qkv_mapping(ck_hub, family, hub, **options)
    assert f"^{ATTENTION[family]}$" in mapping
    check_layout_model(ck_hub, path, mapping, "cpu", tmp_path)
    model, _ = load(path, mapping)
    attn = model.model.layers[0].self_attn
    assert type(attn).__name__ == "QKVAttentionLayout" and not hasattr(attn, "q_proj")
    assert tuple(attn.qkv_proj.weight.shape) == (sum(sizes[f"model.layers.0.self_attn.{x}_proj.weight"][0]
                                                     for x in "qkv"), model.config.hidden_size)



@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_training_step_gives_the_merged_gradients(ck_hub, checkpoints, hub, cpu_kernel_config, family):
    """enable_training keeps QKVAttention's forward (has_backward=True); a training step's logits equal the plain
    model's and qkv_proj's gradient is the q_proj, k_proj and v_proj gradients concatenated (biases too: Qwen2)."""
    reference = plain(checkpoints[family])
    model, _ = load(checkpoints[family], qkv_mapping(ck_hub, family, hub))
    ck_hub.enable_training(model)
    model.train()
    reference.train()
    attn = model.model.layers[0].self_attn
    assert attn.forward.__func__ is ck_hub.layers.QKVAttention.forward
    out, ref = model(IDS, labels=IDS), reference(IDS, labels=IDS)
    assert torch.equal(out.logits, ref.logits)
    out.loss.backward()
    ref.loss.backward()
    plain_attn = reference.model.layers[0].self_attn
    for name in ("weight", "bias") if attn.qkv_proj.bias is not None else ("weight",):
        want = torch.cat([getattr(getattr(plain_attn, f"{x}_proj"), name).grad for x in "qkv"])
        assert torch.allclose(getattr(attn.qkv_proj, name).grad, want, rtol=1e-5, atol=1e-7), name

def test_save_splits_by_the_head_counts(ck, checkpoints):
    """SplitQKV, the reverse of ConcatenateQKV, splits by the config's head counts (an equal Chunk would not)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoints["qwen2"])
    q, k, v = torch.randn(64, 8), torch.randn(32, 8), torch.randn(32, 8)
    op = ck.attention.ConcatenateQKV()
    names = ["q_proj.weight", "k_proj.weight", "v_proj.weight"]
    merged = op.convert({n: [t] for n, t in zip(names, (q, k, v))}, names, ["qkv_proj.weight"])["qkv_proj.weight"]
    split = op.reverse_op.convert({"qkv_proj.weight": merged}, ["qkv_proj.weight"], names, config=config)
    assert all(torch.equal(split[n], t) for n, t in zip(names, (q, k, v)))
    assert not torch.equal(torch.chunk(merged, 3)[0], q)
    with pytest.raises(ValueError, match="not .* heads of one size"):
        op.reverse_op.convert({"qkv_proj.weight": merged[:-1]}, ["qkv_proj.weight"], names, config=config)



def test_a_vision_towers_attention_is_refused(ck):
    """The rule matches every `self_attn.q_proj` of a checkpoint: a multimodal checkpoint's vision tower (Gemma3's
    SigLIP) has them too. The conversion raises for a self_attn that is not a QKVAttentionLayout (transformers then
    fails the load) instead of leaving that tower's projections random behind a warning."""
    from torch import nn

    model = nn.Module()
    model.vision = nn.Module()
    model.vision.self_attn = nn.Module()
    model.text = nn.Module()
    model.text.self_attn = ck.attention.QKVAttentionLayout(config_for("llama"), 0)
    op, names = ck.attention.ConcatenateQKV(), ["q_proj.weight", "k_proj.weight", "v_proj.weight"]
    parts = {n: [torch.randn(4, 8)] for n in names}
    with pytest.raises(ValueError, match="vision.self_attn is Module, not a QKVAttentionLayout"):
        op.convert(parts, names, ["qkv_proj.weight"], full_layer_name="vision.self_attn.qkv_proj.weight", model=model)
    merged = op.convert(parts, names, ["qkv_proj.weight"], full_layer_name="text.self_attn.qkv_proj.weight",
                        model=model)
    assert merged["qkv_proj.weight"].shape == (12, 8)

def test_decoder_layer_composes(ck_hub, hub, cpu_kernel_config, monkeypatch, tmp_path):
    """With decoder=True the decoder layer calls its attention module (a QKVAttentionLayout: decoder.py fuses only
    transformers' own Qwen3Attention), which runs QKVAttention's forward, q_norm/k_norm/RoPE still one qk_norm_rope;
    logits equal the plain model's, and the save round trip holds."""
    calls = counting_qk_norm_rope(ck_hub, monkeypatch)
    path = make_checkpoint("qwen3", tmp_path / "qwen3-64", head_dim=64)
    mapping = qkv_mapping(ck_hub, "qwen3", hub, decoder=True, mlp="merged")
    check_layout_model(ck_hub, path, mapping, "cpu", tmp_path / "saved")
    model, _ = load(path, mapping)
    layer = model.model.layers[0]
    assert type(layer).__name__ == "DecoderLayerLayout" and type(layer.self_attn).__name__ == "QKVAttentionLayout"
    assert layer.self_attn.forward.__func__ is ck_hub.layers.QKVAttention.forward
    calls.clear()
    assert torch.equal(logits(model), logits(plain(path)))
    assert calls == [False] * model.config.num_hidden_layers


@pytest.mark.parametrize("family,search", [("llama", "greedy"), ("qwen3", "beams"), ("qwen2", "assisted")])
def test_generate_grows_the_cache_in_place(ck_hub, checkpoints, hub, cpu_kernel_config, monkeypatch, tmp_path, family,
                                           search):
    """generate through the QKVAttention key with buffers of 3 spare tokens at most (append_kv grows them every 3
    steps): greedy, beam search (reorders the cache) and assisted decoding (crops it) give the plain model's tokens
    and logits, and the caches ran in append_kv's buffers."""
    monkeypatch.setattr(ck_hub.attention, "KV_SPARE", 3)
    monkeypatch.setattr(ck_hub.attention, "KV_MIN_LENGTH", 0)
    path = checkpoints[family]
    model, reference = load(path, qkv_mapping(ck_hub, family, hub))[0], plain(path)
    mask = torch.ones_like(IDS[:, :9])
    mask[0, :2] = 0  # left padding
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True,
                   return_dict_in_generate=True, attention_mask=mask)
    if search == "beams":
        options["num_beams"] = 3
    crops, ids = [], IDS[:, :9]
    if search == "assisted":  # another model's drafts, some rejected: the cache is cropped; one sequence (assisted
        # decoding takes no batch)
        options["assistant_model"] = plain(make_checkpoint(family, tmp_path / "draft", seed=1))
        crop = DynamicLayer.crop
        monkeypatch.setattr(DynamicLayer, "crop", lambda self, n: crops.append(n) or crop(self, n))
        options["attention_mask"], ids = mask[1:], IDS[1:, :9]
    got, want = model.generate(ids, **options), reference.generate(ids, **options)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    cache = got.past_key_values
    grown = ["_cutile_kv" in vars(layer) for layer in cache.layers]
    assert grown == [type(layer).__name__ == "DynamicLayer" for layer in cache.layers] and any(grown)
    assert any(crops) == (search == "assisted")


def test_compiles_without_graph_breaks(checkpoints, hub, ck_hub, cpu_kernel_config, tmp_path):
    """kernelize in TORCH_COMPILE mode keeps QKVAttention (can_torch_compile); fullgraph=True compiles (a break
    raises) through the split of qkv_proj and qk_norm_rope (Qwen3, head_dim 64), and equals the eager logits."""
    path = make_checkpoint("qwen3", tmp_path / "qwen3-64", head_dim=64)
    model, _ = load(path, qkv_mapping(ck_hub, "qwen3", hub, norm=True))
    assert_compiles_like_eager(model, hub, {"RMSNorm": "RMSNorm", "QKVAttention": "QKVAttention"}, fullgraph=True)
    assert model.model.layers[0].self_attn.forward.__func__ is ck_hub.layers.QKVAttention.forward


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_attentions_are_recorded(checkpoints, hub, ck_hub, cpu_kernel_config, family):
    """output_attentions records the Layouts (eager attention), equal to the plain model's; a plain model loaded
    after it still records its own attention class."""
    path = checkpoints[family]
    want = plain(path)
    want.config._attn_implementation = "eager"
    model, _ = load(path, qkv_mapping(ck_hub, family, hub))
    model.config._attn_implementation = "eager"
    later = plain(path)
    later.config._attn_implementation = "eager"
    with torch.no_grad():
        expected = want(IDS, output_attentions=True).attentions
        for m in (model, later):
            got = m(IDS, output_attentions=True).attentions
            assert len(got) == len(expected) and all(torch.equal(g, w) for g, w in zip(got, expected))


def assert_process_clean(checkpoints) -> None:
    """A plain load after a refusal builds plain modules with every weight (no Layout, no conversion)."""
    for family in ("llama", "gemma3"):
        model, info = AutoModelForCausalLM.from_pretrained(checkpoints[family], output_loading_info=True)
        assert not any(info.values()) and not layouts(model), info


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory) -> Path:
    return make_checkpoint("olmo2", tmp_path_factory.mktemp("olmo2") / "olmo2")


@pytest.mark.parametrize("family,key,message", [
    ("olmo2", "Attention", "KernelConfig key 'Attention' -> QKVAttention hits Olmo2Attention; QKVAttention merges "
                           "the q, k and v projections of LlamaAttention, MistralAttention, Qwen2Attention, "
                           "Qwen3Attention and Gemma3Attention only. This package has no layer for Olmo2Attention"),
    ("llama", "^LlamaMLP$", "KernelConfig key '^LlamaMLP$' -> QKVAttention hits LlamaMLP"),
    ("llama", (("RMSNorm", "model.layers.*.input_layernorm"), ("Attention", "model.layers.*.self_attn")),
     "QKVAttention replaces one module, but a fusion (tuple) key handed it LlamaRMSNorm and LlamaAttention"),
])
def test_wrong_class_is_refused(checkpoints, olmo2, hub, cpu_kernel_config, family, key, message):
    path = olmo2 if family == "olmo2" else checkpoints[family]
    with pytest.raises(ValueError, match=re.escape(message)):
        load(path, {key: f"{hub}:QKVAttention"})
    assert_process_clean(checkpoints)


def _tp_refusal_worker(rank: int, port: int, kernel_repo: str, path: str, out: str) -> None:
    """Each rank loads with tp_plan="auto" and the QKVAttention key: the Layout refuses before any weight loads."""
    import kernels

    from devtools.local_hub import local_hub

    _init(rank, port, "cpu")
    with local_hub(Path(kernel_repo)) as hub:
        ck = kernels.get_kernel(hub, version=1)
        try:
            AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", use_kernels=True,
                                                 kernel_config=KernelConfig(qkv_mapping(ck, "llama", hub)))
            error = None
        except ValueError as e:
            error = str(e)
        # the same load without the key shards as before
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", use_kernels=True, kernel_config=KernelConfig(
            ck.recommended_mapping("llama", hub, mlp="merged")))
        _report(Path(out), rank, "qkv-tp", dict(error=error, layouts=len(layouts(model))))
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.skipif(_distributed_unavailable() is not None, reason=str(_distributed_unavailable()))
def test_tensor_parallel_is_refused(kernel_repo, checkpoints, tmp_path):
    """Two gloo processes on CPU: a tp_plan load with the key raises a ValueError naming it and telling to drop it
    under tp_plan; the mapping without it loads sharded."""
    _spawn(_tp_refusal_worker, str(kernel_repo), str(checkpoints["llama"]), str(tmp_path))
    reports = _reports(tmp_path, ["qkv-tp"])
    assert len(reports) == WORLD
    for r in reports.values():
        assert r["error"] is not None and r["layouts"] > 0, r
        assert "KernelConfig key '^LlamaAttention$' -> QKVAttention cannot load under tensor parallelism " \
               "(tp_size=2)" in r["error"] and "Drop the key from the KernelConfig under tp_plan" in r["error"], r


def test_sharded_config_is_refused_when_built_by_hand(ck):
    """The check reads the DistributedConfig from_pretrained puts on the config (fsdp_size shards each checkpoint
    tensor before the concatenation too)."""
    from types import SimpleNamespace

    config = config_for("llama")
    config.distributed_config = SimpleNamespace(tp_size=1, fsdp_size=2)
    with pytest.raises(ValueError, match=re.escape("QKVAttention cannot load with fsdp_size=2")):
        ck.attention.QKVAttentionLayout(config, 0)
    config.distributed_config = SimpleNamespace(tp_size=1, fsdp_size=1)
    assert ck.attention.QKVAttentionLayout(config, 0).qkv_proj.out_features == 128


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_gpu_parity(wide_checkpoints, hub, ck_hub, family):
    """On the GPU in bf16 (head_dim 64: qk_norm_rope and RoPE take cuTile, no fallback): the key alone and with
    the other recommended keys, within the tolerance of the other Layouts (tests/_helpers.py assert_gpu_parity)."""
    path = wide_checkpoints[family]
    for options in ({}, dict(norm=True, mlp="fused", rope=True)):
        model = assert_gpu_parity(ck_hub, path, qkv_mapping(ck_hub, family, hub, **options))
        assert type(model.model.layers[0].self_attn).__name__ == "QKVAttentionLayout"


@pytest.mark.gpu
def test_grown_cache_decodes_as_update_does_on_gpu(wide_checkpoints, hub, ck_hub, monkeypatch):
    """On the GPU in bf16 (Llama, every key, buffers of 8 spare tokens: they grow four times): a prefill of two
    prompts, one left-padded, then 32 decode steps of the same tokens, with append_kv's buffers and with
    cache.update's torch.cat: every step's logits agree (attention over strided buffers against contiguous caches)."""
    from transformers import KernelConfig

    attention = ck_hub.attention
    monkeypatch.setattr(attention, "KV_SPARE", 8)
    monkeypatch.setattr(attention, "KV_MIN_LENGTH", 0)
    model = AutoModelForCausalLM.from_pretrained(
        wide_checkpoints["llama"], dtype=torch.bfloat16, device_map="cuda", use_kernels=True,
        kernel_config=KernelConfig(qkv_mapping(ck_hub, "llama", hub, norm=True, mlp="fused", rope=True)))
    ids = torch.randint(0, model.config.vocab_size, (2, 72), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :5] = 0

    def steps():
        cache, out = DynamicCache(config=model.config), []
        with torch.no_grad():
            for start, stop in [(0, 40)] + [(t, t + 1) for t in range(40, 72)]:
                out.append(model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=cache,
                                 use_cache=True).logits[:, -1].float())
        return out, cache

    got, cache = steps()
    assert all("_cutile_kv" in vars(layer) for layer in cache.layers)
    monkeypatch.setattr(attention, "_growable_layer", lambda *args: None)
    want, cache = steps()
    assert not any("_cutile_kv" in vars(layer) for layer in cache.layers)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-2
