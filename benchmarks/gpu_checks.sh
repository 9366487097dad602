#!/usr/bin/env bash
# The GPU checks of one device call (issue 14), in the order that matters if time runs out:
#   1. the tests marked gpu (the lean step under set_sync_debug_mode("error"), the head's CUDA
#      kernels against the dense head on the CPU, dropout streams on the device);
#   2. the muon benchmarks on CUDA (`pytest benchmarks/ --benchmark`, remote and hepattn sets left out).
# Usage, from the repository root on the GPU machine:
#   bash benchmarks/gpu_checks.sh OUT_DIR [BENCH_TIMEOUT_S]
# Packages the GPU image lacks (zarr and its codecs) are installed from wheels in .whl/ when that
# folder is there (see benchmarks/README.md, "On a GPU"). Writes OUT_DIR/{device.txt, gpu_tests.txt,
# bench.txt} and the benchmark results under OUT_DIR/bench/.
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR [BENCH_TIMEOUT_S]}
budget=${2:-360}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 - <<'EOF' 2>&1 | tee "$out/device.txt"
import torch, zarr
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(), "zarr", zarr.__version__)
EOF
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests 2>&1 | tee "$out/gpu_tests.txt"
CACHEFEAT_BENCH_DEVICE=cuda CACHEFEAT_BENCH_RESULTS="$out/bench" timeout "$budget" \
    python3 -m pytest -q -p no:cacheprovider benchmarks --benchmark \
    --ignore=benchmarks/test_bench_remote.py --ignore=benchmarks/test_bench_hepattn.py 2>&1 | tee "$out/bench.txt"
