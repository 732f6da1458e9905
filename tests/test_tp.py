"""The Layouts under transformers' tensor parallelism (tp_plan, DistributedConfig) and FSDP2, two processes.

CPU: torch.distributed over gloo, the kernels' exact PyTorch references (transformers' "cpu" refusal lifted as in
the `cpu_kernel_config` fixture). GPU (marked `gpu`, two GPUs): NCCL and cuTile, the same checks at bf16 tolerance.

One spawn per family; each rank, for every Layout mapping of that family:
  - loads through from_pretrained(use_kernels=True, kernel_config=..., tp_plan) and checks the kernel forward is
    bound to every Layout;
  - logits equal the single-process plain model's (within the reduction-order tolerance: the row-sharded
    projections sum two partial products);
  - each rank holds 1/2 of every sharded weight: every attention and MLP projection (the merged gate_up_proj
    packed: rank r holds rows r of gate AND of up, checked against the checkpoint), norm weights replicated;
  - a training step (enable_training) gives the single-process gradients (sharded ones gathered);
  - save_pretrained from the sharded model writes the original keys with the full tensors.
Each rank reports what it checked; the test asserts every report arrived (no check can pass by not running).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from devtools.checkpoints import make_checkpoint

from ._helpers import rel_err

WORLD = 2
# family -> Layout mappings (recommended_mapping options; rope on: the RoPE kernel sees each rank's local heads)
CASES = {
    "llama": {"merged": dict(mlp="merged"), "fused": {}, "decoder": dict(decoder=True)},
    "qwen3": {"merged": dict(mlp="merged"), "fused": {}, "decoder": dict(decoder=True)},
    "gemma3": {"fused": {}, "decoder": dict(decoder=True)},
}
# logits and gradients against the single-process float32 model: partial sums add in another order (CPU), or
# bf16 GEMMs split in two and cuTile (GPU, as in tests/_helpers.py assert_gpu_parity)
TOL = {"cpu": dict(logits=1e-5, grad=1e-4), "cuda": dict(logits=2e-2, grad=5e-2)}


def _distributed_unavailable() -> str | None:
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this torch build"
    return None


pytestmark = pytest.mark.skipif(_distributed_unavailable() is not None, reason=str(_distributed_unavailable()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:
    """Run fn(rank, *args) on WORLD processes: torchrun's environment (transformers reads RANK, LOCAL_RANK,
    WORLD_SIZE) and a fresh rendezvous port."""
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(_free_port(), *args), nprocs=WORLD, join=True)


def _init(rank: int, port: int, device: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:  # the one patch of transformers, as the cpu_kernel_config fixture (on a GPU the route runs unpatched)
        import importlib

        kc = importlib.import_module("transformers.utils.kernel_config")
        kc.KERNELS_SUPPORTED_DEVICE_TYPES = [*kc.KERNELS_SUPPORTED_DEVICE_TYPES, "cpu"]
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=WORLD)


def _report(out: Path, rank: int, name: str, record: dict) -> None:
    with open(out / f"{name}.rank{rank}.json", "w") as f:
        json.dump(record, f)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _original_name(name: str) -> list[str]:
    """A kernel model's parameter -> the plain model's parameters it holds (a merged gate_up_proj: gate, up)."""
    for slot in ("mlp", "post_attention_layernorm", "pre_feedforward_layernorm"):
        marker = f".{slot}.gate_up_proj."
        if marker in name:
            head, _, tail = name.partition(marker)
            return [f"{head}.mlp.gate_proj.{tail}", f"{head}.mlp.up_proj.{tail}"]
        marker = f".{slot}.down_proj."
        if marker in name:
            head, _, tail = name.partition(marker)
            return [f"{head}.mlp.down_proj.{tail}"]
    return [name]


def _check_shards(model, checkpoint: dict, rank: int) -> dict:
    """Every projection of the decoder holds 1/WORLD of its weight; a packed gate_up_proj holds rank r's rows of
    gate and of up; every norm weight is replicated. Returns counts for the report."""
    from torch.distributed.tensor import DTensor

    sharded, packed, replicated_norms = 0, 0, 0
    for name, p in model.named_parameters():
        if ".layers." not in name:
            continue
        if name.endswith("_proj.weight"):
            assert isinstance(p, DTensor), f"{name} is not sharded"
            assert _local(p).numel() * WORLD == p.numel(), (name, tuple(_local(p).shape), tuple(p.shape))
            sharded += 1
            if ".gate_up_proj." in name:
                gate, up = (checkpoint[k] for k in _original_name(name))
                rows = gate.shape[0] // WORLD
                want = torch.cat([gate[rank * rows:(rank + 1) * rows], up[rank * rows:(rank + 1) * rows]])
                assert torch.equal(_local(p).cpu().float(), want.float()), f"{name}: not [gate_r | up_r]"
                packed += 1
        elif "norm" in name:
            assert not isinstance(p, DTensor) or all(pl.is_replicate() for pl in p.placements), name
            replicated_norms += 1
    return dict(sharded=sharded, packed=packed, replicated_norms=replicated_norms)


def _grads(model) -> dict:
    return {n: _full(p.grad).float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def _check_grads(got: dict, want: dict, tol: float, where: str) -> int:
    """Each gradient of the kernel model against the plain model's (a merged one: the two concatenated)."""
    assert got, f"{where}: no gradients"
    for name, g in got.items():
        ref = torch.cat([want[k] for k in _original_name(name)])
        assert g.shape == ref.shape, (where, name)
        assert rel_err(g, ref) < tol, (where, name, rel_err(g, ref))
    return len(got)


def _tp_worker(rank: int, port: int, device: str, kernel_repo: str, family: str, path: str, out: str) -> None:
    import kernels
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, KernelConfig
    from transformers.distributed import DistributedConfig

    from devtools.local_hub import local_hub

    _init(rank, port, device)
    out, tol = Path(out), TOL[device]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    checkpoint = load_file(f"{path}/model.safetensors")
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0)).to(device)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)  # single-process, plain
    with torch.no_grad():
        want_logits = reference(ids).logits.float()
    reference.train()
    reference(ids, labels=ids).loss.backward()
    want_grads = _grads(reference)
    del reference
    with local_hub(Path(kernel_repo)) as hub:
        ck = kernels.get_kernel(hub, version=1)
        for i, (case, options) in enumerate(CASES[family].items()):
            mapping = ck.recommended_mapping(family, hub, **options)
            # the first case through the deprecated tp_plan= argument users still pass, the others as
            # transformers recommends (DistributedConfig)
            parallel = dict(tp_plan="auto") if i == 0 else \
                dict(distributed_config=DistributedConfig(tp_plan="auto"))
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_kernels=True,
                                                         kernel_config=KernelConfig(mapping), **parallel)
            found = [m for m in model.modules() if type(m).__name__.endswith("Layout")]
            assert found, case
            if not any(".gate_up_proj." in n for n, _ in model.named_parameters()):
                # no merged MLP Layout (whose load does it): the norm kernels' rebinding drops transformers'
                # q_norm/k_norm gradient all-reduce (parallel.keep_tp_grad_hooks)
                ck.keep_tp_grad_hooks(model)
            for m in found:  # kernelize bound the kernel's forward to each Layout (not its reference)
                assert m.forward.__func__ is getattr(ck.layers, type(m).__name__.removesuffix("Layout")).forward
            record = dict(case=case, layouts=len(found), **_check_shards(model, checkpoint, rank))

            with torch.no_grad():
                got = model(ids).logits.float()
            record["logits_rel_err"] = rel_err(got, want_logits)
            assert record["logits_rel_err"] < tol["logits"], (case, record)

            ck.enable_training(model).train()
            assert all(m.forward.__func__ is not type(m).forward for m in found)  # still the kernels
            model(ids, labels=ids).loss.backward()
            record["grads"] = _check_grads(_grads(model), want_grads, tol["grad"], case)
            model.eval()

            saved = out / f"{family}-{case}"
            model.save_pretrained(saved)  # collective: every rank gathers, rank 0 writes
            if rank == 0:
                written = load_file(f"{saved}/model.safetensors")
                extra = set(written) - set(checkpoint)
                # transformers' TP save writes a tied lm_head too (plain models as well: the gathered tensors are
                # no longer one object); it must still be the embedding
                if model.config.tie_word_embeddings and extra == {"lm_head.weight"}:
                    assert torch.equal(written.pop("lm_head.weight"), written["model.embed_tokens.weight"])
                assert set(written) == set(checkpoint), (case, set(written) ^ set(checkpoint))
                for key, value in checkpoint.items():
                    assert torch.equal(written[key].float(), value.to(dtype).float()), (case, key)
                record["saved_keys"] = len(written)
            _report(out, rank, case, record)
            del model
    import torch.distributed as dist

    dist.destroy_process_group()


def _fsdp_worker(rank: int, port: int, device: str, kernel_repo: str, paths: dict, out: str) -> None:
    """FSDP2 (fully_shard per decoder layer and the root) of a kernels-loaded model, data parallel: each rank one
    sequence of the batch; the averaged gradients equal the single-process gradients of the whole batch."""
    import kernels
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, KernelConfig

    from devtools.local_hub import local_hub

    _init(rank, port, device)
    out, tol = Path(out), TOL[device]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ids = torch.randint(0, 256, (WORLD, 17), generator=torch.Generator().manual_seed(1)).to(device)
    with local_hub(Path(kernel_repo)) as hub:
        ck = kernels.get_kernel(hub, version=1)
        for family, (path, options) in paths.items():
            reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).train()
            reference(ids, labels=ids).loss.backward()
            want = _grads(reference)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_kernels=True, kernel_config=KernelConfig(ck.recommended_mapping(
                    family, hub, **options))).to(device)
            ck.enable_training(model).train()
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            found = [m for m in model.modules() if type(m).__name__.endswith("Layout")]
            assert found and all(m.forward.__func__ is not type(m).forward for m in found)
            mine = ids[rank:rank + 1]
            loss = model(mine, labels=mine).loss
            loss.backward()
            local = {n: _local(p.grad).numel() for n, p in model.named_parameters() if p.grad is not None}
            assert sum(local.values()) * WORLD >= sum(p.numel() for p in model.parameters())  # sharded grads
            record = dict(family=family, grads=_check_grads(_grads(model), want, tol["grad"], f"fsdp {family}"))
            _report(out, rank, f"fsdp-{family}", record)
            del model, reference
    import torch.distributed as dist

    dist.destroy_process_group()


def _reports(out: Path, names) -> dict:
    reports = {}
    for name in names:
        for rank in range(WORLD):
            f = out / f"{name}.rank{rank}.json"
            assert f.exists(), f"rank {rank} did not report {name}"
            reports[name, rank] = json.loads(f.read_text())
    return reports


def _assert_tp_reports(out: Path, family: str, path: Path, device: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    layers = config.num_hidden_layers
    for (case, rank), r in _reports(out, CASES[family]).items():
        # 4 attention + 3 MLP projections a layer; merged MLP: gate_up_proj + down_proj
        merged = family != "gemma3" or case != "decoder"
        assert r["sharded"] == layers * (6 if merged else 7), (case, r)
        assert r["packed"] == (layers if merged else 0), (case, r)
        assert r["replicated_norms"] >= 2 * layers, (case, r)
        assert r["logits_rel_err"] < TOL[device]["logits"], (case, r)
        assert r["grads"] > 0 and r["layouts"] > 0, (case, r)
        if rank == 0:
            assert r["saved_keys"] > 0, (case, r)


@pytest.mark.parametrize("family", list(CASES))
def test_tensor_parallel(kernel_repo, checkpoints, tmp_path, family):
    _spawn(_tp_worker, "cpu", str(kernel_repo), family, str(checkpoints[family]), str(tmp_path))
    _assert_tp_reports(tmp_path, family, checkpoints[family], "cpu")


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_tensor_parallel_with_one_op_for_the_attention_norms(kernel_repo, tmp_path, family):
    """head_dim 32, which qk_norm_rope takes (the tiny checkpoints' 16 keeps the norm modules): the decoder layers
    would do q_norm's and k_norm's work in that op without calling them, which skipped the pre-hook
    (`keep_tp_grad_hooks`) that registers their gradients' all-reduce: each rank kept its partial gradient. Those
    layers call the norms now, so every gradient equals the single-process one."""
    path = make_checkpoint(family, tmp_path / "ckpt", head_dim=32)
    _spawn(_tp_worker, "cpu", str(kernel_repo), family, str(path), str(tmp_path))
    _assert_tp_reports(tmp_path, family, path, "cpu")


FSDP_CASES = {"llama": {}, "qwen3": dict(mlp="merged")}  # the fused norm+MLP Layout; the merged MLP


def test_fsdp2_training_step(kernel_repo, checkpoints, tmp_path):
    paths = {f: (str(checkpoints[f]), options) for f, options in FSDP_CASES.items()}
    _spawn(_fsdp_worker, "cpu", str(kernel_repo), paths, str(tmp_path))
    for (_, _), r in _reports(tmp_path, [f"fsdp-{f}" for f in FSDP_CASES]).items():
        assert r["grads"] > 0, r


# --- two GPUs: NCCL and cuTile --------------------------------------------------------------------------------

def _two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs two CUDA GPUs")
@pytest.mark.parametrize("family", list(CASES))
def test_tensor_parallel_on_two_gpus(kernel_repo, tmp_path, family):
    # head_dim 64: every kernel (RoPE included) takes its cuTile path
    path = make_checkpoint(family, tmp_path / "ckpt", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64)
    _spawn(_tp_worker, "cuda", str(kernel_repo), family, str(path), str(tmp_path))
    _assert_tp_reports(tmp_path, family, path, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs two CUDA GPUs")
def test_fsdp2_training_step_on_two_gpus(kernel_repo, tmp_path):
    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    paths = {f: (str(make_checkpoint(f, tmp_path / f, **shape)), options) for f, options in FSDP_CASES.items()}
    _spawn(_fsdp_worker, "cuda", str(kernel_repo), paths, str(tmp_path))
    assert len(_reports(tmp_path, [f"fsdp-{f}" for f in FSDP_CASES])) == WORLD * len(FSDP_CASES)
