#!/usr/bin/env bash
# Every GPU check in one run, from the repository root on a machine with a CUDA GPU:
#   bash benchmarks/gpu_checks.sh [OUT_DIR]      (default: $OUT, else ./gpu_checks)
# 1. the device and the software;
# 2. tests/test_cuda.py (the whole training step under set_sync_debug_mode("error"),
#    every clip mode, fp32 and bf16) and tests/test_nosync.py;
# 3. tests/test_golden.py (CPU tensors: the recording on this machine's CPU);
# 4. the benchmark suite on the GPU (benchmarks/run.py --device cuda), written to
#    OUT_DIR/RESULTS-cuda.md.
# Each step's output goes to OUT_DIR; a failing step does not stop the later ones.
# Peers that are not installed (zclip, autoclip, wandb) are skipped by the benchmark;
# wheels in ./.whl are installed first when present (no network needed).
set -uo pipefail
out="${1:-${OUT:-gpu_checks}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --target /tmp/gw_site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/gw_site"
fi
status=0
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
} > "$out/device.txt" 2>&1 || status=1
"$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_nosync.py \
    > "$out/tests_cuda.txt" 2>&1 || status=1
"$py" -m pytest -q -p no:cacheprovider tests/test_golden.py > "$out/golden.txt" 2>&1 || status=1
timeout "${BENCH_TIMEOUT:-330}" "$py" benchmarks/run.py --device "${DEVICE:-cuda}" ${BENCH_ARGS:-} \
    --out "$out/RESULTS-cuda.md" > "$out/bench.txt" 2>&1 || status=1
tail -n 3 "$out"/*.txt
exit $status
