#!/usr/bin/env bash
# The GPU check, one command (about 10 minutes on a machine with CUDA; also `./dev gpu-check`):
#   1. every test, the device-parametrised ones also on CUDA (tests/conftest.py's `device` fixture),
#   2. the Mogrifier benchmark on CUDA, float32 and bf16 autocast, against nn.LSTM (cuDNN), every shape
#      including the paper's (batch 64, BPTT 70, hidden 650 and 900, 5 rounds; rank 84 among the low-rank ones),
#   3. a 4-trial quickstart with 0.5 GPU per trial (two trials share each GPU),
# and writes one report with the figures: $GPU_CHECK_DIR/report.md (default gpu_check/<date>/).
# Without CUDA it says so and exits 0: there is nothing GPU-specific to run (the CPU suite is `./dev test`).
# PYTHON (default: python) is the interpreter; the quickstart needs PTB ($LMCORE_DATA_DIR, or the network).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

versions='import torch as t; print("torch", t.__version__, "CUDA", t.version.cuda, "cuDNN", t.backends.cudnn.version())'
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device here ($("$PYTHON" -c "$versions")):"
    echo "  nothing GPU-specific to check; the CPU tests are ./dev test, the CPU benchmark ./dev bench."
    exit 0
fi

OUT="${GPU_CHECK_DIR:-gpu_check/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
REPORT="$OUT/report.md"
status=0
section() { printf '\n## %s\n\n' "$1" >> "$REPORT"; echo "== $1 (log: $OUT/$2)"; }

{
    echo "# GPU check, $(date '+%Y-%m-%d %H:%M')"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"
    "$PYTHON" -c "$versions"
    echo '```'
} > "$REPORT"

section "Tests (CPU and CUDA)" tests.log
"$PYTHON" -m pytest -q -p no:cacheprovider > "$OUT/tests.log" 2>&1 || status=1
tail -n 1 "$OUT/tests.log" >> "$REPORT"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" >> "$REPORT"

for amp in "" "--amp"; do
    bench=(benchmarks/mogrifier_speed.py --device cuda --budget 5 $amp)
    section "Mogrifier layer on CUDA ${amp:-float32} (python ${bench[*]})" "bench${amp}.log"
    "$PYTHON" "${bench[@]}" > "$OUT/bench${amp}.log" 2>&1 || status=1
    grep -E '^(\||# (torch|target))' "$OUT/bench${amp}.log" >> "$REPORT"
done

quickstart=(tune.py experiments/quickstart.yaml --set trials=4 --set resources.gpus=0.5 --set "storage=$OUT/results"
            --no-dashboard)
section "Quickstart, 4 trials at 0.5 GPU (python ${quickstart[*]})" quickstart.log
start=$(date +%s)
"$PYTHON" "${quickstart[@]}" > "$OUT/quickstart.log" 2>&1 || status=1
echo "wall time: $(( $(date +%s) - start )) s" >> "$REPORT"
echo >> "$REPORT"
grep -E '^\|' "$OUT/quickstart.log" | tail -n 5 >> "$REPORT"

echo
cat "$REPORT"
[ "$status" = 0 ] || echo "gpu_check: something failed; see the logs in $OUT" >&2
exit "$status"
