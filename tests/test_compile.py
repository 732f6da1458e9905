"""torch.compile: every op is a torch.library custom op with a fake implementation (opcheck), under the
namespace of the variant's generated `_ops` module, and a compiled model shows no graph break from them."""
import importlib

import kernels
import pytest
import torch
from transformers import AutoModelForCausalLM, KernelConfig

from .test_layouts import configs


@pytest.fixture
def ck(kernel_repo):
    return kernels.get_local_kernel(kernel_repo / "build" / "torch-cpu")


def op(ck, module, name):
    return getattr(importlib.import_module(f"{ck.__name__}.{module}"), name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(ck, dtype):
    x = torch.randn(3, 5, 64, dtype=dtype)
    w = torch.randn(64, dtype=dtype)
    for gemma in (False, True):
        torch.library.opcheck(op(ck, "rms_norm", "rms_norm_op"), (x, w, 1e-6, gemma))
    torch.library.opcheck(op(ck, "rms_norm", "rms_norm_op"), (x[:, ::2], w, 1e-6, False))  # strided input
    for act in ("silu", "gelu_pytorch_tanh"):
        torch.library.opcheck(op(ck, "gated_act", "gated_act_op"), (torch.randn(4, 7, 96, dtype=dtype), act))
    q, k = torch.randn(2, 4, 9, 32, dtype=dtype), torch.randn(2, 2, 9, 32, dtype=dtype)
    cos, sin = torch.randn(2, 9, 32, dtype=dtype), torch.randn(2, 9, 32, dtype=dtype)
    torch.library.opcheck(op(ck, "rope", "rope_op"), (q, k, cos, sin, 1))


def test_ops_live_in_the_variant_namespace(ck):
    ns = getattr(torch.ops, ck.__name__)
    for name in ("rms_norm", "gated_act", "rope"):
        assert hasattr(ns, name), name


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


def test_compiled_model_has_no_break_from_the_kernels(checkpoints, hub, cpu_kernel_config):
    """kernelize in TORCH_COMPILE mode keeps these layers (can_torch_compile=True); Dynamo sees our custom
    ops, never a ct.launch, and the compiled logits equal the eager ones."""
    from kernels import LayerRepository, Mode, kernelize, use_kernel_mapping

    model, _ = AutoModelForCausalLM.from_pretrained(
        checkpoints["qwen3"], use_kernels=True, output_loading_info=True,
        kernel_config=KernelConfig({**configs("qwen3", hub)["fused"], "rotary_pos_emb": f"{hub}:ApplyRotaryPosEmb"}))
    layers = {"RMSNorm": "RMSNorm", "RMSNormMLP": "RMSNormMLP", "rotary_pos_emb": "ApplyRotaryPosEmb"}
    mapping = {key: {"cpu": LayerRepository(hub, layer_name=layer, version=1)} for key, layer in layers.items()}
    with use_kernel_mapping(mapping, inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE | Mode.TORCH_COMPILE, device="cpu")
    layer = kernels.get_kernel(hub, version=1).layers.RMSNormMLP
    assert model.model.layers[0].post_attention_layernorm.forward.__func__ is layer.forward
    ids = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        want = model(ids).logits
        explanation = torch._dynamo.explain(model)(ids)
        got = torch.compile(model, backend="aot_eager")(ids).logits
    assert explanation.graph_break_count == 0, [str(r)[:300] for r in explanation.break_reasons]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_op_registrations_pass_kernel_builders_ops_check():
    """kernel-builder's torch-ops-check: every torch.library decorator names its op through a direct
    add_op_namespace_prefix(...) call (so the build can give each variant its own namespace)."""
    import ast

    from devtools.build import ROOT

    checked = 0
    for path in (ROOT / "torch-ext" / "cutile_kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            for dec in getattr(node, "decorator_list", []):
                if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr in (
                        "custom_op", "triton_op", "register_fake", "register_kernel", "register_vmap",
                        "register_torch_dispatch"):
                    first = dec.args[0]
                    assert isinstance(first, ast.Call) and getattr(first.func, "id", "") == "add_op_namespace_prefix", \
                        f"{path.name}:{dec.lineno}"
                    checked += 1
    assert checked == 10  # custom_op + register_fake for rms_norm, gated_act, rope and the two backward ops
