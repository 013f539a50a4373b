"""Knowledge distillation, DistilBERT-style, for every task: a teacher's soft targets in the loss, and students
cut from their teacher by layer.

The loss of a training step is (1 - alpha) * the task's own loss + alpha * T^2 * KL(teacher || student) at
temperature T, on exactly the positions the task's loss reads (Task.soft_targets), plus, when
distill.hidden_loss > 0, that weight times 1 - cosine between the last hidden states. The teacher is a
plain module beside the Trainer's model: in eval mode, under no_grad, in the run's precision, never wrapped
for DDP nor saved, one forward per step. Evaluation reports the task's own loss, so its numbers compare
with those of a run without a teacher.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit import modeling, teacher_cache
from llmkit.errors import RecipeError, first_line, offline_hint
from llmkit.hf import hub_kwargs
from llmkit.recipefile import load_raw
from llmkit.tasks.base import LABELLED, NEXT, SEQUENCE

if TYPE_CHECKING:
    from llmkit.recipe import Recipe
    from llmkit.tasks.base import Task

log = logging.getLogger("llmkit")

IGNORE = -100

# --------------------------------------------------------------------------- losses (plain torch)


def soft_positions(logits: Any, labels: Any, where: str) -> Any:
    """The rows of `logits` the task's loss reads, as [rows, classes].

    SEQUENCE: one row per sequence (classification). LABELLED: positions whose label is set (NER's first
    sub-tokens, MLM's masked tokens, summarization's target tokens). NEXT: every position that predicts a
    labelled next token (causal LM). Logits that are already one row per label (MLM's masked-only head)
    are returned as they are.
    """
    if where == SEQUENCE or labels is None:
        return logits
    if where == NEXT:
        logits, labels = logits[:, :-1], labels[:, 1:]
    if logits.shape[:-1] == labels.shape:
        return logits[labels != IGNORE]
    return logits


def kl_loss(student: Any, teacher: Any, temperature: float, multi_label: bool = False) -> Any:
    """Mean over rows of KL(teacher || student) at `temperature`, times temperature^2 (Hinton et al., 2015).

    Rows are [rows, classes] logits. Multi-label rows are independent yes/no decisions: the KL of each
    label's Bernoulli, summed over labels. Computed in float32; no rows gives a zero that keeps the graph.
    """
    import torch.nn.functional as F

    if student.shape[0] == 0:
        return student.sum() * 0.0
    if multi_label:
        s, t = student.float() / temperature, teacher.float() / temperature
        ls, lt, ls0, lt0 = F.logsigmoid(s), F.logsigmoid(t), F.logsigmoid(-s), F.logsigmoid(-t)
        per_row = (lt.exp() * (lt - ls) + lt0.exp() * (lt0 - ls0)).sum(-1)
        return per_row.mean() * temperature**2
    return _soft_kl().apply(student, teacher.detach(), float(temperature)) * (temperature**2 / student.shape[0])


_CHUNK_BYTES = 8 << 20  # rows at a time: float32 blocks of about 8 MB (measured: 2x faster than whole, at 4096 x 8000)


def _soft_kl() -> Any:
    """Sum over rows of KL(softmax(t/T) || softmax(s/T)), its gradient computed in the forward, a block of rows
    at a time. Over a vocabulary (LM distillation: [tokens, 8k-150k]) autograd would keep several float32
    copies of the whole [rows, vocab] logits and pass over each again backward; this keeps one gradient in
    the logits' dtype (Liger's fused-KL idea, in plain torch)."""
    import torch

    class SoftKL(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, student: Any, teacher: Any, temperature: float) -> Any:
            rows = max(1, _CHUNK_BYTES // (4 * student.shape[-1]))
            total = torch.zeros((), dtype=torch.float32, device=student.device)
            grad = torch.empty_like(student) if student.requires_grad else None
            for start in range(0, student.shape[0], rows):
                log_q = (student[start : start + rows].float() / temperature).log_softmax(-1)
                log_p = (teacher[start : start + rows].float() / temperature).log_softmax(-1)
                p = log_p.exp()
                total += (p * (log_p - log_q)).sum()
                if grad is not None:  # d KL / d student = (q - p) / T
                    grad[start : start + rows] = (log_q.exp_().sub_(p).div_(temperature)).to(grad.dtype)
            ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx: Any, upstream: Any) -> Any:
            (grad,) = ctx.saved_tensors
            return grad * upstream.to(grad.dtype), None, None

    return SoftKL


def cosine_loss(student: Any, teacher: Any, mask: Any = None) -> Any:
    """Mean of 1 - cosine(student, teacher) over the positions where `mask` is set ([B, T, H] states)."""
    import torch.nn.functional as F

    cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    if mask is not None:
        cos = cos[mask.bool()]
    return (1 - cos).mean() if cos.numel() else student.sum() * 0.0


def _last_hidden(outputs: Any) -> Any:
    states = getattr(outputs, "decoder_hidden_states", None) or outputs.hidden_states
    return states[-1]


def _hidden_mask(inputs: dict, outputs: Any) -> Any:
    """Positions of the last hidden states that are text: the decoder's target tokens (seq2seq), else the attention mask."""
    if getattr(outputs, "decoder_hidden_states", None) is not None:
        labels = inputs.get("labels")
        return None if labels is None else labels != IGNORE
    return inputs.get("attention_mask")


# --------------------------------------------------------------------------- the Trainer


def trainer_with_teacher(base: type, teacher: Any, recipe: Recipe, task: Task) -> type:
    """`base` (a Trainer class) whose training loss adds the teacher's soft targets (evaluation keeps the task's)."""

    d = recipe.distill
    multi_label = getattr(recipe.options, "problem_type", None) == "multi_label_classification"

    class DistillTrainer(teacher_cache.KeepsTeacherLogits, base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.teacher_cache = teacher_cache.TeacherCache() if teacher_cache.wanted(recipe, task, teacher) else None

        def compute_loss(
            self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            if not model.training or (d.alpha == 0 and d.hidden_loss == 0):  # labels alone: no teacher to ask
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            hidden = d.hidden_loss > 0
            labels = inputs.get("labels")  # before the Trainer may pop them (label smoothing)
            teacher_inputs = _teacher_inputs(inputs, task.soft_targets, hidden)
            student_inputs = {**inputs, "output_hidden_states": True} if hidden else dict(inputs)
            loss, outputs = super().compute_loss(model, student_inputs, True, num_items_in_batch)
            logits, taught = teacher_cache.teacher_logits(self.teacher_cache, teacher, teacher_inputs)
            where = task.soft_targets
            ours, theirs = soft_positions(outputs.logits, labels, where), soft_positions(logits, labels, where)
            width = min(ours.shape[-1], theirs.shape[-1])  # vocabularies padded to different sizes: the real one
            extra = d.alpha * kl_loss(ours[..., :width], theirs[..., :width], d.temperature, multi_label)
            if hidden:
                extra = extra + d.hidden_loss * cosine_loss(
                    _last_hidden(outputs), _last_hidden(taught), _hidden_mask(inputs, outputs)
                )
            loss = (1 - d.alpha) * loss + extra * self._scale_like_task_loss(labels, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

        def _scale_like_task_loss(self, labels: Any, num_items_in_batch: Any) -> Any:
            """The distillation terms are means over this batch; where the Trainer takes the task's loss as
            summed over the whole accumulated (and gathered) batch, weigh them as such a loss weighs this batch."""
            if not (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or labels is None:
                return 1.0  # the Trainer divides the loss by the accumulation steps itself
            local = (labels[..., 1:] if getattr(self, "_loss_shifts_labels", False) else labels).ne(IGNORE).sum()
            processes = 1  # the Trainer multiplies the task's loss by the processes only where the count is global
            if self.args.average_tokens_across_devices:
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                processes = self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu
            return local * processes / num_items_in_batch

    return DistillTrainer


def _teacher_inputs(inputs: dict, where: str, hidden: bool) -> dict:
    """What the teacher reads: the student's inputs; labels only where its logits depend on them (MLM's
    masked-only head picks its rows by them; a seq2seq batch without decoder inputs makes them from labels)."""
    keep_labels = where == LABELLED and "decoder_input_ids" not in inputs
    out = {k: v for k, v in inputs.items() if k != "labels" or keep_labels}
    if hidden:
        out["output_hidden_states"] = True
    return out


def prepare_teacher(teacher: Any, args: Any) -> Any:
    """The teacher as it runs: frozen, in eval mode, on the run's device, in bf16 when the run trains in bf16."""
    import torch

    teacher.requires_grad_(False)
    teacher.eval()
    return teacher.to(args.device, dtype=torch.bfloat16 if args.bf16 else None)


# --------------------------------------------------------------------------- the teacher


def load_teacher(recipe: Recipe, task: Task, tokenizer: Any) -> Any:
    """The teacher model of distill.teacher: an llmkit run folder or one of its checkpoints (LoRA merged in),
    another checkpoint folder, or a Hub id (engine.train has checked that a local one exists). Checked against
    the student's task, tokenizer and labels."""
    source = recipe.distill.teacher
    path = Path(source).expanduser()
    run = (path / "recipe.yaml").is_file()
    if run:
        _check_task(path, task)
    where = str(path) if path.is_dir() else source
    _check_vocabulary(_teacher_tokenizer(where, recipe), tokenizer, where)
    model = _run_teacher(path, task, tokenizer) if run else _checkpoint_teacher(source, recipe, task)
    _check_labels(recipe, task, model)
    return model


def check_teacher_exists(recipe: Recipe, task: Task) -> None:
    """A distill.teacher that names a local folder (not a Hub id) exists: said before any data is read."""
    source = recipe.distill.teacher
    path = Path(source).expanduser()
    if not path.is_dir() and _looks_local(source):
        raise RecipeError(
            f"distill.teacher: no folder {source}; train the teacher first "
            f"(e.g. llmkit {task.stage} RECIPE trainer.output_dir={source}) or name a Hub model"
        )
    out = recipe.output_dir.expanduser().resolve()
    if path.is_dir() and (path.resolve() == out or out in path.resolve().parents):
        raise RecipeError(
            f"distill.teacher {source} is inside trainer.output_dir {recipe.output_dir}, which this run writes "
            "(and --overwrite deletes): copy the teacher elsewhere or choose another output_dir"
        )


def _looks_local(source: str) -> bool:
    """A path, not a Hub id (`org/name` or `name`): ./ / ~ at the start, more than one /, or llmkit's runs/ folder."""
    first = Path(source).parts[0] if Path(source).parts else ""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or first == "runs" or Path(first).is_dir()


def _check_task(path: Path, task: Task) -> None:
    teacher_task = load_raw(path / "recipe.yaml").get("task")
    if teacher_task != task.name:
        raise RecipeError(
            f"distill.teacher {path} is a {teacher_task} run, this recipe trains {task.name}: "
            "distil from a teacher of the same task"
        )


def _run_teacher(path: Path, task: Task, tokenizer: Any) -> Any:
    from llmkit import onnxrt, rundir

    onnxrt.refuse_training(path, "distill.teacher")
    try:
        teacher_recipe = rundir.recipe_for_evaluation(path, [])
    except Exception as e:  # noqa: BLE001 - an unfinished or damaged teacher, said in one line
        raise RecipeError(f"distill.teacher {path}: {first_line(e)}") from None
    model = modeling.build_model(teacher_recipe, task, tokenizer, modeling.head_kwargs(task, teacher_recipe))
    if hasattr(model, "merge_and_unload"):  # a LoRA run: one plain model, as fast as the base
        model = model.merge_and_unload()
    return model


def _checkpoint_teacher(source: str, recipe: Recipe, task: Task) -> Any:
    import transformers

    auto = getattr(transformers, task.auto_model)
    try:
        model, info = auto.from_pretrained(source, output_loading_info=True, **_trust(recipe))
    except (OSError, ValueError) as e:
        raise RecipeError(f"cannot load distill.teacher {source!r}: {first_line(e)}{offline_hint()}") from None
    modeling.declare_loss_kwargs(model)  # as llmkit's own builder does (a student cut from it inherits it)
    untrained = [k for k in info.get("missing_keys", []) if "embeddings.position_ids" not in k]
    if untrained:
        raise RecipeError(
            f"distill.teacher {source} has no trained {task.name} head ({', '.join(sorted(untrained)[:3])} "
            "start random): fine-tune it first and distil from that run"
        )
    return model


def _trust(recipe: Recipe) -> dict:
    return {k: v for k, v in hub_kwargs(recipe.model).items() if k == "trust_remote_code"}


def _teacher_tokenizer(source: str, recipe: Recipe) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **_trust(recipe))
    except (OSError, ValueError, TypeError):
        return None  # a checkpoint saved without its tokenizer: the embedding size is checked instead


def _check_vocabulary(teacher_tokenizer: Any, tokenizer: Any, source: str) -> None:
    if teacher_tokenizer is None or teacher_tokenizer.get_vocab() == tokenizer.get_vocab():
        return
    raise RecipeError(
        f"distill.teacher {source}: its vocabulary ({len(teacher_tokenizer):,} tokens) differs from the student's "
        f"tokenizer ({len(tokenizer):,}); teacher and student must read the same token ids: "
        f"use the teacher's tokenizer (tokenizer.name_or_path={source})"
    )


def _check_labels(recipe: Recipe, task: Task, teacher: Any) -> None:
    """A labelled task's teacher predicts the same labels, in the same order, as the student's data has."""
    if task.labels is None or getattr(recipe.options, "labels", None) is None:
        return
    ours = list(recipe.options.labels)
    theirs = [teacher.config.id2label[i] for i in range(len(teacher.config.id2label))]
    if [str(x) for x in theirs] != [str(x) for x in ours]:
        raise RecipeError(
            f"distill.teacher {recipe.distill.teacher} predicts the labels {theirs}, this data has {ours}: "
            f"distil from a teacher trained on the same label set (or set options.labels={theirs})"
        )


def check_pair(recipe: Recipe, teacher: Any, student: Any, tokenizer: Any) -> None:
    """What the losses need of the two models: the teacher reads every token id; equal widths for the hidden loss."""
    embed = teacher.get_input_embeddings().num_embeddings
    if embed < len(tokenizer):
        raise RecipeError(
            f"distill.teacher {recipe.distill.teacher} has {embed:,} token embeddings, the student's tokenizer "
            f"{len(tokenizer):,} tokens: use the teacher's tokenizer (tokenizer.name_or_path={recipe.distill.teacher})"
        )
    wide = (teacher.get_input_embeddings().embedding_dim, student.get_input_embeddings().embedding_dim)
    if recipe.distill.hidden_loss > 0 and wide[0] != wide[1]:
        raise RecipeError(
            f"distill.hidden_loss compares hidden states, but the teacher is {wide[0]} wide and the student "
            f"{wide[1]}: set distill.hidden_loss=0, or a student of the teacher's width (model.from_teacher)"
        )


# --------------------------------------------------------------------------- students cut from the teacher

_DECODER_DEPTH = ("num_decoder_layers", "decoder_layers", "encoder_layers")  # seq2seq configs' other stacks


def cut_from_teacher(teacher: Any, layers: list[int]) -> Any:
    """A copy of `teacher` with only `layers` of its blocks (in that order), weights, embeddings and head copied.

    Every list of the teacher's layer blocks is cut the same way (an encoder-decoder's encoder and decoder),
    the config's depth follows, and each kept attention module gets its new layer number (caches index by it).
    """
    import torch

    config = teacher.config
    depth = getattr(config, "num_hidden_layers", None)
    if not isinstance(depth, int):
        raise RecipeError(
            f"model.from_teacher: a {type(teacher).__name__} names no number of layers to cut; "
            "give the student with model.name_or_path or model.config instead"
        )
    wrong = [i for i in layers if i >= depth]
    if wrong:
        raise RecipeError(
            f"model.from_teacher.layers: {wrong} out of range: the teacher has {depth} layers (0 to {depth - 1})"
        )
    student = copy.deepcopy(teacher)
    stacks = _layer_stacks(student, depth)
    if not stacks:
        raise RecipeError(f"model.from_teacher: no list of {depth} layer blocks found in {type(teacher).__name__}")
    for parent, name, blocks in stacks:
        kept = [blocks[i] for i in layers]
        only_first = set(blocks[0].state_dict()) - set(kept[0].state_dict())
        if only_first:
            raise RecipeError(
                f"model.from_teacher.layers: the teacher's layer 0 holds weights the others lack "
                f"({sorted(only_first)[0]}): keep layer 0 first, e.g. [0, ...]"
            )
        for new, block in enumerate(kept):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new
        setattr(parent, name, torch.nn.ModuleList(kept))
    fields = student.config.to_dict()
    for key in (student.config.attribute_map.get("num_hidden_layers", "num_hidden_layers"), *_DECODER_DEPTH):
        if fields.get(key) == depth:
            setattr(student.config, key, len(layers))
    if isinstance(getattr(student.config, "layer_types", None), list) and len(student.config.layer_types) == depth:
        student.config.layer_types = [student.config.layer_types[i] for i in layers]
    return student


def _layer_stacks(model: Any, depth: int) -> list[tuple[Any, str, Any]]:
    """(parent, attribute, ModuleList) of every outermost list of `depth` blocks of one class."""
    import torch

    found: list[tuple[str, Any]] = []
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module) == depth
            and len({type(m) for m in module}) == 1
            and not any(name.startswith(f"{outer}.") for outer, _ in found)
        ):
            found.append((name, module))
    stacks = []
    for name, module in found:
        parent_name, _, attr = name.rpartition(".")
        stacks.append((model.get_submodule(parent_name) if parent_name else model, attr, module))
    return stacks


# --------------------------------------------------------------------------- facts


def layer_parameters(model: Any) -> int:
    """Parameters outside the embeddings: what a forward multiplies by (its cost per token)."""
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def facts(recipe: Recipe, task: Task, teacher: Any, student: Any) -> dict:
    """The distillation's settings and sizes, for the estimate and the summary."""
    d = recipe.distill
    teacher_cost, student_cost = layer_parameters(teacher), layer_parameters(student)
    return {
        "teacher": d.teacher,
        "temperature": d.temperature,
        "alpha": d.alpha,
        "hidden_loss": d.hidden_loss,
        "from_teacher_layers": recipe.model.from_teacher.layers if recipe.model.from_teacher else None,
        "teacher_parameters": modeling.count_parameters(teacher)[1],
        "student_parameters": modeling.count_parameters(student)[1],
        # One teacher forward against the student's forward + backward (about 3 forwards), per token.
        "teacher_cost_per_step": round(teacher_cost / max(3 * student_cost, 1), 3),
        # the teacher's logits kept per example: from the second epoch on it does not run (teacher_cache.py)
        "teacher_logits_kept": teacher_cache.wanted(recipe, task, teacher),
    }
