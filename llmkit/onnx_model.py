"""An exported ONNX model behind the interface llmkit's predict and evaluate call.

`OnnxModel` makes an `llmkit export --format onnx` folder look like the Hugging Face model it came from:
called with tensors it returns `.logits` (and `.loss` given labels, computed as the model's head computes
it), so a task's predict and the Trainer's evaluation loop run it unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.onnxrt import EXPORT_FILE, MODEL_FILE, session


class OnnxModel(torch.nn.Module):
    """An onnxruntime session that answers like the transformers model it was exported from."""

    main_input_name = "input_ids"
    is_exported_graph = True  # llmkit installs no task hooks on it (engine.evaluate)
    accepts_loss_kwargs = False  # its loss is a mean, like the heads it stands for

    def __init__(self, folder: Path, config: Any) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.config = config
        self.session = session(self.folder / MODEL_FILE)
        self.input_names = [i.name for i in self.session.get_inputs()]
        # No weights to move: an empty buffer gives the Trainer a device to put the model on.
        self.register_buffer("anchor", torch.zeros(0), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        defaults = {"attention_mask": torch.ones_like, "token_type_ids": torch.zeros_like}
        feed = {}
        for name in self.input_names:
            value = given.get(name)
            if value is None:
                value = defaults[name](input_ids)
            feed[name] = value.detach().cpu().to(torch.int64).numpy()
        logits = torch.from_numpy(self.session.run(["logits"], feed)[0]).to(input_ids.device)
        loss = None if labels is None else head_loss(self.config, logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def head_loss(config: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss the exported head computes in PyTorch: BCE for multi-label, else cross-entropy ignoring -100."""
    problem = getattr(config, "problem_type", None)
    if problem == "multi_label_classification":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.to(logits.dtype))
    if problem == "regression" or (problem is None and getattr(config, "num_labels", 2) == 1):
        return torch.nn.functional.mse_loss(logits.float().squeeze(), labels.float().squeeze())
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), labels.flatten().long(), ignore_index=-100)


def load(folder: Path) -> OnnxModel:
    """The exported model in `folder`, with its config (labels, problem type)."""
    from transformers import AutoConfig

    folder = Path(folder)
    try:
        facts = json.loads((folder / EXPORT_FILE).read_text())
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise LlmkitError(f"{folder} is a damaged ONNX export ({type(e).__name__}: {e}); export it again") from None
    if facts.get("format") != "onnx":
        raise LlmkitError(f"{folder / EXPORT_FILE} does not describe an ONNX export; export it again")
    return OnnxModel(folder, config)
