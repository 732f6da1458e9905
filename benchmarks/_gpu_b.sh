# scratch: second GPU call (warm: build/ and .cache kept) — RoPE tune at head_dim 128, then its rows
source .gpu/activate.sh
G=$(python -c "from benchmarks.harness import gpu_slug; print(gpu_slug())" 2>/dev/null); echo gpu=$G
timeout 260 python -m benchmarks.tune --ops rope --widths 128 --workers 14 --write kernel-src/cutile_tile/tuned.py --out $OUT > $OUT/tune.log 2>&1; echo "tune rc=$? t=$SECONDS"; grep "^tune: rope\|warmed" $OUT/tune.log; grep -i "error" $OUT/tune.log | head -3
cp kernel-src/cutile_tile/tuned.py $OUT/tuned_$G.py
timeout 90 python -m devtools.build --archs sm_90 > $OUT/build2.log 2>&1; echo "build rc=$? t=$SECONDS"
timeout 90 python -m pytest -q -m gpu tests/test_rope.py -p no:cacheprovider 2>&1 | tail -2; echo "t=$SECONDS"
left=$((585 - SECONDS)); [ $left -gt 30 ] && { timeout $left python -m benchmarks.run_all --quick --ops rope --out $OUT/kernels_rope_$G.md > $OUT/run_all_rope.log 2>&1; echo "run_all rc=$? t=$SECONDS"; grep "^\[" $OUT/run_all_rope.log; }
