"""Streaming pretraining (data.streaming): trained as read, validation held out, the position restored on resume."""

import hashlib
import json
import shutil

import pytest
from conftest import RECIPES, ROOT
from safetensors.torch import load_file
from transformers import TrainerCallback

from llmkit import engine
from llmkit.config import load_recipe, resolve
from llmkit.errors import DataError, RecipeError

pytestmark = pytest.mark.smoke


def corpus(folder, files=1, lines=600):
    """Text files of numbered, distinct lines (so every packed block differs)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        text = "".join(f"document {f} line {i} says {' '.join(['word'] * (i % 9))} end\n" for i in range(lines))
        (folder / f"part-{f}.txt").write_text(text, encoding="utf-8")
    return str(folder / "*.txt")


class Blocks(TrainerCallback):
    """Records a hash of every block the model trains on (a forward pre-hook), per step."""

    def __init__(self):
        self.steps, self._current = [], []

    def on_train_begin(self, args, state, control, model=None, **kw):
        def hook(module, a, kwargs):
            if module.training:
                self._current += [
                    hashlib.sha1(bytes(str(r), "utf-8")).hexdigest() for r in kwargs["input_ids"].tolist()
                ]

        model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_step_end(self, args, state, control, **kw):
        self.steps.append((state.global_step, self._current))
        self._current = []


def streamed(out, data, *extra):
    recipe = load_recipe(
        RECIPES / "tiny" / "gpt2.yaml",
        [
            f"trainer.output_dir={out}",
            f"data.train={data}",
            "data.source=null",
            "data.streaming=true",
            "data.max_train_samples=null",
            "data.max_eval_samples=50",
            "trainer.max_steps=10",
            "trainer.save_steps=5",
            "trainer.eval_steps=5",
            "trainer.per_device_train_batch_size=4",
            *extra,
        ],
    )
    resolve(recipe)
    return recipe


def test_a_resumed_stream_trains_on_the_blocks_the_uninterrupted_run_did(tmp_path):
    data = corpus(tmp_path / "corpus")
    whole = Blocks()
    engine.train(streamed(tmp_path / "whole", data), callbacks=[whole])
    assert [s for s, _ in whole.steps] == list(range(1, 11))
    assert (tmp_path / "whole" / "checkpoint-5" / "stream_state_0.pt").is_file()

    # The same run stopped after its step-5 checkpoint: resumed, it must read on from there, not from the start.
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoint-10")
    (tmp_path / "cut" / "summary.json").unlink()
    resumed = Blocks()
    engine.train(streamed(tmp_path / "cut", data), resume=True, callbacks=[resumed])
    assert resumed.steps == whole.steps[5:]
    first = {h for _, hashes in whole.steps[:5] for h in hashes}
    assert not first & {h for _, hashes in resumed.steps for h in hashes}  # nothing trained twice
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("whole", "cut"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_validation_is_held_out_of_the_train_stream(tmp_path):
    data = corpus(tmp_path / "corpus", lines=200)
    seen = Blocks()
    recipe = streamed(tmp_path / "run", data, "trainer.max_steps=3", "trainer.save_steps=3", "trainer.eval_steps=3")
    _, tokenizer, tokenized = engine.prepare_data(recipe, engine.get_task("clm"), recipe.args)
    held = {hashlib.sha1(bytes(str(r), "utf-8")).hexdigest() for r in tokenized["validation"]["input_ids"]}
    assert held
    engine.train(recipe, callbacks=[seen])
    assert not held & {h for _, hashes in seen.steps for h in hashes}
    report = json.loads((tmp_path / "run" / "preflight.json").read_text())
    assert report["streaming"] is True and report["held_out_rows"] == {"validation": 50}


def test_a_stream_without_steps_is_refused(tmp_path):
    recipe = streamed(tmp_path / "run", corpus(tmp_path / "corpus", lines=50), "trainer.max_steps=-1")
    with pytest.raises(RecipeError, match="needs trainer.max_steps"):
        engine.train(recipe)
    assert not (tmp_path / "run").exists()


def test_a_finetuning_task_does_not_stream(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(RECIPES / "tiny" / "ner.yaml", [f"trainer.output_dir={tmp_path}/run", "data.streaming=true"])
    resolve(recipe)
    with pytest.raises(RecipeError, match="data.streaming is for pretraining"):
        engine.train(recipe)


def test_check_of_a_streamed_recipe_packs_its_first_block(tmp_path):
    recipe = streamed(tmp_path / "run", corpus(tmp_path / "corpus", lines=200))
    lines, problem = engine.check_packed(recipe, engine.get_task("clm"))
    assert problem is None and "held out in memory: validation" in lines[0]
    bad = streamed(tmp_path / "run", corpus(tmp_path / "corpus", lines=200), "data.columns.text=body")
    with pytest.raises(DataError, match="has no column 'body'"):
        engine.check_packed(bad, engine.get_task("clm"))


def test_mlm_streams_a_data_load_dataset(tmp_path):
    """The data.load path (load_dataset with streaming=True, as for a Hub corpus) and the masked-LM task."""
    data = corpus(tmp_path / "corpus", lines=300)
    overrides = [f"trainer.output_dir={tmp_path}/run", "data.source=null", "data.max_train_samples=null"]
    overrides += ["data.streaming=true", "data.max_eval_samples=30", "trainer.max_steps=4", "trainer.save_steps=2"]
    recipe = load_recipe(
        RECIPES / "tiny" / "bert.yaml", [*overrides, f"data.load={{path: text, data_files: '{data}'}}"]
    )
    summary = engine.train(resolve(recipe))
    assert summary["steps"] == 4 and summary["final_metrics"]["eval_loss"] > 0
    assert (tmp_path / "run" / "checkpoint-4" / "stream_state_0.pt").is_file()


def test_a_file_unreadable_deep_in_the_stream_stops_with_one_line(tmp_path):
    """Bytes that are not UTF-8 past the first chunk are met in the dataloader worker, mid-training: a DataError
    naming the split's files (exit 2), not the worker's traceback."""
    good = "".join(f"line {i} of plain text that is fine\n" for i in range(500)).encode()
    (tmp_path / "bad.txt").write_bytes(good + b"bad \xff\xfe byte\n" + good)
    load = f"data.load={{path: text, data_files: '{tmp_path / 'bad.txt'}', chunksize: 4096}}"
    recipe = streamed(tmp_path / "run", str(tmp_path / "bad.txt"), "data.train=null", load, "trainer.max_steps=400")
    with pytest.raises(DataError, match="reading the stream of the train split .* failed: .*can't decode byte 0xff"):
        engine.train(recipe)


def test_a_stream_checkpoint_resumes_with_as_many_processes(tmp_path):
    from types import SimpleNamespace

    from llmkit.streams import _state_file

    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(DataError, match="holds no stream position"):
        _state_file(tmp_path / "checkpoint-4", SimpleNamespace(world_size=1, process_index=0))
    for rank in (0, 1):
        (tmp_path / "checkpoint-4" / f"stream_state_{rank}.pt").write_bytes(b"")
    with pytest.raises(DataError, match=r"saved by 2 process\(es\) .* this run has 1; resume with 2"):
        _state_file(tmp_path / "checkpoint-4", SimpleNamespace(world_size=1, process_index=0))
    ok = _state_file(tmp_path / "checkpoint-4", SimpleNamespace(world_size=2, process_index=1))
    assert ok.name == "stream_state_1.pt"


@pytest.mark.parametrize("split", ["test", "train"])
def test_a_stream_evaluates_only_a_split_held_in_memory(tmp_path, split):
    """`evaluate --split test` on data without one, or `--split train` (an endless stream): one line, not a
    KeyError or an evaluation that never ends."""
    recipe = streamed(tmp_path / "run", corpus(tmp_path / "corpus", lines=200))
    with pytest.raises(DataError, match=f"no {split!r} split held in memory"):
        engine.prepare_data(recipe, engine.get_task("clm"), recipe.args, only=split)
