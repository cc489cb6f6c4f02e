#!/usr/bin/env bash
# The whole GPU benchmark on a lent H100/H200 in under 8 minutes (see benchmarks/README.md).
#
#   device tool: run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=560)
#   dry run of this script on any machine:  QUICK=1 bash benchmarks/gpu.sh   (tiny components, CPU if no GPU)
#
# Steps, most important first; each runs only if the time it needs is still left in BUDGET_S, under `timeout`:
#   1 main: plain SDXL and every mode of ours (and the prototype processors), 1024², 30 steps, fp16, interleaved
#   2 memory: model offload, sequential offload (faithful mode, 2 steps: peak memory does not depend on steps)
#   3 fast mode (Hyper-SD 8 steps, CFG kept)   4 channels_last   5 VAE slicing + tiling   6 torch.compile
# Output in $OUT (what the device tool brings back: at most 8 files): RESULTS-gpu.md (append it to
# benchmarks/RESULTS.md), gpu-bench.tar.gz (every JSON), log.txt, nvidia-smi.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET_S=${BUDGET_S:-460}
DEADLINE=$((START + BUDGET_S))
OUT=${OUT:-$PWD/outputs/gpu-bench}
QUICK=${QUICK:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT/json"
exec > >(tee -a "$OUT/log.txt") 2>&1

# 1. Packages. The device image has torch, accelerate, psutil, tokenizers and safetensors but no diffusers and an
# older transformers, and no network: the wheels in .whl/ (filled here, see README) go into a side folder that
# shadows the image's copies, without touching its environment.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE=/tmp/bench-site
  for wheel in .whl/*.whl; do  # one at a time: a wheel for another Python must not stop the others
    "$PY" -m pip install --quiet --no-index --no-deps --upgrade --target "$SITE" "$wheel" || echo "!! skipped $wheel"
  done
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import torch, diffusers, transformers, accelerate, psutil; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"; then
  echo "!! packages missing: fill .whl/ as benchmarks/README.md says and carry it (carry=['.whl'])"
  exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

if [ "$QUICK" = 1 ]; then
  DEV=$([ "$CUDA" = 1 ] && echo cuda || echo cpu)
  COMMON=(--quick --device "$DEV" --threads 1)
  STEPS=(--steps 2)
else
  COMMON=(--device cuda --dtype fp16 --resolution 1024)
  STEPS=(--steps 30)
fi

# step NAME NEEDS_S ARGS...: speed.py with ARGS when NEEDS_S seconds are still left (timeout: what is left).
step() {
  local name=$1 needs=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt "$needs" ]; then
    echo "== skip $name: ${left}s left, it needs about ${needs}s"
    return 0
  fi
  echo "== $name ($((SECONDS - START))s in, ${left}s left)"
  timeout --kill-after=10 "$left" "$PY" benchmarks/speed.py "${COMMON[@]}" "$@" \
    --json "$OUT/json/$name.json" --results "$OUT/RESULTS-gpu.md" || echo "!! $name failed or ran out of time"
}

ALL=plain,infinite-id,infinite-id-window,infinite-id-cfg0.8,adapter,text,infinite-id+proto,infinite-id-window+proto,infinite-id+proto-kv
step main 150 "${STEPS[@]}" --repeats 2 --warmup-steps 2 --modes "$ALL" --id-encoder
if [ "$CUDA" = 1 ]; then
  step memory-model 45 --steps 2 --repeats 1 --warmup-steps 1 --modes infinite-id --memory model
  step memory-sequential 60 --steps 2 --repeats 1 --warmup-steps 1 --modes infinite-id --memory sequential
fi
step fast-hyper-sd 45 --fast hyper-sd --repeats 2 --warmup-steps 1 --modes plain,infinite-id,infinite-id-window,infinite-id+proto
step channels-last 60 "${STEPS[@]}" --repeats 2 --warmup-steps 2 --channels-last --modes plain,infinite-id,infinite-id+proto
step vae-slicing-tiling 35 --steps 2 --repeats 1 --warmup-steps 1 --vae-slicing --vae-tiling --modes plain,infinite-id
# The package's processors break the graph at every mixing layer (see README), so compile measures the prototype's.
step compile 150 "${STEPS[@]}" --repeats 2 --warmup-steps 2 --compile default --modes plain,infinite-id+proto

tar -czf "$OUT/gpu-bench.tar.gz" -C "$OUT" json && rm -rf "$OUT/json"
[ -f "$OUT/RESULTS-gpu.md" ] && [ "$QUICK" != 1 ] && cat "$OUT/RESULTS-gpu.md" >> benchmarks/RESULTS.md
echo "== done in $((SECONDS - START))s; results: $OUT/RESULTS-gpu.md"
