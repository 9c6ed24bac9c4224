#!/usr/bin/env bash
# The one-shot GPU check: run on a bare GPU machine (torch + Triton; no vLLM, no pytest needed),
# from anywhere in the checkout. About 3-5 minutes on an H200; every step has its own timeout so
# one hang cannot eat the machine's time.
#
#   scripts/gpu_check.sh                  # results in ./results/gpu
#   OUT=/some/dir scripts/gpu_check.sh    # results in /some/dir
#
# Writes $OUT/gpu_adapter_check.json (pass/fail of the CUDA path, see the docstring of
# benchmarks/gpu_adapter_check.py), $OUT/gpu_scoring.json (Triton scoring/merge measurements,
# --quick) and the console log of each step. Exit status: the adapter check's (0: every check
# passed; 1: a check failed; 124: it timed out); the scoring benchmark's is printed only.
#
# Tunables (seconds): ADAPTER_TIMEOUT_S (150), SCORING_TIMEOUT_S (130), SCORING_BUDGET_S (80,
# after which gpu_scoring.py skips its optional measurements). PYTHON picks the interpreter.

set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/gpu}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
ADAPTER_TIMEOUT_S="${ADAPTER_TIMEOUT_S:-150}"
SCORING_TIMEOUT_S="${SCORING_TIMEOUT_S:-130}"
SCORING_BUDGET_S="${SCORING_BUDGET_S:-80}"
mkdir -p "$OUT"

commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "== environment ($(date -u +%FT%TZ), commit $commit)"
timeout 30 nvidia-smi || echo "nvidia-smi failed or is missing"
timeout 120 "$PYTHON" - <<'EOF'
import platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    print(f"GPU {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
else:
    print("torch sees no CUDA device")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton is not installed")
EOF

echo "== adapter check (timeout ${ADAPTER_TIMEOUT_S}s)"
timeout --kill-after=10 "$ADAPTER_TIMEOUT_S" "$PYTHON" benchmarks/gpu_adapter_check.py \
    --out "$OUT/gpu_adapter_check.json" 2>&1 | tee "$OUT/gpu_adapter_check.log"
adapter_rc=${PIPESTATUS[0]}

echo "== scoring benchmark, --quick (timeout ${SCORING_TIMEOUT_S}s)"
timeout --kill-after=10 "$SCORING_TIMEOUT_S" "$PYTHON" benchmarks/gpu_scoring.py --quick \
    --budget-s "$SCORING_BUDGET_S" --out "$OUT/gpu_scoring.json" 2>&1 | tee "$OUT/gpu_scoring.log"
scoring_rc=${PIPESTATUS[0]}

echo "== adapter check exit $adapter_rc, scoring benchmark exit $scoring_rc (124: timed out)"
echo "   results in $OUT"
exit "$adapter_rc"
