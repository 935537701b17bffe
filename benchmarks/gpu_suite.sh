#!/usr/bin/env bash
# Every CUDA check and benchmark fitserve has, in one time-boxed run on a GPU machine.
#
#   benchmarks/gpu_suite.sh engine OUTDIR MODEL_DIR   # gpu tests that need no weights + engine throughput
#   benchmarks/gpu_suite.sh serve  OUTDIR             # gpu tests on the default model, plan, serving benchmarks
#
# Assumes fitserve is importable by $PYTHON (pip install -e . or PYTHONPATH) and, for `serve`, that the default
# model is fetched (`fitserve model fetch`). The `engine` phase needs only the model's shape, so MODEL_DIR may be a
# randomly initialised copy of the default model (same config and tokenizer): memory and speed do not depend on
# the weights' values. Each step has its own time limit, so one hung step cannot eat the others' time; logs and
# JSON land in OUTDIR. DEVICE=cpu and SMALL=1 turn it into a quick dry run of the script itself on a CPU machine.
set -u
PHASE=${1:?engine or serve}
OUT=${2:?output directory}
MODEL_DIR=${3:-}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda:0}
mkdir -p "$OUT"

if [[ -n "${SMALL:-}" ]]; then
  BATCHES=1,2; LEVELS=1,2; TOKENS=8; MAXC=4; HF_CB=""
else
  BATCHES=1,4,16,64; LEVELS=1,4,16,64; TOKENS=64; MAXC=256; HF_CB="--hf-cb"
fi

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to OUT/NAME.log, print rc and the log's tail
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name"
  timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  grep -vE "^\s*$|Warning|warn\(" "$OUT/$name.log" | tail -n "${TAIL:-12}" | cut -c1-220
}

if [[ $PHASE == engine ]]; then
  step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv; $PY -c '
import torch, transformers, bitsandbytes, fastapi, pydantic
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())
print(\"transformers\", transformers.__version__, \"bitsandbytes\", bitsandbytes.__version__)
print(\"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"none\")'"
  TAIL=20 step pytest_gpu_no_weights 120 "$PY" -m pytest -p no:cacheprovider -q -m gpu -rs \
    tests/integration/test_cuda_metrics.py \
    "tests/integration/test_quant_load.py::test_cuda_budget_matches_mem_get_info"
  # the compiled decode step (issue 11): its unit tests on CUDA, then per-step times of each mode side by side
  TAIL=10 step pytest_gpu_compiled_decode 240 "$PY" -m pytest -p no:cacheprovider -q -m gpu -rs \
    tests/unit/test_compiled_decode.py
  TAIL=14 step decode_step_bf16 240 "$PY" benchmarks/decode_step.py --device "$DEVICE" --dtype bf16 --model-dir "$MODEL_DIR" \
    --compile-modes off,eager,cuda-graphs --batch-sizes "$BATCHES" --steps 20 --out "$OUT/decode_step_bf16.json"
  # the direct Llama layer loop (projections joined, then separate) vs transformers' model(...) on the eager path
  # (host overhead is what a GPU step is)
  TAIL=10 step decode_step_forwards 150 "$PY" benchmarks/decode_step.py --device "$DEVICE" --dtype bf16 \
    --model-dir "$MODEL_DIR" --compile-modes off --forwards direct,direct-separate,transformers \
    --batch-sizes 1,16 --steps 20 --out "$OUT/decode_step_forwards.json"
  TAIL=16 step engine_bf16 150 "$PY" benchmarks/engine_throughput.py --device "$DEVICE" --dtype bf16 \
    --model-dir "$MODEL_DIR" --batch-sizes "$BATCHES" --max-tokens "$TOKENS" $HF_CB --compile-modes off,cuda-graphs \
    --out "$OUT/engine_bf16.json"
  TAIL=8 step engine_fp16 60 "$PY" benchmarks/engine_throughput.py --device "$DEVICE" --dtype fp16 \
    --model-dir "$MODEL_DIR" --batch-sizes "$BATCHES" --max-tokens "$TOKENS" --no-baseline \
    --out "$OUT/engine_fp16.json"
elif [[ $PHASE == serve ]]; then
  TAIL=20 step pytest_gpu 180 "$PY" -m pytest -p no:cacheprovider -q -m gpu -rs --continue-on-collection-errors \
    tests/integration/test_cuda_metrics.py tests/integration/test_quant_load.py
  for budget in auto 2GiB 420MiB 380MiB; do
    extra=(); [[ $budget != auto ]] && extra=(--memory-budget "$budget")
    "$PY" -m fitserve plan "${extra[@]}" --json >"$OUT/plan_$budget.json" 2>/dev/null
    TAIL=2 step "plan_$budget" 30 "$PY" -m fitserve plan "${extra[@]}"
  done
  TAIL=30 step serve_vs_transformers 170 "$PY" benchmarks/serve_vs_transformers.py --device "$DEVICE" \
    --levels "$LEVELS" --max-tokens "$TOKENS" --rounds 2 --ready-timeout 120 --fitserve-args "--max-batch-size 64" \
    --out "$OUT/serve_vs_transformers.json"
  # the planner under a tight budget, then the loadtest's largest batch within a TTFT objective
  port=8765
  "$PY" -m fitserve serve --memory-budget 1GiB --max-batch-size 128 --port "$port" >"$OUT/serve_1gib.log" 2>&1 &
  server=$!
  "$PY" - "$port" <<'EOF'
import sys, time, httpx
for _ in range(180):
    try:
        if httpx.get(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
EOF
  TAIL=14 step loadtest_find_max 110 "$PY" -m fitserve.loadtest --url "http://127.0.0.1:$port" --find-max-batch \
    --max-concurrency "$MAXC" --max-tokens "$TOKENS" --ignore-eos --slo-ttft-p95 1s --level-time-limit 15 \
    --no-plots --out "$OUT/loadtest"
  "$PY" -c "import httpx, sys; print(httpx.get(f'http://127.0.0.1:{sys.argv[1]}/metrics').text)" "$port" | grep -E "^fitserve_(plan|device|torch|kv|memory|model)" \
    >"$OUT/metrics_after.txt"
  kill -TERM "$server"; wait "$server"
  grep -E "error|Error|OOM|KV cache|engine started" "$OUT/serve_1gib.log" | tail -n 8 | cut -c1-220
else
  echo "unknown phase $PHASE" >&2; exit 2
fi
