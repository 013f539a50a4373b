"""The task registry: each task is a frozen dataclass of facts and functions, one module per task."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import RecipeError, suggest


def _no_check(recipe: Any) -> None:
    return None


@dataclass(frozen=True)
class Task:
    """Everything llmkit knows about one task.

    Functions receive the validated Recipe; heavy libraries are imported inside them so that
    validating a recipe stays fast.
    """

    name: str
    stage: str  # "pretrain" or "finetune": which command runs it
    recipe: str  # the shipped recipe (recipes/<file>) that `--task NAME` and `llmkit init NAME` start from
    description: str
    auto_model: str  # name of the transformers AutoModel class
    peft_task_type: str  # peft.TaskType name, filled into LoraConfig.task_type
    Options: type  # dataclass of the task's own `options:` keys
    columns: dict[str, str]  # role -> default column name; data.columns.ROLE overrides
    # (recipe, DatasetDict, tokenizer) -> tokenized DatasetDict ready for the Trainer
    preprocess: Callable[..., Any]
    # (recipe, tokenizer, model) -> data collator
    collator: Callable[..., Any]
    # (recipe, train Dataset) -> texts to train a tokenizer on
    corpus: Callable[..., Iterator[str]]
    # (recipe, tokenizer, tokenized eval Dataset) -> (compute_metrics, preprocess_logits_for_metrics)
    metrics: Callable[..., tuple[Any, Any]] = field(default=lambda recipe, tokenizer, ds: (None, None))
    # (recipe, raw DatasetDict) -> the label names (None for tasks without labels); checks every split
    labels: Callable[..., list[str] | None] = field(default=lambda recipe, ds: None)
    # (recipe) -> extra kwargs for the model config (labels, problem_type)
    model_kwargs: Callable[..., dict] = field(default=lambda recipe: {})
    # (recipe, model) -> None: task-specific speed-ups installed on the built model (hooks; nothing saved changes)
    prepare_model: Callable[..., None] = field(default=lambda recipe, model: None)
    # (recipe, model, tokenizer, rows) -> one output dict per input row
    predict: Callable[..., list[dict]] | None = None
    input_columns: tuple[str, ...] = ("text",)  # roles a predict input file must have
    trainer_defaults: dict = field(default_factory=dict)  # TrainingArguments defaults for this task
    validate: Callable[[Any], None] = _no_check
    main_metric: str = "eval_loss"  # the one number a run is judged by (plots, report)
    pipeline_tag: str = ""  # the Hugging Face Hub pipeline of the trained model (model card)
    perplexity: bool = False  # report exp(eval_loss)
    seq2seq: bool = False
    tokens_per_sample: bool = True  # samples are packed blocks of data.max_length tokens

    def training_args_cls(self) -> type:
        import transformers

        return transformers.Seq2SeqTrainingArguments if self.seq2seq else transformers.TrainingArguments

    def column(self, recipe: Any, role: str) -> str:
        return recipe.data.columns.get(role, self.columns[role])


def _registry() -> dict[str, Task]:
    from llmkit.tasks import classification, clm, mlm, ner, summarization

    return {t.name: t for t in (mlm.TASK, clm.TASK, classification.TASK, ner.TASK, summarization.TASK)}


TASKS: dict[str, Task] = {}  # filled on first use: importing the task modules is not free


def all_tasks() -> dict[str, Task]:
    """Every registered task, by name."""
    if not TASKS:
        TASKS.update(_registry())
    return dict(TASKS)


def get_task(name: Any) -> Task:
    """Look a task up by name, with a suggestion for typos."""
    tasks = all_tasks()
    if not isinstance(name, str) or name not in tasks:  # a list or mapping from YAML is not a name either
        raise RecipeError(f"unknown task {name!r}{suggest(str(name), tasks)}; tasks: {', '.join(tasks)}")
    return tasks[name]
