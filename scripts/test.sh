#!/usr/bin/env bash
# The test command: install, then run the whole suite (CPU, well under 10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest tests "$@"
