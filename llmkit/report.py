"""What a run leaves for people: training-curve plots and the Hugging Face model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmkit.data import SPLITS
from llmkit.errors import LlmkitError
from llmkit.metrics import CONFUSION, perplexity
from llmkit.recipefile import dump_yaml


def load_history(run_dir: Path) -> list[dict]:
    """The Trainer's log history of a run (train and eval entries), from trainer_state.json."""
    state = Path(run_dir) / "trainer_state.json"
    if not state.exists():
        raise LlmkitError(f"{run_dir} has no trainer_state.json: not a finished llmkit run")
    history = json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
    for h in history:  # perplexity for the language-model tasks, derived like the metrics
        if "eval_loss" in h and "eval_perplexity" not in h:
            h["eval_perplexity"] = perplexity(h["eval_loss"])
    return history


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: list[Path], out_dir: Path, main_metric: str) -> list[Path]:
    """Draw loss (train and validation), learning rate and the main metric; several runs overlaid."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    histories = {Path(r).name: load_history(Path(r)) for r in runs}
    metric = main_metric.removeprefix("eval_")
    # (file, title, y label, curves: (log key, legend label, line style))
    panels = [
        ("loss.png", "Loss", "loss", [("loss", "train", "-"), ("eval_loss", "validation", "--")]),
        ("learning_rate.png", "Learning rate", "learning rate", [("learning_rate", "", "-")]),
    ]
    if main_metric != "eval_loss":
        panels.append((f"{metric}.png", f"Validation {metric}", metric, [(main_metric, "validation", "-o")]))
    written = []
    for filename, title, ylabel, curves in panels:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        labels, values_seen = [], []
        for i, (name, history) in enumerate(histories.items()):
            for j, (key, label, style) in enumerate(curves):
                steps, values = _series(history, key)
                if steps:
                    values_seen += values
                    labels.append(" ".join(x for x in (name if len(histories) > 1 else "", label) if x))
                    # Overlaid runs: one colour per run, the line style tells train from validation.
                    color = f"C{i if len(histories) > 1 else j}"
                    ax.plot(steps, values, style, color=color, label=labels[-1] or key, markersize=3)
        if not labels:
            plt.close(fig)
            continue
        positive = [v for v in values_seen if v > 0]
        if ylabel != "learning rate" and positive and max(positive) > 10 * min(positive):
            ax.set_yscale("log")  # curves that fall by orders of magnitude (early loss, perplexity)
            ylabel += " (log scale)"
        elif min(values_seen) >= 0 and ax.get_ylim()[0] < 0:
            # A flat zero (ROUGE early on) should not draw a negative axis; a sliver keeps its markers visible.
            ax.set_ylim(bottom=-0.02 * ax.get_ylim()[1])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(labels) > 1 or labels[0].lower() not in title.lower():  # else the title says it all
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / filename)
        plt.close(fig)
        written.append(out_dir / filename)
    return written


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: runs on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(run_dir: Path, out_dir: Path) -> Path | None:
    """Draw RUN/confusion_matrix.json as out_dir/confusion_matrix.png; None when the run has none."""
    source = Path(run_dir) / CONFUSION
    if not source.exists():
        return None
    saved = json.loads(source.read_text(encoding="utf-8"))
    labels, matrix = [str(x) for x in saved["labels"]], saved["matrix"]
    n, total = len(labels), sum(map(sum, matrix))
    correct = sum(matrix[i][i] for i in range(n))
    plt = pyplot()
    side = min(3.5 + 0.45 * n, 20)
    fig, ax = plt.subplots(figsize=(side + 1, side), dpi=110)
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="count")
    ax.set_xticks(range(n), labels, rotation=45 if max(map(len, labels), default=0) > 3 else 0, ha="right")
    ax.set_yticks(range(n), labels)
    if n and n <= 30:  # beyond that the numbers no longer fit in their cells
        peak = max(map(max, matrix)) or 1
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                color = "white" if count > peak / 2 else "black"
                ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=9 if n <= 12 else 7)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"Confusion matrix ({total} rows, accuracy {correct / max(total, 1):.3f})")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "confusion_matrix.png")
    plt.close(fig)
    return out_dir / "confusion_matrix.png"


def _datasets(data: Any) -> list[str]:
    """What the model card lists as its data: the Hub dataset, the built-in corpus or the files' names."""
    if data.source:
        return [f"llmkit built-in corpus: {data.source}"]
    return [data.load["path"]] if data.load else [Path(p).name for s in SPLITS for p in data.files(s)]


def _how_to_load(recipe: Any, task: Any) -> str:
    """The Python that loads the run's model: the model itself, or base + LoRA adapter (tested by running it)."""
    auto = task.auto_model
    if recipe.lora is None:
        load = f'from transformers import {auto}, AutoTokenizer\n\nmodel = {auto}.from_pretrained("RUN_DIR")\n'
    elif not recipe.model.name_or_path:  # built from a config: run_dir/base_model holds its weights
        load = (
            f"from peft import PeftModel\nfrom transformers import {auto}, AutoTokenizer\n\n"
            f"# base + adapter (or `llmkit export RUN_DIR OUT_DIR --merge` for one standalone model)\n"
            f'base = {auto}.from_pretrained("RUN_DIR/base_model")\n'
            f'model = PeftModel.from_pretrained(base, "RUN_DIR")\n'
        )
    else:  # a pretrained base: its weights with the run's config (labels: the new head's size)
        revision = f", revision={recipe.model.revision!r}" if recipe.model.revision else ""
        load = (
            f"from peft import PeftModel\nfrom transformers import AutoConfig, {auto}, AutoTokenizer\n\n"
            f"# base + adapter (or `llmkit export RUN_DIR OUT_DIR --merge` for one standalone model)\n"
            f'config = AutoConfig.from_pretrained("RUN_DIR/base_model")\n'
            f'base = {auto}.from_pretrained("{recipe.model.name_or_path}"{revision}, config=config, '
            f"ignore_mismatched_sizes=True)\n"
            f'model = PeftModel.from_pretrained(base, "RUN_DIR")\n'
        )
    return load + 'tokenizer = AutoTokenizer.from_pretrained("RUN_DIR")'


def _training_facts(summary: dict, adapter: bool) -> list[str]:
    tokens = summary.get("train_tokens_per_second")
    return [
        f"- model: {summary.get('model')}; {summary.get('parameters', 0):,} parameters, "
        f"{summary.get('trainable_parameters', 0):,} trained{' (LoRA adapter)' if adapter else ''}",
        f"- {summary.get('steps')} steps, {summary.get('epochs', 0):.2f} epochs, global batch {summary.get('global_batch_size')}, "
        f"{summary.get('world_size')} process(es), {'bf16' if summary.get('bf16') else 'fp32'}",
        f"- wall time {summary.get('wall_time_s', 0):.0f} s, {summary.get('train_samples_per_second') or 0:.1f} samples/s"
        + (f", {tokens:.0f} tokens/s" if tokens else ""),
    ]


def distill_lines(summary: dict, main_metric: str) -> list[str]:
    """What a distilled run's summary says of its teacher: settings, sizes, and both models on the validation split."""
    d = summary.get("distill")
    if not d:
        return []
    cut = f", student = layers {d['from_teacher_layers']} of it" if d.get("from_teacher_layers") else ""
    lines = [
        f"- distilled from {d['teacher']} (temperature {d['temperature']}, alpha {d['alpha']}, "
        f"hidden loss {d['hidden_loss']}{cut})",
        f"- parameters: teacher {d['teacher_parameters']:,}, student {d['student_parameters']:,} "
        f"({d['student_parameters'] / max(d['teacher_parameters'], 1):.2f}x)",
    ]
    theirs, ours = d.get("teacher_metrics") or {}, summary.get("final_metrics") or {}
    if theirs and ours:
        name = main_metric.removeprefix("eval_")
        speed = ours.get("eval_samples_per_second"), theirs.get("eval_samples_per_second")
        ratio = f" ({speed[0] / speed[1]:.2f}x the teacher's)" if speed[0] and speed[1] else ""
        lines.append(
            f"- validation {name}: student {ours.get(main_metric, float('nan')):.4f}, "
            f"teacher {theirs.get(main_metric, float('nan')):.4f}; evaluation samples/s: student "
            f"{speed[0] or 0:.1f}, teacher {speed[1] or 0:.1f}{ratio}"
        )
    return lines


def model_card(recipe: Any, task: Any, summary: dict) -> str:
    """A Hugging Face model card (README.md): metadata header, results, training, data, how to load, recipe."""
    datasets = _datasets(recipe.data)
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
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items())
    lines = [
        "---",
        dump_yaml(header).rstrip(),
        "---",
        "",
        f"# {Path(summary.get('output_dir', 'model')).name}",
        "",
        *([recipe.description, ""] if recipe.description else []),
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
        *_training_facts(summary, recipe.lora is not None),
        *distill_lines(summary, task.main_metric),
        "",
        "## Data",
        "",
        *(f"- {d}" for d in datasets or ["(see the recipe)"]),
        "",
        "## How to load",
        "",
        "```python",
        _how_to_load(recipe, task),
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
    plot_confusion(out, out / "plots")
    (out / "README.md").write_text(model_card(recipe, task, summary), encoding="utf-8")


def report(runs: list[Path], output: Path | None = None) -> list[Path]:
    """`llmkit report`: redraw one run's plots (into RUN/plots), or overlay several runs (into --output)."""
    from llmkit.recipefile import load_raw
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
    drawn = plot_runs(runs, output, main)
    confusion = plot_confusion(runs[0], output) if len(runs) == 1 else None
    return drawn + [confusion] if confusion else drawn


def distill_notes(runs: list[Path]) -> list[str]:
    """For `llmkit report`: each distilled run's teacher, settings, sizes and validation numbers (from summary.json)."""
    from llmkit.recipefile import load_raw
    from llmkit.tasks import get_task

    notes = []
    for run in map(Path, runs):
        summary_file = run / "summary.json"
        if not summary_file.exists():
            continue
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        lines = distill_lines(summary, get_task(load_raw(run / "recipe.yaml").get("task")).main_metric)
        notes += [f"{run}:", *(f"  {line[2:]}" for line in lines)] if lines else []
    return notes
