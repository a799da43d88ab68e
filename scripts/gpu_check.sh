#!/usr/bin/env bash
# The one prepared GPU check: CUDA tests, then the GPU benchmark. Run on an NVIDIA machine from the
# repository root:  OUT=/some/dir bash scripts/gpu_check.sh
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LLMRUN_HOME=/tmp/llmrun-home
OUT="${OUT:-/tmp/gpu-check}"; mkdir -p "$OUT"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
echo "== pytest -m gpu"
timeout 200 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider -x 2>&1 | tail -25
echo "== Triton kernels, compiled (tests/model/test_gpu_kernels.py)"
timeout 120 python3 -m pytest -q tests/model/test_gpu_kernels.py -p no:cacheprovider 2>&1 | tail -25
echo "== benchmark"
timeout 330 python3 scripts/gpu_bench.py --folder /tmp/phi3-mini --out "$OUT/gpu_bench.json" ${BENCH_ARGS:-} 2>&1 \
  | grep -v '^\s*"\?[0-9]\+,\?$' | tee "$OUT/gpu_bench.log" | tail -80
