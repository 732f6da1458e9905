"""Every op, forward and backward, over real model widths: cuTile against torch eager, torch.compile, Liger-Kernel
and TileGym.

    python -m benchmarks.run_all [--quick] [--out benchmarks/results/<gpu>/kernels.md]   (and kernels.png)
    python -m benchmarks.run_all --tiny                                                  (CPU: tiny shapes)

Widths come from the harness's model registry (forward: every distinct width; backward: 8B widths), rows from
decode (1) to prefill (32768 tokens). Every implementation is first checked against float64 (relative error
< 1e-2 per output, bf16); one that fails is reported and not timed. Device µs: `harness.device_us` (CUDA graph of
20 calls, rotating inputs); host µs: `harness.host_us` (back-to-back calls).

Backward rows time the backward alone. The forward runs once, outside the timing, on inputs that require grad; the
timed call is the autograd node it recorded, `out.grad_fn.apply(dy)`: for ours the custom op's registered backward
(the cuTile backward kernels), for Liger its autograd Function's backward, for compile the backward graph that
AOTAutograd and Inductor built for the reference. Eager is the package's backward formula in PyTorch. Bytes
counted for "% of copy": forward norms read x, w and write y; backward norms read x, w, dy and write dx, dw; the
gated activation reads gate_up (and dy) and writes its output (d gate_up); RoPE reads and writes q and k.
"""
from __future__ import annotations

import importlib
import math
import statistics

import torch
import torch.nn.functional as F

from . import harness as h

EPS = 1e-6
PEERS = ("compile", "liger", "tilegym")
IMPLS = ("cutile", "eager", *PEERS)  # in this order: Liger's RoPE rotates its inputs in place


def norm64(x, w, gemma=False):
    x = x.double()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return y * (1 + w.double()) if gemma else y * w.double()


def act64(gu, act):
    g, u = gu.double().chunk(2, dim=-1)
    return (F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")) * u


def rope64(q, k, cos, sin):
    c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    rot = lambda x: torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), -1)  # noqa: E731
    return tuple(x.double() * c + rot(x.double()) * s for x in (q, k))


def grads64(f, n_diff: int, n_grads: int = 1):
    """The float64 reference of a backward row: autograd through `f` on (*inputs, *grads)."""
    def ref(*args):
        inputs = [t.double().requires_grad_(i < n_diff) for i, t in enumerate(args[:-n_grads])]
        outs = f(*inputs)
        return torch.autograd.grad(outs, inputs[:n_diff], [g.double() for g in args[-n_grads:]])
    return ref


def backward(forward, n_diff: int, n_grads: int = 1):
    """A backward implementation: (prepare, call). prepare(*inputs, *grads) runs `forward` once on inputs that
    require grad and returns (its autograd node, *grads); call(node, *grads) is the timed backward (the gradients
    of the inputs that require grad, in the order the node lists them)."""
    def prepare(*args):
        inputs, grads = args[:-n_grads], args[-n_grads:]
        leaves = [t.detach().requires_grad_(i < n_diff) for i, t in enumerate(inputs)]
        with torch.enable_grad():
            out = forward(*leaves)
        return ((out[0] if isinstance(out, tuple) else out).grad_fn, *(g.clone() for g in grads))  # Liger: in place
    return prepare, lambda node, *grads: tuple(g for g in node.apply(*grads) if g is not None)


def cases(ck, tiny: bool) -> list[dict]:
    """One dict per op and direction: make(rows, width) -> inputs, ref (float64), nbytes(rows, width), impls."""
    ops, dt = importlib.import_module(f"{ck.__name__}._ops").ops, dict(device=h.DEVICE, dtype=torch.bfloat16)
    shape = h.TINY if tiny else h.SIZE_8B
    ws = lambda attr, gemma: [getattr(h.TINY, attr)] if tiny else h.widths(attr, gemma=gemma)  # noqa: E731
    heads = [shape] if tiny else [h.MODELS["llama3-8b"], h.MODELS["gemma3-12b"]]
    lg_norm, lg_swiglu, lg_geglu, lg_rope, tg_norm, tg_swiglu = (h.peer(m) for m in (
        "liger_kernel.ops.rms_norm", "liger_kernel.ops.swiglu", "liger_kernel.ops.geglu",
        "liger_kernel.transformers.rope", "tilegym.ops.cutile.rms_norm", "tilegym.ops.cutile.silu_and_mul"))
    rand = lambda *s: torch.randn(*s, **dt)  # noqa: E731

    def norm_case(gemma, bwd):
        name = "gemma_rms_norm" if gemma else "rms_norm"
        public, ref = (ck.gemma_rms_norm if gemma else ck.rms_norm), getattr(ck, f"{name}_reference")
        offset = {"offset": 1.0} if gemma else {}  # TileGym's Gemma form
        liger = lg_norm and (lambda x, w: lg_norm.LigerRMSNormFunction.apply(
            x, w, EPS, 1.0 if gemma else 0.0, "gemma" if gemma else "llama", False))
        make = lambda m, n: (rand(m, n), (1 + 0.1 * torch.randn(n, device=h.DEVICE)).bfloat16()) + (  # noqa: E731
            (rand(m, n),) if bwd else ())
        if not bwd:
            impls = dict(cutile=lambda x, w: public(x, w, EPS), eager=lambda x, w: ref(x, w, EPS),
                         compile=h.compiled(lambda x, w: ref(x, w, EPS)), liger=liger,
                         tilegym=tg_norm and (lambda x, w: tg_norm.rms_norm(x, None, w, EPS, **offset)))
            return dict(op=name, make=make, ref=lambda x, w: norm64(x, w, gemma), impls=impls,
                        nbytes=lambda m, n: 4 * m * n + 2 * n, widths=ws("hidden", gemma))
        impls = dict(cutile=backward(lambda x, w: ops.rms_norm(x, w, EPS, gemma), 2),
                     eager=lambda x, w, dy: ck.rms_norm_backward_reference(x, w, dy, EPS, gemma),
                     compile=backward(h.compiled(lambda x, w: ref(x, w, EPS)), 2), liger=liger and backward(liger, 2))
        return dict(op=f"{name} bwd", make=make, ref=grads64(lambda x, w: norm64(x, w, gemma), 2), impls=impls,
                    nbytes=lambda m, n: 6 * m * n + 4 * n, widths=[shape.hidden])

    def act_case(act, bwd):
        name = "silu_mul" if act == "silu" else "gelu_tanh_mul"
        ref = lambda gu: ck.gated_act_reference(gu, act)  # noqa: E731
        if act == "silu":
            liger = lg_swiglu and (lambda gu: lg_swiglu.LigerFusedGateUpSiLUMulFunction.apply(gu))
        else:
            liger = lg_geglu and (lambda gu: lg_geglu.LigerGELUMulFunction.apply(*gu.chunk(2, dim=-1)))
        make = lambda m, i: (rand(m, 2 * i),) + ((rand(m, i),) if bwd else ())  # noqa: E731
        if not bwd:
            impls = dict(cutile=lambda gu: ck.gated_act(gu, act), eager=ref, compile=h.compiled(ref), liger=liger,
                         tilegym=tg_swiglu and act == "silu" and (lambda gu: tg_swiglu.silu_and_mul(gu)))
            return dict(op=name, make=make, ref=lambda gu: act64(gu, act), impls=impls,
                        nbytes=lambda m, i: 6 * m * i, widths=ws("intermediate", act != "silu"))
        impls = dict(cutile=backward(lambda gu: ops.gated_act(gu, act), 1),
                     eager=lambda gu, dy: ck.gated_act_backward_reference(gu, dy, act),
                     compile=backward(h.compiled(ref), 1), liger=liger and backward(liger, 1 if act == "silu" else 2))
        return dict(op=f"{name} bwd", make=make, ref=grads64(lambda gu: act64(gu, act), 1), impls=impls,
                    nbytes=lambda m, i: 10 * m * i, widths=[shape.intermediate])

    def rope_case(bwd):
        def make(t, s):  # (B, H, S, D) views of (B, S, H, D), as attention produces them; cos/sin (B, S, D)
            q, k = (rand(1, t, n, s.head_dim).transpose(1, 2) for n in (s.heads, s.kv_heads))
            freqs = torch.rand(1, t, s.head_dim // 2, device=h.DEVICE) * 100
            emb = torch.cat([freqs, freqs], -1)
            return (q, k, emb.cos().bfloat16(), emb.sin().bfloat16()) + ((rand(*q.shape), rand(*k.shape)) if bwd
                                                                          else ())
        liger = lg_rope and (lambda q, k, c, s: lg_rope.liger_rotary_pos_emb(q, k, c, s))
        nbytes = lambda t, s: 2 * 2 * t * (s.heads + s.kv_heads) * s.head_dim  # noqa: E731
        if not bwd:
            impls = dict(cutile=ck.apply_rotary_pos_emb, eager=ck.rope_reference, compile=h.compiled(ck.rope_reference),
                         liger=liger)
            return dict(op="rope", make=make, ref=rope64, impls=impls, nbytes=nbytes, widths=heads)

        def inverse(s):  # RoPE's backward is RoPE with the inverse rotation
            return -torch.cat([s[..., s.shape[-1] // 2:], s[..., :s.shape[-1] // 2]], -1)
        impls = dict(cutile=backward(lambda q, k, c, s: ops.rope(q, k, c, s, 1), 2, 2),
                     eager=lambda q, k, c, s, dq, dk: ck.rope_reference(dq, dk, c, inverse(s)),
                     compile=backward(h.compiled(ck.rope_reference), 2, 2), liger=liger and backward(liger, 2, 2))
        return dict(op="rope bwd", make=make, ref=grads64(rope64, 2, 2), impls=impls, nbytes=nbytes, widths=heads[:1])

    found = [c(*a) for bwd in (False, True) for c, a in ((norm_case, (False, bwd)), (norm_case, (True, bwd)),
                                                         (act_case, ("silu", bwd)), (act_case, (h.GELU, bwd)),
                                                         (rope_case, (bwd,)))]
    for case in found:
        case["impls"] = {k: (v if isinstance(v, tuple) else (None, v)) for k, v in case["impls"].items() if v}
    return found



def rel_err(got, ref) -> float:
    """Largest relative L2 error over the outputs (a peer returning (d gate, d up) is compared as one tensor)."""
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    if len(got) != len(ref):
        got = (torch.cat(got, -1),)
    return max(((g.double() - r).norm() / r.norm()).item() for g, r in zip(got, ref))


def label(width) -> str:
    return f"{width.heads}q+{width.kv_heads}kv x {width.head_dim}" if isinstance(width, h.Shape) else str(width)


def measure(case, rows: int, width, tiny: bool) -> dict:
    nbytes = case["nbytes"](rows, width)
    sets = h.input_sets(lambda: case["make"](rows, width), nbytes)
    ref = case["ref"](*sets[0])
    row = dict(op=case["op"], rows=rows, width=label(width), bytes=nbytes, dev={}, host={}, bad={})
    for name, (prepare, call) in case["impls"].items():
        try:
            args = [prepare(*s) for s in sets] if prepare else sets
            err = rel_err(call(*args[0]), ref)
            if not err < 1e-2:
                row["bad"][name] = f"rel err {err:.1e}"
                continue
            row["dev"][name] = h.device_us(call, args)
            row["host"][name] = h.host_us(call, args[0], n=10 if tiny else 300 if nbytes > 1 << 25 else 1000)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this shape is reported, not fatal
            row["bad"][name] = f"{type(e).__name__}: {str(e)[:60]}"
    return row


def speedup(row, key: str) -> float:
    peers = [row[key][i] for i in PEERS if i in row[key]]
    return min(peers) / row[key]["cutile"] if peers and "cutile" in row[key] else math.nan


def report(results, args) -> str:
    cells = lambda r: [f"{r['dev'][i]:.1f} / {r['host'][i]:.1f}" if i in r["dev"] else r["bad"].get(i, "—")  # noqa
                       for i in IMPLS]
    rows = [[r["op"], f"{r['rows']} x {r['width']}", *cells(r),
             h.fmt(h.pct_of_copy(r["bytes"], r["dev"]["cutile"]) if "cutile" in r["dev"] else None, ".0f", "%"),
             h.fmt(speedup(r, "dev"), ".2f", "x"), h.fmt(speedup(r, "host"), ".2f", "x")] for r in results]
    return "\n".join([
        h.header("cutile-kernels vs peers, forward and backward", args),
        f"bf16. Copy bandwidth measured in the same run: {h.copy_gbs():.0f} GB/s. Device µs: CUDA graph of 20 calls, "
        "median per call; host µs: back-to-back Python calls. Speedup = best of torch.compile, Liger and TileGym / "
        "cuTile (device; host). Backward (bwd) rows: the backward alone (see `benchmarks/run_all.py`).\n",
        *h.table(["op", "rows x width", *(f"{i} dev / host µs" for i in IMPLS), "cuTile % of copy", "speedup dev",
                  "speedup host"], rows)]) + "\n"


def plot(results, path) -> None:
    panels = []
    for key, title in (("dev", "device time"), ("host", "host time per call")):
        by_op = {}
        for r in results:
            if not math.isnan(s := speedup(r, key)):
                by_op.setdefault(r["op"], {}).setdefault(r["rows"], []).append(s)
        xs = sorted({m for ops in by_op.values() for m in ops})
        panels.append((title, xs, {op: [statistics.median(v[m]) if m in v else None for m in xs]
                                   for op, v in by_op.items()}))
    h.plot(path, panels, ylabel="best peer / cuTile (median over widths)", logx=True)


def main(argv=None) -> None:
    args = h.arguments("benchmarks.run_all", __doc__, argv, out="kernels.md", add=lambda p: p.add_argument(
        "--quick", action="store_true", help="every other row count and the first width of each op (a smoke run)"))
    if not args.tiny:
        torch._dynamo.config.recompile_limit = torch._dynamo.config.cache_size_limit = 10_000
    print(h.header("cutile-kernels vs peers", args) + f"copy bandwidth {h.copy_gbs():.0f} GB/s", flush=True)
    todo = [(c, m, w) for c in cases(h.local_kernel(args.kernel_root), args.tiny)
            for w in (c["widths"][:1] if args.quick else c["widths"])
            for m in ((2, 16) if args.tiny else h.ROWS[::2] if args.quick else h.ROWS)]
    results = []
    for k, (case, m, w) in enumerate(todo, 1):
        results.append(r := measure(case, m, w, args.tiny))
        cut = r["dev"].get("cutile", math.nan)
        print(f"[{k}/{len(todo)}] {r['op']} {m} x {r['width']}: cutile {cut:.1f} µs "
              f"({h.fmt(h.pct_of_copy(r['bytes'], cut), '.0f', '%')} of copy), speedup dev "
              f"{h.fmt(speedup(r, 'dev'), '.2f', 'x')}, host {h.fmt(speedup(r, 'host'), '.2f', 'x')}"
              + (f"; not timed: {r['bad']}" if r["bad"] else ""), flush=True)
        if args.out:  # after every row: a run cut short still leaves its table
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(report(results, args))
    h.write_report(args.out, report(results, args))
    if args.out:
        plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
