#!/usr/bin/env bash
# GPU check for calibration (issue 15), for when a GPU is lent. About 3-5 minutes on one GPU:
#
#   1. the observer benchmark on CUDA in bf16 (benchmarks/observer_bench.py updates its CUDA
#      section of benchmarks/results/observer.md);
#   2. `grape calibrate` of the zoo model qwen3moe-32x4 on cuda:0, whole-model and
#      layer-sequential (bf16), each in a fresh process: peak GPU memory, tokens/s, and the
#      sequential scores compared with the whole-model ones (calibration_bench.differences).
#
# Results: benchmarks/results/gpu_check.md and gpu_check.json (also copied to $OUT when set).
# Usage: bash benchmarks/gpu_check.sh   (from anywhere; needs torch with CUDA and grape importable)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c 'import torch, grape; assert torch.cuda.is_available(), "no CUDA device"' || {
    echo "gpu_check: needs torch with CUDA and grape (bash scripts/setup.sh)" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
model=benchmarks/zoo/models/qwen3moe-32x4
args=(--model "$model" --data grape/assets/heldout/calibration.jsonl --seq-len 256 --samples 64
      --batch-size 8 --subsample 256 --device-map cuda:0 --no-progress --checkpoint-every 0
      --overwrite)

echo "== observer benchmark (cuda, bf16)"
python benchmarks/observer_bench.py --device cuda --dtype bfloat16 --repeats 3

for mode in whole sequential; do
    echo "== grape calibrate --mode $mode on cuda:0"
    python -m grape calibrate "${args[@]}" --mode "$mode" --out "$work/$mode.npz" | grep -v '^|'
done

python - "$work" <<'EOF'
import json, sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
import torch
from calibration_bench import differences
from solvers.scores import Scores

work = Path(sys.argv[1])
whole, seq = Scores.load(work / "whole.npz"), Scores.load(work / "sequential.npz")
result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
          "runs": {m: s.calibration["run"] for m, s in (("whole", whole), ("sequential", seq))},
          "sequential_vs_whole": differences(seq, whole)}
lines = ["# GPU check: calibration on CUDA", "",
         f"`bash benchmarks/gpu_check.sh` on {result['gpu']}, torch {result['torch']}: "
         "`grape calibrate` of the zoo model qwen3moe-32x4 (64 x 256 tokens, bf16) on cuda:0.", "",
         "| mode | wall time | tokens/s | peak GPU memory | peak host memory | hidden states |",
         "|---|---:|---:|---:|---:|---|"]
for mode, run in result["runs"].items():
    gpu = run["peak_device_memory"]
    lines.append(f"| {mode} | {run['seconds']:.2f} s | {run['tokens_per_second']:,.0f} | "
                 f"{gpu / 1e9 if gpu else 0:.3f} GB | {run['peak_host_memory'] / 1e9:.2f} GB | "
                 f"{run.get('hidden_states') or '-'} |")
d = result["sequential_vs_whole"]
lines += ["", f"Sequential vs whole-model scores: counts equal {d['counts_equal']}, identity equal "
          f"{d['identity_equal']}, statistics within {d['stats_rel']:.1e} (relative), similarity "
          f"and cost curves within {d['matrices_rel']:.1e} (of their largest entry).", "",
          "The observer benchmark's CUDA section is in benchmarks/results/observer.md."]
out = Path("benchmarks/results")
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/gpu_check.md benchmarks/results/gpu_check.json \
       benchmarks/results/observer.md "$OUT"/
fi
