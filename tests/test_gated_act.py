"""The gated activation act(gate) * up of a merged [gate | up] projection, SiLU (SwiGLU) and GELU-tanh (GeGLU):
the op against float64 on every device (the matrix; on a GPU cuTile with poisoned outputs over Llama/Qwen/
Mistral widths and random ones), the reference against transformers' activations, the registered backward
(gradcheck), opcheck, and the arguments it refuses."""

import pytest
import torch
from transformers.activations import ACT2FN

from ._helpers import (CI_DEVICE, DEVICES, DTYPES, assert_close_to_float64, assert_grads_close, fresh_rng, no_fallback,
                       poisoned, recorded_launches, tune_everywhere)

ACTS = ["silu", "gelu_pytorch_tanh"]


def gated64(gate_up, act):
    g, u = gate_up.double().chunk(2, dim=-1)
    a = torch.nn.functional.silu(g) if act == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
    return a * u


def check_gated_act(ck, gate_up, act, where=""):
    """One call against float64: on a GPU the cuTile launcher writes into a poisoned buffer, elsewhere the
    public function runs (the reference)."""
    where = f"{tuple(gate_up.shape)} {gate_up.dtype} {act} {where}"
    if gate_up.is_cuda:
        out = ck.gated_act_cutile(gate_up, act, out=poisoned((*gate_up.shape[:-1], gate_up.shape[-1] // 2), gate_up))
    else:
        out = ck.gated_act(gate_up, act)
    assert_close_to_float64(out, gated64(gate_up, act), gate_up.dtype, where)


def check_gated_act_backward(ck, rows, inter, dtype, act, device):
    """d(gate_up) of the public function (on a GPU: the cuTile backward, no fallback) against float64."""
    gu = torch.randn(rows, 2 * inter, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(rows, inter, device=device, dtype=dtype)
    with no_fallback(ck, on=gu.is_cuda):
        ck.gated_act(gu, act).backward(dy)
    g64 = gu.detach().double().requires_grad_()
    gated64(g64, act).backward(dy.double())
    assert_grads_close([(gu.grad, g64.grad)], dtype, (rows, inter, dtype, act))


# --- the matrix --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_act(device_ck, device, dtype, act):
    seed, rng = fresh_rng()
    if device == "cpu":
        shapes = [(1, 160), (37, 96)]
    else:
        shapes = [(1, 14336), (16, 11008), (4096, 9728), (3, 160)] + \
            [(int(2 ** rng.uniform(0, 13)), rng.choice([9728, 11008, 14336, 18944, 28672, rng.randint(1, 4000)]))
             for _ in range(8)]
    for rows, inter in shapes:
        gate_up = torch.randn(rows, 2 * inter, device=device, dtype=dtype) * 3
        check_gated_act(device_ck, gate_up, act, f"seed {seed}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_act_backward(device_ck, device, dtype, act):
    shapes = [(1, 160), (37, 96)] if device == "cpu" else [(1, 14336), (300, 9728), (2048, 2000)]
    for rows, inter in shapes:
        check_gated_act_backward(device_ck, rows, inter, dtype, act, device)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(0, 512, False, 0), (0, 1024, False, 0), (0, 2048, False, 0),
                                    (1, 4096, True, 8, 8)])
def test_every_kind_of_tuned_forward_matches_float64(ck_gpu, config, monkeypatch):
    """What the tuner may write, run before it is chosen: gated_act_row (one chunk of one row per block,
    gather/scatter) and the persistent tiled kernel with 8 warps, at decode and prefill row counts, random widths
    (a partial last chunk), both activations, bf16/fp16 (they take the 16-bit entries) and fp32."""
    tune_everywhere(ck_gpu, monkeypatch, ACTS, config, range(1, 17), dtype_sizes=(2, 4))
    seed, rng = fresh_rng()
    for rows, inter in [(1, 14336), (rng.randint(2, 64), rng.choice([9728, rng.randint(1, 4000)])),
                        (rng.randint(65, 700), 11008)]:
        for dtype in DTYPES:
            for act in ACTS:
                gate_up = torch.randn(rows, 2 * inter, device="cuda", dtype=dtype) * 3
                check_gated_act(ck_gpu, gate_up, act, f"{config} seed {seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(0, 512, False), (0, 1024, False), (0, 2048, False), (2, 2048, True)])
def test_every_kind_of_tuned_backward_matches_float64(ck_gpu, config, monkeypatch):
    """The backward's tuner candidates, run before one is chosen: gated_act_bwd_row (one chunk of one row per
    block, gather/scatter) and 2-row tiles, at decode and prefill row counts, random widths (a partial last
    chunk), both activations, bf16/fp16 and fp32."""
    tune_everywhere(ck_gpu, monkeypatch, [f"{act}_backward" for act in ACTS], config, range(1, 17),
                    dtype_sizes=(2, 4))
    seed, rng = fresh_rng()
    for rows, inter in [(1, 14336), (rng.randint(2, 64), rng.choice([9728, rng.randint(1, 4000)])),
                        (rng.randint(65, 700), 11008)]:
        for dtype in DTYPES:
            for act in ACTS:
                check_gated_act_backward(ck_gpu, rows, inter, dtype, act, "cuda")


@pytest.mark.kernels_ci
@pytest.mark.parametrize("act", ACTS)
def test_gated_act_ci(ck_gpu, act):
    check_gated_act(ck_gpu, torch.randn(7, 1024, device=CI_DEVICE, dtype=torch.bfloat16), act)
    check_gated_act_backward(ck_gpu, 7, 512, torch.bfloat16, act, CI_DEVICE)


# --- the reference and the registered backward (CPU) --------------------------------------------------------

@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_equals_transformers(ck, act, dtype):
    gate_up = torch.randn(3, 5, 2 * 48, dtype=dtype) * 3
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(ck.gated_act_reference(gate_up, act), ACT2FN[act](gate) * up)


@pytest.mark.parametrize("act", ACTS)
def test_op_gradcheck(ck, act):
    gu = torch.randn(5, 2 * 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ck._ops.ops.gated_act(t, act), (gu,))


@pytest.mark.parametrize("dtype,requires_grad", [(torch.float32, False), (torch.bfloat16, False),
                                                (torch.float32, True)])
def test_opcheck(ck, dtype, requires_grad):
    """opcheck of both ops (with inputs that require grad also the autograd registration)."""
    ops = ck._ops.ops
    if requires_grad:
        torch.library.opcheck(ops.gated_act.default, (torch.randn(4, 96, requires_grad=True), "silu"))
        torch.library.opcheck(ops.gated_act_backward.default,
                              (torch.randn(4, 96), torch.randn(4, 48), "gelu_pytorch_tanh"))
        # a transposed gate_up: the fake's strides are the real (contiguous) ones
        torch.library.opcheck(ops.gated_act_backward.default,
                              (torch.randn(3, 4, 96).transpose(0, 1), torch.randn(4, 3, 48), "silu"))
        return
    for act in ACTS:
        torch.library.opcheck(ops.gated_act.default, (torch.randn(4, 7, 96, dtype=dtype), act))


def test_refuses_an_unknown_activation_and_an_odd_width(ck):
    with pytest.raises(ValueError, match="activation 'relu' is not supported"):
        ck.gated_act(torch.randn(2, 8), "relu")
    with pytest.raises(ValueError, match="must be even"):
        ck.gated_act(torch.randn(2, 7), "silu")


# --- GPU: edge shapes ---------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_zero_rows_and_a_column_slice(ck_gpu):
    bf = dict(device="cuda", dtype=torch.bfloat16)
    assert ck_gpu.gated_act(torch.empty(0, 512, **bf), "silu").shape == (0, 256)
    gu = torch.randn(64, 3000, **bf)[:, :2048]  # non-contiguous gate_up: correct result
    assert torch.allclose(ck_gpu.gated_act(gu, "silu").float(), ck_gpu.gated_act_reference(gu, "silu").float(),
                          rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("shape", [(5, 2 * 96), (2, 3, 2 * 96)])
def test_launcher_hands_the_kernel_both_halves_and_its_output(ck, monkeypatch, shape):
    """The launcher's glue on CPU (the launch recorded, not run): gate and up reach the kernel as the two
    (rows, I) halves of gate_up, and the kernel writes (a view of) the returned output of shape (..., I)."""
    plans = recorded_launches(ck, "gated_act", monkeypatch)
    gate_up = torch.randn(shape, dtype=torch.bfloat16)
    out = ck.gated_act_cutile(gate_up, "silu")
    (gate, up, out_rows, *_), = plans
    rows = gate_up.reshape(-1, 2 * 96)
    assert torch.equal(gate, rows[:, :96]) and torch.equal(up, rows[:, 96:])
    assert out.shape == (*shape[:-1], 96) and out.is_contiguous()
    assert out_rows.shape == (rows.shape[0], 96) and out_rows.data_ptr() == out.data_ptr()
