#!/bin/bash
# GPU checks in one call, each step under its own time limit, logs and JSON under OUT:
#   the cuDNN tests (tests/test_gpu.py), the long-context benchmark in bf16 with cuDNN against HF on
#   the same GPU (32K, and 128K with YaRN), the device suite's decode and 2K-prefill steps, and the
#   serving benchmark in bf16 (qwen-jax serve, sequential, static batches, transformers serve on cuda;
#   needs QWEN_JAX_TOKENIZER_DIR, e.g. shared/reference/qwen2.5-tokenizer).
#     OUT=gpu-check-results BUDGET=600 bash benchmarks/gpu_check.sh
#     STEPS="serve" BUDGET=400 bash benchmarks/gpu_check.sh     # only the named steps (the default
#     BUDGET runs out before serve, the last)
# qwen-jax must be importable (pip install -e ".[test]" with a CUDA extra, or offline:
# pip install --no-deps --no-build-isolation -e .). Steps that do not fit the remaining BUDGET
# seconds are skipped and say so. This is what produced the H200 figures in benchmarks/RESULTS.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
START=$(date +%s); BUDGET=${BUDGET:-600}
STEPS=${STEPS:-tests long_context yarn128k suite serve}
S=$OUT/summary.txt
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
step() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  local l; l=$(left); (( secs > l )) && secs=$l
  if (( secs < 25 )); then echo "== $name: not run, $l s left" | tee -a "$S"; return; fi
  echo "== $name (limit $secs s)" | tee -a "$S"
  local t; t=$(date +%s)
  timeout -k 5 "$secs" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name: exit $rc in $(( $(date +%s) - t )) s" | tee -a "$S"
  tail -n 25 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$S"
TIMEOUT_ARGS=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 80")
step tests 150 python3 -m pytest -v -ra -p no:cacheprovider $TIMEOUT_ARGS --durations 8 tests/test_gpu.py
step long_context 110 python3 benchmarks/long_context.py --dtype bfloat16 --attention cudnn \
  --lengths 4096 32768 --decode-contexts --timeout 60 --json "$OUT/long_context.json"
step yarn128k 75 python3 benchmarks/long_context.py --dtype bfloat16 --attention cudnn --rope-scaling yarn:4 \
  --lengths 131072 --decode-contexts --timeout 60 --json "$OUT/yarn128k.json"
step suite 240 python3 benchmarks/device_suite.py --only decode-0.5B prefill-2K-0.5B --keep-going --out "$OUT/suite"
step serve 360 python3 benchmarks/serve.py --requests 16 --rates inf --checkpoint-dir "${TMPDIR:-/tmp}/qwen-jax-serve-ckpt" \
  --json-out "$OUT/serve.json"
echo "total $(( $(date +%s) - START )) s" | tee -a "$S"
