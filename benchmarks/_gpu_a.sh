# scratch: first GPU call of the session (deleted before stopping)
source .gpu/activate.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
G=$(python -c "from benchmarks.harness import gpu_slug; print(gpu_slug())" 2>/dev/null); echo gpu=$G
timeout 200 python -m devtools.build --archs sm_90 > $OUT/build.log 2>&1; echo "build rc=$? t=$SECONDS"; tail -1 $OUT/build.log
if [ "$G" = h200 ]; then T="tests"; else T="tests/test_aot.py tests/test_rope.py tests/test_add_rms_norm.py tests/test_decoder_layer.py"; fi
timeout 290 python -m pytest -q -m gpu $T -p no:cacheprovider > $OUT/pytest.log 2>&1; echo "pytest rc=$? t=$SECONDS"; tail -6 $OUT/pytest.log
timeout 60 python -m benchmarks.launch_host --out $OUT/launch_host_$G.md > $OUT/launch_host.log 2>&1; echo "launch_host rc=$? t=$SECONDS"; tail -20 $OUT/launch_host.log
left=$((580 - SECONDS)); [ $left -gt 40 ] && { timeout $left python -m benchmarks.run_all --quick --ops add_rms_norm,rms_norm,silu_mul,gemma_rms_norm --out $OUT/kernels_cubins_$G.md > $OUT/run_all.log 2>&1; echo "run_all rc=$? t=$SECONDS"; grep "^\[" $OUT/run_all.log; }
