"""One measured training run in a fresh process: llmkit's, or the plain Trainer reference.

    python benchmarks/workers.py llmkit    SPEC_JSON
    python benchmarks/workers.py reference SPEC_JSON

Prints one JSON line (prefixed `RESULT `) with steady-state samples/s, tokens/s, time from process
start to the first optimizer step, evaluation throughput, final eval loss/metric and peak RSS.
The reference is what a plain Hugging Face Trainer script does (the `examples/pytorch` run_mlm /
run_clm / run_glue / run_ner / run_summarization recipe): fp32 unless told `bf16`, logits at every
position, padding to max_length where those scripts pad, random batches. Told `tuned`, it is that script
with the Trainer's own speed options a user who knows them turns on: SDPA attention, dynamic padding,
`train_sampling_strategy: group_by_length` for the fine-tuning tasks (bf16 comes with `bf16`). It shares nothing with
llmkit but the tokenizer and model config (read from llmkit's run folder), so both train the same
model on the same texts; for CLM llmkit also puts an end-of-text token between documents, which
run_clm does not, so CLM eval losses are not comparable.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterable
from pathlib import Path

# LLMKIT_BENCH_PROFILE=N: profile N steps after the warm-up and print the top ops (those steps' times then count
# the profiler's overhead: for reading, not for the table).
PROFILE = int(os.environ.get("LLMKIT_BENCH_PROFILE", "0"))
CUDA = os.environ.get("LLMKIT_BENCH_GPU") == "1"  # bench.py --gpu
START = time.time()  # close enough to the process start: only imports of the stdlib came before


def _process_start() -> float:
    """Wall-clock time this process started (from /proc), so start-up imports count too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return START


def timer(warmup: int):
    """A TrainerCallback recording each optimizer step's end and the eval runs."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.tokens: list[int] = []
            self.faults: list[int] = []  # the process's minor page faults so far, at each step's end
            self.begins: list[float] = []  # each step's begin: the time between steps is the Trainer's own

        def on_step_begin(self, args, state, control, **kw):
            self.begins.append(time.perf_counter())
            if len(self.ends) == 1:  # steps 2 and 3 (warm-up): the matmul FLOPs the step really executes
                from torch.utils.flop_counter import FlopCounterMode

                self.flops = FlopCounterMode(display=False)
                self.flops.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if CUDA:
                import torch

                torch.cuda.synchronize()  # the step's kernels done, not just queued
            self.ends.append(time.perf_counter())
            self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
            self.tokens.append(state.num_input_tokens_seen)
            if len(self.ends) == 1:
                self.first_step = time.time()
            if len(self.ends) == 3 and hasattr(self, "flops"):
                self.flops.__exit__(None, None, None)
                counted = self.tokens[2] - self.tokens[0]
                self.executed = self.flops.get_total_flops() / counted if counted else None
            if PROFILE and len(self.ends) == warmup:
                from torch.profiler import profile

                self.profiler = profile()
                self.profiler.__enter__()
            if PROFILE and len(self.ends) == warmup + PROFILE:
                self.profiler.__exit__(None, None, None)
                table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
                print(f"[bench] top ops over {PROFILE} steps after warm-up:\n{table}", file=sys.stderr, flush=True)

        def result(self, samples_per_step: int) -> dict:
            # The median step, not the mean: a hiccup of this shared VM in one step must not move the number.
            n = len(self.ends) - 1 - warmup

            def middle(values: Iterable[float]) -> float | None:
                """The median (the upper one of an even count); None of nothing."""
                values = sorted(values)
                return values[len(values) // 2] if values else None

            def per_step(marks: list) -> float | None:  # what the timed steps added: the middle one
                return middle(b - a for a, b in zip(marks[warmup:], marks[warmup + 1 :], strict=False))

            median = per_step(self.ends)
            tokens_per_step = (self.tokens[-1] - self.tokens[warmup]) / n
            # from one timed step's end to the next one's begin: the batch fetched and collated, callbacks, logging
            gap = middle(b - e for e, b in zip(self.ends[warmup:-1], self.begins[warmup + 1 :], strict=False))
            return {
                "measured_steps": n,
                "samples_per_s": samples_per_step / median,
                "samples_per_s_mean": n * samples_per_step / (self.ends[-1] - self.ends[warmup]),
                "tokens_per_s": tokens_per_step / median if tokens_per_step else None,
                "first_step_s": self.first_step - _process_start(),
                "executed_flops_per_token": getattr(self, "executed", None),
                # fresh pages the kernel had to map in a timed step (median): a heap still growing, or a block above
                # glibc's mmap threshold allocated and returned every step
                "page_faults_per_step": per_step(self.faults),
                "between_steps_ms": None if gap is None else 1000 * gap,
            }

    assert warmup >= 3, "steps 2 and 3 count FLOPs: they must be warm-up steps"
    return StepTimer()


def _finish(result: dict) -> None:
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if CUDA:
        import torch

        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- llmkit


def run_llmkit(spec: dict) -> None:
    from llmkit import engine
    from llmkit.config import load_recipe, resolve

    recipe = resolve(load_recipe(spec["recipe"], spec["overrides"]))
    t = timer(spec["warmup"])
    summary = engine.train(recipe, overwrite=True, callbacks=[t])
    args = recipe.args
    out = t.result(args.per_device_train_batch_size * args.gradient_accumulation_steps)
    final = summary["final_metrics"]
    out.update(
        eval_loss=final.get("eval_loss"),
        metric=final.get(spec["metric"]),
        eval_samples_per_s=final.get("eval_samples_per_second"),
        flops_per_token=flops_per_token(Path(recipe.output_dir), spec),
        bf16=bool(args.bf16),
    )
    _finish(out)


def flops_per_token(run_dir: Path, spec: dict) -> float:
    """Model FLOPs per trained token, forward + backward: 6 x matmul weights + attention scores.

    The standard model's count (the full vocabulary head included for language models), whatever an
    implementation skips: the same number for llmkit and the reference. For an encoder-decoder it is
    an upper bound per source token (the decoder runs over the shorter target).
    """
    import torch
    import transformers
    from transformers.pytorch_utils import Conv1D

    config = transformers.AutoConfig.from_pretrained(run_dir)
    with torch.device("meta"):
        model = getattr(transformers, spec["auto_model"]).from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    # num_hidden_layers / hidden_size are aliases of n_layer / n_embd (GPT-2) and num_layers / d_model (T5).
    layers = config.num_hidden_layers + (config.num_decoder_layers if config.is_encoder_decoder else 0)
    hidden = config.hidden_size
    return 6 * linear + 12 * layers * hidden * spec["seq_len"]


# --------------------------------------------------------------------------- the plain Trainer reference


def run_reference(spec: dict) -> None:
    import numpy as np
    import transformers
    from datasets import load_dataset
    from transformers import AutoConfig, AutoTokenizer, set_seed

    task, run_dir, max_len = spec["task"], spec["llmkit_run"], spec["seq_len"]
    set_seed(42)
    tuned = spec.get("tuned", False)  # what a Trainer user who knows its speed options turns on
    tok = AutoTokenizer.from_pretrained(run_dir)
    config = AutoConfig.from_pretrained(run_dir)
    attention = {"attn_implementation": "sdpa"} if tuned else {}
    auto = getattr(transformers, spec["auto_model"])
    if spec.get("pretrained"):  # the checkpoint's weights, llmkit's label names (the run's config)
        model = auto.from_pretrained(spec["pretrained"], config=config, ignore_mismatched_sizes=True, **attention)
    else:
        model = auto.from_config(config, **attention)
    files = spec["files"]
    ext = Path(files["train"]).suffix.lstrip(".")
    raw = load_dataset("text" if ext == "txt" else "json", data_files=files)
    if "validation" not in raw:  # carved as llmkit carves it
        parts = raw["train"].train_test_split(test_size=0.05, seed=42)
        raw["train"], raw["validation"] = parts["train"], parts["test"]
    if spec.get("max_train_samples"):
        raw["train"] = raw["train"].select(range(min(spec["max_train_samples"], len(raw["train"]))))
    raw["validation"] = raw["validation"].select(range(min(spec["max_eval_samples"], len(raw["validation"]))))
    compute_metrics = None
    seq2seq = task == "summarization"

    if task in ("mlm", "clm"):  # run_mlm / run_clm: tokenize, concatenate, cut into blocks

        def group(batch):
            ids = tok([t for t in batch["text"] if t.strip()])["input_ids"]
            flat = [i for seq in ids for i in seq]
            usable = len(flat) // max_len * max_len
            return {"input_ids": [flat[i : i + max_len] for i in range(0, usable, max_len)]}

        data = raw.map(group, batched=True, remove_columns=["text"])
        if task == "mlm":
            collator = transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
        else:
            collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    elif task == "classification":  # run_glue: pad_to_max_length=True by default
        label2id = config.label2id  # llmkit's label order, so both heads mean the same

        def enc(batch):
            padding = {} if tuned else {"padding": "max_length"}  # tuned: dynamic padding
            out = tok(batch["text"], max_length=max_len, truncation=True, **padding)
            out["labels"] = [label2id[str(x)] for x in batch["label"]]
            return out

        data = raw.map(enc, batched=True, remove_columns=raw["train"].column_names)
        collator = transformers.DataCollatorWithPadding(tok) if tuned else transformers.default_data_collator

        def compute_metrics(p):
            return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}
    elif task == "ner":  # run_ner: labels on the first sub-token, dynamic padding
        names = [config.id2label[i] for i in range(len(config.id2label))]
        index = {n: i for i, n in enumerate(names)}

        def enc(batch):
            out = tok(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_len)
            out["labels"] = []
            for i, tags in enumerate(batch["ner_tags"]):
                prev, row = None, []
                for w in out.word_ids(i):
                    row.append(-100 if w is None or w == prev else index[tags[w]])
                    prev = w
                out["labels"].append(row)
            return out

        data = raw.map(enc, batched=True, remove_columns=raw["train"].column_names)
        collator = transformers.DataCollatorForTokenClassification(tok)

        def compute_metrics(p):
            import seqeval.metrics

            pred = np.argmax(p.predictions, -1)
            keep = [
                [(names[t], names[q]) for t, q in zip(ts, qs, strict=True) if t != -100]
                for ts, qs in zip(p.label_ids, pred, strict=True)
            ]
            return {
                "f1": seqeval.metrics.f1_score([[t for t, _ in r] for r in keep], [[q for _, q in r] for r in keep])
            }
    else:  # run_summarization: dynamic padding, generation at evaluation
        tgt_len = spec["target_len"]

        def enc(batch):
            out = tok(batch["document"], max_length=max_len, truncation=True)
            out["labels"] = tok(text_target=batch["summary"], max_length=tgt_len, truncation=True)["input_ids"]
            return out

        data = raw.map(enc, batched=True, remove_columns=raw["train"].column_names)
        collator = transformers.DataCollatorForSeq2Seq(tok, model=model)
        model.generation_config.max_length = tgt_len + 1
        model.generation_config.num_beams = 1

        def compute_metrics(p):
            from rouge_score import rouge_scorer

            scorer = rouge_scorer.RougeScorer(["rougeL"])
            pred = tok.batch_decode(
                np.where(p.predictions < 0, tok.pad_token_id, p.predictions), skip_special_tokens=True
            )
            ref = tok.batch_decode(np.where(p.label_ids < 0, tok.pad_token_id, p.label_ids), skip_special_tokens=True)
            return {
                "rougeL": 100
                * float(np.mean([scorer.score(r, q)["rougeL"].fmeasure for r, q in zip(ref, pred, strict=True)]))
            }

    args_cls = transformers.Seq2SeqTrainingArguments if seq2seq else transformers.TrainingArguments
    extra = {"predict_with_generate": True} if seq2seq else {}
    if tuned and task not in ("mlm", "clm"):  # packed blocks are all one length: nothing to group
        extra["train_sampling_strategy"] = "group_by_length"
    if tuned and CUDA:  # the Trainer's own GPU options (pinned memory is its default)
        extra.update(tf32=True, dataloader_num_workers=2, dataloader_persistent_workers=True)
    args = args_cls(
        output_dir=spec["output_dir"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        per_device_eval_batch_size=spec["eval_batch_size"],
        learning_rate=spec["learning_rate"],
        warmup_steps=spec["warmup_steps"],
        weight_decay=0.01,
        bf16=spec["bf16"],
        use_cpu=not CUDA,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=spec["steps"],
        disable_tqdm=True,
        seed=42,
        include_num_input_tokens_seen="non_padding",
        **extra,
    )
    t = timer(spec["warmup"])
    trainer_cls = transformers.Seq2SeqTrainer if seq2seq else transformers.Trainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator,
        processing_class=tok,
        compute_metrics=compute_metrics,
        callbacks=[t],
    )
    trainer.train()
    metrics = trainer.evaluate()
    out = t.result(spec["batch_size"])
    out.update(
        eval_loss=metrics.get("eval_loss"),
        metric=metrics.get(spec["metric"]) if spec["metric"] != "eval_perplexity" else math.exp(metrics["eval_loss"]),
        eval_samples_per_s=metrics.get("eval_samples_per_second"),
        bf16=spec["bf16"],
    )
    _finish(out)


if __name__ == "__main__":
    which, spec = sys.argv[1], json.loads(sys.argv[2])
    {"llmkit": run_llmkit, "reference": run_reference}[which](spec)
