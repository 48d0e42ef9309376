#!/usr/bin/env bash
# Installs everything GRAPE needs into the current Python environment. Idempotent.
# torch goes first and pinned: the CPU build lies on disk here, an unpinned torch pulls CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || pip install --quiet "torch==2.13.0"
pip install --quiet -e ".[test]"
