#!/usr/bin/env bash
# The whole GPU benchmark on a lent H100/H200 in under 8 minutes (see benchmarks/README.md, "GPU: gpu.sh").
#
#   device tool: run(command="bash benchmarks/gpu.sh --tests", carry=[".whl"], timeout_s=560)
#   dry run of this script on any machine:  QUICK=1 bash benchmarks/gpu.sh --tests   (tiny components, CPU if no GPU)
#
# Steps, most important first; each runs only if the time it needs is still left in BUDGET_S, under its own cap:
#   0 (--tests) the gpu-marked tests, their failure output kept   1 main: plain SDXL and our modes, 1024², 30 steps
#   2 torch.compile of ours (one graph per layout) against stock uncompiled plain SDXL, compile time apart
#   3 VRAM tier 8 (model offload), 4 tier 6 (model offload + int8 UNet; sequential without torchao): peak memory
#   5 fast mode (Hyper-SD 8 steps, CFG kept)   6 xformers (only if it is installed and runs)
# A step that fails or runs out of time prints why: its exit status and the last lines of its output (a step out of
# time gets SIGINT first, so Python prints the traceback of where it was). Each step's full output stays in
# $OUT/steps/NAME.log. Output in $OUT (the device tool brings back at most 8 files): RESULTS-gpu.md (append it to
# benchmarks/RESULTS.md), gpu-bench.tar.gz (every JSON and step log), log.txt, tests.txt, nvidia-smi.txt.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
START=$SECONDS
BUDGET_S=${BUDGET_S:-450}
DEADLINE=$((START + BUDGET_S))
OUT=${OUT:-$PWD/outputs/gpu-bench}
QUICK=${QUICK:-0}
PY=${PYTHON:-python3}
TESTS=0
for arg in "$@"; do
  case $arg in
    --tests) TESTS=1 ;;
    *) echo "usage: [QUICK=1] [BUDGET_S=450] bash benchmarks/gpu.sh [--tests]"; exit 2 ;;
  esac
done
mkdir -p "$OUT/json" "$OUT/steps"
exec > >(tee -a "$OUT/log.txt") 2>&1

# Packages. The device image has torch, accelerate, psutil, tokenizers and safetensors but no diffusers, an older
# transformers, and no network: the wheels in .whl/ (filled here, see README) go into a side folder that shadows
# the image's copies, without touching its environment.
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
"$PY" -c "import importlib.metadata as m
for name in ('xformers', 'torchao', 'pytest'):
    try: print(name, m.version(name))
    except m.PackageNotFoundError: print(name, 'not installed')"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

if [ "$QUICK" = 1 ]; then
  DEV=$([ "$CUDA" = 1 ] && echo cuda || echo cpu)
  COMMON=(--quick --device "$DEV" --threads 1)
  STEPS=(--steps 2)
  COMPILE_BACKEND=(--compile-backend "$([ "$CUDA" = 1 ] && echo inductor || echo eager)")  # no C++ build on a CPU
else
  COMMON=(--device cuda --dtype fp16 --resolution 1024)
  STEPS=(--steps 30)
  COMPILE_BACKEND=()
fi

# run NAME NEEDS_S CAP_S COMMAND...: COMMAND when NEEDS_S seconds are still left, for at most CAP_S (or what is left).
run() {
  local name=$1 needs=$2 cap=$3
  shift 3
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt "$needs" ]; then
    echo "== skip $name: ${left}s left, it needs about ${needs}s"
    return 0
  fi
  local limit=$((left < cap ? left : cap)) began=$SECONDS status
  echo "== $name ($((SECONDS - START))s in, limit ${limit}s): $*"
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/steps/$name.log" 2>&1
  status=$?
  if [ "$status" = 0 ]; then
    echo "== $name done in $((SECONDS - began))s"
    return 0
  fi
  case $status in
    124|130) why="ran out of its ${limit}s (SIGINT; traceback of where it was below)" ;;
    137) why="killed after its ${limit}s" ;;
    *) why="exit status $status" ;;
  esac
  echo "!! $name failed after $((SECONDS - began))s: $why; last lines of $OUT/steps/$name.log:"
  grep -v "torchvision (not installed)" "$OUT/steps/$name.log" | tail -n 30 | sed 's/^/   | /'
}

speed() {  # speed NAME NEEDS CAP ARGS...: benchmarks/speed.py with the common flags
  local name=$1 needs=$2 cap=$3
  shift 3
  run "$name" "$needs" "$cap" "$PY" benchmarks/speed.py "${COMMON[@]}" "$@" \
    --json "$OUT/json/$name.json" --results "$OUT/RESULTS-gpu.md"
}

if [ "$TESTS" = 1 ]; then
  # The gpu-marked tests only, with full tracebacks and every outcome listed (-rA); kept in tests.txt.
  run tests 60 150 env HF_HUB_OFFLINE=1 "$PY" -m pytest -m gpu -rA --tb=long -p no:cacheprovider \
    -o addopts="" tests/test_speed_options.py tests/test_backends.py tests/test_tiers.py \
    tests/test_verify.py
  cp "$OUT/steps/tests.log" "$OUT/tests.txt" 2>/dev/null
  grep -E "^(PASSED|FAILED|SKIPPED|ERROR)|passed|failed" "$OUT/steps/tests.log" | tail -n 20 | sed 's/^/   | /'
fi

speed main 100 170 "${STEPS[@]}" --repeats 2 --warmup-steps 2 --id-encoder \
  --modes plain,infinite-id,infinite-id-app,infinite-id-window,adapter,text,infinite-id+no-text-cache
# Compiled ours against stock, uncompiled plain SDXL; the warm-up (2 steps of the window mode) compiles both
# layouts (4 rows mixing, 2 identity rows after the window), reported apart from the timed round.
speed compile 150 240 "${STEPS[@]}" --repeats 1 --warmup-steps 2 --compile default --compile-skip-plain \
  "${COMPILE_BACKEND[@]}" --modes plain,infinite-id,infinite-id-window
if [ "$CUDA" = 1 ]; then
  # Peak memory does not depend on the step count: 2 steps, one round, each tier in its own process.
  speed tier-8 50 110 --steps 2 --repeats 1 --warmup-steps 1 --vram-tier 8 --modes infinite-id
  speed tier-6 50 130 --steps 2 --repeats 1 --warmup-steps 1 --vram-tier 6 --modes infinite-id
fi
speed fast-hyper-sd 40 90 --fast hyper-sd --repeats 2 --warmup-steps 1 \
  --modes plain,infinite-id,infinite-id-app,infinite-id-window
if [ "$CUDA" = 1 ] && "$PY" -c "import xformers" 2>/dev/null; then
  speed xformers 60 120 "${STEPS[@]}" --repeats 1 --warmup-steps 1 --attention xformers \
    --modes plain,infinite-id,infinite-id-window
fi

tar -czf "$OUT/gpu-bench.tar.gz" -C "$OUT" json steps && rm -rf "$OUT/json" "$OUT/steps"
[ -f "$OUT/RESULTS-gpu.md" ] && [ "$QUICK" != 1 ] && cat "$OUT/RESULTS-gpu.md" >> benchmarks/RESULTS.md
echo "== done in $((SECONDS - START))s; results: $OUT/RESULTS-gpu.md"
