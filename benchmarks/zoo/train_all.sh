#!/usr/bin/env bash
# Rebuild the whole zoo: corpus, tokenizer, then the models one after another (2 threads).
#   nohup bash benchmarks/zoo/train_all.sh > benchmarks/zoo/logs/train_all.out 2>&1 &
# Environment knobs:
#   QWEN_MIN=40 DSV3_MIN=60 MIXTRAL_MIN=60 UPCYCLED_MIN=50 OLMOE_MIN=50   per-model minutes
#   MODELS="mixtral-8x2"                     train only these (default: all five, in this order)
#   SKIP_DATA=1                              reuse benchmarks/zoo/data and the committed tokenizer
#   WAIT_PID=1234                            start only after that process has exited
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
# shared, oversubscribed CPU: threads that wait should sleep, not spin
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if [ -n "${WAIT_PID:-}" ]; then
  while kill -0 "$WAIT_PID" 2>/dev/null; do sleep 15; done
fi
if [ -z "${SKIP_DATA:-}" ]; then
  python benchmarks/zoo/build_corpus.py
  python benchmarks/zoo/train_tokenizer.py
fi
declare -A MINUTES=([qwen3moe-32x4]="${QWEN_MIN:-40}" [deepseekv3-32x4g]="${DSV3_MIN:-60}" [mixtral-8x2]="${MIXTRAL_MIN:-60}"
                    [mixtral-8x2-upcycled]="${UPCYCLED_MIN:-50}" [olmoe-32x4]="${OLMOE_MIN:-50}")
for name in ${MODELS:-qwen3moe-32x4 deepseekv3-32x4g mixtral-8x2 mixtral-8x2-upcycled olmoe-32x4}; do
  echo "$(date -u +%T) training $name for ${MINUTES[$name]} min"
  python benchmarks/zoo/train.py "$name" --minutes "${MINUTES[$name]}"
done
echo "train_all done $(date -u)"
