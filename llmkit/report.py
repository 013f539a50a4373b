"""What a run leaves for people: training-curve plots and the Hugging Face model card."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llmkit.config import dump_yaml
from llmkit.errors import LlmkitError


def load_history(run_dir: Path) -> list[dict]:
    """The Trainer's log history of a run (train and eval entries), from trainer_state.json."""
    state = Path(run_dir) / "trainer_state.json"
    if not state.exists():
        raise LlmkitError(f"{run_dir} has no trainer_state.json: not a finished llmkit run")
    history = json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
    for h in history:  # perplexity for the language-model tasks, derived like the metrics
        if "eval_loss" in h and "eval_perplexity" not in h:
            h["eval_perplexity"] = math.exp(min(h["eval_loss"], 50.0))
    return history


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: list[Path], out_dir: Path, main_metric: str) -> list[Path]:
    """Draw loss (train and validation), learning rate and the main metric; several runs overlaid."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    histories = {Path(r).name: load_history(Path(r)) for r in runs}
    panels = [
        ("loss.png", "Loss", [("loss", "train", "-"), ("eval_loss", "validation", "--")]),
        ("learning_rate.png", "Learning rate", [("learning_rate", "", "-")]),
    ]
    if main_metric != "eval_loss":
        panels.append(
            (
                f"{main_metric.removeprefix('eval_')}.png",
                main_metric.removeprefix("eval_"),
                [(main_metric, "validation", "-o")],
            )
        )
    written = []
    for filename, title, curves in panels:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        drawn, values_seen = False, []
        for name, history in histories.items():
            for key, label, style in curves:
                steps, values = _series(history, key)
                if steps:
                    values_seen += values
                    tag = " ".join(x for x in (name if len(histories) > 1 else "", label) if x)
                    ax.plot(steps, values, style, label=tag or key, markersize=3)
                    drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_title(title)
        positive = [v for v in values_seen if v > 0]
        if title != "Learning rate" and positive and max(positive) > 10 * min(positive):
            ax.set_yscale("log")  # curves that fall by orders of magnitude (early loss, perplexity)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / filename)
        plt.close(fig)
        written.append(out_dir / filename)
    return written


def model_card(recipe: Any, task: Any, summary: dict) -> str:
    """A Hugging Face model card (README.md): metadata header, results, training, data, how to load, recipe."""
    data = recipe.data
    datasets = (
        [data.load["path"]]
        if data.load
        else [
            Path(p).name
            for s in ("train", "validation", "test")
            for p in ([getattr(data, s)] if isinstance(getattr(data, s), str) else getattr(data, s) or [])
        ]
    )
    if data.source:
        datasets = [f"llmkit built-in corpus: {data.source}"]
    metrics = {
        k.removeprefix("eval_"): v
        for k, v in summary.get("final_metrics", {}).items()
        if isinstance(v, (int, float)) and not k.endswith(("_runtime", "_per_second")) and k != "epoch"
    }
    header = {"library_name": "llmkit", "pipeline_tag": task.pipeline_tag, "tags": ["llmkit", task.name]}
    if recipe.model.name_or_path:
        header["base_model"] = recipe.model.name_or_path
    if datasets:
        header["datasets"] = datasets
    header["metrics"] = sorted(metrics)
    adapter = recipe.lora is not None
    auto = task.auto_model
    load = (
        f"from peft import PeftModel\nfrom transformers import {auto}, AutoTokenizer\n\n"
        f"# base + adapter (or `llmkit export RUN_DIR OUT_DIR --merge` for one standalone model)\n"
        f'base = {auto}.from_pretrained("{recipe.model.name_or_path or "RUN_DIR/base_model"}")\n'
        f'model = PeftModel.from_pretrained(base, "RUN_DIR")\n'
        if adapter
        else f'from transformers import {auto}, AutoTokenizer\n\nmodel = {auto}.from_pretrained("RUN_DIR")\n'
    )
    load += 'tokenizer = AutoTokenizer.from_pretrained("RUN_DIR")\n'
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items())
    tokens = summary.get("train_tokens_per_second")
    lines = [
        "---",
        dump_yaml(header).rstrip(),
        "---",
        "",
        f"# {Path(summary.get('output_dir', 'model')).name}",
        "",
        f"{task.description.capitalize()}, trained with llmkit (`llmkit {task.stage} recipe.yaml`, the recipe below).",
        "",
        "## Results (validation)",
        "",
        "| metric | value |",
        "|---|---|",
        rows or "| (none) | |",
        "",
        "## Training",
        "",
        f"- model: {summary.get('model')}; {summary.get('parameters', 0):,} parameters, "
        f"{summary.get('trainable_parameters', 0):,} trained{' (LoRA adapter)' if adapter else ''}",
        f"- {summary.get('steps')} steps, {summary.get('epochs', 0):.2f} epochs, global batch {summary.get('global_batch_size')}, "
        f"{summary.get('world_size')} process(es), {'bf16' if summary.get('bf16') else 'fp32'}",
        f"- wall time {summary.get('wall_time_s', 0):.0f} s, {summary.get('train_samples_per_second') or 0:.1f} samples/s"
        + (f", {tokens:.0f} tokens/s" if tokens else ""),
        "",
        "## Data",
        "",
        *(f"- {d}" for d in datasets or ["(see the recipe)"]),
        "",
        "## How to load",
        "",
        "```python",
        load.rstrip(),
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        dump_yaml(recipe.raw | {"trainer": recipe.trainer}).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_run_report(out: Path, recipe: Any, task: Any, summary: dict) -> None:
    """At the end of a run: plots/ and the model card README.md in the output folder."""
    plot_runs([out], out / "plots", task.main_metric)
    (out / "README.md").write_text(model_card(recipe, task, summary), encoding="utf-8")


def report(runs: list[Path], output: Path | None = None) -> list[Path]:
    """`llmkit report`: redraw one run's plots (into RUN/plots), or overlay several runs (into --output)."""
    from llmkit.config import load_raw
    from llmkit.tasks import get_task

    runs = [Path(r) for r in runs]
    for r in runs:
        if not (r / "recipe.yaml").exists():
            raise LlmkitError(f"{r} has no recipe.yaml: not an llmkit run")
    tasks = {load_raw(r / "recipe.yaml").get("task") for r in runs}
    metrics = {get_task(t).main_metric for t in tasks}
    main = metrics.pop() if len(metrics) == 1 else "eval_loss"
    if output is None:
        if len(runs) > 1:
            raise LlmkitError("several runs: say where the comparison goes with --output DIR")
        output = runs[0] / "plots"
    return plot_runs(runs, output, main)
