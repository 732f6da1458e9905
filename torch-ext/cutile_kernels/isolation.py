"""Load models with kernels without leaving transformers' process-global state changed.

`from_pretrained(..., kernel_config=...)` registers class patches and checkpoint conversion rules globally and
rewrites `_can_record_outputs` on model classes; all three outlive the load, and when building the model raises,
transformers' `apply_patches` never puts the original classes back into its modules
(docs/upstream-kernel-state-leak.md). The package removes its own share at the end of each load (checks.py);
the guard restores everything, also other libraries' patches. Inside `transformers_state_guard()` loads work as
usual; on exit all four are restored, and models already loaded keep working (their modules, conversions for
save_pretrained and recorders are their own). One exception: transformers' `rotary_pos_emb` is one module
object per modeling file, shared by every model of that family, so its kernel forward is process-wide and is
undone on exit as well: keep a model that uses `ApplyRotaryPosEmb` inside the block.

    with kernel.transformers_state_guard():
        model = AutoModelForCausalLM.from_pretrained(path, use_kernels=True, kernel_config=config)
"""
from __future__ import annotations

import contextlib
import copy
import sys


def _model_classes(base: type) -> list[type]:
    seen, todo = [], [base]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.append(sub)
                todo.append(sub)
    return seen


def transformers_modules() -> list:
    return [m for name, m in list(sys.modules.items()) if m is not None and name.startswith("transformers")]


def _module_classes() -> dict[tuple[str, str], type]:
    found = {}
    for module in transformers_modules():
        for attr, value in list(vars(module).items()):
            if isinstance(value, type):
                found[(module.__name__, attr)] = value
    return found


def _kernel_funcs() -> dict:
    """Functions transformers turned into kernelizable module objects (e.g. apply_rotary_pos_emb), with the
    forward bound on each instance (None: the class's own)."""
    import torch

    found = {}
    for module in transformers_modules():
        for value in list(vars(module).values()):
            if isinstance(value, torch.nn.Module) and hasattr(type(value), "kernel_layer_name"):
                found[value] = value.__dict__.get("forward")
    return found


@contextlib.contextmanager
def transformers_state_guard():
    from transformers import conversion_mapping, monkey_patching
    from transformers.modeling_utils import PreTrainedModel

    with monkey_patching._monkey_patch_lock:
        patches = dict(monkey_patching._monkey_patch_mapping_cache)
    conversions = conversion_mapping._checkpoint_conversion_mapping_cache
    conversions = None if conversions is None else dict(conversions)  # entries are replaced, never mutated
    user_registered = set(conversion_mapping.USER_REGISTERED_MAPPINGS)
    recorders = {cls: copy.deepcopy(cls.__dict__["_can_record_outputs"])
                 for cls in _model_classes(PreTrainedModel) if "_can_record_outputs" in cls.__dict__}
    classes = _module_classes()
    funcs = _kernel_funcs()
    try:
        yield
    finally:
        replacements = set(monkey_patching.get_patch_mapping().values()) - set(patches.values())
        for (module_name, attr), original in classes.items():
            if getattr(sys.modules[module_name], attr, original) in replacements:
                setattr(sys.modules[module_name], attr, original)
        with monkey_patching._monkey_patch_lock:
            monkey_patching._monkey_patch_mapping_cache.clear()
            monkey_patching._monkey_patch_mapping_cache.update(patches)
        conversion_mapping._checkpoint_conversion_mapping_cache = conversions
        conversion_mapping.USER_REGISTERED_MAPPINGS.clear()
        conversion_mapping.USER_REGISTERED_MAPPINGS.update(user_registered)
        for cls, saved in recorders.items():
            cls._can_record_outputs = saved
        for func, forward in funcs.items():  # kernelize binds the kernel forward on these shared instances
            if forward is None:
                func.__dict__.pop("forward", None)
            else:
                func.forward = forward
