"""Tensor parallelism: how the Layouts' parameters shard under transformers' tp_plan (DistributedConfig).

transformers takes a model's plan from `config.base_model_tp_plan` (module paths under the base model -> a style of
transformers/distributed/tensor_parallel.py), read once the base model's layers are built (`init_parallel_plans` in
`post_init`, transformers/distributed/mixin.py); `apply_tensor_parallelism` installs the styles before the weights
load, so each rank reads only its shard. The families' plans name `layers.*.mlp.{gate,up,down}_proj`, which a
merged MLP no longer has: `gate_up_proj` would stay replicated and feed the full intermediate activation to a
row-sharded `down_proj` (a shape error), and a fused norm+MLP Layout's projections (under the norm's slot) would
match nothing (a replicated MLP on every rank).

So each Layout, when transformers builds it, rewrites its model's config plan (an instance attribute: the class's
plan is shared, and transformers never saves this attribute) from the original projections to its own:
  - gate_up_proj: packed column-wise. A plain column split of [gate | up] would give rank 0 the gate and rank 1 the
    up; packed, each rank holds its slice of gate and of up, so act(gate) * up stays local;
  - down_proj: rowwise (transformers all-reduces the partial sums after it);
  - a fused Layout's norm weight: no entry, replicated.
The kernels call the projections as modules (never `F.linear` on their weights), so the styles' hooks run.
tp_plan="auto" and a dict override (merged into this plan) both see it.

Why the plan says "colwise" for gate_up_proj at first: transformers 5.22 shards on read, each checkpoint tensor by
the placement of the parameter it loads into (sharding_utils.DtensorShardOperation), before the conversion
concatenates gate and up. "packed_colwise" (_StridedShard(0, split_factor=2)) would then take two strided pieces
of gate and two of up, not the halves of [gate | up]; "colwise" (Shard(0)) takes rank r's contiguous slice of each,
which concatenated is exactly the packed local shard [gate_r | up_r]. The concatenation (`ConcatenateGateUp`, in
the Layouts' conversion rules) then declares what it built: the parameter becomes packed (transformers'
PackedColwiseParallel placement and hooks), so full_tensor() and save_pretrained give [gate | up] back and the
conversion rules write the original gate_proj/up_proj keys.

The merged q/k/v attention (attention.py) has no such plan: under GQA [q | k | v] has unequal parts, which the packed
style (equal parts) cannot describe, so its Layout refuses a sharded load (`sharded_load`).
"""
from __future__ import annotations

# The merged MLP's plan relative to the module holding gate_up_proj and down_proj (transformers' `_tp_plan` form),
# as the loader reads it ("colwise": see the docstring); gate_up_proj is packed once read.
MERGED_MLP_TP_PLAN = {"gate_up_proj": "colwise", "down_proj": "rowwise"}
PACKED_STYLE = "packed_colwise"
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def merged_mlp_tp_plan(plan: dict | None, src: str, dst: str) -> dict | None:
    """`plan` (a base_model_tp_plan) with the entries of `<layers>.<src>.{gate,up,down}_proj` replaced by
    MERGED_MLP_TP_PLAN under `<layers>.<dst>`; None when the plan shards no such MLP (nothing to change)."""
    if not plan:
        return None
    rewritten, changed = {}, False
    for key, style in plan.items():
        parent, _, leaf = key.rpartition(".")
        if leaf in _MLP_PROJECTIONS and (parent == src or parent.endswith(f".{src}")):
            layers = parent.removesuffix(src)  # "layers.*." (or "" for a plan at the MLP's own level)
            rewritten.update({f"{layers}{dst}.{name}": s for name, s in MERGED_MLP_TP_PLAN.items()})
            changed = True
        else:
            rewritten[key] = style
    return rewritten if changed else None


def declare_merged_mlp_sharding(config, src: str, dst: str) -> None:
    """Called by a merged-MLP Layout when built: its model's plan shards the Layout's projections (at `dst`) as the
    original plan sharded the MLP's (at `src`). Idempotent (every layer's Layout calls it)."""
    plan = merged_mlp_tp_plan(getattr(config, "base_model_tp_plan", None), src, dst)
    if plan is not None:
        config.base_model_tp_plan = plan


def sharded_load(config) -> str | None:
    """How the load building a Layout shards checkpoint tensors ("under tensor parallelism (tp_size=2)"), or None:
    from the DistributedConfig that from_pretrained puts on the config before it builds the model."""
    distributed = getattr(config, "distributed_config", None)
    tp, fsdp = (getattr(distributed, name, None) or 1 for name in ("tp_size", "fsdp_size"))
    if tp > 1:
        return f"under tensor parallelism (tp_size={tp})"
    if fsdp > 1:
        return f"with fsdp_size={fsdp}"
    return None


def pack_gate_up_shard(model, param_name: str) -> None:
    """After rank r read [gate_r | up_r] into `param_name` (a gate_up_proj weight or bias placeholder, Shard(0) on
    the TP mesh): declare it packed, and give its module transformers' packed_colwise hooks. No-op when the
    parameter is not sharded."""
    import torch
    from torch import nn
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, replace_layer_number_by_wildcard

    module_name, _, name = param_name.rpartition(".")
    module = model.get_submodule(module_name)
    param = module._parameters.get(name)
    if not isinstance(param, DTensor):
        return
    if param.placements != (Shard(0),) or param.device_mesh.mesh_dim_names != ("tp",):
        raise NotImplementedError(
            f"cutile_kernels: {param_name} is sharded as {param.placements} on the mesh "
            f"{param.device_mesh.mesh_dim_names}; a merged gate_up_proj loads under tensor parallelism alone "
            "(its plan entry is the Layout's: do not override it, and no fsdp_size with a merged MLP)")
    mesh = param.device_mesh
    # Still a meta placeholder: only its placement changes; the loader then wraps the local [gate_r | up_r] in it.
    # 1-D too (a bias): transformers' PackedColwiseParallel would label a packed bias a contiguous Shard.
    full = torch.empty(param.shape, dtype=param.dtype, device="meta")
    module._parameters[name] = nn.Parameter(
        distribute_tensor(full, mesh, [_StridedShard(0, split_factor=2)], src_data_rank=None),
        requires_grad=param.requires_grad)
    if name == "weight":
        module.__dict__.pop("forward", None)  # ColwiseParallel's hook: its grad path would regroup the output
        ALL_PARALLEL_STYLES[PACKED_STYLE].install_forward(module, mesh)
        plan = getattr(model, "_tp_plan", None)
        if plan is not None and plan.get(key := replace_layer_number_by_wildcard(module_name)) is not None:
            plan[key] = PACKED_STYLE


def keep_tp_grad_hooks(model) -> None:
    """Keep the gradient all-reduce of transformers' `replicated_with_grad_allreduce` style (Qwen3's and Gemma3's
    q_norm/k_norm: replicated weights that see only this rank's heads) on modules a kernel replaces.

    transformers installs the style by replacing the module's `forward` (its hook registers the gradient
    all-reduce on the first forward with gradients); kernels' kernelize (end of from_pretrained, and every
    model.train()/eval()) rebinds `forward` to the kernel's, or back to the class's, which drops it: each rank's
    gradient of those weights stays partial. A forward pre-hook survives the rebinding; it registers the same
    all-reduce once per parameter, only while the module's forward is not transformers' own hook (no double sum).
    Called by the merged MLP Layouts' load; call it once after from_pretrained for other mappings under tp_plan.
    Idempotent; a no-op without tensor parallelism."""
    from transformers.distributed.tensor_parallel import _get_parameter_plan

    plan, manager = getattr(model, "_tp_plan", None), getattr(model, "_mesh_manager", None)
    if not plan or manager is None:
        return
    group = manager.get_mesh("tp").get_group()
    for name, module in model.named_modules():
        if _get_parameter_plan(name, plan, is_weight=False) != "replicated_with_grad_allreduce" or \
                getattr(module, "_cutile_grad_allreduce", False):
            continue
        module._cutile_grad_allreduce = True
        module.register_forward_pre_hook(_grad_allreduce_pre_hook(group))


def _grad_allreduce_pre_hook(group):
    import torch
    import torch.distributed as dist

    def all_reduce(param):
        dist.all_reduce(param.grad, group=group)

    def pre_hook(module, args):
        own = getattr(module.__dict__.get("forward"), "__name__", None) == "tp_forward"  # transformers' hook intact
        if own or not torch.is_grad_enabled():
            return
        for param in module.parameters(recurse=False):
            if param.requires_grad and not getattr(param, "_cutile_grad_allreduce", False):
                param._cutile_grad_allreduce = True
                param.register_post_accumulate_grad_hook(all_reduce)

    return pre_hook


try:  # kernels also loads this package without transformers: then no Layout (and no conversion) is used
    from transformers.core_model_loading import Concatenate
except ImportError:
    Concatenate = None

if Concatenate is not None:
    class ConcatenateGateUp(Concatenate):
        """Concatenate(dim=0) of gate_proj and up_proj into gate_up_proj; under tensor parallelism, the result is
        this rank's packed shard (pack_gate_up_shard). Reversed on save by Concatenate's Chunk."""

        def __init__(self):
            super().__init__(dim=0)

        def convert(self, input_dict, source_patterns, target_patterns, full_layer_name=None, model=None,
                    **kwargs):
            merged = super().convert(input_dict, source_patterns, target_patterns, **kwargs)
            if model is not None and full_layer_name:
                pack_gate_up_shard(model, full_layer_name)
                keep_tp_grad_hooks(model)
            return merged
