#!/usr/bin/env bash
# Every GPU figure of benchmarks/ in one run, for a machine with one CUDA GPU (see benchmarks/README.md):
# every method's training step and its host-device traffic, the reduced-precision accuracy runs, the
# Omniglot and sinusoid steps against plain PyTorch, and the DDP (nccl) cells. Each part has its own time
# limit and a failure does not stop the others; the reports and one log go to $OUT.
#
#   OUT=/tmp/gpu DATA=/path/to/omniglot bash benchmarks/run_gpu.sh
#
# DATA is Omniglot's folder (the zips and the Vinyals split). BUDGET scales every limit (default 1).
# DEVICE=cpu QUICK=--quick runs the same parts as smoke tests on a machine without a GPU. PARTS picks
# parts by name (default: "device omniglot sinusoid cli ddp").
set -u
OUT=${OUT:?set OUT to a folder for the reports}
DATA=${DATA:?set DATA to the Omniglot folder}
SCALE=${BUDGET:-1}
PY=${PYTHON:-python3}
DEV=${DEVICE:-cuda}
Q=${QUICK:-}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DATA=$(cd "$DATA" && pwd)
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 PYTHONPATH="$(cd .. && pwd)${PYTHONPATH:+:$PYTHONPATH}"
log="$OUT/log.txt"
PARTS=" ${PARTS:-device omniglot sinusoid cli ddp} "
want() { [[ "$PARTS" == *" $1 "* ]]; }

part() {  # part SECONDS command...: run it under its limit, log it, go on whatever it returns
    local limit
    limit=$(awk -v s="$1" -v k="$SCALE" 'BEGIN { printf "%d", s * k }')
    shift
    echo "=== $(date -u +%T) (limit ${limit} s) $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== $(date -u +%T) rc ${PIPESTATUS[0]}" | tee -a "$log"
}

part 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
part 20 "$PY" -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, torch.cuda.get_device_name())"
want device && part 200 "$PY" bench_device.py --device "$DEV" $Q --data-root "$DATA" --accuracy 500 --out "$OUT/RESULTS_device.md"
want omniglot && part 100 "$PY" bench_omniglot.py --device "$DEV" $Q --repeats 5 --out "$OUT/RESULTS_omniglot_cuda.md"
want sinusoid && part 120 "$PY" bench_sinusoid.py --device "$DEV" $Q --tasks 1,25 --inner-steps 1,5 --loop-tasks 25 \
    --repeats 5 --breakdown abml:1:1,maml:1:1 --out "$OUT/RESULTS_cuda.md"
# a user's run end to end on the device: training with checkpoints, evaluation, export and plots
CLI_STEPS=200; [ -n "$Q" ] && CLI_STEPS=3
want cli && part 120 "$PY" -m pyro_meta train omniglot --method versa --ways 5 --shots 1 --steps "$CLI_STEPS" --test-tasks 200 \
    --device "$DEV" --precision "${CLI_PRECISION:-tf32}" --data-root "$DATA" --no-progress --out "$(mktemp -d)/versa"
want ddp && part 100 "$PY" bench_ddp.py --device "$DEV" $Q --ranks 1 --steps 10 --cases maml-mlp maml-conv4 versa-conv4 \
    --out "$OUT/RESULTS_ddp_cuda.md"
echo "=== done $(date -u +%T)" | tee -a "$log"
