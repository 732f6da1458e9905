"""The GPU benchmark scripts run end to end on CPU in their --tiny mode (in this process, through main(argv)): each
report carries the version header, the rows and columns the GPU run fills and finite numbers; ours runs our layers
(in training only after enable_training). CPU times mean nothing: the checks are about what ran."""
import contextlib
import gzip
import json
import math
import re

import pytest
import torch

from benchmarks import (cold_start, compiled_decode, coverage, decode_layer, harness, launch_host, run_all,
                        train_step)
from devtools.build import ROOT, build


@pytest.fixture(scope="module", autouse=True)
def repo_build():
    """The scripts load this checkout's build/ under the repo id that the suite's other tests serve from their own
    fresh build (conftest.kernel_repo). A build/ of an older commit carries another module id, and a KernelConfig
    then took its layers from the suite's copy, not from the module the script checks against (seen on CPU: "0 of 1
    decoder layers run the decoder layer kernel" after test_decoder_layer.py): make build/ this checkout's."""
    build(ROOT / "build")


@pytest.fixture(autouse=True)
def one_thread():
    """Small CPU machines run other jobs beside the tests: OpenMP threads spinning on busy cores cost 10-50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


def run(module, tmp_path, cache, *args) -> str:
    out = tmp_path / "report.md"
    module.main(["--tiny", "--out", str(out), "--cache", str(cache), *args])
    text = out.read_text()
    first = text.splitlines()[2]
    for part in ("CPU; torch 2.", "cuda.tile", "transformers 5.", "kernels 0.", "liger-kernel", "tilegym",
                 f"`python -m {module.__name__} --tiny"):
        assert part in first, (part, first)
    return text


def rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows by their first two cells joined (the header row included)."""
    found = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            found[" | ".join(cells[:2])] = cells
    return found


def finite(cell: str) -> list[float]:
    values = [float(v) for v in re.findall(r"-?\d+\.?\d*(?:e[-+]\d+)?", cell)]
    assert values and all(math.isfinite(v) for v in values), cell
    return values


def test_run_all_tiny(tmp_path, cache):
    table = rows(run(run_all, tmp_path, cache))
    head = table.pop("op | rows x width")
    assert head[2:6] == ["cutile dev / host µs", "cubin dev / host µs", "eager dev / host µs",
                         "compile dev / host µs"] and len(head) == 11
    ops = [f"{op}{d}" for d in ("", " bwd") for op in ("rms_norm", "gemma_rms_norm", "add_rms_norm",
                                                         "gemma_add_rms_norm", "sandwich_rms_norm", "rms_norm_add",
                                                         "silu_mul", "gelu_tanh_mul")]
    want = {f"{op} | {m} x {w}" for op in ops for m in (2, 16)
            for w in ([64] if "norm" in op else [160])} | {f"{op}{d} | {m} x 4q+2kv x 16" for d in ("", " bwd")
                                                            for m in (2, 16) for op in ("rope", "qk_norm_rope")} \
        | {f"cross_entropy{d} | {m} x {harness.TINY.vocab}" for d in ("", " bwd") for m in (2, 16)}
    assert set(table) == want
    for name, cells in table.items():  # every backward too: ours, eager and compile passed the float64 check
        for cell in (cells[2], *cells[4:6]):
            assert len(finite(cell)) == 2, (name, cell)
        assert cells[3] == "no cubins"  # a CPU has none
        assert cells[6] == cells[7] == "—"  # Liger and TileGym do not import here: skipped, not failed
        for cell in cells[8:]:
            finite(cell)
    assert (tmp_path / "report.png").stat().st_size > 0


def test_run_all_times_peers_that_modify_inputs_last(monkeypatch):
    """Liger's RoPE rotates its inputs in place: every implementation checked after it would see rotated inputs and
    fail its float64 check (an H100 run reported the cubin column of RoPE so when it ran last)."""
    calls = []

    def impl(name, in_place=False):
        def call(x):
            calls.append(name)
            y = x * 2
            if in_place:
                x.mul_(2)
            return y
        return None, call

    @contextlib.contextmanager
    def precompiled(ck, on):  # as on a GPU with cubins
        yield True

    monkeypatch.setattr(harness, "precompiled", precompiled)
    case = dict(op="double", nbytes=lambda m, w: 8 * m * w, make=lambda m, w: (torch.ones(m, w),),
                ref=lambda x: x.double() * 2, impls={"liger": impl("liger", in_place=True), "cutile": impl("cutile"),
                                                    "eager": impl("eager"), "compile": impl("compile")})
    row = run_all.measure(case, 2, 4, True, None)
    assert not row["bad"] and set(row["dev"]) == {"cutile", "cubin", "eager", "compile", "liger"}
    assert list(dict.fromkeys(calls)) == ["cutile", "eager", "compile", "liger"]  # cubin runs cutile's call


def test_launch_host_tiny(tmp_path, cache):
    """On CPU the op calls run (their references) and are timed; the launch rows need a GPU with cubins."""
    text = run(launch_host, tmp_path, cache)
    table = rows(text)
    assert table.pop("op | cubin: Precompiled.launch µs")[2:] == ["ct.launch µs", "cubin / ct.launch",
                                                                  "op call with cubins µs", "op call with JIT µs"]
    assert "Parts of the cubin path (rms_norm):\n\nn/a" in text
    assert [k.split(" | ")[0] for k in table] == ["rms_norm", "add_rms_norm", "silu_mul", "rope"]
    for cells in table.values():
        assert cells[1:4] == ["n/a"] * 3
        assert all(finite(c)[0] > 0 for c in cells[4:6])


def test_decode_layer_tiny(tmp_path, cache):
    text = run(decode_layer, tmp_path, cache)
    table = rows(text)
    assert table.pop("config | batch 1 µs")[2:3] == ["batch 4 µs"]
    configs = [k.split(" | ")[0] for k in table]
    refs = "torch.compile, references <= 64 tokens"
    assert configs == ["plain eager", "plain torch.compile", "ours eager", "ours torch.compile", f"ours {refs}",
                       "ours + decoder eager", "ours + decoder torch.compile", f"ours + decoder {refs}",
                       "ours + decoder + qkv eager", "ours + decoder + qkv torch.compile",
                       f"ours + decoder + qkv {refs}",
                       "ours + decoder, residual in down_proj eager",
                       "ours + decoder, residual in down_proj torch.compile"]
    for cells in table.values():
        us1, us4 = finite(cells[1])[0], finite(cells[2])[0]
        assert us1 > 0 and us4 > 0
        assert all(err < 1e-2 for err in finite(cells[5]))  # against plain eager on the same cache
    assert "- ours: ApplyRotaryPosEmb x1, RMSNorm x2, RMSNormMLP x1;" in text
    # the decoder layer kernel runs layer 0 (the fallback warning for its add_rms_norm is once per process, so an
    # earlier test in the same run may have taken it: not asserted)
    for name in ("ours + decoder", "ours + decoder, residual in down_proj"):
        assert f"- {name}: ApplyRotaryPosEmb x1, DecoderLayer x1, RMSNorm x3, SwiGLUMLP x1;" in text
    assert "- ours + decoder + qkv: ApplyRotaryPosEmb x1, DecoderLayer x1, QKVAttention x1, RMSNorm x3, SwiGLUMLP x1;" \
        in text
    assert "- Liger-Kernel skipped: liger_kernel does not import" in text
    assert (tmp_path / "report.png").stat().st_size > 0


def test_train_step_tiny(tmp_path, cache):
    text = run(train_step, tmp_path, cache, "--family", "qwen3")
    table = rows(text)
    assert table["config | step ms"][2] == "host ms"
    assert all(finite(cells[2])[0] > 0 for name, cells in table.items() if name.startswith(("plain", "cuTile")))
    configs = [k.split(" | ")[0] for k in table]
    assert configs == ["config", "plain transformers", "cuTile kernels: KernelConfig + train()",
                       "cuTile kernels: + enable_training(model) (incl. its cross-entropy)", "Liger-Kernel",
                       "Liger-Kernel + fused linear cross-entropy"]
    # without enable_training transformers' forwards run in train(); with it, ours
    assert "- ours: kernel layers in train(): none (transformers')" in text
    assert "- ours+train: kernel layers in train(): ApplyRotaryPosEmb x1, RMSNorm x" in text
    # enable_training's loss sums the rows' losses, then divides (F.cross_entropy's mean rounds in its own order)
    assert "RMSNormMLP x2;" in text
    assert float(re.search(r"ours\+train: [^\n]*\|loss - plain\| = (\S+);", text)[1]) < 1e-5
    # every row's gradients against a float32 model's; plain bf16's own error sets the bound
    plain_err = finite(next(v for k, v in table.items() if k.startswith("plain transformers"))[-1])[0]
    assert 0 < plain_err < 0.1 and table["config | step ms"][-1] == "max grad rel err vs float32"
    assert float(re.search(r"relative L2 error vs float32 <= 2x plain bf16's \+ 0.01 = ([-.e0-9]+)", text)[1]) == \
        pytest.approx(2 * plain_err + 0.01, rel=0.02)


def test_train_step_tiny_decoder(tmp_path, cache):
    """--decoder: ours trains through the decoder layer kernel (every layer), and the title says so."""
    text = run(train_step, tmp_path, cache, "--family", "llama", "--decoder")
    assert "ours with the decoder layer kernel" in text.splitlines()[0]
    assert re.search(r"- ours\+train: kernel layers in train\(\): .*DecoderLayer x2", text), text


def test_train_step_tiny_qkv(tmp_path, cache):
    """--qkv: ours trains through QKVAttention (one q/k/v GEMM), and q_proj's gradient (qkv_proj's first rows) is
    compared with the float32 model's like the others."""
    text = run(train_step, tmp_path, cache, "--family", "qwen3", "--qkv")
    assert "ours with q/k/v as one GEMM" in text.splitlines()[0]
    assert re.search(r"- ours\+train: kernel layers in train\(\): .*QKVAttention x2", text), text
    err = float(re.search(r"- ours\+train: .* layers\.1\.q_proj (\S+)", text)[1])
    assert 0 < err < 0.1


def test_coverage_tiny(tmp_path, cache):
    """Both configs and both steps profiled; the category shares of each step add up to 100 %; ours ran our layers
    (on CPU their reference) and the time lists named kernels."""
    text = run(coverage, tmp_path, cache, "--family", "qwen3", "--top", "5")
    table = {k: v for k, v in rows(text).items() if not k.startswith("`") and not k.startswith("kernel |")}
    head = table.pop("config | step")
    assert head[2:6] == ["time µs", "launches", "wall ms", "GPU idle µs"]
    assert head[6:] == [c for c, _ in coverage.CATEGORIES] + ["other"]
    assert set(table) == {"plain | prefill", "plain | decode", "ours | prefill", "ours | decode"}
    for cells in table.values():
        assert finite(cells[2])[0] > 0 and finite(cells[3])[0] > 0 and cells[5] == "–"  # no GPU timeline on CPU
        assert abs(sum(finite(c)[0] for c in cells[6:]) - 100) < 0.5, cells
        assert finite(cells[6])[0] == 0  # no cuTile kernel on CPU: its references run, as aten operators
    assert "- ours: ApplyRotaryPosEmb x1, RMSNorm x" in text and "RMSNormMLP x2;" in text
    assert text.count("the 5 largest of") == 4 and "`aten::linear` | GEMM" in text
    assert (tmp_path / "report.png").stat().st_size > 0


def test_coverage_tiny_train(tmp_path, cache):
    """--train: one training step per config instead of prefill and decode; ours ran enable_training's layers (their
    backward is what the step profiles), the shares add up, and the loss has its own category. --trace: each
    profiled step's Chrome trace beside the report, holding that step's operators."""
    text = run(coverage, tmp_path, cache, "--family", "llama", "--top", "40", "--train", "--trace")
    assert "Coverage of llama's training step" in text.splitlines()[0]
    table = {k: v for k, v in rows(text).items() if k.startswith(("plain |", "ours |"))}
    assert set(table) == {"plain | train", "ours | train"}
    for cells in table.values():
        assert abs(sum(finite(c)[0] for c in cells[6:]) - 100) < 0.5, cells
    assert "- ours: ApplyRotaryPosEmb x1, RMSNorm x" in text and "| loss |" in text
    names = {config: {e.get("name", "") for e in json.load(gzip.open(tmp_path / f"report_{config}_train.json.gz"))[
        "traceEvents"]} for config in ("plain", "ours")}
    assert "aten::embedding_backward" in names["plain"] and "aten::embedding_backward" in names["ours"]
    # our cross-entropy (its reference on CPU) keeps the logsumexp for its backward; transformers' loss does not
    assert "aten::logsumexp" in names["ours"] and "aten::logsumexp" not in names["plain"]


def test_coverage_idle_is_time_no_kernel_runs():
    """The GPU's idle time between a step's first and last kernel: overlapping kernels (two streams) leave no gap,
    a kernel inside another's span none either; the longest waits come first, named by the kernels around them."""
    spans = [(0.0, 10.0, "a"), (5.0, 12.0, "b"), (20.0, 25.0, "c"), (21.0, 22.0, "inside"), (26.0, 40.0, "d"),
             (100.0, 101.0, "e")]
    got = coverage.idle(spans, top=2)
    assert got["span"] == 101.0 and got["idle"] == 8.0 + 1.0 + 60.0
    assert got["gaps"] == [(60.0, "d", "e"), (8.0, "b", "c")]
    assert coverage.idle([(3.0, 4.0, "only")]) == {"span": 1.0, "idle": 0, "gaps": []}


def test_coverage_counts_every_cutile_kernel_as_ours():
    """Every @ct.kernel of the package, as the profiler names it (function name, then cuTile's specialization
    suffix), falls in ours: an H100 profile had filed rms_norm_row under "other"."""
    names = re.findall(r"@ct\.kernel[^\n]*\ndef (\w+)", "".join(
        p.read_text() for p in (harness.ROOT / "kernel-src" / "cutile_tile").glob("*.py")))
    assert len(names) >= 7
    for name in names:
        assert coverage.category(f"{name}_Kt1_A2bf16_1v8l0_2i8t1_p16_Si32") == "ours (cuTile)", name


def test_coverage_tiny_decoder(tmp_path, cache):
    """--decoder: ours is profiled with decoder=True (every layer runs the decoder layer kernel), and says so."""
    text = run(coverage, tmp_path, cache, "--family", "gemma3", "--top", "3", "--decoder")
    assert "plain and with our kernels + decoder layer (decoder=True)" in text.splitlines()[0]
    assert {k for k in rows(text) if k.startswith(("plain |", "ours"))} == {
        "plain | prefill", "plain | decode", "ours + decoder | prefill", "ours + decoder | decode"}
    assert "- ours + decoder: ApplyRotaryPosEmb x1, GemmaDecoderLayer x2, GemmaRMSNorm x13;" in text


def test_category_names_gpu_kernels():
    assert coverage.category("rms_norm_fwd") == "ours (cuTile)"
    assert coverage.category("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "GEMM"
    assert coverage.category("pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert coverage.category("void at::native::elementwise_kernel<128, 2, ...>") == "elementwise"
    assert coverage.category("CatArrayBatchedCopy") == "copies, casts"
    assert coverage.category("qk_norm_rope_row_Kt1_A4bf16") == "ours (cuTile)"
    assert coverage.category("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>") == "GEMM"
    assert coverage.category("void cudnn::fusion::lean_reduction_kernel<false, false, false>(...)") == "attention"


def test_compiled_decode_tiny(tmp_path, cache):
    text = run(compiled_decode, tmp_path, cache, "--family", "llama", "--decoder")
    table = rows(text)
    assert [k.split(" | ")[0] for k in table] == ["config", "plain transformers", "cuTile kernels (KernelConfig)",
                                                  "cuTile kernels + decoder (KernelConfig)"]
    assert "0 break(s)" in text and "compiled ours == compiled plain: True" in text
    assert "compiled ours + decoder == compiled plain: True" in text
    assert "- ours + decoder: ApplyRotaryPosEmb x1, DecoderLayer x2, RMSNorm x5, SwiGLUMLP x2;" in text


def test_cold_start_tiny(tmp_path, cache):
    """Each configuration ran in its own process and reported finite times; ours ran our layers (their references
    on CPU: no compile, no cubin), and the process where cuda.tile cannot be imported did not import it."""
    text = run(cold_start, tmp_path, cache)
    table = rows(text)
    assert table.pop("config | env")[2:] == ["load s", "first forward s", "later forward s", "load + first s",
                                             "vs plain s", "kernel set-up s", "cuTile compiles", "cubin launches",
                                             "rms_norm host µs", "process s"]
    assert [k.split(" | ")[0] for k in table] == [label for _, label, _, _ in cold_start.CONFIGS]
    for key, cells in table.items():
        assert all(finite(c)[0] > 0 for c in cells[2:6] + cells[11:]), cells
        assert all(c == "—" if key.startswith("plain") else finite(c) for c in cells[6:8]), cells
        assert cells[10] == "n/a" if key.startswith("plain") else finite(cells[10])[0] > 0, cells
        assert cells[8:10] == ["0 (0.0 s)", "0/0"], cells
    assert "CUTILE_KERNELS_PRECOMPILED=0, CUDA_TILE_CACHE_DIR=<empty dir>" in text
    for _, label, _, block in cold_start.CONFIGS[1:]:  # cuda-tile is installed here: only the blocked one fails
        assert (f"- {label}: kernel layers ApplyRotaryPosEmb x1, RMSNorm x3, RMSNormMLP x2; cuda.tile imported: False "
                f"(importable: {not block});") in text


def test_harness_gpu_folder_and_cpu_check(monkeypatch):
    for name, slug in (("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
                       ("CPU", "cpu")):
        monkeypatch.setattr(harness, "versions", lambda name=name: {"gpu": name})
        assert harness.gpu_slug() == slug
    import transformers.utils.kernel_config as kc

    before = list(kc.KERNELS_SUPPORTED_DEVICE_TYPES)
    with harness.cpu_kernel_config():
        assert "cpu" in kc.KERNELS_SUPPORTED_DEVICE_TYPES
    assert kc.KERNELS_SUPPORTED_DEVICE_TYPES == before


def test_decode_layer_tiny_gemma3(tmp_path, cache):
    """Gemma3's layer 0 (sliding-window attention: its cache also counts on the host, reset before every step) and
    GemmaDecoderLayer (two fused launches) against plain eager on the same cache."""
    table = rows(run(decode_layer, tmp_path, cache, "--family", "gemma3"))
    table.pop("config | batch 1 µs")
    refs = "torch.compile, references <= 64 tokens"
    assert [k.split(" | ")[0] for k in table] == [
        "plain eager", "plain torch.compile", "ours eager", "ours torch.compile", f"ours {refs}",
        "ours + decoder eager", "ours + decoder torch.compile", f"ours + decoder {refs}",
        "ours + decoder + qkv eager", "ours + decoder + qkv torch.compile", f"ours + decoder + qkv {refs}"]
    for cells in table.values():
        assert all(err < 1e-2 for err in finite(cells[5]))
