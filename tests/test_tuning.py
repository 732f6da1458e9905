"""The per-GPU launch table (kernel-src/cutile_tile/tuned.py) and the tuner's candidates, on CPU: every table entry
is a configuration the tuner can produce (so it was measured and float64-checked, benchmarks/tune.py), the GPU
models are told apart, and every candidate makes a launch whose arguments match its kernel's signature."""
import sys

import pytest
import torch

from benchmarks import tune
from devtools import compile_all

MODULES = {m.__name__.rsplit(".", 1)[-1]: m for m in compile_all._load_modules()}
TUNED = sys.modules["cutile_tile.tuned"]
T = compile_all.Tensor
BF16 = torch.bfloat16


def plan(op: str, width: int, rows: int, gpu):
    """The launch the op's launcher makes for (rows, width) in bf16 on `gpu` (stand-in tensors)."""
    norm, act, rope = MODULES["rms_norm"], MODULES["gated_act"], MODULES["rope"]
    x, w = T(BF16, (rows, width)), T(BF16, (width,))
    if op in ("rms_norm", "gemma_rms_norm"):
        return norm.forward_launch(x, w, x, 1e-6, op == "gemma_rms_norm", gpu)
    if op in ("add_rms_norm", "gemma_add_rms_norm"):
        return norm.add_forward_launch(x, x, w, x, x, 1e-6, op == "gemma_add_rms_norm", gpu)
    if op == "rms_norm_backward":
        return norm.backward_launch(x, w, x, x, T(torch.float32, (norm.backward_blocks(x, gpu), width)), 1e-6,
                                    False, gpu)
    if op in ("rope", "qk_norm_rope"):
        q, k, cs = T(BF16, (1, 32, rows, width)), T(BF16, (1, 8, rows, width)), T(BF16, (1, rows, width))
        if op == "qk_norm_rope":
            return rope.qk_norm_launch(q, k, cs, cs, cs, cs, q, k, 1e-6, False, gpu)
        return rope.forward_launch(q, k, cs, cs, q, k, gpu)
    if op in ("cross_entropy", "cross_entropy_backward"):
        ce, t, row = MODULES["cross_entropy"], T(torch.int64, (rows,)), T(torch.float32, (rows,))
        if op == "cross_entropy":
            return ce.forward_launch(x, t, row, row, -100, gpu)
        return ce.backward_launch(x, t, row, row, x, -100, gpu)
    if op.endswith("_backward"):
        return act.backward_launch(x, x, x, x, x, op[:-len("_backward")], gpu)
    return act.forward_launch(x, x, x, op, gpu)


def test_every_table_entry_is_a_tuner_candidate():
    assert {gpu for gpu, *_ in TUNED.TABLE} >= {"h100", "h200"}
    for (gpu, op, size, width, rows_bucket), config in TUNED.TABLE.items():
        # an exact width's entries are its own candidates; a bucket's, those of a real width in it
        widths = [w for w in tune.ALL[op] if (w - 1).bit_length() == width] if TUNED.is_bucket(width) else [width]
        assert size == 2 and widths, (gpu, op, width)
        assert any(config in list(tune.candidates(op, w)) for w in widths), (gpu, op, width, config)
        if op.endswith("rms_norm"):
            assert not (config[2] and config[3]), "prefetch runs with plain loads only"


def test_an_exact_width_takes_its_own_entry_before_its_bucket(monkeypatch):
    """A tune of one width writes that width's entries and its bucket's (tune.keys): the width then runs its own
    choice, the bucket's other widths the last tuned width's, and the AOT build compiles both."""
    tuned_2560, bucket = (0, 0, False, False, 8), (2, 1, True, False)
    for rows_bucket in range(1, 18):
        exact_key, bucket_key = tune.keys("test", "rms_norm", 2560, rows_bucket)
        assert bucket_key == ("test", "rms_norm", 2, 12, rows_bucket)
        monkeypatch.setitem(TUNED.TABLE, exact_key, tuned_2560)
        monkeypatch.setitem(TUNED.TABLE, bucket_key, bucket)
    for rows in (1, 64, 4096):
        assert TUNED.lookup("test", "rms_norm", BF16, 2560, rows) == tuned_2560
        assert TUNED.lookup("test", "rms_norm", BF16, 3584, rows) == bucket
        assert TUNED.lookup("test", "gemma_rms_norm", BF16, 2560, rows) is None  # per op
    assert plan("rms_norm", 2560, 64, ("test", 132))[0] is not plan("rms_norm", 3584, 64, ("test", 132))[0]
    assert {(w, r) for g, w, r in TUNED.shapes("rms_norm") if g == "test"} >= {(2560, 1), (4096, 1), (4096, 32768)}


def test_gpu_models_are_told_apart():
    assert TUNED.gpu_key("NVIDIA H100 80GB HBM3") == "h100" and TUNED.gpu_key("NVIDIA H200") == "h200"
    assert TUNED.lookup("h100", "rope", BF16, 128, 32768) is not None
    assert TUNED.lookup("an untuned gpu", "rope", BF16, 128, 32768) is None  # -> the module's default


def test_rope_without_its_own_entry_runs_the_h100_configuration(monkeypatch):
    """RoPE in every dtype takes the 16-bit entries (the tables hold bf16 measurements); a GPU without entries
    launches the H100's configuration for its head_dim and token bucket: on both tuned GPUs those beat
    default_config by 1.1-5.4x. The H200's own entries came from kernels since replaced, so it holds none now. A
    GPU with its own entry keeps it; head dims no table holds take default_config."""
    rope = MODULES["rope"]

    def config(d, tokens, dtype, gpu):
        q, k, cs = T(dtype, (1, 32, tokens, d)), T(dtype, (1, 8, tokens, d)), T(dtype, (1, tokens, d))
        kernel, _, args = rope.forward_launch(q, k, cs, cs, q, k, gpu)
        if kernel is rope.rope_row:
            return rope.ROW_NATIVE if args[11] else rope.ROW_TILED if args[10] else rope.ROW
        return (args[11], args[12], args[8]) + ((1,) if args[14] else ())  # TILE_S, TILE_H, chunks[, NATIVE]

    for d in (128, 256):
        for tokens in (1, 16, 300, 4096, 32768):
            h100 = TUNED.lookup("h100", "rope", BF16, d, tokens)
            for dtype in (BF16, torch.float16, torch.float32):
                assert config(d, tokens, dtype, ("an untuned gpu", 84)) == h100
                assert config(d, tokens, dtype, ("h200", 132)) == h100
    assert config(64, 4096, BF16, ("an untuned gpu", 84)) == rope.default_config(4096, 40, 84)
    monkeypatch.setitem(TUNED.TABLE, ("h200", "rope", 2, 7, 13), (16, 1, 4))
    assert config(128, 4096, BF16, ("h200", 132)) == (16, 1, 4)


def test_qk_norm_rope_without_its_own_entry_runs_the_h100_configuration():
    """As RoPE: a GPU without qk_norm_rope entries (the H200 today) launches the H100's tuned configuration (53.9
    against 110.7 µs for qk_default_config at 4096 tokens on the H100); head dims no table holds take the default."""
    rope = MODULES["rope"]

    def plan(d, tokens, dtype, gpu):
        q, k, cs = T(dtype, (1, 32, tokens, d)), T(dtype, (1, 8, tokens, d)), T(dtype, (1, tokens, d))
        w = T(dtype, (d,))
        return rope.qk_norm_launch(q, k, w, w, cs, cs, q, k, 1e-6, False, gpu)

    def reference(d, tokens):
        return plan(d, tokens, BF16, ("h100", 132))

    for d in (128, 256):
        for tokens in (1, 300, 4096, 32768):
            assert TUNED.lookup("h100", "qk_norm_rope", BF16, d, tokens) is not None
            for dtype, gpu in ((BF16, ("an untuned gpu", 84)), (torch.float32, ("h200", 132))):
                got, want = plan(d, tokens, dtype, gpu), reference(d, tokens)
                assert got[0] is want[0] and got[1] == want[1], (d, tokens, dtype, gpu)
    kernel, grid, _ = plan(64, 4096, BF16, ("an untuned gpu", 84))
    assert kernel is rope.qk_norm_rope_fwd and rope.qk_default_config(4096, 40, 84, 32)[0] * grid[0] >= 4096


@pytest.mark.parametrize("op", list(tune.ALL))
def test_every_candidate_launch_matches_its_kernel(op, monkeypatch):
    width = tune.ALL[op][0]
    for rows in (1, 4096):
        key = ("test", op, 2, (width - 1).bit_length(), rows.bit_length())
        for config in tune.candidates(op, width):
            monkeypatch.setitem(TUNED.TABLE, key, config)
            kernel, grid, args = plan(op, width, rows, ("test", 132))
            assert all(g >= 1 for g in grid), (config, grid)
            _, params = compile_all._constraints((kernel, grid, args))
            assert len(params) == len(args) == len(kernel._annotated_function.pyfunc.__code__.co_varnames[
                :kernel._annotated_function.pyfunc.__code__.co_argcount]), config


@pytest.mark.parametrize("kv_heads", [1, 4, 8])
def test_rope_chunks_cover_every_head_once(kv_heads, monkeypatch):
    """Every candidate's plan: q's chunks of TILE_H heads and k's of TILE_HK (no wider than k's heads rounded up
    to a power of two: a 32-head q tile beside 8 kv heads rotates no padded k heads) cover each head once, and
    the grid's third axis covers every chunk."""
    rope = MODULES["rope"]
    for config in tune.candidates("rope", 128):
        if config[:3] in (rope.ROW, rope.ROW_TILED, rope.ROW_NATIVE):
            continue  # rope_row: every head in one block (test_every_candidate_launch_matches_its_kernel)
        monkeypatch.setitem(TUNED.TABLE, ("test", "rope", 2, 7, 1), config)
        q, k, cs = T(BF16, (1, 32, 1, 128)), T(BF16, (1, kv_heads, 1, 128)), T(BF16, (1, 1, 128))
        _, grid, args = rope.forward_launch(q, k, cs, cs, q, k, ("test", 132))
        q_chunks, chunks, per_block, tile_h, tile_hk = args[6], args[7], args[8], args[12], args[13]
        assert tile_h == config[1] and tile_hk == min(tile_h, 1 << (kv_heads - 1).bit_length())
        assert (q_chunks - 1) * tile_h < 32 <= q_chunks * tile_h
        assert ((chunks - q_chunks) - 1) * tile_hk < kv_heads <= (chunks - q_chunks) * tile_hk
        assert (grid[2] - 1) * per_block < chunks <= grid[2] * per_block


def test_a_stopped_tune_leaves_the_buckets_it_did_not_measure():
    """fill_buckets: every bucket takes the nearest planned row count's best configuration; buckets nearest to a
    planned count that was never measured (a run stopped by its time limit) are left out, so the table keeps them."""
    planned = tune.ROWS  # 1 ... 4096, 32768
    complete = {rows: ("config", rows) for rows in planned}
    assert set(tune.fill_buckets(complete, planned)) == set(range(1, 18))
    assert tune.fill_buckets(complete, planned) == tune.fill_buckets(complete)
    stopped = {rows: ("config", rows) for rows in planned if rows < 32768}
    filled = tune.fill_buckets(stopped, planned)
    assert filled[13] == ("config", 4096) and filled[14] == ("config", 4096)  # 4096 and its nearer neighbours
    assert not {15, 16, 17} & set(filled)  # 32768's bucket and those nearer to it than to 4096's
    assert tune.fill_buckets({}, planned) == {}
    # `--rows 32768` alone: only the buckets nearer to 32768 than to any other default row count
    assert set(tune.fill_buckets({32768: ("config", 32768)}, planned)) == {15, 16, 17}


@pytest.mark.parametrize("rows", [1, 65535, 65536, 1 << 20])
def test_the_gated_row_kernel_keeps_its_grid_within_cuda_limits(rows, monkeypatch):
    """gated_act_row puts rows on the grid's y dimension (at most 65535): a tuned row-kernel entry that a larger
    row count reaches (the table's last bucket covers every count above it) runs 1-row tiles instead."""
    for bucket in range(1, 22):
        monkeypatch.setitem(TUNED.TABLE, ("test", "silu", 2, 14, bucket), (0, 512, False, 0))
    kernel, grid, args = plan("silu", 14336, rows, ("test", 132))
    name = kernel._annotated_function.pyfunc.__name__
    assert name == ("gated_act_row" if rows <= 65535 else "gated_act_fwd"), (rows, name)
    assert grid[1:] in ((), (rows,)) and all(1 <= g < 1 << 24 for g in grid) and (len(grid) < 2 or grid[1] <= 65535)
    if name == "gated_act_row":  # one block per chunk of every row
        assert grid == (14336 // 512, rows)
    else:  # persistent blocks over 1-row tiles
        assert args[5:7] == (1, 512) and grid == (8 * 132,)


@pytest.mark.parametrize("rows", [1, 65535, 65536, 1 << 20])
def test_the_gated_backward_row_kernel_keeps_its_grid_within_cuda_limits(rows, monkeypatch):
    """gated_act_bwd_row likewise: past 65535 rows its entry runs gated_act_bwd with 1-row tiles (rows on the grid's
    x dimension, chunks on y)."""
    for bucket in range(1, 22):
        monkeypatch.setitem(TUNED.TABLE, ("test", "silu_backward", 2, 14, bucket), (0, 1024, False))
    kernel, grid, args = plan("silu_backward", 14336, rows, ("test", 132))
    name = kernel._annotated_function.pyfunc.__name__ if hasattr(kernel, "_annotated_function") else kernel.__name__
    assert name == ("gated_act_bwd_row" if rows <= 65535 else "gated_act_bwd"), (rows, name)
    assert grid == ((14336 // 1024, rows) if rows <= 65535 else (rows, 14336 // 1024))
    assert args[-1] == 1024 and (rows <= 65535 or args[-2] == 1)
