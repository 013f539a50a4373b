"""The tokenizer of a recipe: loaded (tokenizer.name_or_path or the model's), or trained on the corpus and cached."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

from llmkit import data
from llmkit.errors import DataError, RecipeError, first_line, offline_hint
from llmkit.files import cache_dir
from llmkit.hf import hub_kwargs

if TYPE_CHECKING:
    from llmkit.recipe import Recipe
    from llmkit.tasks.base import Task

log = logging.getLogger("llmkit")
STREAMED_TEXTS = 100_000  # a tokenizer trained on a stream reads at most this many texts unless max_texts says

# Special tokens by tokenizer type, and the template that wraps one text (and a pair).
_BERT = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
_ROBERTA = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>", "cls": "<s>", "sep": "</s>"}
_GPT = {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>", "pad": "<|pad|>"}


def _specials(kind: str, task: Task) -> dict[str, str]:
    if kind == "wordpiece":
        return _BERT
    return _GPT if task.causal else _ROBERTA


def load_tokenizer(name_or_path: str, recipe: Recipe | None = None, key: str = "tokenizer.name_or_path") -> Any:
    """AutoTokenizer.from_pretrained with one-line errors naming the recipe key to change."""
    from transformers import AutoTokenizer

    kwargs = hub_kwargs(recipe.model) if recipe is not None else {}
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise RecipeError(
            f"cannot load tokenizer {name_or_path!r} ({key}): {first}{offline_hint()}; set {key}=PATH to a local folder"
        ) from None


def get_tokenizer(recipe: Recipe, task: Task, train: Any) -> Any:
    """The recipe's tokenizer: tokenizer.name_or_path, else a trained one, else the model's own (a student cut
    from its teacher: the teacher's)."""
    t = recipe.tokenizer
    if t.name_or_path:
        tok = load_tokenizer(t.name_or_path, recipe)
    elif recipe.model.from_teacher is not None:
        tok = load_tokenizer(recipe.distill.teacher, recipe, "distill.teacher")
    elif t.train is not None:
        if train is None:
            raise RecipeError("this recipe trains its tokenizer: predict from the run folder it made instead")
        tok = train_tokenizer(recipe, task, train)
    elif recipe.model.name_or_path:
        tok = load_tokenizer(recipe.model.name_or_path, recipe, "model.name_or_path")
    elif recipe.model.encoder:
        tok = load_tokenizer(recipe.model.encoder, recipe, "model.encoder")
    else:
        raise RecipeError("no tokenizer: set tokenizer.name_or_path, tokenizer.train.type, or model.name_or_path")
    return tok


def train_tokenizer(recipe: Recipe, task: Task, train: Any) -> Any:
    """Train a fast tokenizer on the training split (cached by corpus fingerprint and settings)."""
    from transformers import PreTrainedTokenizerFast

    spec = recipe.tokenizer.train
    specials = _specials(spec.type, task)
    streamed = data.is_stream(train)  # a stream (data.streaming) is never read whole for this
    limit = spec.max_texts or (STREAMED_TEXTS if streamed else None)
    key = json.dumps(
        {
            "spec": {**vars(spec), "max_texts": limit},
            "specials": specials,
            "task": task.name,
            "corpus": data.identity(recipe) if streamed else train._fingerprint,
            "columns": recipe.data.columns,
            "max_length": recipe.data.max_length,
            "v": 1,
        },
        sort_keys=True,
    )
    folder = cache_dir() / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (folder / "tokenizer.json").exists():
        log.info("Using the cached tokenizer trained on this corpus: %s", folder)
        return PreTrainedTokenizerFast.from_pretrained(str(folder))

    texts = task.corpus(recipe, train)
    if limit is not None:
        import itertools

        if streamed and spec.max_texts is None:
            log.info("Training the tokenizer on the stream's first %s texts (tokenizer.train.max_texts)", f"{limit:,}")
        texts = itertools.islice(texts, limit)
    backend = _train_backend(spec, specials, texts)
    if backend.get_vocab_size() <= len(set(specials.values())):
        raise DataError("the training corpus is empty: no text to train a tokenizer on")
    token_kwargs = {f"{role}_token": tok for role, tok in specials.items()}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=recipe.data.max_length, **token_kwargs
    )
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    tokenizer.save_pretrained(str(tmp))
    try:
        tmp.replace(folder)  # atomic: a reader never sees a half-written tokenizer
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process saved the same tokenizer first
    return tokenizer


def _train_backend(spec: Any, specials: dict[str, str], texts: Any) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    special_list = list(dict.fromkeys(specials.values()))
    if spec.type == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=specials["unk"]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=spec.lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=spec.vocab_size, min_frequency=spec.min_frequency, special_tokens=special_list
        )
    elif spec.type == "bpe":
        tok = Tokenizer(models.BPE())
        if spec.lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=spec.vocab_size,
            min_frequency=spec.min_frequency,
            special_tokens=special_list,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:  # unigram
        tok = Tokenizer(models.Unigram())
        norms = [normalizers.NFKC()] + ([normalizers.Lowercase()] if spec.lowercase else [])
        tok.normalizer = normalizers.Sequence(norms)
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=spec.vocab_size, special_tokens=special_list, unk_token=specials["unk"]
        )
    tok.train_from_iterator(texts, trainer=trainer)
    if "cls" in specials:
        cls, sep = specials["cls"], specials["sep"]
        pair = f"{cls} $A {sep} $B:1 {sep}:1" if spec.type == "wordpiece" else f"{cls} $A {sep} {sep} $B:1 {sep}:1"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=pair,
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
        )
    return tok
