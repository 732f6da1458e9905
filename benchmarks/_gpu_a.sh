# scratch: first GPU call of the session (deleted before stopping)
source .gpu/activate.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
G=$(python -c "from benchmarks.harness import gpu_slug; print(gpu_slug())" 2>/dev/null); echo gpu=$G
timeout 200 python -m devtools.build --archs sm_90 > $OUT/build.log 2>&1; echo "build rc=$? t=$SECONDS"; tail -2 $OUT/build.log
timeout 300 python -m pytest -q -m gpu tests -p no:cacheprovider > $OUT/pytest.log 2>&1; echo "pytest rc=$? t=$SECONDS"; tail -8 $OUT/pytest.log
left=$((570 - SECONDS)); [ $left -gt 30 ] && { timeout $left python -m benchmarks.launch_host --out $OUT/launch_host_$G.md > $OUT/launch_host.log 2>&1; echo "launch_host rc=$? t=$SECONDS"; tail -22 $OUT/launch_host.log; }
