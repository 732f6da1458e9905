"""Every op, forward and backward, over real model widths: cuTile against torch eager, torch.compile, Liger-Kernel
and TileGym.

    python -m benchmarks.run_all [--quick] [--ops 'rms_norm,rms_norm bwd'] [--out benchmarks/results/<gpu>/kernels.md]
    python -m benchmarks.run_all --tiny                                                  (CPU: tiny shapes)

Widths come from the harness's model registry (forward: every distinct width; backward: 8B widths), rows from
decode (1) to prefill (32768 tokens). Every implementation is first checked against float64 (relative error
< 1e-2 per output, bf16); one that fails is reported and not timed. Device µs: `harness.device_us` (CUDA graph of
20 calls, rotating inputs); host µs: `harness.host_us` (back-to-back calls, median of 5 batches). `cutile` runs
the cuTile JIT; `cubin` the same op on the build's precompiled cubins (`devtools.build --archs sm_XY`; "no cubins"
without them), so a release with cubins can be checked to lose no device time against the JIT.

Backward rows time the backward alone. The forward runs once, outside the timing, on inputs that require grad; the
timed call is `torch.autograd.grad` through the graph it recorded (kept between calls): for ours the public function's
eager autograd path (the op's torch.autograd.Function, whose backward runs the cuTile backward kernels; what a
training step runs), for Liger its autograd Function's backward, for compile the backward graph that
AOTAutograd and Inductor built for the reference. Eager is the package's backward formula in PyTorch. Bytes
counted for "% of copy": forward norms read x, w and write y; backward norms read x, w, dy and write dx, dw;
add_rms_norm (residual add + RMSNorm, Liger's fused_add_rms_norm the peer) reads x, residual, w and writes the
normed and summed rows, its backward reads summed, both output gradients and w and writes one input gradient
and dw; the gated activation reads gate_up (and dy) and writes its output (d gate_up); RoPE and qk_norm_rope (Qwen3's
q_norm, k_norm and RoPE) read and write q and k (their backwards also read dq and dk); the cross-entropy reads the
logits (its backward also reads them and writes their gradient).
"""
from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F

from . import harness as h

EPS = 1e-6
PEERS = ("compile", "liger", "tilegym")
IMPLS = ("cutile", "cubin", "eager", *PEERS)  # in this order: Liger's RoPE rotates its inputs in place


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
        inputs = [t.double().requires_grad_(i < n_diff) if t.is_floating_point() else t  # targets stay integers
                  for i, t in enumerate(args[:-n_grads])]
        outs = f(*inputs)
        return torch.autograd.grad(outs, inputs[:n_diff], [g.double() for g in args[-n_grads:]])
    return ref


def backward(forward, n_diff: int, n_grads: int = 1):
    """A backward implementation: (prepare, call). prepare(*inputs, *grads) runs `forward` once on inputs whose
    first n_diff require grad and returns (its graph: outputs and leaves, *grads); call(graph, *grads), the timed
    part, returns the gradients of the leaves (the graph is kept, so the same backward can be replayed)."""
    def prepare(*args):
        leaves = [t.detach().requires_grad_(i < n_diff) for i, t in enumerate(args[:-n_grads])]
        # The forward runs on a side stream: autograd runs each backward node on its forward's stream, and the
        # legacy default stream cannot join a CUDA graph capture (the first captured backward of a process failed
        # with "operation failed due to a previous error during capture" in every capture mode, H100)
        with torch.enable_grad(), h.side_stream():
            out = forward(*leaves)
        return ((out if isinstance(out, tuple) else (out,), leaves[:n_diff]), *(g.clone() for g in args[-n_grads:]))

    def call(graph, *grads):
        outs, leaves = graph
        return torch.autograd.grad(outs, leaves, grads, retain_graph=True)
    return prepare, call


def pair(name, make, ref, impls, nbytes, widths, *, eager_bwd, bwd_nbytes, bwd_widths, n_diff, n_grads=1,
         max_rows=None):
    """The forward case of an op and its backward case: make(rows, width, bwd) -> inputs (+ grads), ref (float64),
    impls, nbytes(rows, width). Backward: ours is the public function's autograd (its Function's backward), compile
    and Liger their own autograd nodes, eager the package's backward formula `eager_bwd`. max_rows: the largest
    row count run (an op whose rows are a vocabulary wide)."""
    impls = {k: v for k, v in impls.items() if v}
    bwd = dict(cutile=backward(impls["cutile"], n_diff, n_grads), eager=eager_bwd,
               **{k: backward(impls[k], n_diff, n_grads) for k in ("compile", "liger") if k in impls})
    return [dict(op=name, make=lambda m, w: make(m, w, False), ref=ref, nbytes=nbytes, widths=widths,
                 impls={k: (None, v) for k, v in impls.items()}, max_rows=max_rows),
            dict(op=f"{name} bwd", make=lambda m, w: make(m, w, True), ref=grads64(ref, n_diff, n_grads),
                 nbytes=bwd_nbytes, widths=bwd_widths, max_rows=max_rows,
                 impls={k: v if isinstance(v, tuple) else (None, v) for k, v in bwd.items()})]


def cases(ck, tiny: bool) -> list[dict]:
    """Every op's forward case, then every backward case (see `pair`)."""
    dt = dict(device=h.DEVICE, dtype=torch.bfloat16)
    shape = h.TINY if tiny else h.SIZE_8B
    ws = lambda attr, gemma: [getattr(h.TINY, attr)] if tiny else h.widths(attr, gemma=gemma)  # noqa: E731
    rand = lambda *s: torch.randn(*s, **dt)  # noqa: E731
    lg_norm, lg_add, lg_swiglu, lg_geglu, lg_rope, tg_norm, tg_swiglu = (h.peer(m) for m in (
        "liger_kernel.ops.rms_norm", "liger_kernel.ops.fused_add_rms_norm", "liger_kernel.ops.swiglu",
        "liger_kernel.ops.geglu", "liger_kernel.transformers.rope", "tilegym.ops.cutile.rms_norm",
        "tilegym.ops.cutile.silu_and_mul"))

    def norm(gemma: bool):
        public, ref = (ck.gemma_rms_norm, ck.gemma_rms_norm_reference) if gemma else (ck.rms_norm,
                                                                                     ck.rms_norm_reference)
        offset, form = (1.0, "gemma") if gemma else (0.0, "llama")
        return pair(
            "gemma_rms_norm" if gemma else "rms_norm",
            lambda m, n, bwd: (rand(m, n), (1 + 0.1 * torch.randn(n, device=h.DEVICE)).bfloat16(), *[rand(m, n)][:bwd]),
            lambda x, w: norm64(x, w, gemma),
            dict(cutile=lambda x, w: public(x, w, EPS), eager=lambda x, w: ref(x, w, EPS),
                 compile=h.compiled(lambda x, w: ref(x, w, EPS)),
                 liger=lg_norm and (lambda x, w: lg_norm.LigerRMSNormFunction.apply(x, w, EPS, offset, form, False)),
                 tilegym=tg_norm and (lambda x, w: tg_norm.rms_norm(x, None, w, EPS, **({"offset": 1.0} if gemma
                                                                                        else {})))),
            lambda m, n: 4 * m * n + 2 * n, ws("hidden", gemma),
            eager_bwd=lambda x, w, dy: ck.rms_norm_backward_reference(x, w, dy, EPS, gemma),
            bwd_nbytes=lambda m, n: 6 * m * n + 4 * n, bwd_widths=[shape.hidden], n_diff=2)

    def add_norm(gemma: bool):  # residual add + RMSNorm, (normed, summed); Liger's fused_add_rms_norm is the peer
        ref = lambda x, r, w: ck.add_rms_norm_reference(x, r, w, EPS, gemma)  # noqa: E731

        def eager_bwd(x, r, w, dn, ds):  # the package's backward formula (ops.add_rms_norm's) in PyTorch
            dx, dw = ck.rms_norm_backward_reference(x + r, w, dn, EPS, gemma)
            return dx + ds, dx + ds, dw
        return pair(
            "gemma_add_rms_norm" if gemma else "add_rms_norm",
            lambda m, n, bwd: (rand(m, n), rand(m, n), (1 + 0.1 * torch.randn(n, device=h.DEVICE)).bfloat16(),
                               *[rand(m, n), rand(m, n)][:2 * bwd]),
            lambda x, r, w: (norm64(x.double() + r.double(), w, gemma), x.double() + r.double()),
            dict(cutile=lambda x, r, w: ck.add_rms_norm(x, r, w, EPS, gemma), eager=ref, compile=h.compiled(ref),
                 liger=lg_add and (lambda x, r, w: lg_add.LigerFusedAddRMSNormFunction.apply(
                     x, r, w, EPS, 1.0 if gemma else 0.0, "gemma" if gemma else "llama", False))),
            lambda m, n: 8 * m * n + 2 * n, ws("hidden", gemma), eager_bwd=eager_bwd,
            bwd_nbytes=lambda m, n: 8 * m * n + 4 * n, bwd_widths=[shape.hidden], n_diff=3, n_grads=2)

    def sandwich():  # Gemma3's post-attention norm, residual add and pre-feedforward norm; Liger: its two ops
        ref = lambda x, r, pw, w: ck.sandwich_rms_norm_reference(x, r, pw, w, EPS)  # noqa: E731

        def eager_bwd(x, r, pw, w, dn, ds):  # the package's backward formula (ops.sandwich_rms_norm's) in PyTorch
            d, dw = ck.rms_norm_backward_reference(r + ck.gemma_rms_norm_reference(x, pw, EPS), w, dn, EPS, True)
            dx, dpw = ck.rms_norm_backward_reference(x, pw, d + ds, EPS, True)
            return dx, d + ds, dpw, dw
        liger = lg_norm and lg_add and (lambda x, r, pw, w: lg_add.LigerFusedAddRMSNormFunction.apply(
            lg_norm.LigerRMSNormFunction.apply(x, pw, EPS, 1.0, "gemma", False), r, w, EPS, 1.0, "gemma", False))
        weight = lambda n: (0.1 * torch.randn(n, device=h.DEVICE)).bfloat16()  # noqa: E731
        return pair(
            "sandwich_rms_norm",
            lambda m, n, bwd: (rand(m, n), rand(m, n), weight(n), weight(n), *[rand(m, n), rand(m, n)][:2 * bwd]),
            lambda x, r, pw, w: (norm64(r.double() + norm64(x, pw, True), w, True), r.double() + norm64(x, pw, True)),
            dict(cutile=lambda x, r, pw, w: ck.sandwich_rms_norm(x, r, pw, w, EPS), eager=ref,
                 compile=h.compiled(ref), liger=liger),
            lambda m, n: 8 * m * n + 4 * n, ws("hidden", True), eager_bwd=eager_bwd,
            bwd_nbytes=lambda m, n: 8 * m * n + 8 * n, bwd_widths=[shape.hidden], n_diff=4, n_grads=2)

    def norm_add():  # Gemma3's post-feedforward norm and last residual add; Liger: its norm, then a torch add
        ref = lambda x, r, w: ck.rms_norm_add_reference(x, r, w, EPS, True)  # noqa: E731

        def eager_bwd(x, r, w, ds):  # the package's backward formula (ops.rms_norm_add's) in PyTorch
            dx, dw = ck.rms_norm_backward_reference(x, w, ds, EPS, True)
            return dx, ds, dw
        liger = lg_norm and (lambda x, r, w: r + lg_norm.LigerRMSNormFunction.apply(x, w, EPS, 1.0, "gemma", False))
        return pair(
            "rms_norm_add",
            lambda m, n, bwd: (rand(m, n), rand(m, n), (0.1 * torch.randn(n, device=h.DEVICE)).bfloat16(),
                               *[rand(m, n)][:bwd]),
            lambda x, r, w: r.double() + norm64(x, w, True),
            dict(cutile=lambda x, r, w: ck.rms_norm_add(x, r, w, EPS, True), eager=ref, compile=h.compiled(ref),
                 liger=liger),
            lambda m, n: 6 * m * n + 2 * n, ws("hidden", True), eager_bwd=eager_bwd,
            bwd_nbytes=lambda m, n: 6 * m * n + 4 * n, bwd_widths=[shape.hidden], n_diff=3)

    def gated(act: str):
        ref = lambda gu: ck.gated_act_reference(gu, act)  # noqa: E731
        liger = (lg_swiglu and lg_swiglu.LigerFusedGateUpSiLUMulFunction.apply if act == "silu" else
                 lg_geglu and (lambda gu: lg_geglu.LigerGELUMulFunction.apply(*gu.chunk(2, dim=-1))))
        return pair(
            "silu_mul" if act == "silu" else "gelu_tanh_mul", lambda m, i, bwd: (rand(m, 2 * i), *[rand(m, i)][:bwd]),
            lambda gu: act64(gu, act), dict(cutile=lambda gu: ck.gated_act(gu, act), eager=ref, compile=h.compiled(ref),
                                            liger=liger, tilegym=tg_swiglu and act == "silu" and tg_swiglu.silu_and_mul),
            lambda m, i: 6 * m * i, ws("intermediate", act != "silu"),
            eager_bwd=lambda gu, dy: ck.gated_act_backward_reference(gu, dy, act),
            bwd_nbytes=lambda m, i: 10 * m * i, bwd_widths=[shape.intermediate], n_diff=1)

    def rope_inputs(t, s, bwd):  # (B, H, S, D) views of (B, S, H, D), as attention makes them; cos/sin (B, S, D)
        q, k = (rand(1, t, n, s.head_dim).transpose(1, 2) for n in (s.heads, s.kv_heads))
        emb = (torch.rand(1, t, s.head_dim // 2, device=h.DEVICE) * 100).repeat(1, 1, 2)
        return q, k, emb.cos().bfloat16(), emb.sin().bfloat16(), *[rand(*q.shape), rand(*k.shape)][:2 * bwd]

    rope_bytes = lambda t, s: 2 * 2 * t * (s.heads + s.kv_heads) * s.head_dim  # noqa: E731  q, k in and out
    rope = pair("rope", rope_inputs, rope64, dict(cutile=ck.apply_rotary_pos_emb, eager=ck.rope_reference,
                                                  compile=h.compiled(ck.rope_reference),
                                                  liger=lg_rope and lg_rope.liger_rotary_pos_emb),
                rope_bytes, [shape] if tiny else [h.MODELS["llama3-8b"], h.MODELS["gemma3-12b"]],
                eager_bwd=lambda q, k, c, s, dq, dk: ck.rope_backward_reference(dq, dk, c, s),
                bwd_nbytes=rope_bytes, bwd_widths=[shape], n_diff=2, n_grads=2)
    def qk_inputs(t, s, bwd):  # rope_inputs with q_norm / k_norm weights
        q, k, cos, sin, *grads = rope_inputs(t, s, bwd)
        w = lambda: (1 + 0.1 * torch.randn(s.head_dim, device=h.DEVICE)).bfloat16()  # noqa: E731
        return q, k, w(), w(), cos, sin, *grads

    def qk_ref(q, k, wq, wk, c, s):
        return ck.qk_norm_rope_reference(q, k, wq, wk, c, s, EPS)

    def qk_eager_bwd(q, k, wq, wk, c, s, dq, dk):  # the package's backward formula (ops.qk_norm_rope's) in PyTorch
        dq, dk = ck.rope_backward_reference(dq, dk, c, s)
        (dq, dwq), (dk, dwk) = (ck.rms_norm_backward_reference(x, w, d, EPS) for x, w, d in ((q, wq, dq), (k, wk, dk)))
        return dq, dk, dwq, dwk

    def liger_qk(q, k, wq, wk, c, s):  # Liger's composition: its RMSNorm on q and on k, then its RoPE
        qn, kn = (lg_norm.LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False) for x, w in ((q, wq), (k, wk)))
        return lg_rope.liger_rotary_pos_emb(qn, kn, c, s)

    # Qwen3's q_norm, k_norm and RoPE: ours one launch, compile fuses the same, Liger three launches
    qk = pair("qk_norm_rope", qk_inputs,
              lambda q, k, wq, wk, c, s: rope64(norm64(q, wq), norm64(k, wk), c, s),
              dict(cutile=lambda *a: ck.qk_norm_rope(*a, EPS), eager=qk_ref, compile=h.compiled(qk_ref),
                   liger=lg_norm and lg_rope and liger_qk),
              rope_bytes, [shape] if tiny else [h.MODELS["qwen3-8b"]], eager_bwd=qk_eager_bwd,
              bwd_nbytes=lambda t, s: 3 * rope_bytes(t, s) // 2, bwd_widths=[shape], n_diff=4, n_grads=2)

    def cross_entropy():  # the loss over Llama 3's and Mistral's vocabularies; eager and compile: transformers' path
        ref = lambda x, t: F.cross_entropy(x.float(), t, reduction="none")  # noqa: E731
        # Liger's cross-entropy is no row: its forward reads a count back to the host (a sync), which a CUDA graph
        # cannot capture (the failed capture broke every later row of an H200 run); train_step measures it end to end
        return pair(
            "cross_entropy", lambda m, v, bwd: (rand(m, v) * 4, torch.randint(0, v, (m,), device=h.DEVICE),
                                                *[torch.randn(m, device=h.DEVICE)][:bwd]),
            lambda x, t: F.cross_entropy(x.double(), t, reduction="none"),
            dict(cutile=ck.cross_entropy, eager=ref, compile=h.compiled(ref)),
            lambda m, v: 2 * m * v, [shape.vocab] if tiny else [h.MODELS["llama3-8b"].vocab, h.SIZE_8B.vocab],
            eager_bwd=lambda x, t, d: ck.cross_entropy_backward_reference(x, t, torch.logsumexp(x.float(), -1), d,
                                                                          -100),
            bwd_nbytes=lambda m, v: 4 * m * v, bwd_widths=[shape.vocab] if tiny else [h.MODELS["llama3-8b"].vocab],
            n_diff=1, max_rows=4096)
    found = [norm(False), norm(True), add_norm(False), add_norm(True), sandwich(), norm_add(), gated("silu"),
             gated(h.GELU), rope, qk, cross_entropy()]
    return [p[0] for p in found] + [p[1] for p in found]


def rel_err(got, ref) -> float:
    """Largest relative L2 error over the outputs (a peer returning (d gate, d up) is compared as one tensor)."""
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    if len(got) != len(ref):
        got = (torch.cat(got, -1),)
    return max(((g.double() - r).norm() / r.norm()).item() for g, r in zip(got, ref))


def label(width) -> str:
    return f"{width.heads}q+{width.kv_heads}kv x {width.head_dim}" if isinstance(width, h.Shape) else str(width)


def measure(case, rows: int, width, tiny: bool, ck) -> dict:
    nbytes = case["nbytes"](rows, width)
    sets = h.input_sets(lambda: case["make"](rows, width), nbytes)
    ref = case["ref"](*sets[0])
    row = dict(op=case["op"], rows=rows, width=label(width), bytes=nbytes, dev={}, host={}, bad={})
    impls = {**case["impls"], "cubin": case["impls"]["cutile"]}
    for name in [i for i in IMPLS if i in impls]:  # IMPLS' order: peers that modify their inputs come last
        prepare, call = impls[name]
        with h.precompiled(ck, name == "cubin") as cubins:  # cutile: the JIT; cubin: the precompiled kernels
            if name == "cubin" and not cubins:
                row["bad"][name] = "no cubins"
                continue
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
    def add(p):
        p.add_argument("--quick", action="store_true", help="every other row count and the first width of each op")
        p.add_argument("--ops", help="comma list of rows' op names to run, e.g. 'rms_norm,rms_norm bwd' (default: all)")
    args = h.arguments("benchmarks.run_all", __doc__, argv, out="kernels.md", add=add)
    torch._dynamo.config.recompile_limit = torch._dynamo.config.cache_size_limit = 10_000  # a graph per shape
    print(h.header("cutile-kernels vs peers", args) + f"copy bandwidth {h.copy_gbs():.0f} GB/s", flush=True)
    wanted = args.ops and set(args.ops.split(","))
    ck = h.local_kernel(args.kernel_root)
    todo = [(c, m, w) for c in cases(ck, args.tiny) if not wanted or c["op"] in wanted
            for w in (c["widths"][:1] if args.quick else c["widths"])
            for m in ((2, 16) if args.tiny else h.ROWS[::2] if args.quick else h.ROWS)
            if m <= (c["max_rows"] or m)]
    results = []
    for k, (case, m, w) in enumerate(todo, 1):
        results.append(r := measure(case, m, w, args.tiny, ck))
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
