"""What a CUDA GPU turns on that a CPU must not: each lever decided here from the device and the recipe, off
on a CPU, and a recipe's own setting always wins (a key it names is never touched).

- fused AdamW: transformers 5's default optimizer (`adamw_torch_fused`) on every device (on this project's
  CPUs too: 14.5 vs 83 ms a step for MiniLM's 22.7M parameters), so nothing to do here.
- TF32 matmuls (`tf32`) on compute capability 8.0 and newer (Ampere, Hopper): the fp32 matmuls outside bf16
  autocast (the loss head, the optimizer's norms) run on tensor cores.
- pinned host memory, `dataloader_num_workers` (2, persistent): batches collated and copied off the training
  thread. On a CPU pinned memory only warns, and workers compete with the training for the same cores.
- flash attention 2 where the `flash-attn` package is installed and the model supports it (else transformers'
  default, SDPA).
- liger-kernel's fused linear cross-entropy for causal LMs of the model types it covers (llama, mistral,
  qwen2, gemma, ...: not GPT-2), when installed (`pip install 'llmkit[gpu]'`): the vocabulary logits are
  never materialised whole. Off when a teacher needs the student's logits.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

log = logging.getLogger("llmkit")

WORKERS = 2


def cuda_capability(trainer: dict) -> tuple[int, int] | None:
    """The CUDA device's compute capability when this run trains on one (not `use_cpu`), else None."""
    import torch

    if trainer.get("use_cpu") or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def runtime_levers(trainer: dict) -> dict:
    """TrainingArguments for the device this process trains on (none named by the recipe's trainer section)."""
    capability = cuda_capability(trainer)
    levers: dict[str, Any] = {"dataloader_pin_memory": capability is not None}
    if capability is not None:
        levers["tf32"] = capability >= (8, 0)
        if "dataloader_num_workers" not in trainer:
            levers["dataloader_num_workers"] = WORKERS
            levers["dataloader_persistent_workers"] = True
    return {key: value for key, value in levers.items() if key not in trainer}


def flash_attention(trainer: dict) -> str | None:
    """'flash_attention_2' where it can run (a CUDA run, flash-attn installed), else None: transformers' choice."""
    if cuda_capability(trainer) is None or not installed("flash_attn"):
        return None
    return "flash_attention_2"


def use_liger(recipe: Any, task: Any, model: Any) -> bool:
    """Whether the Trainer should apply liger-kernel to this model (its `use_liger_kernel`), said in one line."""
    # a causal LM whose model computes its own loss (liger fuses it into the forward); a task's own loss reads logits
    causal_lm = task.causal and task.compute_loss is None
    if "use_liger_kernel" in recipe.trainer or not causal_lm or cuda_capability(recipe.trainer) is None:
        return False
    if not installed("liger_kernel"):
        return False
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log.info("liger-kernel has no kernels for model type %s: training with transformers' own", model_type)
        return False
    if recipe.distill is not None and recipe.distill.alpha > 0:
        log.info("liger-kernel's fused cross-entropy is off: distillation reads the student's logits")
        return False
    log.info("liger-kernel: fused linear cross-entropy and kernels for %s", model_type)
    return True
