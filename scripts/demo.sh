#!/usr/bin/env bash
# The whole chain on the built-in offline default: prepare -> train (LoRA) -> eval -> merge, then
# the base and the merged model side by side on prompts they were trained on.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-outputs/demo}
sftkit prepare-data --data_path data/demo_alpaca.json --output_dir "$OUT/data" --max_length 512 --inspect 1
sftkit train --config examples/tiny_lora.yaml --data_path "$OUT/data" --output_dir "$OUT/run" --overwrite_output_dir
sftkit eval --model "$OUT/run/final" --data_path data/sample_sharegpt.json
sftkit merge-lora --adapter "$OUT/run/final" --output_dir "$OUT/merged" --overwrite_output_dir
python scripts/demo_compare.py --merged "$OUT/merged" --data data/demo_alpaca.json --n 4 --out "$OUT/compare.json" --run "$OUT/run"
echo "demo finished: adapter in $OUT/run/final, merged model in $OUT/merged, metrics in $OUT/run/metrics.jsonl"
