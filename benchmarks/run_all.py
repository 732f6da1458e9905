"""Every kernel over shapes of real models, against torch eager, torch.compile, Liger-Kernel and TileGym.

    python benchmarks/run_all.py [--quick] [--out-dir benchmarks/results/<gpu>]

For each op and shape, every implementation is first checked against a float64 reference (relative error
under 1e-2, bf16); one that fails is reported and not timed. Two times per implementation:
  - device: one CUDA graph of 20 back-to-back calls (inputs rotated so large shapes do not sit in L2),
    median of replays / 20 — the kernel itself;
  - host: 1000 back-to-back calls from Python, one synchronize at the end — what a decode step pays.
Writes `<out-dir>/kernels.md` (table, versions) and `<out-dir>/kernels.png` (speedup plot).
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from devtools.build import ROOT  # noqa: E402
from devtools.timing import graph_us  # noqa: E402

HIDDEN = [2560, 3584, 4096, 5120, 8192]
INTER = [9728, 14336, 18944, 28672]
ROWS = [1, 16, 64, 512, 4096, 32768]
EPS = 1e-6


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    e.synchronize()
    return 2 * a.numel() * 10 / (s.elapsed_time(e) * 1e-3) / 1e9


def host_us(fn, args, n=1000) -> float:
    for _ in range(20):
        fn(*args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def rel_err(got, ref) -> float:
    if isinstance(got, tuple):  # (q_embed, k_embed): one error over both
        got = torch.cat([t.flatten() for t in got])
    return ((got.double() - ref).norm() / ref.norm()).item()


def ops(ck):
    """name -> (make inputs, float64 reference, bytes moved, {impl: fn})"""
    def norm_inputs(m, n):
        return (torch.randn(m, n, device="cuda", dtype=torch.bfloat16),
                (1 + 0.1 * torch.randn(n, device="cuda")).to(torch.bfloat16))

    def norm64(x, w, gemma=False):
        x64 = x.double()
        h = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
        return h * (1 + w.double()) if gemma else h * w.double()

    def rope_inputs(tokens, head_dim):
        # decode/prefill of an 8B model: 32 query and 8 kv heads, (B, H, S, D) views of (B, S, H, D)
        q = torch.randn(1, tokens, 32, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(1, tokens, 8, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        freqs = torch.rand(1, tokens, head_dim // 2, device="cuda") * 100
        emb = torch.cat([freqs, freqs], -1)
        return q, k, emb.cos().bfloat16(), emb.sin().bfloat16()

    def rope64(q, k, cos, sin):  # both outputs in one tensor, so one relative error covers q and k
        c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
        rot = lambda x: torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), -1)  # noqa: E731
        return torch.cat([(x.double() * c + rot(x.double()) * s).flatten() for x in (q, k)])

    def act_inputs(m, i):
        return (torch.randn(m, 2 * i, device="cuda", dtype=torch.bfloat16),)

    def act64(gu, act):
        g, u = gu.double().chunk(2, dim=-1)
        return (g * torch.sigmoid(g) if act == "silu" else F.gelu(g, approximate="tanh")) * u

    eager_norm = ck.rms_norm_reference
    eager_gemma = ck.gemma_rms_norm_reference
    table = {
        "rms_norm": (norm_inputs, lambda x, w: norm64(x, w), lambda m, n: 4 * m * n, {
            "cutile": lambda x, w: ck.rms_norm(x, w, EPS),
            "eager": lambda x, w: eager_norm(x, w, EPS),
            "compile": torch.compile(lambda x, w: eager_norm(x, w, EPS), dynamic=False)}),
        "gemma_rms_norm": (norm_inputs, lambda x, w: norm64(x, w, True), lambda m, n: 4 * m * n, {
            "cutile": lambda x, w: ck.gemma_rms_norm(x, w, EPS),
            "eager": lambda x, w: eager_gemma(x, w, EPS),
            "compile": torch.compile(lambda x, w: eager_gemma(x, w, EPS), dynamic=False)}),
        "silu_mul": (act_inputs, lambda gu: act64(gu, "silu"), lambda m, i: 6 * m * i, {
            "cutile": lambda gu: ck.gated_act(gu, "silu"),
            "eager": lambda gu: ck.gated_act_reference(gu, "silu"),
            "compile": torch.compile(lambda gu: ck.gated_act_reference(gu, "silu"), dynamic=False)}),
        "gelu_tanh_mul": (act_inputs, lambda gu: act64(gu, "gelu_pytorch_tanh"), lambda m, i: 6 * m * i, {
            "cutile": lambda gu: ck.gated_act(gu, "gelu_pytorch_tanh"),
            "eager": lambda gu: ck.gated_act_reference(gu, "gelu_pytorch_tanh"),
            "compile": torch.compile(lambda gu: ck.gated_act_reference(gu, "gelu_pytorch_tanh"),
                                     dynamic=False)}),
        "rope": (rope_inputs, rope64, lambda t, d: 2 * 2 * t * 40 * d, {
            "cutile": lambda q, k, c, s: ck.apply_rotary_pos_emb(q, k, c, s),
            "eager": lambda q, k, c, s: ck.rope_reference(q, k, c, s),
            "compile": torch.compile(lambda q, k, c, s: ck.rope_reference(q, k, c, s), dynamic=False)}),
    }
    try:
        from liger_kernel.ops.geglu import LigerGELUMulFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction

        table["rms_norm"][3]["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
        table["gemma_rms_norm"][3]["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 1.0, "gemma",
                                                                                      False)
        table["silu_mul"][3]["liger"] = lambda gu: LigerFusedGateUpSiLUMulFunction.apply(gu)
        table["gelu_tanh_mul"][3]["liger"] = lambda gu: LigerGELUMulFunction.apply(*gu.chunk(2, dim=-1))
    except ImportError as e:
        print(f"liger-kernel unavailable: {e}")
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from tilegym.ops.cutile.rms_norm import rms_norm as tg_rms_norm
            from tilegym.ops.cutile.silu_and_mul import silu_and_mul as tg_silu_and_mul
        table["rms_norm"][3]["tilegym"] = lambda x, w: tg_rms_norm(x, None, w, EPS)
        table["gemma_rms_norm"][3]["tilegym"] = lambda x, w: tg_rms_norm(x, None, w, EPS, offset=1.0)
        table["silu_mul"][3]["tilegym"] = lambda gu: tg_silu_and_mul(gu)
    except ImportError as e:
        print(f"tilegym unavailable: {e}")
    return table


def main():
    import cuda.tile as ct
    import kernels
    import transformers

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    parser.add_argument("--out-dir", type=Path)
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 10_000
    torch._dynamo.config.cache_size_limit = 10_000
    ck = kernels.get_local_kernel(ROOT)
    gpu = torch.cuda.get_device_name()
    peak = copy_bandwidth()
    versions = (f"{gpu}; torch {torch.__version__}, transformers {transformers.__version__}, kernels "
                f"{kernels.__version__}, cuda.tile {ct.__version__}, python {platform.python_version()}")
    for name in ("liger_kernel", "tilegym"):
        try:
            from importlib.metadata import version
            versions += f", {name} {version(name.replace('_', '-'))}"
        except Exception:
            pass
    print(f"{versions}\ncopy bandwidth {peak:.0f} GB/s", flush=True)
    table = ops(ck)
    rows = ROWS[::2] if args.quick else ROWS
    widths = {"rms_norm": HIDDEN, "gemma_rms_norm": HIDDEN[::2], "silu_mul": INTER, "gelu_tanh_mul": INTER[::2],
              "rope": [128]}  # rope: rows = tokens, width = head_dim
    if args.quick:
        widths = {k: v[:1] for k, v in widths.items()}
    jobs = [(op, m, n) for op in table for n in widths[op] for m in rows]
    results = []
    for k, (op, m, n) in enumerate(jobs, 1):
        make, ref64, nbytes, impls = table[op]
        nsets = max(1, min(4, math.ceil(256e6 / nbytes(m, n))))
        sets = [make(m, n) for _ in range(nsets)]
        ref = ref64(*sets[0])
        row = {"op": op, "rows": m, "width": n, "bytes": nbytes(m, n), "dev": {}, "host": {}, "bad": {}}
        for impl, fn in impls.items():
            try:
                err = rel_err(fn(*sets[0]), ref)
                if not err < 1e-2:
                    row["bad"][impl] = f"rel err {err:.1e}"
                    continue
                row["dev"][impl] = graph_us(fn, sets)
                row["host"][impl] = host_us(fn, sets[0], n=300 if m * n > 1 << 24 else 1000)
            except Exception as e:  # a peer that cannot run this shape is reported, not fatal
                row["bad"][impl] = f"{type(e).__name__}: {str(e)[:60]}"
        results.append(row)
        cut = row["dev"].get("cutile")
        peers = {i: t for i, t in row["dev"].items() if i != "cutile"}
        best = min(peers, key=peers.get) if peers else None
        bw = 100 * row["bytes"] / (cut * 1e-6) / 1e9 / peak if cut else float("nan")
        print(f"[{k}/{len(jobs)}] {op} {m}x{n}: cutile {cut or float('nan'):.1f} µs ({bw:.0f}% of copy), best peer "
              f"{best} {peers.get(best, float('nan')):.1f} µs; host {row['host'].get('cutile', float('nan')):.1f} "
              f"vs {min(row['host'][i] for i in peers) if peers else float('nan'):.1f} µs"
              + (f"; not timed: {row['bad']}" if row["bad"] else ""), flush=True)
        if args.out_dir:  # after every shape: a run cut short still leaves its table
            write_results(args.out_dir, results, versions, peak)


def write_results(out_dir: Path, results, versions, peak):
    out_dir.mkdir(parents=True, exist_ok=True)
    impls = ["cutile", "eager", "compile", "liger", "tilegym"]
    lines = [f"# cutile-kernels vs peers\n\n{versions}. bf16. Copy bandwidth measured in the same run: "
             f"{peak:.0f} GB/s.\n",
             "Device µs: CUDA graph of 20 calls, median per call. Host µs: 1000 back-to-back Python calls. "
             "Speedup = best peer / cuTile (device; host). Goals: ≥ 95 % of copy bandwidth at 8192+ rows, "
             "≥ 1.1x the best of torch.compile, Liger and TileGym.\n",
             "| op | rows x width | " + " | ".join(f"{i} dev / host µs" for i in impls)
             + " | cuTile % of copy | speedup dev | speedup host |",
             "|---|---|" + "---|" * (len(impls) + 3)]
    for r in results:
        cells = []
        for i in impls:
            if i in r["dev"]:
                cells.append(f"{r['dev'][i]:.1f} / {r['host'][i]:.1f}")
            else:
                cells.append(r["bad"].get(i, "—"))
        cut = r["dev"].get("cutile")
        peer_dev = [r["dev"][i] for i in ("compile", "liger", "tilegym") if i in r["dev"]]
        peer_host = [r["host"][i] for i in ("compile", "liger", "tilegym") if i in r["host"]]
        pct = f"{100 * r['bytes'] / (cut * 1e-6) / 1e9 / peak:.0f}%" if cut else "—"
        sd = f"{min(peer_dev) / cut:.2f}x" if cut and peer_dev else "—"
        sh = f"{min(peer_host) / r['host']['cutile']:.2f}x" if cut and peer_host else "—"
        lines.append(f"| {r['op']} | {r['rows']} x {r['width']} | " + " | ".join(cells) + f" | {pct} | {sd} | {sh} |")
    (out_dir / "kernels.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    for ax, key, title in ((axes[0], "dev", "device time"), (axes[1], "host", "host time per call")):
        for op in dict.fromkeys(r["op"] for r in results):
            pts = [(r["rows"], min(r[key][i] for i in ("compile", "liger", "tilegym") if i in r[key])
                    / r[key]["cutile"]) for r in results
                   if r["op"] == op and "cutile" in r[key] and any(i in r[key] for i in ("compile", "liger", "tilegym"))]
            by_rows = {}
            for m, s in pts:
                by_rows.setdefault(m, []).append(s)
            xs = sorted(by_rows)
            ax.plot(xs, [statistics.median(by_rows[m]) for m in xs], marker="o", label=op)
        ax.axhline(1.1, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows")
        ax.set_ylabel("best peer / cuTile (median over widths)")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "kernels.png")


if __name__ == "__main__":
    main()
