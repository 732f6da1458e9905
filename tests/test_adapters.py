"""LoRA adapters with the merged Layouts (gate_up_proj, qkv_proj): an adapter trained on transformers' modules,
converted by `convert_lora_adapter`, gives the plain model's outputs with that adapter; an adapter trained on the
Layouts merges back into a checkpoint with the original keys. CPU: the kernels' references run."""
import warnings

import peft
import pytest
import torch

from devtools.checkpoints import ALL_FAMILIES

from ._helpers import IDS, load, logits, plain

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# the Layout combinations that merge projections (recommended_mapping options); Gemma3's MLP is only offered fused
LAYOUTS = {"fused": {}, "merged": dict(mlp="merged"), "decoder+qkv": dict(decoder=True, qkv=True)}


def plain_adapter(path, out, **lora):
    """An adapter trained (here: randomly initialized) on the plain model, saved to `out`; its logits on IDS."""
    model = peft.get_peft_model(plain(path), peft.LoraConfig(init_lora_weights=False, **lora))
    model.save_pretrained(out)
    return logits(model.eval())


@pytest.mark.parametrize("family,layout", [(f, lay) for f in ALL_FAMILIES for lay in LAYOUTS
                                           if not (f == "gemma3" and lay == "merged")])  # Gemma3: fused MLP only
def test_converted_adapter_gives_the_plain_model_with_the_adapter(checkpoints, hub, ck_hub, cpu_kernel_config,
                                                                  tmp_path, family, layout):
    """Per-module ranks and alphas, rsLoRA on one family: after conversion every LoRA update reaches the merged
    modules (the outputs equal plain + adapter); loaded unconverted, PEFT only warns and the gate/up (q/k/v)
    updates are lost, which is what the conversion is for."""
    lora = dict(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"up_proj": 2}, alpha_pattern={"down_proj": 3},
                use_rslora=family == "qwen3")
    want = plain_adapter(checkpoints[family], tmp_path / "adapter", **lora)
    mapping = ck_hub.recommended_mapping(family, hub, **LAYOUTS[layout])
    model, _ = load(checkpoints[family], mapping)
    converted = ck_hub.convert_lora_adapter(model, tmp_path / "adapter", tmp_path / "converted")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no missing or unexpected adapter keys
        got = logits(peft.PeftModel.from_pretrained(model, converted))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unconverted, _ = load(checkpoints[family], mapping)
    with pytest.warns(UserWarning, match="(missing|unexpected) adapter keys"):
        dropped = logits(peft.PeftModel.from_pretrained(unconverted, tmp_path / "adapter"))
    assert (dropped - want).abs().max() > 1e-2


def test_transformers_load_adapter_takes_the_converted_adapter(checkpoints, hub, ck_hub, cpu_kernel_config, tmp_path):
    """The same through transformers' own `model.load_adapter`."""
    want = plain_adapter(checkpoints["llama"], tmp_path / "adapter", r=8, target_modules=TARGETS)
    model, _ = load(checkpoints["llama"], ck_hub.recommended_mapping("llama", hub, decoder=True, qkv=True))
    model.load_adapter(str(ck_hub.convert_lora_adapter(model, tmp_path / "adapter", tmp_path / "converted")))
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)


def test_what_cannot_be_converted_is_refused(checkpoints, wide_checkpoints, hub, ck_hub, cpu_kernel_config,
                                             tmp_path):
    """DoRA (a magnitude per module) and an adapter of another model raise, naming why, instead of loading partly."""
    model, _ = load(checkpoints["llama"], ck_hub.recommended_mapping("llama", hub))
    plain_adapter(checkpoints["llama"], tmp_path / "dora", r=4, target_modules=TARGETS, use_dora=True)
    with pytest.raises(ValueError, match="DoRA is not converted"):
        ck_hub.convert_lora_adapter(model, tmp_path / "dora", tmp_path / "out")
    plain_adapter(wide_checkpoints["llama"], tmp_path / "other", r=4, target_modules=TARGETS)  # other head_dim
    with pytest.raises(ValueError, match="matches no Linear of this model"):
        ck_hub.convert_lora_adapter(model, tmp_path / "other", tmp_path / "out")


@pytest.mark.parametrize("family,options", [("llama", dict(decoder=True, qkv=True)), ("gemma3", dict(qkv=True))])
def test_lora_trained_on_the_layouts_merges_into_the_original_keys(checkpoints, hub, ck_hub, cpu_kernel_config,
                                                                   tmp_path, family, options):
    """LoRA on a model with the merged Layouts ("all-linear" finds gate_up_proj and qkv_proj): every adapter weight
    gets a gradient through the kernel forwards, and merge_and_unload + save_pretrained write a checkpoint with the
    original keys whose plain model gives the adapted outputs."""
    model, _ = load(checkpoints[family], ck_hub.recommended_mapping(family, hub, **options))
    ck_hub.enable_training(model).train()
    tuned = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    tuned(IDS, labels=IDS).loss.backward()
    adapters = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
    assert any("gate_up_proj" in n for n in adapters) and any("qkv_proj" in n for n in adapters)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.values())
    want = logits(tuned.eval())
    tuned.merge_and_unload().save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(plain(tmp_path / "merged")), want, rtol=1e-5, atol=1e-5)
