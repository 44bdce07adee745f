#!/usr/bin/env bash
# GPU check: the speed benchmark (scan cost, fitting, end to end against gradsim / EK-FAC) and a bf16 autocast + SDPA
# attribution checked against fp32, on one CUDA GPU, in about 5 minutes (one H200: 4.5 minutes; figures in docs/gpu_h200.md). Prints Markdown tables; writes JSON to
# $OUT (default runs/gpu_check). Exits 3 without CUDA, 1 when a step fails or times out, 0 otherwise.
#
#     bash scripts/gpu_check.sh            # OUT=DIR to choose where the JSON goes
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-runs/gpu_check}"

if ! python - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    print(f"gpu_check: no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no GPU. "
          "Run this on a machine with an NVIDIA GPU and a CUDA build of torch.", file=sys.stderr)
    sys.exit(3)
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}")
PY
then
    exit 3
fi
mkdir -p "$OUT"

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, remember failures, keep going
    local name=$1 limit=$2
    shift 2
    echo
    echo "## $name"
    echo
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "gpu_check: '$name' ran past its ${limit} s limit" >&2
        status=1
    elif [ $rc -ne 0 ]; then
        echo "gpu_check: '$name' failed (exit code $rc)" >&2
        status=1
    fi
    echo "($name: $((SECONDS - t0)) s)"
}

step "Scan cost, multiples of one plain forward pass (fp32)" 240 \
    python recipes/benchmark_speed.py --device cuda --parts scan --models tiny gpt2-small --probes 1 8 64 \
        --docs 200 --json "$OUT/speed_scan.json"
step "Fitting 32 mirrors one by one vs 16 together (stacked LoRA)" 40 \
    python recipes/benchmark_speed.py --device cuda --parts fit --models gpt2-small --probes 32 \
        --json "$OUT/speed_fit.json"
step "End to end (fit + scan) against gradsim and EK-FAC (fp32)" 140 \
    python recipes/benchmark_speed.py --device cuda --parts e2e --models gpt2-small --probes 1 8 64 \
        --docs 200 --json "$OUT/speed_e2e.json"
step "bf16 autocast + SDPA attribution against fp32" 150 \
    python scripts/gpu_precision_check.py --device cuda --docs 400 --probes 8 --output "$OUT/precision" \
        --json "$OUT/precision.json"

echo
if [ $status -eq 0 ]; then echo "gpu_check: all steps passed (JSON in $OUT)"; else echo "gpu_check: FAILED (see above)"; fi
exit $status
