#!/usr/bin/env bash
# Build each peer's own virtual environment from its lock file in benchmarks/peers/locks/:
#   benchmarks/peers/.venvs/llmcompressor       llm-compressor 0.14.0.1 (REAPPruningModifier, oneshot)
#   benchmarks/peers/.venvs/compressed-tensors  compressed-tensors 0.19.0 (MagnitudeExpertPruner)
# torch is installed first as torch==2.13.0 (the CPU wheel the machine's pip finds), so the
# resolver never fetches another build. Nothing goes into GRAPE's own environment.
# REAP's own repository and EvoESAP get no venv: their pins (torch 2.7.1 + CUDA-only vLLM, git-submodule
# packages) do not install on a CPU from PyPI; run.py's NOT_RUN gives the exact reasons.
#   bash benchmarks/peers/setup.sh [PEER ...]      # default: every peer; an existing venv is kept
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
PEERS=("$@")
[ ${#PEERS[@]} -eq 0 ] && PEERS=(llmcompressor compressed-tensors)
for peer in "${PEERS[@]}"; do
  lock="$HERE/locks/$peer.txt"
  venv="$HERE/.venvs/$peer"
  [ -f "$lock" ] || { echo "no lock file $lock" >&2; exit 2; }
  if [ -x "$venv/bin/python" ] && [ -f "$venv/.installed" ] && cmp -s "$lock" "$venv/.installed"; then
    echo "$peer: $venv is up to date"; continue
  fi
  start=$(date +%s)
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q -r "$lock" -c "$HERE/locks/llmcompressor.txt" "torch==2.13.0"
  cp "$lock" "$venv/.installed"
  echo "$peer: installed in $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1)"
done
