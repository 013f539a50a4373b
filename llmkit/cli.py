"""The `llmkit` command line: Typer commands that parse argv and call config + run (no ML imports here)."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Any

import typer

from llmkit import __version__
from llmkit.console import (
    basic_logging,
    guarded,
    leave_process_group,
    print_estimate,
    print_metrics,
    print_report,
    setup_logging,
    sigterm_unreported,
    stop_on_sigterm,
    usage_error_exit,
)
from llmkit.errors import LlmkitError, Terminated

# Plain (Click) help instead of Rich panels: importing rich and markdown-it was most of `llmkit --help`'s time.
app = typer.Typer(
    help="Pretrain and fine-tune Hugging Face transformers from YAML recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode=None,
)
recipe_app = typer.Typer(help="Inspect recipes.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(recipe_app, name="recipe")

# Extra words after the recipe are key=value overrides; an unknown --flag lands there too and is
# then reported as a bad override (one line, exit 2) instead of Click's multi-line usage error.
_TRAIN_CTX = {"ignore_unknown_options": True}

RecipeArg = typer.Argument(
    ..., help="Recipe YAML file, or a shipped recipe by name (bert, recipes/ner.yaml).", show_default=False
)
OverridesArg = typer.Argument(None, help="key=value overrides, e.g. trainer.learning_rate=3e-4", show_default=False)
DebugOpt = typer.Option(False, "--debug", help="Show the full traceback on errors.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings, errors and the final report only."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also the libraries' info messages."),
) -> None:
    """Pretrain and fine-tune Hugging Face transformers from YAML recipes."""
    if quiet and verbose:
        raise typer.BadParameter("--quiet and --verbose contradict each other")
    # An environment variable, so that the recipe resolution (progress bars) and every rank see it.
    os.environ["LLMKIT_VERBOSITY"] = "quiet" if quiet else "verbose" if verbose else "normal"


def _load(recipe: Path, overrides: list[str] | None) -> Any:
    from llmkit.config import load_recipe, resolve

    basic_logging()  # a recipe named by its shipped name says which file it reads
    return resolve(load_recipe(recipe, overrides or []))


def _train_command(
    stage: str, recipe: Path, overrides: list[str] | None, dry_run: bool, overwrite: bool, resume: bool
) -> None:
    from llmkit.recipefile import dump_yaml

    r = _load(recipe, overrides)
    from llmkit import engine, rundir

    engine.check_stage(r, stage)
    setup_logging()
    if dry_run:
        typer.echo(dump_yaml(rundir.resolved_dict(r)).rstrip())
        print_estimate(engine.train(r, dry_run=True))
        return
    summary = engine.train(r, overwrite=overwrite, resume=resume)
    if summary:
        print_report(summary)


@app.command(context_settings=_TRAIN_CTX)
def pretrain(
    recipe: Path = RecipeArg,
    overrides: list[str] = OverridesArg,
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and estimate; train nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in output_dir."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its newest checkpoint."),
    debug: bool = DebugOpt,
) -> None:
    """Pretrain a language model (tasks mlm, clm) from a recipe."""
    guarded(debug, lambda: _train_command("pretrain", recipe, overrides, dry_run, overwrite, resume))


def _recipe_for_task(recipe: str | None, task: str | None, overrides: list[str]) -> tuple[Path, list[str]]:
    """`--task T` picks the shipped recipe for T; a recipe given as well must be for the same task."""
    from llmkit.config import shipped_recipe
    from llmkit.recipefile import load_raw

    overrides = list(overrides or [])
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        overrides.insert(0, recipe)  # `finetune --task ner trainer.seed=3`: no recipe, just overrides
        recipe = None
    if recipe is None:
        if task is None:
            raise LlmkitError("name a recipe (llmkit finetune recipes/ner.yaml) or a task (llmkit finetune --task ner)")
        return shipped_recipe(task), overrides
    if task is not None:
        declared = load_raw(recipe).get("task")
        if declared != task:
            raise LlmkitError(
                f"--task {task} disagrees with {recipe}, which is a {declared!r} recipe; drop one of them"
            )
    return Path(recipe), overrides


@app.command(context_settings=_TRAIN_CTX)
def finetune(
    recipe: str = typer.Argument(None, help="Recipe YAML file (or use --task).", show_default=False),
    overrides: list[str] = OverridesArg,
    task: str = typer.Option(
        None, "--task", help="Use the shipped recipe for this task: classification, ner, summarization."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and estimate; train nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in output_dir."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its newest checkpoint."),
    debug: bool = DebugOpt,
) -> None:
    """Fine-tune a model for classification, ner or summarization."""

    def go() -> None:
        path, extra = _recipe_for_task(recipe, task, overrides)
        _train_command("finetune", path, extra, dry_run, overwrite, resume)

    guarded(debug, go)


@app.command(context_settings=_TRAIN_CTX)
def check(
    recipe: Path = RecipeArg,
    overrides: list[str] = OverridesArg,
    json_path: Path = typer.Option(
        None, "--json", help="Save the report here (default: OUTPUT_DIR/preflight.json if the run folder exists)."
    ),
    debug: bool = DebugOpt,
) -> None:
    """Preflight a recipe's data without training.

    Reports rows per split, empty rows, train/eval duplicates, labels, NER tags and truncation. Given a folder:
    a run's checkpoints, or a prepared folder (llmkit prepare), against their manifests.
    """

    def go() -> None:
        if recipe.is_dir():
            from llmkit.rundir import check_folder

            return _echo_check(*check_folder(recipe))
        r = _load(recipe, overrides)
        setup_logging()
        from llmkit import preflight
        from llmkit.tasks import get_task

        task = get_task(r.task)
        if r.data.prepared is not None or r.data.streaming:  # what a run reads, refused as a run would be
            from llmkit.engine import check_packed

            return _echo_check(*check_packed(r, task))
        raw, tokenizer = preflight.load_data(r, task, strict=False)
        report = preflight.build_report(r, task, raw, tokenizer)
        typer.echo(preflight.format_report(report))
        path = json_path or preflight.default_path(r)
        if path is not None:
            preflight.save_report(report, path)
            typer.echo(f"Saved the report to {path}")
        # Logs the warnings; under data.on_bad_rows=error a bad row is a DataError (exit 2).
        preflight.enforce(r, task, raw, report)

    guarded(debug, go)


def _echo_check(lines: list[str], problem: str | None) -> None:
    typer.echo("\n".join(lines))
    if problem:
        raise LlmkitError(problem)


@app.command(context_settings=_TRAIN_CTX)
def prepare(
    recipe: Path = RecipeArg,
    overrides: list[str] = OverridesArg,
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write: packed blocks, tokenizer, manifest."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the prepared folder at --output."),
    debug: bool = DebugOpt,
) -> None:
    """Tokenize and pack a pretraining corpus once, for many runs.

    Runs read the folder with data.prepared=OUTPUT; `llmkit check OUTPUT` verifies it.
    """

    def go() -> None:
        r = _load(recipe, overrides)
        setup_logging()
        from llmkit import engine

        m = engine.prepare(r, output, overwrite)
        splits = ", ".join(f"{s} {f['blocks']:,} blocks ({f['tokens']:,} tokens)" for s, f in m["splits"].items())
        typer.echo(f"Prepared {output}: {splits}. Train on it: llmkit pretrain {recipe} data.prepared={output}")

    guarded(debug, go)


@app.command(context_settings=_TRAIN_CTX)
def evaluate(
    target: Path = typer.Argument(..., help="A run folder (output_dir of a finished run) or a recipe file."),
    overrides: list[str] = OverridesArg,
    split: str = typer.Option("validation", "--split", help="Which split to evaluate: validation, test, train."),
    debug: bool = DebugOpt,
) -> None:
    """Compute metrics for a run or any checkpoint on any split."""

    def go() -> None:
        from llmkit import engine, rundir

        basic_logging()  # a recipe named by its shipped name says which file it reads
        r = rundir.recipe_for_evaluation(target, overrides or [])
        setup_logging()
        metrics = engine.evaluate(r, split)
        typer.echo(f"\nMetrics on {split} ({metrics['samples']} samples):")
        print_metrics(metrics)

    guarded(debug, go)


@app.command(context_settings=_TRAIN_CTX)
def predict(
    target: Path = typer.Argument(..., help="A run folder (output_dir of a finished run) or a recipe file."),
    overrides: list[str] = OverridesArg,
    input: Path = typer.Option(..., "--input", "-i", help="Inputs: .jsonl/.json/.csv/.tsv (task's columns), .txt."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the predictions (JSONL)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    batch_size: int = typer.Option(
        None, "--batch-size", min=1, help="Rows per forward pass or generate call (default: the task's, 16 or 32)."
    ),
    debug: bool = DebugOpt,
) -> None:
    """Predict with a trained model on a file of inputs."""

    def go() -> None:
        from llmkit import rundir
        from llmkit.predict import predict as run_predict

        basic_logging()  # a recipe named by its shipped name says which file it reads
        r = rundir.recipe_for_evaluation(target, overrides or [])
        setup_logging()
        n = run_predict(r, input, output, overwrite=overwrite, batch_size=batch_size)
        typer.echo(f"Wrote {n} predictions to {output}")

    guarded(debug, go)


@app.command(context_settings=_TRAIN_CTX)
def tune(
    target: Path = typer.Argument(..., help="A recipe with a search: section, or the folder of an earlier study."),
    overrides: list[str] = OverridesArg,
    trials: int = typer.Option(None, "--trials", min=1, help="Finished trials the study should reach (tune.trials)."),
    storage: str = typer.Option(None, "--storage", help="Optuna RDB URL (default: sqlite in the output folder)."),
    study: str = typer.Option(None, "--study", help="The study's name (default: the output folder's name)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the space and the first sampled values; train nothing."
    ),
    debug: bool = DebugOpt,
) -> None:
    """Search hyperparameters (Optuna); each trial is a run.

    Trials go to OUTPUT_DIR/trial-N, the study to OUTPUT_DIR/study.db (or --storage).
    """

    def go() -> None:
        from llmkit import tune as tuning
        from llmkit.tune_report import format_table, rows

        basic_logging()
        p = tuning.plan(tuning.load(target, overrides or []), trials, storage, study)
        setup_logging()
        if dry_run:
            typer.echo(tuning.describe(p))
            return
        result = tuning.run(p)
        typer.echo(format_table(p, rows(result)))
        if (p.folder / "best.yaml").is_file():
            typer.echo(f"\nBest recipe: {p.folder / 'best.yaml'}  (llmkit finetune {p.folder / 'best.yaml'})")

    guarded(debug, go)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A finished run folder."),
    out_dir: Path = typer.Argument(..., help="Where to write the exported model."),
    merge: bool = typer.Option(False, "--merge", help="Merge a LoRA adapter into its base: one standalone model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT_DIR."),
    format: str = typer.Option("pytorch", "--format", help="pytorch (safetensors) or onnx."),
    quantize: str = typer.Option(
        None, "--quantize", help="int8: onnxruntime dynamic int8 (onnx) or torchao (pytorch)."
    ),
    debug: bool = DebugOpt,
) -> None:
    """Export a run's model: a copy, LoRA merged, ONNX, int8.

    With --merge, the adapter is merged into its base model: one standalone model. ONNX and int8 exports
    merge a LoRA adapter themselves, check themselves against PyTorch and record it in export.json.
    """

    def go() -> None:
        from llmkit.export import check_choices
        from llmkit.export import export as run_export

        check_choices(format, quantize, merge)
        setup_logging()
        kind = run_export(run_dir, out_dir, merge=merge, overwrite=overwrite, fmt=format, quantize=quantize)
        typer.echo(f"Exported the {kind} to {out_dir}")

    guarded(debug, go)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="One or more run folders."),
    output: Path = typer.Option(None, "--output", "-o", help="Where the plots go (default: RUN/plots for one run)."),
    debug: bool = DebugOpt,
) -> None:
    """Redraw a run's plots; several runs are overlaid for comparison.

    Plots: loss, learning rate and the main metric.
    """

    def go() -> None:
        from llmkit.report import distill_notes
        from llmkit.report import report as draw

        for path in draw(runs, output):
            typer.echo(str(path))
        for line in distill_notes(runs):
            typer.echo(line)

    guarded(debug, go)


@app.command()
def init(
    task: str = typer.Argument(..., help="mlm, clm, classification, ner or summarization."),
    output: Path = typer.Option(None, "--output", "-o", help="Where to write it (default: TASK.yaml here)."),
    debug: bool = DebugOpt,
) -> None:
    """Write a commented starter recipe for TASK to edit.

    It is a copy of the shipped recipe for TASK.
    """

    def go() -> None:
        from llmkit.config import shipped_recipe
        from llmkit.recipefile import load_raw

        source = shipped_recipe(task)
        dest = output or Path(f"{task}.yaml")
        if dest.exists():
            raise LlmkitError(f"{dest} exists; choose another name with --output NAME.yaml")
        lines = source.read_text(encoding="utf-8").splitlines()
        what = lines[0].split(": ", 1)[1] if ": " in lines[0] else ""
        lines[0] = f"# {dest}: {what} (started from llmkit's {source.name} by `llmkit init {task}`)"
        dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
        from llmkit.tasks import get_task

        stage = get_task(load_raw(dest)["task"]).stage
        typer.echo(
            f"Wrote {dest}. Edit it, check it with `llmkit {stage} {dest} --dry-run`, then `llmkit {stage} {dest}`"
        )

    guarded(debug, go)


@app.command("recipes")
def recipes_list(debug: bool = DebugOpt) -> None:
    """List the shipped recipes: path, task and what each does."""

    def go() -> None:
        from llmkit.recipefile import load_raw, shipped_recipes_dir

        root = shipped_recipes_dir()
        for path in sorted(root.rglob("*.yaml")):
            first = path.read_text(encoding="utf-8").splitlines()[0]
            what = first.split(": ", 1)[1] if ": " in first else ""
            task = "(accelerate)" if path.parent.name == "accelerate" else load_raw(path).get("task", "?")
            typer.echo(f"{path.relative_to(root.parent).as_posix():<42} {task:<15} {what}")

    guarded(debug, go)


@recipe_app.command("show", context_settings=_TRAIN_CTX)
def recipe_show(recipe: Path = RecipeArg, overrides: list[str] = OverridesArg, debug: bool = DebugOpt) -> None:
    """Print the recipe merged (extends), overridden and resolved."""

    def go() -> None:
        from llmkit.recipefile import dump_yaml
        from llmkit.rundir import resolved_dict

        loaded = _load(recipe, overrides)
        typer.echo(f"# {Path(loaded.recipe_file).resolve()}")  # which file was read (a shipped one, by name)
        typer.echo(dump_yaml(resolved_dict(loaded)).rstrip())

    guarded(debug, go)


def main() -> None:
    """Console-script entry point."""
    # Importing torch, transformers and datasets creates ~450k long-lived objects, which Python's full
    # collections would scan again and again: ~0.7 s before a tiny run's first step. No collections until
    # the libraries are in (console.end_of_startup, called by setup_logging); after that they are frozen.
    gc.disable()
    stop_on_sigterm()
    try:
        code = app(standalone_mode=False)
    except Exception as e:  # noqa: BLE001 - Click's usage errors and Abort, whose classes Typer keeps private
        usage_error_exit(e)
        if type(e).__name__ == "Abort":  # Ctrl-C while the command line was being parsed
            typer.echo("interrupted", err=True)
            sys.exit(130)
        raise
    except Terminated:  # SIGTERM while the command line was being parsed (inside a command: guarded): noted below
        code = 130
    finally:
        leave_process_group()
    if sigterm_unreported():  # raised while parsing, or swallowed by Python there (an import's lock callback)
        typer.echo("interrupted (SIGTERM)", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
