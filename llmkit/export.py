"""`llmkit export`: a clean, standalone copy of a run's model (or its LoRA adapter, or both merged), or a
converted one: ONNX (fp32 or dynamic int8, llmkit/onnx_export.py) or PyTorch int8 (torchao)."""

from __future__ import annotations

import shutil
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from llmkit import __version__, modeling, onnxrt
from llmkit.errors import LlmkitError
from llmkit.files import write_json
from llmkit.rundir import MODEL_FILES, check_replaceable, recipe_for_evaluation
from llmkit.tasks import get_task
from llmkit.tokenizer import get_tokenizer

FORMATS = ("pytorch", "onnx")
PRECISIONS = ("int8",)


def check_choices(fmt: str, quantize: str | None, merge: bool) -> None:
    """One line for an unknown format or precision, before anything is loaded."""
    if fmt not in FORMATS:
        raise LlmkitError(f"unknown export format {fmt!r}; use --format {' or --format '.join(FORMATS)}")
    if quantize is not None and quantize not in PRECISIONS:
        raise LlmkitError(f"unknown precision {quantize!r} for --quantize; use --quantize int8 (or leave it out: fp32)")
    if merge and (fmt != "pytorch" or quantize):
        raise LlmkitError("--merge is for plain PyTorch copies; ONNX and int8 exports merge a LoRA adapter themselves")


def export(
    run_dir: Path,
    out_dir: Path,
    merge: bool = False,
    overwrite: bool = False,
    fmt: str = "pytorch",
    quantize: str | None = None,
) -> str:
    """Write a standalone copy of a run's model: the adapter as is, base + adapter merged, or converted
    (ONNX, int8). Returns what was written: "model", "adapter", "merged", or "onnx fp32"-style labels.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_choices(fmt, quantize, merge)
    recipe = recipe_for_evaluation(run_dir, [])
    is_adapter = (run_dir / "adapter_config.json").exists()
    if merge and not is_adapter:
        raise LlmkitError(f"{run_dir} holds a full model, not a LoRA adapter: nothing to merge; drop --merge")
    _check_apart(run_dir, out_dir)
    if not overwrite and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LlmkitError(f"{out_dir} exists and is not empty; pass --overwrite or choose another folder")
    check_replaceable(out_dir, "choose another folder to export to")
    task = get_task(recipe.task)
    converted = fmt == "onnx" or quantize is not None
    if converted:
        _check_convertible(task, fmt, run_dir)
    tokenizer = get_tokenizer(recipe, task, None)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if converted or merge:
            kind = _build_export(run_dir, tmp, recipe, task, tokenizer, fmt if converted else None, quantize)
        else:
            _copy_run(run_dir, tmp)
            kind = "adapter" if is_adapter else "model"
    except BaseException:  # a failed or interrupted export leaves nothing behind (OUT is untouched)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.is_dir():  # --overwrite (checked above): the old export goes only once the new one is complete
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return kind


def _check_apart(run_dir: Path, out_dir: Path) -> None:
    """OUT must be neither the run nor inside it, nor hold it: --overwrite would delete the source."""
    run, out = run_dir.resolve(), out_dir.resolve()
    if run == out or run in out.parents or out in run.parents:
        raise LlmkitError(f"{out_dir} is {run_dir} or holds it or lies inside it; export to a folder of its own")


def _build_export(
    run_dir: Path, tmp: Path, recipe: Any, task: Any, tokenizer: Any, fmt: str | None, quantize: str | None
) -> str:
    """Write the merged (fmt None) or converted model into `tmp` with its tokenizer, recipe and facts."""
    model = modeling.build_model(recipe, task, tokenizer, modeling.head_kwargs(task, recipe))
    if hasattr(model, "merge_and_unload"):  # a LoRA run: one plain model
        model = model.merge_and_unload()
    tmp.mkdir(parents=True)
    if fmt is None:
        model.save_pretrained(tmp)
    else:
        facts = _convert(model.float().eval(), recipe, task, tokenizer, tmp, fmt, quantize)
    tokenizer.save_pretrained(tmp)
    shutil.copy2(run_dir / "recipe.yaml", tmp / "recipe.yaml")  # how it was trained; marks an llmkit export
    if fmt is None:
        return "merged"
    facts["files"] = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
    facts["source"] = str(run_dir)
    write_json(tmp / onnxrt.EXPORT_FILE, facts)
    (tmp / "README.md").write_text(model_card(task, run_dir, facts), encoding="utf-8")
    return f"{fmt} {facts['precision']}"


def _copy_run(run_dir: Path, tmp: Path) -> None:
    tmp.mkdir(parents=True)
    for f in run_dir.iterdir():
        if f.is_file() and any(fnmatchcase(f.name, p) for p in (*MODEL_FILES, "recipe.yaml", "README.md")):
            shutil.copy2(f, tmp / f.name)
    if (run_dir / modeling.BASE_DIR).is_dir():
        shutil.copytree(run_dir / modeling.BASE_DIR, tmp / modeling.BASE_DIR)


def _check_convertible(task: Any, fmt: str, run_dir: Path) -> None:
    """ONNX covers models that answer in one forward pass; the extra's libraries must be installed."""
    if onnxrt.is_onnx_folder(run_dir) or "quantization_config" in _config(run_dir):
        raise LlmkitError(f"{run_dir} is already converted (ONNX or int8); export its source run folder instead")
    if fmt == "onnx":
        if task.seq2seq or task.causal:
            raise LlmkitError(
                f"ONNX export covers models that answer in one forward pass, not {task.name} models, which "
                "generate token by token; export as PyTorch (drop --format onnx; --quantize int8 for int8)"
            )
        from llmkit import onnx_export

        onnx_export.check_extra()
    else:
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise LlmkitError(f"PyTorch int8 export needs torchao, which is not installed; {onnxrt.EXTRA}") from None


def _config(run_dir: Path) -> dict:
    import json

    path = run_dir / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _convert(model: Any, recipe: Any, task: Any, tokenizer: Any, tmp: Path, fmt: str, quantize: str | None) -> dict:
    """Write the converted model into `tmp` (config included) and return export.json's facts."""
    facts: dict = {"format": fmt, "precision": quantize or "fp32", "task": task.name, "llmkit": __version__}
    if fmt == "onnx":
        facts.update(_to_onnx(model, recipe, task, tokenizer, tmp, quantize))
        model.config.save_pretrained(tmp)
    else:
        facts.update(_to_torchao_int8(model, recipe, task, tokenizer, tmp))
    return facts


def _to_onnx(model: Any, recipe: Any, task: Any, tokenizer: Any, tmp: Path, quantize: str | None) -> dict:
    from llmkit import onnx_export

    names = onnx_export.input_names(model, tokenizer)
    fp32 = tmp / ("model.fp32.onnx" if quantize else onnxrt.MODEL_FILE)
    onnx_export.write_onnx(model, names, fp32)
    facts: dict = {"opset": onnx_export.OPSET, "inputs": names, "outputs": ["logits"]}
    batches, source = onnx_export.parity_batches(recipe, task, tokenizer, model, names)
    facts["parity"] = {
        "rows": source,
        "fp32": onnx_export.parity(model, onnx_export.onnx_logits(onnxrt.session(fp32)), batches),
    }
    if quantize:
        final = tmp / onnxrt.MODEL_FILE
        onnx_export.quantize_int8(fp32, final)
        facts["parity"]["int8"] = onnx_export.parity(model, onnx_export.onnx_logits(onnxrt.session(final)), batches)
        facts["fp32_bytes"] = fp32.stat().st_size
        facts["size_ratio"] = round(final.stat().st_size / facts["fp32_bytes"], 4)
        fp32.unlink()
    return facts


def _to_torchao_int8(model: Any, recipe: Any, task: Any, tokenizer: Any, tmp: Path) -> dict:
    """torchao's int8 dynamic quantization (int8 weights, per-token int8 activations) of every Linear layer.

    The model is quantized as `from_pretrained(..., quantization_config=TorchAoConfig(...))` loads it, so the
    saved config carries the quantization and `from_pretrained` (and llmkit) reload it as it is.
    """
    import torch
    import transformers
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    from llmkit import onnx_export

    staging = tmp / ".fp32"
    model.save_pretrained(staging)
    fp32_bytes = _weights_bytes(staging)
    quantized = getattr(transformers, task.auto_model).from_pretrained(
        staging,
        trust_remote_code=recipe.model.trust_remote_code,
        dtype=torch.float32,
        quantization_config=transformers.TorchAoConfig(Int8DynamicActivationInt8WeightConfig()),
    )
    shutil.rmtree(staging)
    layers = sum(type(m.weight).__name__ != "Parameter" for m in quantized.modules() if isinstance(m, torch.nn.Linear))
    if not layers:  # GPT-2's blocks are Conv1D, not Linear: nothing for torchao to quantize
        raise LlmkitError(
            f"torchao found no Linear layer to quantize in {type(model).__name__}; "
            "export it as it is (drop --quantize), or to ONNX where the task allows"
        )
    quantized.save_pretrained(tmp)
    batches, source = onnx_export.parity_batches(
        recipe, task, tokenizer, model, onnx_export.input_names(model, tokenizer)
    )
    with torch.no_grad():
        check = onnx_export.parity(model, lambda batch: quantized(**batch).logits, batches)
    return {
        "quantized_layers": layers,
        "fp32_bytes": fp32_bytes,
        "size_ratio": round(_weights_bytes(tmp) / fp32_bytes, 4),
        "parity": {"rows": source, "int8": check},
    }


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def model_card(task: Any, run_dir: Path, facts: dict) -> str:
    """The exported folder's README: what it is, how it was checked, how to run it."""
    parity = facts.get("parity", {})
    lines = [
        "---",
        *([f"pipeline_tag: {task.pipeline_tag}"] if task.pipeline_tag else []),
        f"library_name: {'onnx' if facts['format'] == 'onnx' else 'transformers'}",
        "tags: [llmkit]",
        "---",
        f"# {run_dir.name} ({facts['format']}, {facts['precision']})",
        "",
        f"Exported by llmkit {facts['llmkit']} from the {task.name} run `{run_dir}`.",
        "",
    ]
    for name, size in facts["files"].items():
        lines.append(f"- `{name}`: {size / 1e6:.1f} MB")
    if "size_ratio" in facts:
        lines.append(f"- weights at {100 * facts['size_ratio']:.1f}% of fp32")
    for precision, check in parity.items():
        if precision != "rows":
            lines.append(
                f"- {precision} vs PyTorch on {parity['rows']}: max |logit diff| {check['max_abs_diff']:.2e}, "
                f"same prediction {100 * check['argmax_agreement']:.2f}%"
            )
    lines += ["", "```", "llmkit predict THIS_FOLDER --input inputs.jsonl --output preds.jsonl", "```", ""]
    return "\n".join(lines)
