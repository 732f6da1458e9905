"""One definition per op: from a description (name, launcher, reference, check, fake, backward) `CutileOp`
builds the public function's dispatch, the torch.library custom op with its fake and autograd registration,
and the one-time fallback warning.

    RMS_NORM = CutileOp("rms_norm", launcher=rms_norm_cutile, reference=..., check=..., fake=...)
    RMS_NORM(x, weight, eps, gemma)          # what the public function calls
    RMS_NORM.op                              # the custom op (torch.ops.<variant namespace>.rms_norm)

Routing of a call, in this order (`__call__`):
  1. under torch.compile: the reference when the call has at most `COMPILE_REFERENCE_TOKENS` tokens (Inductor
     traces it and fuses it with its neighbours: at decode sizes a fused neighbour saves more than a kernel's
     speed gains), else the custom op (Inductor sees one opaque node with a fake);
  2. `check(*args)` returns a reason (CPU tensor, dtype, shape the kernel does not take): one warning per
     reason, then the exact PyTorch reference (differentiable by PyTorch); invalid arguments raise there;
  3. autograd records for a tensor argument: a differentiable op runs as a torch.autograd.Function made from the
     same description (`setup_context`, `backward`), whose backward calls the backward ops' launchers directly:
     an RMSNorm forward and backward cost ~40 µs of host time where the custom op's dispatch and registered
     autograd cost ~85 (CPU, launchers stubbed out; a bare autograd.Function: 33); an op without a backward runs
     as the custom op, whose missing autograd formula raises on backward rather than giving no gradient;
  4. otherwise the cuTile launcher directly (the lowest host cost per call).
The custom op's body (`run`) never routes back through `__call__`: it takes the launcher or the reference. A
backward description calls the backward ops through `in_backward`: the custom op (what torch.compile traces), or
inside the eager Function's backward the route above.
"""
from __future__ import annotations

import functools
import inspect
import threading

import torch

from ._ops import add_op_namespace_prefix
from ._runtime import KernelUnavailable, warn_fallback

# Under torch.compile, calls with at most this many tokens trace the op's reference (see the module docstring);
# 0: every call is the custom op. Read when a call is traced (benchmarks/decode_layer.py compares both).
COMPILE_REFERENCE_TOKENS = 0

_EAGER_BACKWARD = threading.local()  # set while an eager Function's backward runs (autograd's thread)


def _contiguous(out, *args):
    return tuple(t.contiguous() for t in out) if isinstance(out, tuple) else out.contiguous()


class CutileOp:
    """An op from its description: `launcher` (the cuTile path alone; its annotated signature is the custom op's
    schema), `reference` (the exact PyTorch computation, same arguments), `check` ((*args) -> None when the
    launcher takes them, else the reason; raises ValueError on invalid arguments), `fake` (output metadata for
    torch.compile), optionally `conform` ((outputs, *args) -> the outputs in the fake's layout; default: contiguous)
    and `backward` + `setup_context` (as torch.library.register_autograd takes them), and `tokens` ((*args) -> the
    call's token count; default: the first argument's rows)."""

    def __init__(self, name: str, *, launcher, reference, check, fake, conform=None, backward=None,
                 setup_context=None, tokens=None):
        self.name, self.launcher, self.reference, self.check = name, launcher, reference, check
        self.tokens = tokens or (lambda x, *args: x.numel() // x.shape[-1])
        self.conform = conform or _contiguous
        self.differentiable = backward is not None

        @functools.wraps(launcher)
        def body(*args):
            return self.run(*args)

        # The schema: the launcher's parameters without its optional output buffers (`out=None`: the GPU tests
        # poison them; an op may not return its inputs) and without defaults (every caller passes all).
        sig = inspect.signature(launcher)
        body.__signature__ = sig.replace(parameters=[
            p.replace(default=p.empty) for p in sig.parameters.values() if p.default is not None])
        self.op = torch.library.custom_op(add_op_namespace_prefix(name), body, mutates_args=())
        torch.library.register_fake(add_op_namespace_prefix(name), fake)
        if backward is not None:
            torch.library.register_autograd(add_op_namespace_prefix(name), backward, setup_context=setup_context)
            self.function = _eager_function(self, backward, setup_context)

    def run(self, *args):
        """The custom op's body: the launcher, or the reference when `check` gives a reason (warned once)."""
        reason = self.check(*args)
        if reason is not None:
            warn_fallback(self.name, reason)
        out = self.reference(*args) if reason is not None else self.launched(*args)
        # laid out as the fake promises (a reference or a transposed launch may return other strides)
        return self.conform(out, *args)

    def launched(self, *args):
        """The launcher on arguments `check` passed; the reference where it cannot launch (no cubin for these
        inputs and no cuda.tile; outputs are fresh tensors either way)."""
        try:
            return self.launcher(*args)
        except KernelUnavailable as e:
            warn_fallback(self.name, str(e))
            return self.reference(*args)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            if COMPILE_REFERENCE_TOKENS and self.tokens(*args) <= COMPILE_REFERENCE_TOKENS:
                return self.reference(*args)
            return self.op(*args)
        reason = self.check(*args)
        if reason is not None:
            warn_fallback(self.name, reason)
            return self.reference(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self.function.apply(*args) if self.differentiable else self.op(*args)
        return self.launched(*args)

    def in_backward(self, *args):
        """What a backward description calls: the custom op, except inside an eager Function's backward, where the
        call routes as `__call__` does (grad mode is off there unless create_graph: the launcher directly)."""
        return self(*args) if getattr(_EAGER_BACKWARD, "on", False) else self.op(*args)


def _eager_function(op: CutileOp, backward, setup_context):
    """A torch.autograd.Function of `op`'s description: forward `op.launched` (only `__call__` applies it, after the
    check), the same setup_context and backward. The forward calls setup_context itself (the separate-setup_context
    form binds default arguments through inspect.signature on every call: 10 µs of host time)."""
    def forward(ctx, *args):
        out = op.launched(*args)
        setup_context(ctx, args, out)
        return out

    def eager_backward(ctx, *grads):
        before = getattr(_EAGER_BACKWARD, "on", False)
        _EAGER_BACKWARD.on = True
        try:
            return backward(ctx, *grads)
        finally:
            _EAGER_BACKWARD.on = before

    return type(f"{op.name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(eager_backward)})
