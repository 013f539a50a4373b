"""ONNX export (`llmkit export --format onnx`): the graph, dynamic int8 quantization, and the parity check.

The model is traced by `torch.onnx.export` (the dynamo exporter; optimum's exporter pins an older
transformers) with dynamic batch and sequence axes and one output, `logits`. The export then runs the same
rows through PyTorch and onnxruntime and records the largest logit difference in `export.json`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmkit import onnxrt
from llmkit.errors import LlmkitError, first_line

OPSET = 18
PARITY_ROWS = 256
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def check_extra() -> None:
    """One line naming the extra when an ONNX export's libraries are missing."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise LlmkitError(f"ONNX export needs {name}, which is not installed; {onnxrt.EXTRA}") from None


class _Logits(torch.nn.Module):
    """The model with tensor inputs and its logits as the one output (what the ONNX graph computes)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        return self.model(**kw).logits


def input_names(model: Any, tokenizer: Any) -> list[str]:
    """The inputs the graph takes: ids and mask, and token types where both tokenizer and model use them."""
    import inspect

    takes = inspect.signature(model.forward).parameters
    uses_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ()) and "token_type_ids" in takes
    return [n for n in INPUTS if n != "token_type_ids" or uses_types]


def _example(model: Any, names: list[str]) -> dict:
    """Two rows of 16 tokens, one padded: shapes the exporter must keep dynamic."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (2, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    tensors = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {n: tensors[n] for n in names}


@contextlib.contextmanager
def _quiet_exporter() -> Any:
    """The exporter logs optional torchvision ops and its progress; keep stderr for llmkit's own lines."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def write_onnx(model: Any, names: list[str], path: Path) -> None:
    """Trace `model` (fp32, eval) into `path`: dynamic batch and sequence axes, output `logits`."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size >= 2**31:  # one protobuf file holds at most 2 GB; external weight files are not written here
        raise LlmkitError(
            f"the model's weights take {size / 2**30:.1f} GB, over ONNX's 2 GB for one file; export it as PyTorch"
        )
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    example = _example(model, names)
    with _quiet_exporter(), torch.no_grad():
        try:
            torch.onnx.export(
                _Logits(model),
                (),
                str(path),
                kwargs=example,
                input_names=names,
                output_names=["logits"],
                dynamic_shapes={n: {0: batch, 1: seq} for n in names},
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        except Exception as e:  # the exporter's errors name the unsupported op; say which model it was
            raise LlmkitError(
                f"torch.onnx.export cannot trace {type(model).__name__} ({first_line(e)}); export it as PyTorch instead"
            ) from None


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime's dynamic int8 quantization: int8 weights, activations quantized per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # its hint to pre-process the graph, logged on the root logger
    try:
        # Per-channel weight scales keep SST-2 within a point of fp32 (per-tensor: -1.4 points); reduce_range
        # (7-bit weights) avoids the int16 saturation of u8s8 products on CPUs without VNNI, at no cost here.
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    finally:
        root.setLevel(level)


def onnx_logits(sess: Any) -> Callable[[dict], torch.Tensor]:
    """The logits of an onnxruntime session on a batch of tensors (the inputs the graph takes)."""
    names = [i.name for i in sess.get_inputs()]
    return lambda batch: torch.from_numpy(sess.run(["logits"], {n: batch[n].numpy() for n in names})[0])


def parity(model: Any, candidate: Callable[[dict], torch.Tensor], batches: list[dict]) -> dict:
    """The largest |logit| difference between the PyTorch model and its conversion on the same batches (real
    tokens only: no padding, no unlabelled target positions), and how often they predict the same: the same
    class (argmax), or for a multi-label head the same yes/no per label."""
    multi = getattr(model.config, "problem_type", None) == "multi_label_classification"
    worst, same, total = 0.0, 0, 0
    for batch in batches:
        with torch.no_grad():
            ref = model(**batch).logits.float()
            out = candidate(batch).float()
        if out.dim() == 3:
            keep = batch["labels"] != -100 if "labels" in batch else batch["attention_mask"].bool()
        else:
            keep = torch.ones(out.shape[0], dtype=torch.bool)
        if not keep.any():
            continue
        worst = max(worst, float((out - ref).abs()[keep].max()))
        agree = ((out > 0) == (ref > 0)).float().mean(-1) if multi else (out.argmax(-1) == ref.argmax(-1)).float()
        same += float(agree[keep].sum())
        total += int(keep.sum())
    return {"max_abs_diff": worst, "argmax_agreement": round(same / max(total, 1), 6)}


def parity_batches(recipe: Any, task: Any, tokenizer: Any, model: Any, names: list[str]) -> tuple[list[dict], str]:
    """Up to 256 rows of the recipe's validation split, collated in batches of 8, and where they came from.

    A seq2seq model's batches keep their labels (its decoder reads them, shifted). Without readable validation
    data (moved, or a Hub dataset offline) the rows are random token ids.
    """
    names = [*names, "labels"] if task.seq2seq else names
    from llmkit.engine import prepare_data

    try:
        _, _, tokenized = prepare_data(recipe, task, recipe.args, only="validation")
        rows = tokenized["validation"].select(range(min(PARITY_ROWS, len(tokenized["validation"]))))
        source = f"{len(rows)} validation rows"
    except LlmkitError as e:
        rows, source = None, f"{PARITY_ROWS} rows of random tokens (no validation data: {e})"
    batches = []
    if rows is not None:
        collate = task.collator(recipe, tokenizer, model)
        keep = [c for c in rows.column_names if c in names or c == "labels"]
        rows = rows.select_columns(keep)
        for start in range(0, len(rows), 8):
            batch = collate([rows[i] for i in range(start, min(start + 8, len(rows)))])
            ids = batch["input_ids"]  # packed blocks (mlm) carry no mask: nothing in them is padding
            given = {"attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids), **batch}
            batches.append({n: given[n] for n in names})
    else:
        gen = torch.Generator().manual_seed(0)
        for _ in range(PARITY_ROWS // 8):
            ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (8, 64), generator=gen)
            tensors = {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "token_type_ids": torch.zeros_like(ids),
            }
            batches.append({n: tensors[n] for n in names})
    return batches, source
