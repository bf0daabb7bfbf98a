#!/usr/bin/env bash
# GPU checks, meant to finish within 10 minutes on one recent GPU (every part has its own
# timeout): bf16 vs float32 training throughput, torch.compile speed-up (its compile time
# shown as warm-up), activation checkpointing, peak memory
# (torch.cuda.max_memory_allocated); a short real training run with checkpoints and a
# resume; then the sampling table of every solver on that run's weights. Prints tables;
# writes benchmarks/results/gpu.json, benchmarks/results/sampling-gpu.json and a run
# directory under ${OUT:-/tmp/tarflow-gpu}.
#
#     bash benchmarks/gpu.sh            # PYTHON=... to choose the interpreter
#     SMOKE=1 bash benchmarks/gpu.sh    # every part on the CPU, tiny sizes: checks the
#                                       # script itself (results under $OUT-results)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-/tmp/tarflow-gpu}
if [[ "${SMOKE:-0}" == 1 ]]; then
    DEVICE=cpu THREADS=2 STEPS=4 HALF=2 LOG=1 RESULTS="$OUT-results"
    BENCH=(--steps 1 --warmup 1 --quick) SAMPLING=(--quick --batch-sizes 1,2)
else
    DEVICE=cuda THREADS=8 STEPS=200 HALF=100 LOG=20 RESULTS=benchmarks/results
    BENCH=(--steps 30 --warmup 5) SAMPLING=()
fi
mkdir -p "$RESULTS"

"$PYTHON" - "$DEVICE" <<'PY'
import sys
import torch
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device visible"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}")
else:
    print(f"torch {torch.__version__}, smoke run on the CPU")
PY

# Throughput and memory per variant; each case in a fresh process (compile included).
timeout 420 "$PYTHON" benchmarks/training.py --device "$DEVICE" --threads "$THREADS" \
    "${BENCH[@]}" --json "$RESULTS/gpu.json"

# A short real run: 200 steps in two parts (checkpoint, resume), bf16 + compile.
rm -rf "$OUT"
start=$(date +%s)
timeout 150 "$PYTHON" -m tarflow train --config configs/fashion_mnist.yaml --out "$OUT" \
    --set train.steps="$STEPS" --set train.device="$DEVICE" --set train.precision=bf16 \
    --set train.compile=true --set train.checkpoint_every="$HALF" --set train.log_every="$LOG" \
    --set train.checkpoint_samples=0 --stop-at "$HALF" --no-progress
timeout 120 "$PYTHON" -m tarflow train --config "$OUT/config.yaml" --out "$OUT" --resume \
    --no-progress
echo "training run: $(( $(date +%s) - start )) s for $STEPS steps (two compilations)"
"$PYTHON" - "$OUT/metrics.jsonl" <<'PY'
import json, sys
print(f"{'step':>5} {'loss':>8} {'bits/dim':>9} {'grad norm':>10} {'images/s':>9} {'skipped':>8}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['step']:5d} {r['loss']:8.4f} {r['bits_per_dim']:9.4f} {r['grad_norm']:10.3f} "
          f"{r['images_per_sec']:9.0f} {r['skipped_steps']:8d}")
PY

# Sampling speed of every solver on the GPU (demo weights from the run above, deep model
# random), batch 1 and 64, against one parallel forward pass.
timeout 200 "$PYTHON" benchmarks/sampling.py --run "$OUT" --device "$DEVICE" \
    "${SAMPLING[@]}" --json "$RESULTS/sampling-gpu.json"
