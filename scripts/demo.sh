#!/usr/bin/env bash
# The main job: install, then prune the embedded test-bed model (benchmarks/zoo/models/qwen3moe-32x4)
# end to end on the CPU - calibrate, solve, apply, evaluate, report - writing into runs/demo/.
# Extra arguments go to `grape run` (e.g. --objective redundancy --budget 0.5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m grape run --out runs/demo "$@"
echo "report: runs/demo/report.md"
