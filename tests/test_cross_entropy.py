"""The cross-entropy of a causal LM's logits (cross_entropy.py) and `causal_lm_loss`, the loss enable_training
installs: per-row losses and the logits' gradient against float64 on every device (on a GPU the cuTile kernels with
poisoned outputs over real vocabulary sizes and random ones, ignored targets included), the loss function against
transformers' ForCausalLMLoss (mean, num_items_in_batch, shift_labels), opcheck, and what a wrong target gives."""
import pytest
import torch
from transformers.loss.loss_utils import LOSS_MAPPING

from ._helpers import CI_DEVICE, DEVICES, DTYPES, GRAD_REL_TOL, fresh_rng, no_fallback, poisoned, rel_err

VOCABS = [128256, 151936, 262208, 32768]  # Llama 3, Qwen2/3, Gemma3, Mistral


def problem(rows, vocab, dtype, device, ignored=0.2):
    """Logits with a realistic spread (scale 4) and targets with about `ignored` of them -100."""
    logits = (torch.randn(rows, vocab, device=device) * 4).to(dtype)
    target = torch.randint(0, vocab, (rows,), device=device)
    target[torch.rand(rows, device=device) < ignored] = -100
    target[0] = vocab - 1  # one counted row at least (the last column: the tail of the last tile)
    return logits, target


def float64_loss(logits, target):
    x = logits.double()
    lse = torch.logsumexp(x, -1)
    keep = target != -100
    picked = x.gather(1, target.clamp(min=0)[:, None])[:, 0]
    return torch.where(keep, lse - picked, 0), lse


def check_forward(ck, logits, target, where):
    want, want_lse = float64_loss(logits, target)
    if logits.is_cuda:
        loss, lse = ck.cross_entropy_cutile(logits, target, -100, loss=poisoned(want.shape, want.float()),
                                            lse=poisoned(want.shape, want.float()))
        torch.cuda.synchronize()
        assert not loss.isnan().any() and not lse.isnan().any(), f"unwritten outputs: {where}"
    else:
        loss, lse = ck._ops.ops.cross_entropy(logits, target, -100)
    assert loss.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    # fp32 sums over up to 262208 exact (upcast) logits: a few fp32 roundings of float64's result
    assert (loss.double() - want).abs().max() < 1e-4 * (1 + want.abs().max()), where
    assert (lse.double() - want_lse).abs().max() < 1e-4 * (1 + want_lse.abs().max()), where


def check_backward(ck, logits, target, dtype, where):
    x = logits.clone().requires_grad_()
    dloss = torch.randn(logits.shape[0], device=logits.device)
    with no_fallback(ck, on=logits.is_cuda):
        ck.cross_entropy(x, target).backward(dloss)
    x64 = logits.double().requires_grad_()
    torch.nn.functional.cross_entropy(x64, target, reduction="none").backward(dloss.double())
    assert x.grad.dtype == dtype and not x.grad.isnan().any(), where
    assert rel_err(x.grad, x64.grad) < GRAD_REL_TOL[dtype], (where, rel_err(x.grad, x64.grad))
    ignored = target == -100
    assert (x.grad[ignored] == 0).all(), where


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy(device_ck, device, dtype):
    seed, rng = fresh_rng()
    if device == "cpu":
        shapes = [(1, 1000), (37, 4099)]
    else:
        shapes = [(1, 128256), (7, 151936), (64, 262208), (300, 32768)] + \
            [(rng.randint(1, 700), rng.choice([*VOCABS, rng.randint(2, 70000)])) for _ in range(4)]
    torch.manual_seed(seed)
    for rows, vocab in shapes:
        logits, target = problem(rows, vocab, dtype, device)
        check_forward(device_ck, logits, target, f"{rows} x {vocab} {dtype} seed {seed}")
        check_backward(device_ck, logits, target, dtype, f"{rows} x {vocab} {dtype} seed {seed}")


@pytest.mark.kernels_ci
def test_cross_entropy_ci(ck_gpu):
    logits, target = problem(9, 5000, torch.bfloat16, CI_DEVICE)
    check_forward(ck_gpu, logits, target, "ci")
    check_backward(ck_gpu, logits, target, torch.bfloat16, "ci")


@pytest.mark.gpu
def test_a_target_outside_the_vocabulary_gives_nan_not_a_number(ck_gpu):
    """PyTorch raises a device-side assert; the kernel cannot raise, so such a row's loss is NaN (no silent
    value), while ignored and valid rows keep theirs."""
    logits = torch.randn(4, 1000, device="cuda", dtype=torch.bfloat16)
    target = torch.tensor([3, 1000, -100, -5], device="cuda")
    loss = ck_gpu.cross_entropy(logits, target)
    assert loss[1].isnan() and loss[3].isnan() and loss[2] == 0 and loss[0].isfinite()


@pytest.mark.gpu
def test_causal_lm_loss_on_a_gpu_matches_transformers(ck_gpu):
    """The loss transformers computes (fp32 logits, F.cross_entropy) and its gradient, at a real vocabulary."""
    logits = (torch.randn(2, 300, 128256, device="cuda") * 4).to(torch.bfloat16)
    labels = torch.randint(0, 128256, (2, 300), device="cuda")
    labels[:, :20] = -100
    check_causal_lm_loss(ck_gpu, logits, labels, {})


# --- causal_lm_loss: transformers' ForCausalLMLoss ------------------------------------------------------------

def check_causal_lm_loss(ck, logits, labels, kwargs):
    ours_x, theirs_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    vocab = logits.shape[-1]
    with no_fallback(ck, on=logits.is_cuda):
        ours = ck.causal_lm_loss(ours_x, labels, vocab, **kwargs)
    theirs = LOSS_MAPPING["ForCausalLM"](theirs_x, labels, vocab, **kwargs)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_x.grad.float(), theirs_x.grad.float(), rtol=GRAD_REL_TOL[logits.dtype],
                               atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["mean", "num_items_in_batch", "shift_labels", "int_items"])
def test_causal_lm_loss_matches_transformers(ck, dtype, case):
    logits = (torch.randn(2, 9, 300) * 4).to(dtype)
    labels = torch.randint(0, 300, (2, 9))
    labels[0, :3] = -100
    kwargs = {"mean": {}, "num_items_in_batch": {"num_items_in_batch": torch.tensor(11)},
              "shift_labels": {"shift_labels": torch.randint(0, 300, (2, 9))},
              "int_items": {"num_items_in_batch": 7}}[case]
    check_causal_lm_loss(ck, logits, labels, kwargs)


def test_enable_training_installs_the_loss_once_and_keeps_a_users(checkpoints, hub, ck_hub, cpu_kernel_config):
    """enable_training makes a causal LM's loss causal_lm_loss (the training loss equals plain's); loss=False and
    a loss function the user set are left alone."""
    from ._helpers import load, plain

    path = checkpoints["llama"]
    mapping = ck_hub.recommended_mapping("llama", hub, norm=False, rope=False)
    model, _ = load(path, mapping)
    assert model.loss_function is LOSS_MAPPING["ForCausalLM"]
    ck_hub.enable_training(model).train()
    assert model.loss_function is ck_hub.causal_lm_loss
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    reference = plain(path).train()
    torch.testing.assert_close(model(ids, labels=ids).loss, reference(ids, labels=ids).loss, rtol=1e-5, atol=1e-6)
    kept, _ = load(path, mapping)
    ck_hub.enable_training(kept, loss=False)
    assert kept.loss_function is LOSS_MAPPING["ForCausalLM"]
    mine = lambda *a, **k: torch.tensor(0.0)  # noqa: E731
    custom, _ = load(path, mapping)
    custom.loss_function = mine
    ck_hub.enable_training(custom)
    assert custom.loss_function is mine


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(ck, requires_grad):
    ops = ck._ops.ops
    logits, target = torch.randn(5, 40, requires_grad=requires_grad), torch.tensor([1, -100, 39, 0, 7])
    torch.library.opcheck(ops.cross_entropy.default, (logits, target, -100))
    lse = torch.logsumexp(logits.detach(), -1)
    torch.library.opcheck(ops.cross_entropy_backward.default, (logits.detach(), target, lse, torch.randn(5), -100))


def test_refuses_mismatched_shapes(ck):
    with pytest.raises(ValueError, match=r"logits must be \(rows, vocab\)"):
        ck.cross_entropy(torch.randn(2, 3, 8), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must be"):
        ck.cross_entropy(torch.randn(4, 8), torch.zeros(3, dtype=torch.long))


def test_launchers_hand_the_kernels_rows_and_tiles(ck, monkeypatch):
    """The launchers' glue on CPU (launches recorded, not run): one block per row forward, (rows, tiles of the
    vocabulary) backward, the float32 row buffers and the returned gradient are what the kernels write."""
    from ._helpers import recorded_launches

    plans = recorded_launches(ck, "cross_entropy", monkeypatch)
    logits, target = torch.randn(3, 5000, dtype=torch.bfloat16), torch.tensor([0, 4999, -100])
    loss, lse = ck.cross_entropy_cutile(logits, target, -100)
    grad = ck.cross_entropy_backward_cutile(logits, target, lse, torch.ones(3), -100)
    (f_args, b_args) = plans
    assert f_args[0] is logits and f_args[2].data_ptr() == loss.data_ptr() and f_args[3].data_ptr() == lse.data_ptr()
    assert loss.dtype == lse.dtype == torch.float32 and f_args[4:6] == (5000, -100)
    assert b_args[4].data_ptr() == grad.data_ptr() and grad.shape == logits.shape and grad.dtype == torch.bfloat16
