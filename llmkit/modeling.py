"""The model of a recipe: pretrained, built from a config, or an encoder-decoder; LoRA adapters on it."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit import gpu, onnxrt
from llmkit.errors import RecipeError, first_line, offline_hint, show, suggest
from llmkit.hf import hub_kwargs

if TYPE_CHECKING:
    from llmkit.recipe import Recipe
    from llmkit.tasks.base import Task

log = logging.getLogger("llmkit")

# --------------------------------------------------------------------------- model


def _auto_class(task: Task) -> Any:
    import transformers

    return getattr(transformers, task.auto_model)


def _pretrained_config(m: Any) -> Any:
    """AutoConfig of model.name_or_path (a Hub id or a folder), with one-line errors."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(m.name_or_path, **hub_kwargs(m))
    except (OSError, ValueError) as e:
        raise RecipeError(
            f"cannot load model {m.name_or_path!r}: {first_line(e)}{offline_hint()}; "
            "set model.name_or_path=PATH to a local model folder"
        ) from None


def _check_config_keys(keys: Any, config: Any) -> None:
    """Every model.config key is a field of `config` (a misspelt key would change nothing, silently)."""
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    for key in keys:
        if key not in known:
            raise RecipeError(
                f"unknown key {show(f'model.config.{key}')}{suggest(str(key), known)} "
                f"(not a {type(config).__name__} field)"
            )


def _model_type(m: Any) -> str:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not m.config:
        raise RecipeError("model: set model.name_or_path (a checkpoint) or model.config (to train from scratch)")
    model_type = m.config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        hint = suggest(str(model_type), list(CONFIG_MAPPING.keys())) if model_type else ""
        raise RecipeError(
            f"model.config.model_type: unknown model type {model_type!r}{hint} "
            "(any AutoConfig model_type: bert, roberta, gpt2, llama, t5, ...)"
        )
    return model_type


def check_model_config(m: Any) -> None:
    """Check model.config against the model's config class before any data is read.

    From scratch: the model_type and every key. On a pretrained model: every key against the
    checkpoint's config, when it can be read now (a Hub model offline is reported when it is built).
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if m.encoder or m.from_teacher is not None:  # built from other models, checked when they are loaded
        return
    if not m.name_or_path:
        model_type = _model_type(m)
        _check_config_keys([k for k in m.config if k != "model_type"], CONFIG_MAPPING[model_type]())
    elif m.config:
        try:
            config = _pretrained_config(m)
        except RecipeError:
            return
        _check_config_keys(m.config, config)


def build_config(recipe: Recipe, task: Task, tokenizer: Any, extra: dict) -> Any:
    """The model config: the pretrained checkpoint's (model.config keys set on it) or built from model.config."""
    m = recipe.model
    if m.name_or_path:
        config = _pretrained_config(m)
        _check_config_keys(m.config or {}, config)
        for key, value in (m.config or {}).items():
            setattr(config, key, value)
    else:
        check_model_config(m)
        config = _config_from_scratch(recipe, task, tokenizer)
    for key, value in extra.items():
        setattr(config, key, value)
    return config


def _config_from_scratch(recipe: Recipe, task: Task, tokenizer: Any) -> Any:
    """AutoConfig.for_model(**model.config), its vocabulary and special ids from the tokenizer."""
    from transformers import AutoConfig

    cfg = dict(recipe.model.config)
    model_type = cfg.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"model.config: {first_line(e)}") from None
    # The vocabulary and special ids come from the tokenizer; positions must cover a block.
    config.vocab_size = len(tokenizer)
    for role in ("pad", "bos", "eos", "sep", "cls"):
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is not None and hasattr(config, f"{role}_token_id"):
            setattr(config, f"{role}_token_id", tid)
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    if task.seq2seq and getattr(config, "decoder_start_token_id", None) is None:
        # T5-style: the decoder starts from the pad token.
        config.decoder_start_token_id = tokenizer.pad_token_id
    for attr in ("max_position_embeddings", "n_positions"):
        if hasattr(config, attr) and attr not in cfg and getattr(config, attr) < recipe.data.max_length:
            setattr(config, attr, recipe.data.max_length)
    return config


def build_model(recipe: Recipe, task: Task, tokenizer: Any, extra: dict | None = None, meta: bool = False) -> Any:
    """Load the pretrained model (new heads start random) or build it from the config.

    With meta=True the model lives on the meta device: no memory, for counting parameters. A task's
    own build_model hook gets llmkit's builder as `default` and may call it, change its result or
    replace it.
    """

    def default(recipe: Recipe = recipe, tokenizer: Any = tokenizer, extra: dict | None = extra) -> Any:
        return _build_model(recipe, task, tokenizer, extra, meta)

    model = default() if task.build_model is None else task.build_model(recipe, tokenizer, dict(extra or {}), default)
    declare_loss_kwargs(model.get_base_model() if hasattr(model, "get_base_model") else model)
    return model


def _build_model(recipe: Recipe, task: Task, tokenizer: Any, extra: dict | None, meta: bool) -> Any:
    import torch

    m = recipe.model
    if m.from_teacher is not None:  # only training cuts a student (engine): evaluate or predict its run folder
        raise RecipeError(
            "model.from_teacher builds a student for training only; evaluate or predict the run folder it trained"
        )
    if onnxrt.is_onnx_folder(m.name_or_path):  # `llmkit export --format onnx`: run by onnxruntime
        from llmkit import onnx_model

        return onnx_model.load(Path(m.name_or_path))
    if m.encoder:
        return _encoder_decoder(recipe, tokenizer, meta)
    auto = _auto_class(task)
    if m.name_or_path and (Path(m.name_or_path) / "adapter_config.json").exists():
        if meta:
            with torch.device("meta"):
                return auto.from_config(_adapter_base_config(Path(m.name_or_path)))
        return load_adapter_run(Path(m.name_or_path), auto, tokenizer, m)
    config = build_config(recipe, task, tokenizer, extra or {})
    if meta:
        with torch.device("meta"):
            return _from_config(auto, config, m, recipe.trainer)
    if m.name_or_path:
        try:
            # A new head (its labels differ from the checkpoint's) starts random instead of failing.
            quant = {}
            if m.quantization:
                from transformers import BitsAndBytesConfig

                quant["quantization_config"] = BitsAndBytesConfig(**m.quantization)
            model = _with_attention(
                lambda attention: auto.from_pretrained(
                    m.name_or_path,
                    config=config,
                    **hub_kwargs(m),
                    ignore_mismatched_sizes="num_labels" in (extra or {}),
                    **quant,
                    **attention,
                ),
                m,
                recipe.trainer,
            )
        except (OSError, ValueError) as e:
            first = first_line(e)
            raise RecipeError(f"cannot load model {m.name_or_path!r}: {first}{offline_hint()}") from None
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = _from_config(auto, config, m, recipe.trainer)
    if task.seq2seq:
        configure_generation(model, recipe, tokenizer)
    return model


def _from_config(auto: Any, config: Any, m: Any, trainer: dict) -> Any:
    """auto.from_config with the recipe's attention implementation; a value transformers rejects is a recipe error."""
    try:
        return _with_attention(lambda attention: auto.from_config(config, **attention), m, trainer)
    except ValueError as e:
        raise RecipeError(f"model: {first_line(e)}") from None


def forward_source(cls: type) -> str | None:
    """The source code of `cls.forward`, or None where Python cannot show it (compiled, built at runtime)."""
    import inspect

    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None


def declare_loss_kwargs(model: Any) -> None:
    """Tell the Trainer whether the model's loss uses `num_items_in_batch` (`accepts_loss_kwargs`).

    The Trainer guesses yes for any forward taking **kwargs and, with several processes, then
    multiplies the loss by the world size, expecting a loss summed over tokens and divided by the
    global count. Models that compute their own mean loss (BERT's heads: CrossEntropyLoss) ignore
    that count, so their loss, its gradients and the logged values came out world-size times too big.
    """
    if hasattr(model, "accepts_loss_kwargs"):
        return
    source = forward_source(type(model))
    if source is None:
        return
    # The count reaches the loss only through a `loss_function(..., **kwargs)` call; heads that call it
    # without kwargs (the generic Llama/Qwen classifiers) or use their own CrossEntropyLoss take the mean.
    model.accepts_loss_kwargs = re.search(r"loss_function\((?:[^()]|\([^()]*\))*\*\*kwargs", source) is not None


def _with_attention(load: Any, m: Any, trainer: dict) -> Any:
    """load(attention kwargs): model.attn_implementation (eager beats SDPA at short lengths on CPU); unset,
    flash attention 2 on a CUDA run where flash-attn is installed, and transformers' choice for a model
    that has none (or no flash attention)."""
    if not m.attn_implementation and (flash := gpu.flash_attention(trainer)):
        try:
            return load({"attn_implementation": flash})
        except (ValueError, ImportError) as e:
            log.info("flash attention 2 not used (%s): transformers' default attention", first_line(e))
    return load({"attn_implementation": m.attn_implementation} if m.attn_implementation else {})


def _encoder_decoder(recipe: Recipe, tokenizer: Any, meta: bool) -> Any:
    """An EncoderDecoderModel warm-started from two encoder checkpoints (e.g. bert2bert)."""
    import torch
    from transformers import AutoConfig, EncoderDecoderConfig, EncoderDecoderModel

    m = recipe.model
    decoder = m.decoder or m.encoder
    hub = hub_kwargs(m)
    try:
        if meta:
            config = EncoderDecoderConfig.from_encoder_decoder_configs(
                AutoConfig.from_pretrained(m.encoder, **hub), AutoConfig.from_pretrained(decoder, **hub)
            )
            with torch.device("meta"):
                return EncoderDecoderModel(config=config)
        parts = {f"{part}_{key}": value for part in ("encoder", "decoder") for key, value in hub.items()}
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(m.encoder, decoder, **parts)
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise RecipeError(
            f"cannot load model.encoder/decoder ({m.encoder}, {decoder}): {first}{offline_hint()}"
        ) from None
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.bos_token_id = start, start
        cfg.eos_token_id, cfg.pad_token_id = end, tokenizer.pad_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    configure_generation(model, recipe, tokenizer)
    return model


def configure_generation(model: Any, recipe: Recipe, tokenizer: Any) -> None:
    """Apply the recipe's `generation:` settings; bound the summary length by data.max_target_length."""
    gen = model.generation_config
    settings = dict(recipe.generation or {})
    if "max_new_tokens" not in settings and "max_length" not in settings:
        settings["max_new_tokens"] = recipe.data.max_target_length
    if "max_new_tokens" in settings:
        settings.setdefault("max_length", None)  # else the default max_length=20 competes with it
        if getattr(model.config, "is_encoder_decoder", False) and settings["max_new_tokens"] is not None:
            # The same bound as max_length (the decoder starts from one token). Seq2SeqTrainer fills the
            # default max_length=20 into the model's config after its first generate, and with both set
            # every later generate call warns; max_length alone has nothing to clash with.
            settings["max_length"] = settings.pop("max_new_tokens") + 1
            settings["max_new_tokens"] = None
    for key, value in settings.items():
        setattr(gen, key, value)
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if gen.decoder_start_token_id is None:
        gen.decoder_start_token_id = getattr(model.config, "decoder_start_token_id", None)


# --------------------------------------------------------------------------- LoRA

BASE_DIR = "base_model"  # in a LoRA run's output_dir: the base model's config (and weights if it had none elsewhere)


def apply_lora(model: Any, recipe: Recipe, out: Path | None) -> Any:
    """Wrap the model with LoRA adapters (recipe.lora); the task's new head stays fully trainable.

    Saves what reloading needs to out/base_model: the base config (labels), and the base weights
    when the base was built from a config rather than loaded from a checkpoint.
    """
    from peft import get_peft_model

    if out is not None:
        if recipe.model.name_or_path:
            model.config.save_pretrained(out / BASE_DIR)
        else:
            model.save_pretrained(out / BASE_DIR)
    try:
        return get_peft_model(model, recipe.lora)
    except (ValueError, TypeError) as e:
        first = first_line(e)
        raise RecipeError(f"peft: {first}; name the layers to adapt with peft.target_modules=[...]") from None


def base_dir(run: Path) -> Path:
    """A LoRA run's base_model folder; a checkpoint inside the run uses its run's."""
    return run / BASE_DIR if (run / BASE_DIR).is_dir() else run.parent / BASE_DIR


def _adapter_base_config(run: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base_dir(run))


def load_adapter_run(run: Path, auto: Any, tokenizer: Any, m: Any) -> Any:
    """Base model + the LoRA adapter saved in a run folder, as a PeftModel (the base config carries the labels).

    A base from the Hub is loaded at the recipe's model.revision, as the run trained it."""
    from peft import PeftModel

    folder = base_dir(run)
    base = (
        str(folder)
        if (folder / "model.safetensors").exists()
        else json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    config = _adapter_base_config(run)
    try:
        model = auto.from_pretrained(base, config=config, **hub_kwargs(m))
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise RecipeError(
            f"cannot load the base model {base!r} of the adapter in {run}: {first}{offline_hint()}"
        ) from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return PeftModel.from_pretrained(model, str(run))


def head_kwargs(task: Task, recipe: Recipe) -> dict:
    """The task's model-config kwargs; none for a labelled task whose labels are unknown (take the checkpoint's)."""
    if getattr(recipe.options, "labels", ()) is None:
        return {}
    return task.model_kwargs(recipe)


def has_unused_parameters(model: Any) -> bool:
    """Whether a trainable parameter gets no gradient in a training step, so that DDP must look for such
    parameters at every step (`ddp_find_unused_parameters`). llmkit's models use all of theirs except one: the
    pooler of a BERT-style encoder in an encoder-decoder model (bert2bert), whose decoder reads hidden states."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base.config, "is_encoder_decoder", False):
        return False
    pooler = getattr(getattr(base, "encoder", None), "pooler", None)
    return pooler is not None and any(p.requires_grad for p in pooler.parameters())


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def describe_model(recipe: Recipe) -> str:
    m = recipe.model
    if m.name_or_path:
        return m.name_or_path
    if m.from_teacher is not None:
        return f"layers {m.from_teacher.layers} of {recipe.distill.teacher}"
    if m.encoder:
        return f"{m.encoder} -> {m.decoder or m.encoder}"
    return f"{(m.config or {}).get('model_type', '?')} (from config)"
