"""Exported ONNX folders: what marks them, and onnxruntime sessions on them (llmkit/onnx_model.py runs them).

`llmkit export RUN OUT --format onnx` writes `model.onnx` (inputs: the tokenizer's ids, mask and token
types with dynamic batch and sequence axes; output: `logits`) beside `config.json`, the tokenizer and
`export.json`. Nothing here imports torch or onnxruntime until a session is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError, first_line

MODEL_FILE = "model.onnx"
EXPORT_FILE = "export.json"
EXTRA = "pip install 'llmkit[export]'"


def _export_facts(path: str | Path) -> dict:
    """The export.json that `llmkit export` writes beside a converted model; {} where there is none (or it is bad)."""
    import json

    try:
        facts = json.loads((Path(path) / EXPORT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return facts if isinstance(facts, dict) else {}


def is_onnx_folder(path: str | Path | None) -> bool:
    """Whether `path` is a folder written by `llmkit export --format onnx` (its export.json says so: a Hub
    snapshot that ships a model.onnx beside its weights stays a transformers folder)."""
    return path is not None and (Path(path) / MODEL_FILE).is_file() and _export_facts(path).get("format") == "onnx"


def refuse_training(path: str | Path | None, role: str) -> None:
    """A converted export (ONNX, or torchao's PyTorch int8) runs inference only: one line when a run would train from
    it or distil with it. A Hub checkpoint quantized for QLoRA has no export.json and trains as before."""
    if path is None:
        return
    facts = _export_facts(path)
    kind = "an ONNX export" if is_onnx_folder(path) else "an int8 export" if facts.get("precision") == "int8" else None
    if kind:
        raise LlmkitError(
            f"{role} {path} is {kind}, which only predicts and evaluates; use the run it was exported from"
        )


def import_runtime() -> Any:
    """onnxruntime, or one line naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise LlmkitError(f"ONNX models need onnxruntime, which is not installed; {EXTRA}") from None
    return onnxruntime


def session(path: Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session on `path`; a damaged file is one line naming it."""
    ort = import_runtime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: no per-node warnings on stderr
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types for damaged files
        raise LlmkitError(f"{path} is not a loadable ONNX model ({first_line(e)}); export it again") from None
