"""Choose every kernel's launch parameters for this GPU and write them into the per-GPU table.

    python -m benchmarks.tune [--ops rms_norm,gemma_rms_norm,add_rms_norm,gemma_add_rms_norm,silu,gelu_pytorch_tanh,
                               rope,qk_norm_rope,rms_norm_backward,silu_backward,gelu_pytorch_tanh_backward,
                               cross_entropy,cross_entropy_backward] [--quick]
                              [--widths 128] [--rows 1,16,64]
                              [--write kernel-src/cutile_tile/tuned.py] [--out DIR] [--workers 12]
    python -m benchmarks.tune --check     (every table bucket of this GPU against float64, poisoned outputs)

For each op, real model widths and row counts from decode to prefill, every candidate configuration runs
through the package's own launcher (the table entry under test is set, then `*_cutile` is called), is checked
against float64 on fresh random inputs with a NaN-poisoned output, and timed as device time (a CUDA graph of
back-to-back calls, median of replays, inputs rotated past the L2). The fastest correct configuration per
(op, width, row bucket) goes into the table; measured row counts fill the buckets nearest to them. The table
keeps other GPUs' entries; `--write` rewrites kernel-src/cutile_tile/tuned.py (a Python literal, so that
kernel-builder ships it). A markdown report (best vs the untuned default, µs) goes to --out.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import pprint
import time
from pathlib import Path

import torch

from . import harness as h

ROWS = [1, 16, 64, 256, 512, 2048, 4096, 32768]
# one real model width per table bucket ((width - 1).bit_length(): 128, 4096 for 2049..4096, 8192 for 4097..); a
# tune writes its width's own entries and its bucket's (`keys`): --widths 2560 gives 2560 a choice of its own
WIDTHS = {"rms_norm": [128, 4096, 5120], "gemma_rms_norm": [256, 2560, 5376], "silu": [14336, 18944],
          "gelu_pytorch_tanh": [15360, 21504], "rope": [128, 256], "qk_norm_rope": [128, 256],
          # the fused residual add + norm (also what sandwich_rms_norm and rms_norm_add launch with)
          "add_rms_norm": [4096, 5120], "gemma_add_rms_norm": [2560, 5376]}
# backward plans (RMSNorm's both forms share one key; the backward kernels take rows per tile and blocks per SM, or
# the tile shape, of the same tuples)
BACKWARD = {"rms_norm_backward": [4096, 5120], "silu_backward": [14336], "gelu_pytorch_tanh_backward": [15360]}
# the loss over Llama 3's and Mistral's vocabularies (rows: tokens, at most MAX_ROWS: a float64 reference of 4096 x
# 128256 takes 4 GB)
LOSS = {"cross_entropy": [128256, 32000], "cross_entropy_backward": [128256, 32000]}
MAX_ROWS = {"cross_entropy": 4096, "cross_entropy_backward": 4096}
ALL = {**WIDTHS, **BACKWARD, **LOSS}
TOL = 1e-2  # bf16: two roundings (see tests/conftest.py GPU_REL_TOL)


def candidates(op: str, width: int):
    if op in LOSS:  # (columns per tile, warps per block: 0 = cuTile's choice)
        for tile_n, warps in itertools.product((2048, 4096, 8192, 16384), (0, 8)):
            yield (tile_n, warps)
        return
    if op == "rms_norm_backward":  # the row kernel, or persistent grids with one dw partial row per block
        tile_n = max(64, 1 << (width - 1).bit_length())
        if tile_n <= 8192:  # rms_norm_bwd_row: one row per block, fp32 dw rows summed by the launcher
            yield (0, 0, 0, 0)
            if tile_n >= 2048:
                yield (0, 0, 0, 0, 8)
        for tile_m in (m for m in (1, 2, 4) if m * tile_n <= 16384):
            # (rows per tile, blocks per SM, occupancy hint: none or that many, load latency hint: none or 10)
            for per_sm, occupancy, latency in itertools.product((1, 2, 4), (False, True), (0, 10)):
                yield (tile_m, per_sm, per_sm if occupancy else 0, latency)
                if tile_m * tile_n >= 4096 and not occupancy:  # 8 warps per block (cuTile's choice: 4)
                    yield (tile_m, per_sm, 0, latency, 8)
                if width & (width - 1):  # rms_norm_bwd_split: two tiles per row (warps: cuTile's choice)
                    yield (tile_m, per_sm, per_sm if occupancy else 0, latency, 0, 1)
    elif op.endswith("_backward"):
        for tile_n in (512, 1024, 2048):  # gated_act_bwd_row: one chunk of one row per block, gather/scatter
            yield (0, tile_n, False)
        for tile_m, tile_n in itertools.product((1, 2, 4), (512, 1024, 2048, 4096)):
            if tile_m * tile_n <= 4096:
                yield (tile_m, tile_n, True)
    elif op in ("rms_norm", "gemma_rms_norm", "add_rms_norm", "gemma_add_rms_norm"):
        tile_n = max(64, 1 << (width - 1).bit_length())
        fused = "add" in op  # no prefetching form (sm_90: 4 x 4096 tiles of two inputs still do not spill)
        if tile_n <= 8192:
            yield (0, 0, False, False)  # the one-row kernel (rms_norm_row, add_rms_norm_row): gather/scatter
            if tile_n >= 2048:  # with 8 warps (cuTile's own choice is 4 there): half the row per thread
                yield (0, 0, False, False, 8)
        for tile_m in (m for m in (1, 2, 4, 8, 16, 32) if m * tile_n <= 16384):
            for per_sm, tma in itertools.product((1, 2, 4, 8, 0), (True, False)):
                yield (tile_m, per_sm, tma, False)
                if per_sm and not tma and not fused:  # the prefetching loop loads without TMA (see rms_norm_fwd)
                    yield (tile_m, per_sm, tma, True)
    elif op in ("rope", "qk_norm_rope"):  # qk_norm_rope: the row kernel (always tile loads) or RoPE's tiles
        half = width // 2
        if op == "rope":
            yield (0, 0, 0)  # rope_row: one position per block, all heads, gather/scatter
        yield (0, 0, 1)  # rope_row (qk_norm_rope_row) with cos/sin tile loads
        yield (0, 0, 2)  # the same rotating in the inputs' dtype (bf16: packed HMUL2/HADD2; `_summed_products`)
        yield (0, 0, 2, 8)  # with 8 warps per block (cuTile's choice: 4)
        # up to 32 heads per tile: one position with all of an 8B model's q heads in one tile (2 chunks per block)
        # is how TileGym's cuTile RoPE works; with outputs in q's layout rope_row won from 1 to 4096 tokens on the
        # H100 and one head per tile at 32768 (results/h100/tune_h100_rope_qlayout.md)
        limit = 8192 if op == "rope" else 4096  # qk_norm_rope spills past 4096 on sm_90 (QK_TILE_ELEMENTS)
        for tile_s, tile_h in itertools.product((1, 2, 4, 8, 16, 32), (1, 2, 4, 8, 16, 32)):
            if tile_s * tile_h * half <= limit:
                for per_block in (1, 2, 4, 40):
                    yield (tile_s, tile_h, per_block)
                    # NATIVE: the rotation in the inputs' dtype (qk_norm_rope: after the norm's statistics)
                    yield (tile_s, tile_h, per_block, 1)
                    if per_block == 40 and tile_s >= 8:  # a block looping over every head: latency hint 10
                        yield (tile_s, tile_h, per_block, 1, 10)
    else:  # (rows, columns per tile, TMA loads, blocks per SM: 0 = one block per tile)
        for tile_n in (512, 1024, 2048):  # gated_act_row: one chunk of one row per block, gather/scatter
            yield (0, tile_n, False, 0)
        for tile_m, tile_n, tma, per_sm in itertools.product((1, 2, 4), (512, 1024, 2048, 4096), (True, False),
                                                             (0, 4, 8)):
            if tile_m * tile_n <= 4096:
                yield (tile_m, tile_n, tma, per_sm)
                if tile_m * tile_n >= 2048:  # with 8 warps per block (cuTile's choice: 4)
                    yield (tile_m, tile_n, tma, per_sm, 8)


def problem(ck, op: str, rows: int, width: int):
    """(inputs, launcher(inputs, out), float64 reference, output buffer, bytes moved)."""
    dev, bf16 = "cuda", torch.bfloat16
    if op in ("rope", "qk_norm_rope"):  # rows = tokens of an 8B-style model: 32 q + 8 kv heads, (B, H, S, D)
        # views of (B, S, H, D); qk_norm_rope: Qwen3's q_norm / k_norm (Llama form) first
        q = torch.randn(1, rows, 32, width, device=dev, dtype=bf16).transpose(1, 2)
        k = torch.randn(1, rows, 8, width, device=dev, dtype=bf16).transpose(1, 2)
        emb = (torch.rand(1, rows, width // 2, device=dev) * 100).repeat(1, 1, 2)
        cos, sin = emb.cos().to(bf16), emb.sin().to(bf16)
        outs = (torch.empty_like(q), torch.empty_like(k))  # laid out as the op allocates them
        rot = lambda x: torch.cat((-x[..., width // 2:], x[..., :width // 2]), -1)  # noqa: E731
        w = (1 + 0.1 * torch.randn(width, device=dev)).to(bf16)
        norm64 = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()  # noqa: E731
        pre = norm64 if op == "qk_norm_rope" else (lambda x: x)
        ref = torch.cat([(x * cos.double()[:, None] + rot(x) * sin.double()[:, None]).flatten()
                         for x in (pre(q.double()), pre(k.double()))])
        if op == "rope":
            run = lambda o: ck.rope_cutile(q, k, cos, sin, 1, q_out=o[0], k_out=o[1])  # noqa: E731
        else:
            run = lambda o: ck.qk_norm_rope_cutile(q, k, w, w, cos, sin, 1e-6, False, o[0], o[1])  # noqa: E731
        return run, ref, outs, 2 * 2 * rows * 40 * width + 2 * 2 * rows * width
    if op in LOSS:  # rows of logits (scale 4, a tenth of the targets ignored): (loss, lse) or d(logits)
        x = (torch.randn(rows, width, device=dev) * 4).to(bf16)
        t = torch.randint(0, width, (rows,), device=dev)
        t[torch.rand(rows, device=dev) < 0.1] = -100
        lse64 = torch.logsumexp(x.double(), -1)
        if op == "cross_entropy":
            loss64 = torch.nn.functional.cross_entropy(x.double(), t, reduction="none")
            row = torch.empty(rows, device=dev)
            run = lambda o: ck.cross_entropy_cutile(x, t, -100, loss=o[0], lse=o[1])  # noqa: E731
            return run, torch.cat([loss64, lse64]), (row, torch.empty_like(row)), 2 * rows * width
        d = torch.randn(rows, device=dev)
        ref = ck.cross_entropy_backward_reference(x.double(), t, lse64, d.double(), -100)
        lse = lse64.float()
        run = lambda o: ck.cross_entropy_backward_cutile(x, t, lse, d, -100, dlogits=o[0])  # noqa: E731
        return run, ref, (torch.empty_like(x),), 4 * rows * width
    if op == "rms_norm_backward":  # (dx into the poisoned buffer, dweight) against float64
        x = torch.randn(rows, width, device=dev, dtype=bf16)
        w, dy = (1 + 0.1 * torch.randn(width, device=dev)).to(bf16), torch.randn(rows, width, device=dev, dtype=bf16)
        dx64, dw64 = ck.rms_norm_backward_reference(x.double(), w.double(), dy.double(), 1e-6, False)
        ref = torch.cat([dx64.flatten(), dw64.flatten()])
        dw = torch.empty(width, device=dev, dtype=bf16)
        run = lambda o: o[1].copy_(ck.rms_norm_backward_cutile(x, w, dy, 1e-6, False, dx=o[0])[1])  # noqa: E731
        return run, ref, (torch.empty_like(x), dw), 6 * rows * width
    if op.endswith("_backward"):  # d(gate_up) into the poisoned buffer against float64
        act = op[:-len("_backward")]
        gu, dy = torch.randn(rows, 2 * width, device=dev, dtype=bf16), torch.randn(rows, width, device=dev, dtype=bf16)
        ref = ck.gated_act_backward_reference(gu.double(), dy.double(), act)
        run = lambda o: ck.gated_act_backward_cutile(gu, dy, act, grad=o[0])  # noqa: E731
        return run, ref, (torch.empty_like(gu),), 10 * rows * width
    if op in ("add_rms_norm", "gemma_add_rms_norm"):  # (normed, summed) into the poisoned buffers
        gemma = op == "gemma_add_rms_norm"
        x, r = torch.randn(rows, width, device=dev, dtype=bf16), torch.randn(rows, width, device=dev, dtype=bf16)
        w = (1 + 0.1 * torch.randn(width, device=dev)).to(bf16)
        s64 = x.double() + r.double()
        h = s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-6)
        ref = torch.cat([(h * (1 + w.double()) if gemma else h * w.double()).flatten(), s64.flatten()])
        run = lambda o: ck.add_rms_norm_cutile(x, r, w, 1e-6, gemma, out=o[0], summed=o[1])  # noqa: E731
        return run, ref, (torch.empty_like(x), torch.empty_like(x)), 8 * rows * width
    if op in ("rms_norm", "gemma_rms_norm"):
        gemma = op == "gemma_rms_norm"
        x = torch.randn(rows, width, device=dev, dtype=bf16)
        w = (1 + 0.1 * torch.randn(width, device=dev)).to(bf16)
        x64 = x.double()
        h = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
        ref = h * (1 + w.double()) if gemma else h * w.double()
        run = lambda o: ck.rms_norm_cutile(x, w, 1e-6, gemma=gemma, out=o[0])  # noqa: E731
        return run, ref, (torch.empty_like(x),), 4 * rows * width
    gu = torch.randn(rows, 2 * width, device=dev, dtype=bf16)
    g, u = gu.double().chunk(2, dim=-1)
    ref = (g * torch.sigmoid(g) if op == "silu" else torch.nn.functional.gelu(g, approximate="tanh")) * u
    run = lambda o: ck.gated_act_cutile(gu, op, out=o[0])  # noqa: E731
    return run, ref, (torch.empty(rows, width, device=dev, dtype=bf16),), 6 * rows * width


def rel_err(outs, ref) -> float:
    got = torch.cat([o.flatten() for o in outs]).double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref.flatten()).norm() / ref.norm()).item()


def tune_shape(ck, table: dict, gpu: str, op: str, rows: int, width: int):
    """{config: µs} over the correct candidates, and the default's µs (table entry removed)."""
    first = problem(ck, op, rows, width)  # rotated as run_all rotates its inputs (harness.set_count)
    problems = [first] + [problem(ck, op, rows, width) for _ in range(h.set_count(first[3]) - 1)]
    key, bucket_key = keys(gpu, op, width, rows.bit_length())
    table.pop(key, None)
    table.pop(bucket_key, None)
    def timed() -> float:  # the harness's CUDA-graph median, cycling over the input copies
        return h.device_us(lambda p: p[0](p[2]), [(p,) for p in problems], reps=7)

    default = timed()
    results, failed = {}, []
    for config in candidates(op, width):
        table[key] = config
        run, ref, outs, _ = problems[0]
        for o in outs:
            o.fill_(float("nan"))
        try:
            run(outs)
            err = rel_err(outs, ref)
        except Exception as e:  # a configuration that does not compile or launch is skipped, and reported
            failed.append(f"{config}: {type(e).__name__}: {str(e)[:120]}")
            continue
        if err > TOL:
            failed.append(f"{config}: rel err {err:.2e}")
            continue
        results[config] = timed()
    table.pop(key, None)
    return results, default, failed, problems[0][3]


def keys(gpu: str, op: str, width: int, rows_bucket: int) -> tuple[tuple, tuple]:
    """The table keys a tune of `width` writes: its exact width (what the lookup tries first), and its bucket
    (every other width of the bucket takes the last tuned width's choice)."""
    return (gpu, op, 2, width, rows_bucket), (gpu, op, 2, (width - 1).bit_length(), rows_bucket)


def _load():
    import kernels

    from devtools.build import ROOT

    ck = kernels.get_local_kernel(ROOT)
    tuned = importlib.import_module(f"{ck.__name__}.tile.tuned")
    return ck, tuned, tuned.gpu_key(torch.cuda.get_device_name())


def _warm(job) -> int:
    """Compile every candidate of one (op, width, rows <= 4096: the same specializations as more rows, a
    fraction of the memory) into cuTile's disk cache (worker process)."""
    op, width, rows = job
    ck, tuned, gpu = _load()
    run, _, outs, _ = problem(ck, op, rows, width)
    for config in candidates(op, width):
        tuned.TABLE[keys(gpu, op, width, rows.bit_length())[0]] = config
        try:
            run(outs)
        except Exception:  # reported by the timing pass
            pass
    torch.cuda.synchronize()
    return len(list(candidates(op, width)))


def warm(jobs, workers: int) -> None:
    """cuTile compiles each specialization once per machine (disk cache); doing it in parallel first keeps
    the sequential timing pass short."""
    import multiprocessing

    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        n = sum(pool.imap_unordered(_warm, jobs))
    print(f"tune: warmed {n} launches over {len(jobs)} shapes in {time.perf_counter() - t0:.0f} s", flush=True)


def check(ck, tuned, gpu) -> int:
    """Every table bucket of this GPU through the launchers (the tuned configuration the lookup returns), against
    float64 with NaN-poisoned outputs, at row counts inside and between the measured ones; returns the failures."""
    worst, failures, n = {}, 0, 0
    for op, widths in ALL.items():
        if not any(k[0] == gpu and k[1] == op for k in tuned.TABLE):
            continue  # nothing tuned for it on this GPU: the defaults, covered by the GPU tests
        for width in widths:
            for rows in [1, 3, 17, 100, 333, 1000, 3000, 5000, 12000, 20000, 32768, 40000][:11 if "rope" in op else 12]:
                run, ref, outs, _ = problem(ck, op, rows, width)
                for o in outs:
                    o.fill_(float("nan"))
                run(outs)
                err, n = rel_err(outs, ref), n + 1
                worst[op] = max(worst.get(op, 0.0), err)
                if not err < TOL:
                    failures += 1
                    print(f"tune: FAIL {op} {width} x {rows}: rel err {err:.2e}, config "
                          f"{tuned.lookup(gpu, op, torch.bfloat16, width, rows)}")
    print(f"tune: check on {gpu}: {n} shapes, {failures} failed; worst rel err per op: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()), flush=True)
    return failures


def fill_buckets(best: dict[int, tuple], planned=None) -> dict[int, tuple]:
    """Measured row counts -> the buckets 1..17, each taking the nearest of the `planned` row counts' buckets (default:
    the measured ones); a bucket nearest to a planned count that was not measured (a run stopped early, or no
    candidate passed) is left out, so that the table keeps its entry."""
    measured = {rows.bit_length(): config for rows, config in best.items()}
    buckets = {rows.bit_length() for rows in planned} if planned else set(measured)
    nearest = {b: min(buckets, key=lambda m: (abs(m - b), m)) for b in range(1, 18)} if measured else {}
    return {b: measured[m] for b, m in nearest.items() if m in measured}


def write_table(path: Path, table: dict) -> None:
    text = path.read_text()
    head = text[:text.index("TABLE: dict = ")]
    body = pprint.pformat(dict(sorted(table.items())), width=116, compact=True)
    path.write_text(f"{head}TABLE: dict = {body}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(WIDTHS), help=f"any of {', '.join(ALL)}")
    parser.add_argument("--quick", action="store_true", help="3 row counts, first width: a smoke run")
    parser.add_argument("--widths", help="comma list of widths to tune (default: the op's real model widths)")
    parser.add_argument("--rows", help=f"comma list of row counts to tune (default {','.join(map(str, ROWS))}); the "
                                       "table keeps its entries for the buckets nearer to the others")
    parser.add_argument("--write", type=Path, help="rewrite this tuned.py with the new entries")
    parser.add_argument("--out", type=Path, help="directory for tune_<gpu>.md")
    parser.add_argument("--workers", type=int, default=12, help="processes compiling in parallel first (0: none)")
    parser.add_argument("--check", action="store_true", help="only check this GPU's table (see check())")
    args = parser.parse_args()
    if args.check:
        from devtools.build import ROOT, build

        build(ROOT / "build")
        raise SystemExit(1 if check(*_load()) else 0)

    from devtools.build import ROOT, build

    build(ROOT / "build")
    ops = args.ops.split(",")
    widths = {op: [int(w) for w in args.widths.split(",")] if args.widths else ALL[op][:1] if args.quick else ALL[op]
              for op in ops}
    rows_list = [int(r) for r in args.rows.split(",")] if args.rows else [1, 512, 32768] if args.quick else ROWS
    planned = sorted(set(ROWS) | set(rows_list)) if args.rows else rows_list  # the buckets a partial run leaves
    if args.workers:
        warm(sorted({(op, w, min(r, 64 if op in LOSS else 4096)) for op in ops for w in widths[op] for r in rows_list}),
             args.workers)
    ck, tuned, gpu = _load()
    props = torch.cuda.get_device_properties(0)
    print(f"tune: {props.name} ({gpu}), {props.multi_processor_count} SMs, torch {torch.__version__}", flush=True)
    lines = [f"# Launch tuning on {props.name} (`{gpu}`)", "",
             f"torch {torch.__version__}, `python -m benchmarks.tune`, {time.strftime('%Y-%m-%d')}. Device µs per "
             "call (CUDA graph, median); default = what this GPU runs without its entry (RoPE: the H100's entry; "
             "otherwise the untuned heuristic).", "",
             "| op | width | rows | default µs | best µs | gain | best config | candidates | failed |",
             "|---|---|---|---|---|---|---|---|---|"]
    new = {}
    for op in ops:
        for width in widths[op]:
            best = {}
            for rows in [r for r in rows_list if r <= MAX_ROWS.get(op, r)]:
                t0 = time.perf_counter()
                results, default, failed, nbytes = tune_shape(ck, tuned.TABLE, gpu, op, rows, width)
                if not results:  # keep the default; say why every candidate was refused
                    print(f"tune: {op} {width} x {rows}: NO candidate passed; first failures: {failed[:3]}")
                    continue
                config = min(results, key=results.get)
                best[rows] = config
                gain = default / results[config]
                lines.append(f"| {op} | {width} | {rows} | {default:.2f} | {results[config]:.2f} | {gain:.2f}x | "
                             f"{config} | {len(results)} | {len(failed)} |")
                print(f"tune: {op} {width} x {rows}: default {default:.2f} µs, best {results[config]:.2f} µs "
                      f"{config} ({nbytes / results[config] / 1e3:.0f} GB/s; {len(results)} ok, "
                      f"{len(failed)} failed; {time.perf_counter() - t0:.0f} s)", flush=True)
                for f in failed[:3]:
                    print(f"      failed {f}")
            for bucket, config in fill_buckets(best, planned).items():
                for key in keys(gpu, op, width, bucket):
                    new[key] = config
            # after every width, so that a run stopped by a time limit keeps what it measured
            if args.write:
                write_table(args.write, {**tuned.TABLE, **new})
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"tune_{gpu}.md").write_text("\n".join(lines) + "\n")
    if args.write:
        build(ROOT / "build")  # later benchmarks in the same session load build/: let them see the new entries
        print(f"tune: wrote {len(new)} entries for {gpu} into {args.write} and rebuilt build/")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
