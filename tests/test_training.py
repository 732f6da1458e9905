"""Training through the kernels (layers declare has_backward=True): kernelize in TRAINING mode, enable_training
for a KernelConfig-loaded model, and on a GPU a bf16 training step whose loss and gradients stay as accurate as
plain transformers' while the cuTile backward ops run. Each op's backward alone: tests/test_<op>.py."""
import collections
import importlib
import inspect

import pytest
import torch
from kernels import LayerRepository, Mode, kernelize, use_kernel_mapping
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from devtools.checkpoints import ALL_FAMILIES

from ._helpers import IDS, layouts, load, no_fallback, plain, rel_err


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_enable_training_keeps_the_kernel_forward(checkpoints, hub, ck_hub, cpu_kernel_config, family):
    """model.train() re-kernelizes in TRAINING mode (transformers); after enable_training the layers
    (has_backward=True) stay, not the Layout's reference, and the step matches the plain model."""
    reference = plain(checkpoints[family])
    model, _ = load(checkpoints[family], ck_hub.recommended_mapping(family, hub, norm=False, rope=False))
    ck_hub.enable_training(model)
    model.train()
    reference.train()
    assert layouts(model) and all(m.forward.__func__ is not type(m).forward for m in layouts(model))
    out, ref = model(IDS, labels=IDS), reference(IDS, labels=IDS)
    assert torch.equal(out.logits, ref.logits)
    out.loss.backward()
    ref.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    g = grads[next(n for n in grads if n.endswith("gate_up_proj.weight"))]
    assert g is not None and g.abs().sum() > 0
    # the merged gradient is the two original gradients, concatenated
    layer = reference.model.layers[0].mlp
    merged = torch.cat([layer.gate_proj.weight.grad, layer.up_proj.weight.grad])
    fused_name = "pre_feedforward_layernorm" if family == "gemma3" else "post_attention_layernorm"
    got = grads[f"model.layers.0.{fused_name}.gate_up_proj.weight"]
    assert torch.allclose(got, merged, rtol=1e-5, atol=1e-7)
    model.eval()  # and back to inference: still the kernel forward
    assert all(m.forward.__func__ is not type(m).forward for m in layouts(model))


def test_train_without_enable_training_falls_back_to_the_reference(checkpoints, hub, ck_hub, cpu_kernel_config):
    """What enable_training exists for: transformers maps a KernelConfig for the load-time mode only, so a plain
    model.train() swaps the Layout's reference forward back in (still correct, but no kernels)."""
    model, _ = load(checkpoints["llama"], ck_hub.recommended_mapping("llama", hub, norm=False, rope=False))
    model.train()
    assert all(m.forward.__func__ is type(m).forward for m in layouts(model))
    with pytest.raises(ValueError, match="not loaded with a KernelConfig"):
        ck_hub.enable_training(plain(checkpoints["llama"]))


def test_kernelize_in_training_mode(checkpoints, hub, ck_hub):
    """kernelize in TRAINING mode swaps the RMSNorm kernel in, and a training step's loss and every gradient
    equal the plain model's (on CPU the kernel runs its exact, differentiable reference)."""
    reference, model = plain(checkpoints["llama"]), plain(checkpoints["llama"])
    model.train()
    repo = LayerRepository(hub, layer_name="RMSNorm", version=1)
    with use_kernel_mapping({"RMSNorm": {"cpu": repo}}, inherit_mapping=False):
        kernelize(model, mode=Mode.TRAINING, device="cpu")
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(m.forward.__func__ is ck_hub.layers.RMSNorm.forward for m in norms)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    out, ref = model(ids, labels=ids), reference(ids, labels=ids)
    out.loss.backward()
    ref.loss.backward()
    assert torch.equal(out.loss, ref.loss)
    want = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, want[name].grad), name


class OpCalls(TorchDispatchMode):
    """Counts the dispatches of `ck`'s custom ops."""

    def __init__(self, ck):
        super().__init__()
        self.prefix = f"{ck._ops.ops.name}::"
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith(self.prefix):
            self.calls[func.name().removeprefix(self.prefix)] += 1
        return func(*args, **(kwargs or {}))


def cutile_ops(ck) -> list:
    """Every op description of `ck`, once each (rope.py imports rms_norm.py's backward op)."""
    op_class = importlib.import_module(f"{ck.__name__}._op").CutileOp
    return list({id(op): op for stem in ("rms_norm", "gated_act", "rope", "cross_entropy")
                 for op in vars(importlib.import_module(f"{ck.__name__}.{stem}")).values()
                 if isinstance(op, op_class)}.values())


def counted_launchers(ck, monkeypatch) -> collections.Counter:
    """Calls of each op's cuTile launcher (forward, and the backward autograd runs), by op name, counted while the
    launchers run."""
    calls = collections.Counter()
    for op in cutile_ops(ck):
        def counted(*args, _name=op.name, _launcher=op.launcher):
            calls[_name] += 1
            return _launcher(*args)
        monkeypatch.setattr(op, "launcher", counted)
    return calls


def test_eager_autograd_runs_the_launchers_without_the_custom_op(ck, monkeypatch):
    """Where autograd records (training), a differentiable op runs as its autograd.Function: the forward launcher,
    then in backward the backward op's launcher, with no custom-op dispatch (its host cost); an op without a
    backward formula runs as the custom op, so a gradient through it raises rather than coming out missing. The
    launchers stand in (CPU): the routing is what is tested."""
    rms = importlib.import_module(f"{ck.__name__}.rms_norm")
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    dx, dw = torch.randn(3, 8), torch.randn(8)
    monkeypatch.setattr(rms.RMS_NORM, "check", lambda *a: None)
    monkeypatch.setattr(rms.RMS_NORM_BACKWARD, "check", lambda *a: None)
    monkeypatch.setattr(rms.RMS_NORM, "launcher", lambda x, w, eps, gemma, out=None: torch.zeros_like(x))
    monkeypatch.setattr(rms.RMS_NORM_BACKWARD, "launcher",
                        lambda x, w, dy, eps, gemma, *buffers: (dx.clone(), dw.clone()))
    calls = counted_launchers(ck, monkeypatch)
    with OpCalls(ck) as dispatched:
        ck.rms_norm(x, w, 1e-6).backward(torch.ones(3, 8))
    assert calls == {"rms_norm": 1, "rms_norm_backward": 1} and not dispatched.calls
    assert torch.equal(x.grad, dx) and torch.equal(w.grad, dw)
    with OpCalls(ck) as dispatched:
        grads = rms.RMS_NORM_BACKWARD(x, w, torch.randn(3, 8), 1e-6, False)
    assert dispatched.calls == {"rms_norm_backward": 1}
    with pytest.raises(RuntimeError, match="autograd"):
        grads[0].sum().backward()


def gpu_routing(ck, monkeypatch) -> None:
    """Every op routes as on a GPU (its check passes) with its reference standing in for its launcher: the eager
    autograd path (the Functions and in_backward) runs on CPU."""
    for op in cutile_ops(ck):
        n = len(inspect.signature(op.reference).parameters)
        monkeypatch.setattr(op, "check", lambda *a: None)
        monkeypatch.setattr(op, "launcher", lambda *a, _ref=op.reference, _n=n: _ref(*a[:_n]))


def test_eager_autograd_gradients_equal_the_references(ck, monkeypatch):
    """The Functions' backward (the backward ops through in_backward) gives autograd's gradients of each op's
    reference, for every differentiable op (the norms' references compute in fp32, as transformers does, hence
    the tolerance); RoPE's also twice (its backward's backward is RoPE: gradgradcheck, float64 exact)."""
    gpu_routing(ck, monkeypatch)
    t = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=True)  # noqa: E731
    emb = torch.rand(2, 3, 4, dtype=torch.float64).repeat(1, 1, 2)
    cos, sin, target = emb.cos(), emb.sin(), torch.tensor([1, -100, 4])
    cases = {  # name: (ours, its reference, inputs)
        "rms_norm": (lambda x, w: ck.rms_norm(x, w, 1e-6), lambda x, w: ck.rms_norm_reference(x, w, 1e-6),
                     (t(3, 8), t(8))),
        "gemma_rms_norm": (lambda x, w: ck.gemma_rms_norm(x, w, 1e-6),
                           lambda x, w: ck.gemma_rms_norm_reference(x, w, 1e-6), (t(3, 8), t(8))),
        "add_rms_norm": (lambda x, r, w: ck.add_rms_norm(x, r, w, 1e-6),
                         lambda x, r, w: ck.add_rms_norm_reference(x, r, w, 1e-6), (t(3, 8), t(3, 8), t(8))),
        "sandwich_rms_norm": (lambda *a: ck.sandwich_rms_norm(*a, 1e-6), lambda *a: ck.sandwich_rms_norm_reference(
            *a, 1e-6), (t(3, 8), t(3, 8), t(8), t(8))),
        "rms_norm_add": (lambda x, r, w: ck.rms_norm_add(x, r, w, 1e-6, True),
                         lambda x, r, w: ck.rms_norm_add_reference(x, r, w, 1e-6, True), (t(3, 8), t(3, 8), t(8))),
        "gated_act": (lambda gu: ck.gated_act(gu, "gelu_pytorch_tanh"),
                      lambda gu: ck.gated_act_reference(gu, "gelu_pytorch_tanh"), (t(3, 16),)),
        "rope": (lambda q, k: ck.apply_rotary_pos_emb(q, k, cos, sin), lambda q, k: ck.rope_reference(q, k, cos, sin),
                 (t(2, 2, 3, 8), t(2, 1, 3, 8))),
        "qk_norm_rope": (lambda *a: ck.qk_norm_rope(*a, cos, sin, 1e-6),
                         lambda *a: ck.qk_norm_rope_reference(*a, cos, sin, 1e-6),
                         (t(2, 2, 3, 8), t(2, 1, 3, 8), t(8), t(8))),
        "cross_entropy": (lambda x: ck.cross_entropy(x, target), lambda x: ck.cross_entropy_reference(x, target, -100)[0],
                          (t(3, 5),)),
    }
    with OpCalls(ck) as dispatched:
        for name, (ours, reference, inputs) in cases.items():
            outs = ours(*inputs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            grads = [torch.randn_like(o) for o in outs]
            got = torch.autograd.grad(outs, inputs, grads)
            want = torch.autograd.grad(reference(*inputs), inputs, grads)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.autograd.gradgradcheck(cases["rope"][0], cases["rope"][2])
    assert not dispatched.calls  # all through the Functions


def plain_grad(name: str, grads: dict, family: str) -> torch.Tensor:
    """The plain model's gradient (`grads`: {name: grad}) of our parameter `name`: a merged gate_up_proj (in the MLP
    or the fused norm's slot) is [gate | up], a fused layout's down_proj is the MLP's."""
    fused = "pre_feedforward_layernorm" if family == "gemma3" else "post_attention_layernorm"
    if name.endswith("gate_up_proj.weight"):
        mlp = name.replace(f"{fused}.gate_up_proj.weight", "mlp.").replace("mlp.gate_up_proj.weight", "mlp.")
        return torch.cat([grads[mlp + "gate_proj.weight"], grads[mlp + "up_proj.weight"]])
    return grads[name.replace(f"{fused}.down_proj", "mlp.down_proj")]


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_training_step_matches_plain(wide_checkpoints, hub, ck_hub, family, monkeypatch):
    """model.train() through KernelConfig runs the cuTile forward and backward ops (counted; none falls back),
    and the bf16 step is as accurate as plain transformers' bf16 step: against a float32 plain step, the loss and
    every gradient of the kernel model stay within 2x (+ a small floor) of plain bf16's own error. bf16 rounding
    differs in where it happens (fused norm, merged gate_up GEMM), not in how much, so a wrong gradient shows as
    many times the error."""
    from transformers import KernelConfig

    path = wide_checkpoints[family]
    mapping = ck_hub.recommended_mapping(family, hub, norm=False)
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cuda")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    ids = torch.randint(0, reference.config.vocab_size, (2, 128), device="cuda")
    runs = {}
    for name, m in (("fp32", fp32), ("plain", reference)):
        m.train()
        out = m(ids, labels=ids)
        out.loss.backward()
        runs[name] = out.loss.item(), m
    with no_fallback(ck_hub):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda", use_kernels=True,
                                                     kernel_config=KernelConfig(mapping, inherit_mapping=False))
        ck_hub.enable_training(model).train()
        calls = counted_launchers(ck_hub, monkeypatch)
        out = model(ids, labels=ids)
        out.loss.backward()
    layers = model.config.num_hidden_layers
    assert calls["rms_norm_backward"] >= layers and calls["gated_act_backward"] == layers, calls
    assert calls["rope"] == calls["rope_backward"] == layers, calls  # the backward: the inverse rotation
    assert calls["cross_entropy"] == calls["cross_entropy_backward"] == 1, calls  # enable_training's loss
    ref_loss, plain_loss = runs["fp32"][0], runs["plain"][0]
    assert abs(out.loss.item() - ref_loss) <= 2 * abs(plain_loss - ref_loss) + 2e-3
    want32 = {n: p.grad for n, p in fp32.named_parameters()}
    want16 = {n: p.grad for n, p in reference.named_parameters()}
    checked = 0
    for name, p in model.named_parameters():
        g32, g16 = plain_grad(name, want32, family), plain_grad(name, want16, family)
        assert rel_err(p.grad, g32) <= 2 * rel_err(g16, g32) + 1e-2, (name, rel_err(p.grad, g32), rel_err(g16, g32))
        checked += 1
    assert checked == len(want32) - model.config.num_hidden_layers  # gate and up count once, merged


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("decoder", [False, True])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_through_the_eager_functions(checkpoints, hub, ck_hub, cpu_kernel_config, monkeypatch,
                                                           family, decoder, reentrant):
    """model.gradient_checkpointing_enable() with every kernel of recommended_mapping (and the decoder layer) on the
    route a GPU takes (`gpu_routing`: the eager autograd.Functions, their references standing in for the launchers):
    the checkpointed layers run their forward ops again during the backward (the Functions' forwards inside
    autograd's backward pass), and the loss and every gradient equal the same model's without checkpointing and the
    plain model's. Both of torch's checkpoint forms: transformers' default (use_reentrant=False) recomputes when the
    backward unpacks a saved tensor; the reentrant one runs a nested backward inside its own Function's."""
    reference = plain(checkpoints[family])
    mapping = ck_hub.recommended_mapping(family, hub, decoder=decoder)
    gpu_routing(ck_hub, monkeypatch)
    grads, launched, calls = {}, {}, counted_launchers(ck_hub, monkeypatch)
    for checkpointing in (False, True):
        model, _ = load(checkpoints[family], mapping)
        ck_hub.enable_training(model)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model.train()
        calls.clear()
        out = model(IDS, labels=IDS)
        out.loss.backward()
        grads[checkpointing] = out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}
        launched[checkpointing] = collections.Counter(calls)
    # the backward ops run once either way; with checkpointing the layers' forward ops run again (the recompute)
    backward = {k: v for k, v in launched[False].items() if k.endswith("_backward")}
    assert backward["cross_entropy_backward"] == 1 and len(backward) >= 3, backward
    assert backward == {k: v for k, v in launched[True].items() if k.endswith("_backward")}
    assert sum(launched[True].values()) > sum(launched[False].values()), launched
    reference.train()
    ref = reference(IDS, labels=IDS)
    ref.loss.backward()
    assert torch.allclose(grads[True][0], ref.loss, rtol=1e-5) and torch.equal(grads[True][0], grads[False][0])
    for name, g in grads[True][1].items():
        assert g is not None and torch.equal(g, grads[False][1][name]), name
    want = {n: p.grad for n, p in reference.named_parameters()}
    for name, g in grads[True][1].items():
        assert torch.allclose(g, plain_grad(name, want, family), rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_autocast_training_of_a_float32_model_through_the_eager_functions(checkpoints, hub, ck_hub,
                                                                        cpu_kernel_config, monkeypatch, family):
    """Mixed precision as transformers' Trainer runs it (float32 weights, torch.autocast to bf16) on the route a GPU
    takes (`gpu_routing`): the ops get mixed dtypes (16-bit q and k with float32 cos/sin in RoPE, float32 norms,
    bf16 gate_up), their Functions return and take gradients in the dtypes autograd expects, and the loss and every
    gradient equal the plain model's under the same autocast (within bf16 GEMM rounding)."""
    reference = plain(checkpoints[family])
    gpu_routing(ck_hub, monkeypatch)
    calls = counted_launchers(ck_hub, monkeypatch)
    model, _ = load(checkpoints[family], ck_hub.recommended_mapping(family, hub))
    ck_hub.enable_training(model).train()
    reference.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = model(IDS, labels=IDS), reference(IDS, labels=IDS)
        out.loss.backward()
        ref.loss.backward()
    assert calls["rope"] and calls["rope_backward"] and calls["gated_act_backward"], calls
    assert torch.allclose(out.loss, ref.loss, rtol=1e-5)  # causal_lm_loss sums then divides
    # bf16 GEMMs: the merged gate_up GEMM rounds as two GEMMs do, but CPU kernels may block its sums differently
    want = {n: p.grad for n, p in reference.named_parameters()}
    for name, g in model.named_parameters():
        w = plain_grad(name, want, family)
        assert g.grad is not None and g.grad.dtype == torch.float32, name
        assert rel_err(g.grad, w) < 1e-2, (name, rel_err(g.grad, w))
