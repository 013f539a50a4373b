"""What a task is: a frozen dataclass of facts and functions (Task), and the data columns it reads (Role)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmkit.rows import PAIR, TAGS, TARGET, TEXT, WORDS

INPUT_KINDS = (TEXT, PAIR, WORDS)  # what a model reads (a predict file needs the first of them)
# Task.soft_targets: which logits the task's loss reads, so distillation compares the same ones (llmkit/distill.py)
SEQUENCE = "sequence"  # one row per sequence (classification)
LABELLED = "labelled"  # the positions whose label is set (NER's first sub-tokens, MLM's masks, seq2seq targets)
NEXT = "next"  # each position that predicts a labelled next token (causal LM)


@dataclass(frozen=True)
class Role:
    """One column a task reads. `column` is its default name (data.columns.ROLE renames it); a role
    without one (optional) is read only when the recipe names its column."""

    kind: str
    column: str | None = None

    @property
    def optional(self) -> bool:
        return self.column is None


def _no_check(recipe: Any) -> None:
    return None


@dataclass(frozen=True)
class Task:
    """Everything llmkit knows about one task.

    Functions receive the validated Recipe; heavy libraries are imported inside them so that
    validating a recipe stays fast. Hooks (prepare_model, build_model, compute_loss) let a task
    change how its model is built and trained without any other module naming it.
    """

    name: str
    stage: str  # "pretrain" or "finetune": which command runs it
    recipe: str  # the shipped recipe (recipes/<file>) that `--task NAME` and `llmkit init NAME` start from
    description: str
    auto_model: str  # name of the transformers AutoModel class
    peft_task_type: str  # peft.TaskType name, filled into LoraConfig.task_type
    Options: type  # dataclass of the task's own `options:` keys
    roles: dict[str, Role]  # role name -> Role; the recipe's data.columns.ROLE maps it to a column
    # (recipe, DatasetDict, tokenizer) -> tokenized DatasetDict ready for the Trainer
    preprocess: Callable[..., Any]
    # (recipe, tokenizer, model) -> data collator
    collator: Callable[..., Any]
    # (recipe, train Dataset) -> texts to train a tokenizer on
    corpus: Callable[..., Iterator[str]]
    # (recipe, tokenizer, tokenized eval Dataset) -> (compute_metrics, preprocess_logits_for_metrics)
    metrics: Callable[..., tuple[Any, Any]] = field(default=lambda recipe, tokenizer, ds: (None, None))
    # (recipe, raw DatasetDict) -> the label names (None for tasks without labels); checks every split
    labels: Callable[..., list[str] | None] | None = None
    # (recipe) -> extra kwargs for the model config (labels, problem_type)
    model_kwargs: Callable[..., dict] = field(default=lambda recipe: {})
    # (recipe, model) -> None: task-specific speed-ups installed on the built model (hooks; nothing saved changes)
    prepare_model: Callable[..., None] = field(default=lambda recipe, model: None)
    # (recipe, tokenizer, config kwargs, default) -> the model; `default(recipe, tokenizer, kwargs)` is
    # llmkit's own builder (pretrained, from config, encoder-decoder), which the hook may call and change
    build_model: Callable[..., Any] | None = None
    # (model, inputs, num_items_in_batch) -> (loss, outputs): the training and evaluation loss (None: the model's)
    compute_loss: Callable[..., tuple[Any, Any]] | None = None
    # (recipe, model, tokenizer, rows, batch_size=default) -> one output dict per input row
    predict: Callable[..., list[dict]] | None = None
    trainer_defaults: dict = field(default_factory=dict)  # TrainingArguments defaults for this task
    validate: Callable[[Any], None] = _no_check
    main_metric: str = "eval_loss"  # the one number a run is judged by (plots, report)
    pipeline_tag: str = ""  # the Hugging Face Hub pipeline of the trained model (model card)
    perplexity: bool = False  # report exp(eval_loss)
    seq2seq: bool = False
    causal: bool = False  # a left-to-right model: a trained tokenizer gets GPT-style special tokens
    tokens_per_sample: bool = True  # samples are packed blocks of data.max_length tokens
    soft_targets: str = LABELLED  # SEQUENCE | LABELLED | NEXT: where distillation compares teacher and student
    random_inputs: bool = False  # the collator draws new inputs each time (MLM masks): a teacher's logits don't repeat

    def training_args_cls(self) -> type:
        import transformers

        return transformers.Seq2SeqTrainingArguments if self.seq2seq else transformers.TrainingArguments

    def column(self, recipe: Any, role: str) -> str:
        """The data column of a role: data.columns.ROLE, else the role's default."""
        return recipe.data.columns.get(role, self.roles[role].column)

    def columns(self, recipe: Any, kinds: tuple[str, ...] | None = None) -> dict[str, str]:
        """Role -> column for every role the recipe's data has (optional roles only when named), of `kinds`."""
        return {
            role: self.column(recipe, role)
            for role, r in self.roles.items()
            if (not r.optional or role in recipe.data.columns) and (kinds is None or r.kind in kinds)
        }

    def checked_columns(self, recipe: Any) -> dict[str, tuple[str, str]]:
        """Role -> (kind, column) for the row rules (rows.tokenize_splits) of every role the data has."""
        kinds = (TEXT, PAIR, WORDS, TAGS, TARGET)  # labels are checked by the task's labels()
        return {role: (self.roles[role].kind, column) for role, column in self.columns(recipe, kinds).items()}

    @property
    def input_role(self) -> str:
        """The role a predict input must have (the model's first input)."""
        return next(role for role, r in self.roles.items() if r.kind in INPUT_KINDS and not r.optional)
