"""Training and torch.compile on a real GPU: the cuTile backward kernels against float64 autograd (fresh random
shapes), a bf16 training step through KernelConfig against plain transformers, and generate() with a static cache
under torch.compile with CUDA graphs."""
import importlib
import random
import warnings

import pytest
import torch

from devtools.checkpoints import make_checkpoint

from .conftest import requires_cuda
from .test_layouts import configs

pytestmark = [pytest.mark.gpu, requires_cuda]
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
FALLBACK = "running the PyTorch reference"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def no_fallback():
    """Turns the one-time fallback warning into an error: the public functions must take the cuTile path."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("error", message=f".*{FALLBACK}")
    return ctx


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_backward(ck_gpu, dtype, gemma):
    rng = random.Random()
    fn = ck_gpu.gemma_rms_norm if gemma else ck_gpu.rms_norm
    for rows, hidden in [(1, 4096), (37, 2560), (4096, 4096), (rng.randint(1, 3000), rng.choice([128, 5120]))]:
        x = torch.randn(rows, hidden, device="cuda", dtype=dtype, requires_grad=True)
        w = (0.3 * torch.randn(hidden, device="cuda") + (0 if gemma else 1)).to(dtype).requires_grad_()
        dy = torch.randn(rows, hidden, device="cuda", dtype=dtype)
        ctx = no_fallback()
        try:
            fn(x, w, 1e-6).backward(dy)
        finally:
            ctx.__exit__(None, None, None)
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        h = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
        (h * (1 + w64) if gemma else h * w64).backward(dy.double())
        assert rel(x.grad, x64.grad) < REL_TOL[dtype], (rows, hidden)
        assert rel(w.grad, w64.grad) < REL_TOL[dtype], (rows, hidden)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_gated_act_backward(ck_gpu, dtype, act):
    for rows, inter in [(1, 14336), (300, 9728), (2048, 2000)]:
        gu = torch.randn(rows, 2 * inter, device="cuda", dtype=dtype, requires_grad=True)
        dy = torch.randn(rows, inter, device="cuda", dtype=dtype)
        ck_gpu.gated_act(gu, act).backward(dy)
        g64 = gu.detach().double().requires_grad_()
        g, u = g64.chunk(2, dim=-1)
        a = torch.nn.functional.silu(g) if act == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
        (a * u).backward(dy.double())
        assert rel(gu.grad, g64.grad) < REL_TOL[dtype], (rows, inter)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_backward(ck_gpu, dtype):
    q = torch.randn(2, 300, 8, 128, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 300, 2, 128, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    freqs = torch.rand(2, 300, 64, device="cuda") * 100
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    ctx = no_fallback()
    try:
        torch.autograd.backward(ck_gpu.apply_rotary_pos_emb(q, k, cos, sin), (dq, dk))
    finally:
        ctx.__exit__(None, None, None)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    torch.autograd.backward(ck_gpu.rope_reference(q64, k64, cos.double(), sin.double()), (dq.double(), dk.double()))
    assert rel(q.grad, q64.grad) < REL_TOL[dtype] and rel(k.grad, k64.grad) < REL_TOL[dtype]


@pytest.fixture(scope="module")
def wide_checkpoints(tmp_path_factory):
    """head_dim 64 so every kernel (RoPE included) takes its cuTile path."""
    root = tmp_path_factory.mktemp("wide")
    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return {f: make_checkpoint(f, root / f, **shape) for f in ("llama", "gemma3")}


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    return calls


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_training_step_matches_plain(wide_checkpoints, hub, monkeypatch, family):
    """model.train() through KernelConfig runs the cuTile forward and backward kernels (counted), and the bf16 step
    is as accurate as plain transformers' bf16 step: against a float32 plain step, the loss and every gradient of
    the kernel model stay within 2x (+ a small floor) of plain bf16's own error. bf16 rounding differs in where it
    happens (fused norm, merged gate_up GEMM), not in how much, so a wrong gradient shows as many times the error."""
    import kernels
    from transformers import AutoModelForCausalLM, KernelConfig

    ck = kernels.get_kernel(hub, version=1)  # the module KernelConfig's layers come from
    path = wide_checkpoints[family]
    mapping = {**configs(family, hub)["fused"], "rotary_pos_emb": f"{hub}:ApplyRotaryPosEmb"}
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cuda")
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    ids = torch.randint(0, plain.config.vocab_size, (2, 128), device="cuda")
    runs = {}
    for name, m in (("fp32", fp32), ("plain", plain)):
        m.train()
        out = m(ids, labels=ids)
        out.loss.backward()
        runs[name] = out.loss.item(), m
    modules = {op: importlib.import_module(f"{ck.__name__}.{op}") for op in ("rms_norm", "gated_act", "rope")}
    calls = {name: count_calls(monkeypatch, modules[op], name) for op, name in (
        ("rms_norm", "rms_norm_backward_cutile"), ("gated_act", "gated_act_backward_cutile"), ("rope", "rope_cutile"))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda", use_kernels=True,
                                                     kernel_config=KernelConfig(mapping, inherit_mapping=False))
        ck.enable_training(model).train()
        out = model(ids, labels=ids)
        out.loss.backward()
    assert not [w for w in caught if FALLBACK in str(w.message)], [str(w.message) for w in caught]
    layers = model.config.num_hidden_layers
    assert len(calls["rms_norm_backward_cutile"]) >= layers and len(calls["gated_act_backward_cutile"]) == layers
    assert len(calls["rope_cutile"]) == 2 * layers  # forward and the inverse rotation in backward
    ref_loss, plain_loss = runs["fp32"][0], runs["plain"][0]
    assert abs(out.loss.item() - ref_loss) <= 2 * abs(plain_loss - ref_loss) + 2e-3
    want32, want16 = dict(fp32.named_parameters()), dict(plain.named_parameters())
    fused = "pre_feedforward_layernorm" if family == "gemma3" else "post_attention_layernorm"
    checked = 0
    for name, p in model.named_parameters():
        if name.endswith("gate_up_proj.weight"):
            mlp = name.replace(f"{fused}.gate_up_proj.weight", "mlp.")
            g32 = torch.cat([want32[mlp + "gate_proj.weight"].grad, want32[mlp + "up_proj.weight"].grad])
            g16 = torch.cat([want16[mlp + "gate_proj.weight"].grad, want16[mlp + "up_proj.weight"].grad])
        else:
            key = name.replace(f"{fused}.down_proj", "mlp.down_proj")
            g32, g16 = want32[key].grad, want16[key].grad
        assert rel(p.grad, g32) <= 2 * rel(g16, g32) + 1e-2, (name, rel(p.grad, g32), rel(g16, g32))
        checked += 1
    assert checked == len(want32) - model.config.num_hidden_layers  # gate and up count once, merged


def test_compiled_static_cache_generate_uses_cuda_graphs(wide_checkpoints, hub):
    """generate() with a static cache compiles the decode step (transformers' auto-compile, inductor with
    mode="reduce-overhead", i.e. CUDA graphs) with fullgraph=True, so any graph break raises; the greedy tokens
    equal the eager kernel model's and no CUDA graph is skipped."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM, CompileConfig, KernelConfig

    path = wide_checkpoints["llama"]
    mapping = {**configs("llama", hub)["fused"], "rotary_pos_emb": f"{hub}:ApplyRotaryPosEmb"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda", use_kernels=True,
                                                 kernel_config=KernelConfig(mapping, inherit_mapping=False))
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
