"""torch.compile: every op is a torch.library custom op (with a fake; opcheck in tests/test_<op>.py) registered
under the namespace of the variant's generated `_ops` module, as kernel-builder's torch-ops-check requires, and
compiled functions, training steps and models show no graph break from them."""
import ast
import importlib
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, KernelConfig

from devtools.build import ROOT

from ._helpers import assert_compiles_like_eager

OPS = {"rms_norm", "rms_norm_backward", "gated_act", "gated_act_backward", "rope"}
# torch.library functions that name the op they register or implement
REGISTRATIONS = {"custom_op", "triton_op", "define", "impl", "impl_abstract", "register_fake", "register_kernel",
                 "register_autograd", "register_autocast", "register_vmap", "register_torch_dispatch"}


def registrations(source: str) -> tuple[int, list[int]]:
    """(how many torch.library registration calls, decorators or plain calls, the source makes; the lines of
    those whose op name is not a direct `add_op_namespace_prefix(...)` call)."""
    tree = ast.parse(source)
    imported = {alias.asname or alias.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module == "torch.library"
                for alias in node.names if alias.name in REGISTRATIONS}
    count, bad = 0, []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if not ((isinstance(f, ast.Attribute) and f.attr in REGISTRATIONS
                 and ast.unparse(f.value) in ("torch.library", "library"))
                or (isinstance(f, ast.Name) and f.id in imported)):
            continue
        count += 1
        name = node.args[0] if node.args else next((k.value for k in node.keywords), None)
        if not (isinstance(name, ast.Call) and getattr(name.func, "id", "") == "add_op_namespace_prefix"):
            bad.append(node.lineno)
    return count, bad


def test_op_registrations_pass_kernel_builders_ops_check(ck):
    """kernel-builder's torch-ops-check: every torch.library registration names its op through a direct
    add_op_namespace_prefix(...) call (so the build can give each variant its own namespace), and the ops land
    in the variant's namespace, `ck._ops.ops`."""
    count = 0
    for path in sorted((ROOT / "torch-ext" / "cutile_kernels").glob("*.py")):
        found, bad = registrations(path.read_text())
        assert not bad, [f"{path.name}:{line}" for line in bad]
        count += found
    assert count >= 2  # at least a custom_op and a register_fake
    namespace = ck._ops.ops.name
    registered = {name.removeprefix(f"{namespace}::") for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith(f"{namespace}::")}
    assert registered >= OPS, registered
    assert all(isinstance(getattr(ck._ops.ops, name), torch._ops.OpOverloadPacket) for name in OPS)


def test_the_ops_check_finds_a_name_not_built_by_the_prefix():
    source = textwrap.dedent("""\
        import torch
        from torch.library import register_fake as fake_of
        @torch.library.custom_op("ns::a", mutates_args=())
        def a(x: torch.Tensor) -> torch.Tensor: ...
        torch.library.register_autograd(prefix("a"), backward, setup_context=setup)
        fake_of(name="ns::a")(lambda x: x)
        torch.library.custom_op(add_op_namespace_prefix("b"), body, mutates_args=())
        op.register_fake(lambda x: x)  # a CustomOpDef method: names no op
    """)
    assert registrations(source) == (4, [3, 5, 6])


def test_functional_ops_compile_without_graph_breaks(ck):
    def f(x, w, gate_up, q, k, cos, sin):
        qe, ke = ck.apply_rotary_pos_emb(q, k, cos, sin)
        return ck.rms_norm(x, w, 1e-6), ck.gemma_rms_norm(x, w, 1e-6), ck.gated_act(gate_up, "silu"), qe, ke

    args = (torch.randn(3, 64), torch.randn(64), torch.randn(3, 128), torch.randn(1, 2, 5, 32),
            torch.randn(1, 2, 5, 32), torch.randn(1, 5, 32), torch.randn(1, 5, 32))
    with torch.no_grad():
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)  # fullgraph: a break raises
        want = f(*args)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("tokens", [2, 3])
def test_compile_traces_the_references_of_calls_up_to_the_token_threshold(ck, monkeypatch, tokens):
    """COMPILE_REFERENCE_TOKENS = 2: Inductor gets the references' aten ops (to fuse) for calls of at most 2
    tokens, the custom ops above; RoPE counts tokens, not heads (q and k of 4 heads); outputs are unchanged."""
    monkeypatch.setattr(importlib.import_module(f"{ck.__name__}._op"), "COMPILE_REFERENCE_TOKENS", 2)
    namespace, seen = ck._ops.ops.name, []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def f(x, w, gate_up, q, k, cos, sin):
        qe, ke = ck.apply_rotary_pos_emb(q, k, cos, sin)
        qn, kn = ck.qk_norm_rope(q, k, w[:32], w[32:], cos, sin, 1e-6)
        return ck.rms_norm(x, w, 1e-6), ck.gated_act(gate_up, "silu"), qe, ke, qn, kn

    args = (torch.randn(tokens, 64), torch.randn(64), torch.randn(tokens, 128), torch.randn(1, 4, tokens, 32),
            torch.randn(1, 4, tokens, 32), torch.randn(1, tokens, 32), torch.randn(1, tokens, 32))
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(f, fullgraph=True, backend=backend)(*args)
        want = f(*args)
    torch._dynamo.reset()
    ours = {t.split(".")[1] for t in seen if t.startswith(f"{namespace}.")}
    assert ours == (set() if tokens <= 2 else {"rms_norm", "gated_act", "rope", "qk_norm_rope"}), seen
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_compiled_training_step_has_no_break_from_the_ops(ck):
    """Forward and backward through the custom ops under torch.compile(fullgraph=True): a break raises."""
    def f(x, w, gate_up):
        return ck.rms_norm(x, w, 1e-6).sum() + ck.gemma_rms_norm(x, w, 1e-6).sum() + ck.gated_act(gate_up, "silu").sum()

    args = [torch.randn(3, 64, requires_grad=True), torch.randn(64, requires_grad=True),
            torch.randn(3, 128, requires_grad=True)]
    torch.compile(f, fullgraph=True, backend="aot_eager")(*args).backward()
    got = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    f(*args).backward()
    assert all(torch.allclose(g, a.grad, rtol=1e-5, atol=1e-6) for g, a in zip(got, args))


def test_compiled_model_has_no_break_from_the_kernels(checkpoints, hub, ck_hub, cpu_kernel_config):
    """kernelize in TORCH_COMPILE mode keeps these layers (can_torch_compile=True); Dynamo sees our custom
    ops, never a ct.launch, and the compiled logits equal the eager ones."""
    model, _ = AutoModelForCausalLM.from_pretrained(
        checkpoints["qwen3"], use_kernels=True, output_loading_info=True,
        kernel_config=KernelConfig(ck_hub.recommended_mapping("qwen3", hub, norm=False)))
    assert_compiles_like_eager(
        model, hub, {"RMSNorm": "RMSNorm", "RMSNormMLP": "RMSNormMLP", "rotary_pos_emb": "ApplyRotaryPosEmb"})
    assert model.model.layers[0].post_attention_layernorm.forward.__func__ is ck_hub.layers.RMSNormMLP.forward


@pytest.mark.gpu
def test_compiled_static_cache_generate_uses_cuda_graphs(wide_checkpoints, hub, ck_hub):
    """generate() with a static cache compiles the decode step (transformers' auto-compile, inductor with
    mode="reduce-overhead", i.e. CUDA graphs) with fullgraph=True, so any graph break raises; the greedy tokens
    equal the eager kernel model's and no CUDA graph is skipped."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = AutoModelForCausalLM.from_pretrained(
        wide_checkpoints["llama"], dtype=torch.bfloat16, device_map="cuda", use_kernels=True,
        kernel_config=KernelConfig(ck_hub.recommended_mapping("llama", hub, norm=False), inherit_mapping=False))
    ids = torch.randint(0, model.config.vocab_size, (1, 24), device="cuda")
    gen = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    eager = model.generate(ids, **gen)
    counters.clear()
    torch._dynamo.reset()
    compiled = model.generate(ids, cache_implementation="static", compile_config=CompileConfig(fullgraph=True), **gen)
    compiled = model.generate(ids, cache_implementation="static", compile_config=CompileConfig(fullgraph=True), **gen)
    assert counters["stats"]["unique_graphs"] >= 1, "the decode step was not compiled"
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert (compiled == eager).float().mean().item() > 0.9
