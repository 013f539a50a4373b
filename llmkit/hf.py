"""The Hugging Face objects a recipe describes (TrainingArguments, LoraConfig, GenerationConfig), built and
checked key by key so a bad key fails in the first seconds; and the hardware probes they depend on."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit import gpu
from llmkit.errors import RecipeError, first_line, show, suggest
from llmkit.recipe import check_value

if TYPE_CHECKING:
    from llmkit.recipe import Recipe

log = logging.getLogger("llmkit")

# llmkit's defaults under the recipe's trainer section (the recipe wins).
TRAINER_DEFAULTS = {"report_to": ["tensorboard"]}


def _has_accelerator() -> bool:
    import torch
    from transformers.utils import is_torch_xla_available

    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available() or xpu or is_torch_xla_available()


def fast_bf16_available() -> bool:
    """True where bfloat16 autocast runs fast: CUDA GPUs with bf16, CPUs with AMX or AVX512-BF16."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].splitlines()[0].split()
    except (OSError, IndexError):
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def check_hf_kwargs(cls: type, kwargs: dict, path: str) -> None:
    """Reject unknown keys and plainly wrong scalar types for a Hugging Face dataclass, by recipe path."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - forward refs we cannot evaluate: skip type checks
        hints = {}
    basic = (str, int, float, bool, type(None))

    def checkable(m: Any) -> bool:  # types check_type knows; enums, tuples and classes are left to the constructor
        origin = typing.get_origin(m)
        if origin is list:
            return all(a in basic for a in typing.get_args(m))
        return m in basic or m in (dict, list) or origin is dict

    for key, value in kwargs.items():
        if key not in fields:
            shown = show(f"{path}.{key}")
            raise RecipeError(f"unknown key {shown}{suggest(str(key), fields)} (not a {cls.__name__} field)")
        tp = hints.get(key)
        if isinstance(value, bool) and isinstance(fields[key].metadata.get("const"), bool):
            continue  # a flag typed str for its legacy string form, e.g. fsdp: true
        members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if tp is not None and all(checkable(m) for m in members):
            check_value(value, tp, f"{path}.{key}")


def hf_error(path: str, e: Exception) -> RecipeError:
    """One line for a Hugging Face constructor that rejected the recipe's section at `path`."""
    if isinstance(e, OSError) and e.filename is not None:  # e.g. trainer.deepspeed / accelerator_config: a file
        return RecipeError(
            f"{path}: cannot read {e.filename!r} ({e.strerror or first_line(e)}); "
            "a string there names a config file: fix the path, or write the settings as a mapping"
        )
    if isinstance(e, (ValueError, TypeError, ImportError)):
        return RecipeError(f"{path}: {first_line(e)}")
    return RecipeError(f"{path}: a value has the wrong shape ({type(e).__name__}: {first_line(e)}); check {path}")


def construct(cls: type, kwargs: dict, path: str) -> Any:
    check_hf_kwargs(cls, kwargs, path)
    try:
        return cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - the constructor validates user values and fails in many types
        raise hf_error(path, e) from None


def check_quantization(settings: dict) -> None:
    """4-bit/8-bit loading (QLoRA) runs only on CUDA with bitsandbytes: say so before any work."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise RecipeError(
            "model.quantization (4-bit/8-bit, QLoRA) needs a CUDA GPU; this machine has none. "
            "Remove model.quantization to train LoRA in full precision"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError("model.quantization (QLoRA) needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    construct(BitsAndBytesConfig, settings, "model.quantization")


def hub_kwargs(model: Any) -> dict:
    """The kwargs every from_pretrained of the recipe's model, config, tokenizer, encoder/decoder or adapter
    base takes: the pinned Hub commit (model.revision; ignored for local folders) and trust_remote_code."""
    return {"revision": model.revision, "trust_remote_code": model.trust_remote_code}


def global_batch_size(args: Any) -> int:
    """Samples per optimizer step over all processes."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def trainer_settings(recipe: Recipe, task_defaults: dict) -> dict:
    """The recipe's trainer section under llmkit's and the task's defaults (the recipe wins); bf16 where fast."""
    trainer = {**TRAINER_DEFAULTS, **task_defaults, **recipe.trainer}
    if "bf16" not in trainer and "fp16" not in trainer:
        trainer["bf16"] = fast_bf16_available()
    return trainer


def runtime_settings(trainer: dict) -> dict:
    """TrainingArguments that depend on where and how this process runs, not on the experiment.

    They go to TrainingArguments but not into the recipe, so a run can resume from a pipe, a
    terminal or torchrun.
    """
    runtime = {}
    if "use_cpu" not in trainer and not _has_accelerator():
        # On a CPU-only machine say so: under torchrun Accelerate sets up gloo DDP only when told it is
        # on CPU (otherwise every process trains alone), and bf16 autocast on CPU needs it too.
        runtime["use_cpu"] = True
    if "disable_tqdm" not in trainer:
        # A live progress bar on a terminal; one plain line per log step in pipes and CI logs.
        runtime["disable_tqdm"] = os.environ.get("LLMKIT_VERBOSITY") == "quiet" or not sys.stderr.isatty()
    # Pinned memory, dataloader workers, TF32: on a CUDA GPU only (llmkit/gpu.py)
    return {**runtime, **gpu.runtime_levers(trainer)}


def restarted_worker_note() -> str | None:
    """What to know when torchrun has restarted this worker (--max-restarts), or None on a first start.

    The run resumes by itself (same command, same folder: the newest complete checkpoint). But with the
    rendezvous store shared between torchrun and the workers (the default), the restarted workers can read
    the previous attempt's addresses while joining their process group and hang or fail to connect
    (pytorch/pytorch#135712; measured here: 2 of 3 restarts under --standalone hung);
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on the launcher gives every attempt a fresh store.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0:
        return None
    note = f"torchrun restarted this worker (restart {attempt} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')})"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        note += (
            "; if it hangs before the first step, launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "(the shared rendezvous store still holds the previous attempt's addresses)"
        )
    return note


def training_arguments(cls: type, trainer: dict) -> Any:
    """`cls` (TrainingArguments or Seq2SeqTrainingArguments) from the trainer settings plus the runtime ones."""
    note = restarted_worker_note()
    if note and os.environ.get("LOCAL_RANK", "0") == "0":
        log.warning(note)  # before the process group is joined: where a restart can hang
    args = construct(cls, {**trainer, **runtime_settings(trainer)}, "trainer")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no" and not (trainer.get("bf16") or trainer.get("fp16")):
        # transformers takes accelerate launch's --mixed_precision when the recipe sets neither flag true.
        log.warning("accelerate launch's mixed_precision %s applies: the recipe's trainer.bf16/fp16 are off", launcher)
    return args


def lora_config(peft_section: dict, task_type: str) -> Any:
    """peft.LoraConfig from the recipe's peft section; task_type defaults to the task's."""
    import peft

    return construct(peft.LoraConfig, {"task_type": task_type, **peft_section}, "peft")


def check_generation(settings: dict) -> None:
    """Every generation: key is a GenerationConfig field and the values pass its strict validation."""
    from transformers import GenerationConfig

    gen = GenerationConfig()
    unknown = [k for k in settings if not isinstance(k, str) or not hasattr(gen, k)]
    if unknown:
        raise RecipeError(f"unknown key {show(f'generation.{unknown[0]}')}{suggest(str(unknown[0]), vars(gen))}")
    try:
        GenerationConfig(**settings).validate(strict=True)
    except Exception as e:  # noqa: BLE001 - as in construct
        raise hf_error("generation", e) from None


def warn_remote_code(model: Any) -> None:
    """model.trust_remote_code runs the model repository's Python: say so, every run."""
    log.warning(
        "model.trust_remote_code is on: Python code from %s will run on this machine; "
        "keep it on only for a repository you trust (pin model.revision to the commit you reviewed)",
        " and ".join(repr(x) for x in (model.name_or_path, model.encoder, model.decoder) if x) or "the model",
    )


# --------------------------------------------------------------------------- the Hub, reachable or not

_LOCAL_BUILDERS = ("json", "csv", "text", "parquet", "arrow", "pandas", "sql", "xml", "webdataset", "imagefolder")
RESOLVE_TIMEOUT = 3.0  # seconds to look the Hub's host name up before working offline


def hub_names(recipe: Recipe) -> list[str]:
    """The names in a recipe that only the Hugging Face Hub can resolve (not local folders or files)."""
    m, load = recipe.model, recipe.data.load or {}
    names = [m.name_or_path, m.encoder, m.decoder, recipe.tokenizer.name_or_path]
    if load.get("path") not in _LOCAL_BUILDERS:
        names.append(load.get("path"))
    return [n for n in names if isinstance(n, str) and n.strip() and not Path(n).exists()]


def hub_host_resolves(timeout: float = RESOLVE_TIMEOUT) -> bool:
    """True when the Hub's host name (HF_ENDPOINT's, else huggingface.co) resolves within `timeout` seconds."""
    import socket
    import threading
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    answer: list[bool] = []

    def look_up() -> None:
        try:
            socket.getaddrinfo(host, 443)
            answer.append(True)
        except (OSError, UnicodeError):
            answer.append(False)

    thread = threading.Thread(target=look_up, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def offline_unless_hub_resolves(recipe: Recipe) -> None:
    """Without a network the Hub libraries retry each download for half a minute: when the recipe needs the
    Hub and its host name does not resolve, work offline at once (models and datasets from the local cache,
    and a one-line error in seconds for what is not there). Transient errors keep their retries."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if offline or not hub_names(recipe) or hub_host_resolves():
        return
    log.warning("the Hugging Face Hub does not resolve (no network?): working offline, from the local cache")
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    switches = [("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")]
    for module, name in [*switches, ("datasets.config", "HF_DATASETS_OFFLINE")]:
        if module in sys.modules:  # read at import time: already imported by a Python caller
            setattr(sys.modules[module], name, True)
