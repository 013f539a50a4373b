"""The benchmark scripts' own contracts that a CPU can check: without a CUDA GPU the GPU benchmark says so in
one line and exits 1 (it never falls back to timing a CPU under the GPU table's name); several rounds of a
workload report medians and ratios within each round."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd, tmp_path):
    env = {**os.environ, "PY": sys.executable, "LLMKIT_BENCH_DATA": str(tmp_path)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_gpu_script_needs_cuda(tmp_path):
    done = _run(["bash", "benchmarks/gpu.sh"], tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "benchmarks/gpu.sh needs a CUDA GPU: torch.cuda.is_available() is False here (on a CPU: make bench)"
    ]


def test_bench_gpu_flag_needs_cuda(tmp_path):
    done = _run([sys.executable, "benchmarks/bench.py", "--gpu", "classification"], tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "benchmarks/bench.py --gpu needs a CUDA GPU: torch.cuda.is_available() is False here"
    ]


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_report_each_runs_median_round_and_the_ratio_within_rounds():
    bench = _bench_module()
    one = lambda llmkit, tuned: {  # noqa: E731
        "llmkit": {"samples_per_s": llmkit, "peak_rss_mb": llmkit},
        "reference_tuned": {"samples_per_s": tuned, "peak_rss_mb": tuned},
    }
    single = one(160.0, 135.0)
    assert bench.median_round([single]) is single
    assert bench.ratio_cell(single, "reference_tuned") == "1.19x"
    runs = bench.median_round([one(160.0, 135.0), one(182.0, 136.0), one(146.0, 157.0)])
    assert runs["llmkit"]["peak_rss_mb"] == 160.0 and runs["reference_tuned"]["peak_rss_mb"] == 136.0
    assert runs["llmkit"]["rounds_samples_per_s"] == [160.0, 182.0, 146.0]
    # the ratio of each round, not of the two medians (160 / 136 = 1.18): 1.19, 1.34, 0.93
    assert bench.ratio_cell(runs, "reference_tuned") == "1.19x (0.93-1.34x, 3 rounds)"
    assert bench.ratio_cell(runs, "reference_fp32") == "-"


def test_rounds_must_be_positive(tmp_path):
    done = _run([sys.executable, "benchmarks/bench.py", "--rounds", "0", "classification"], tmp_path)
    assert done.returncode == 2 and "--rounds must be at least 1" in done.stderr


def _offline_main(bench, tmp_path, monkeypatch, fake_bench, *argv):
    monkeypatch.setattr(bench, "bench", fake_bench)
    monkeypatch.setattr(bench, "matmul_peak", lambda device: {"fp32": 0.2, "bf16": 0.4, "bf16_head": 0.3})
    monkeypatch.setattr(bench, "wait_until_idle", lambda: 0.0)
    monkeypatch.setattr(bench, "OUT", tmp_path)
    monkeypatch.setattr(bench, "DATA", tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    bench.main()


ROW = {"llmkit": {"samples_per_s": 200.0, "tokens_per_s": None, "first_step_s": 9.0, "peak_rss_mb": 1.0}}


def test_a_failed_workload_costs_its_own_row_and_each_workload_is_written_as_it_ends(tmp_path, monkeypatch):
    """A GPU lease is short: one workload's failure must not lose the others, nor a run cut short what it measured."""
    import json

    import pytest

    bench = _bench_module()
    written = []

    def fake_bench(name, w, a):
        if name == "ner":
            raise bench.RunFailed("llmkit run failed (1): ModuleNotFoundError: No module named 'seqeval'\ntraceback")
        if name == "clm":
            raise OSError("No space left on device")
        so_far = tmp_path / "results-classification-ner-clm-mlm.json"
        written.append(json.loads(so_far.read_text()) if so_far.exists() else None)
        return ROW

    with pytest.raises(SystemExit, match=r"^\[bench\] failed: ner, clm$"):
        _offline_main(bench, tmp_path, monkeypatch, fake_bench, "classification", "ner", "clm", "mlm")
    assert written[0] is None  # classification began with nothing on disk
    # mlm began with classification's row and the two failures on disk
    assert set(written[1]["workloads"]) == {"classification"} and set(written[1]["failed"]) == {"ner", "clm"}
    results = json.loads((tmp_path / "results-classification-ner-clm-mlm.json").read_text())
    assert set(results["workloads"]) == {"classification", "mlm"}
    assert results["failed"] == {
        "ner": "llmkit run failed (1): ModuleNotFoundError: No module named 'seqeval'",
        "clm": "OSError: No space left on device",
    }
    md = (tmp_path / "results-classification-ner-clm-mlm.md").read_text()
    assert "ner: failed (llmkit run failed (1): ModuleNotFoundError: No module named 'seqeval')." in md
    assert not list(tmp_path.glob("*.tmp"))  # each file written whole, then renamed


def test_llmkit_overrides_write_beside_the_plain_results(tmp_path, monkeypatch):
    import json

    bench = _bench_module()
    _offline_main(bench, tmp_path, monkeypatch, lambda *_: ROW, "mlm", "--llmkit-set", "model.skip_positions=false")
    results = json.loads((tmp_path / "results-mlm-model.skip_positions_false.json").read_text())
    assert results["llmkit_set"] == ["model.skip_positions=false"]
    assert not (tmp_path / "results-mlm.json").exists()


def test_a_failed_run_is_named_by_its_last_line_of_stderr(monkeypatch):
    import pytest

    bench = _bench_module()
    done = subprocess.CompletedProcess([], 1, stdout="", stderr="Traceback ...\nValueError: bad column 'txt'\n")
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: done)
    monkeypatch.setattr(bench, "wait_until_idle", lambda: 0.0)
    with pytest.raises(bench.RunFailed, match=r"^llmkit run failed \(1\): ValueError: bad column 'txt'\n"):
        bench.one_run("llmkit", {})


def test_a_gpu_run_never_waits_for_idle_host_cores(monkeypatch):
    bench = _bench_module()
    monkeypatch.setattr(bench, "busy_cpus", lambda: 5.0)
    slept = []
    monkeypatch.setattr(bench.time, "sleep", slept.append)
    monkeypatch.setenv("LLMKIT_BENCH_GPU", "1")
    assert bench.wait_until_idle() == 5.0 and slept == []
    monkeypatch.delenv("LLMKIT_BENCH_GPU")
    assert bench.wait_until_idle(limit_s=0.05) == 5.0 and slept  # a CPU run waits (here: up to 50 ms)


def test_gpu_script_passes_options_through_and_picks_the_default_workloads(tmp_path):
    fake = tmp_path / "python"  # answers every check with success and prints the bench.py command it is given
    fake.write_text('#!/bin/sh\n[ "$1" = -c ] && exit 0\necho "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PY": str(fake), "LLMKIT_BENCH_DATA": str(tmp_path)}
    run = lambda *args: subprocess.run(["bash", "benchmarks/gpu.sh", *args], cwd=ROOT, env=env, capture_output=True,  # noqa: E731
                                       text=True, timeout=60).stdout.strip().splitlines()[-1]  # fmt: skip
    base = "benchmarks/bench.py --gpu --batch 128 --steps 30 --warmup 5 --references tuned"
    assert run() == f"{base} mlm clm sst2-minilm wnut-minilm"
    assert run("ner", "--llmkit-set", "model.skip_positions=false", "--rounds=2") == (
        f"{base} --llmkit-set model.skip_positions=false --rounds=2 ner"
    )


def test_table_names_each_runs_page_faults_per_step():
    bench = _bench_module()
    run = lambda sps, faults, gap=None: {  # noqa: E731
        "samples_per_s": sps, "tokens_per_s": None, "first_step_s": 9.0, "peak_rss_mb": 1000.0,
        **({"page_faults_per_step": faults} if faults is not None else {}),
        **({"between_steps_ms": gap} if gap is not None else {}),
    }  # fmt: skip
    runs = {"llmkit": run(200.0, 37, 1.24), "reference_tuned": run(150.0, 11446, 1.31)}
    results = {"workloads": {"sst2-minilm": runs, "old": {"llmkit": run(1.0, None)}}}
    results.update(steps=40, warmup=80, batch=32, device="a CPU")
    text = bench.table(results, {"fp32": 0.2, "bf16": 0.4, "bf16_head": 0.3})
    assert "sst2-minilm, minor page faults in a timed step (median): llmkit 37; reference_tuned 11,446." in text
    assert "old, minor page faults" not in text  # results from before the column: no line
    between = "ms from one timed step's end to the next one's begin (median: batch, callbacks, logging)"
    assert f"sst2-minilm, {between}: llmkit 1.2; reference_tuned 1.3." in text
    assert "old, ms from" not in text
    assert "| sst2-minilm | - | - | 1.33x |" in text
    assert "llmkit's runs with" not in text
    results["llmkit_set"] = ["model.skip_positions=false"]
    assert "llmkit's runs with model.skip_positions=false." in bench.table(
        results, {"fp32": 0.2, "bf16": 0.4, "bf16_head": 0.3}
    )


def test_step_loop_batches_label_first_pieces_and_group_by_token_count(tmp_path, monkeypatch):
    """benchmarks/step_loop.py: a word's first piece carries its tag (the rest -100, as run_ner), and grouped
    batches hold rows of similar token counts (not word counts: one long word is many pieces)."""
    import importlib.util
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("step_loop", ROOT / "benchmarks" / "step_loop.py")
    step_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_loop)
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4, "b": 5, "##b": 6}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=wordpiece, pad_token="[PAD]", unk_token="[UNK]")
    rows = [{"tokens": ["a"] * (1 + i % 8), "ner_tags": ["B-x"] + ["O"] * (i % 8)} for i in range(48)]
    rows += [{"tokens": ["b" * (2 + i)], "ner_tags": ["I-x"]} for i in range(16)]  # 1 word, 3-18 pieces
    (tmp_path / "wnut17").mkdir()
    (tmp_path / "wnut17" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(step_loop, "DATA", tmp_path)
    random_batches = step_loop.batches("ner", tok, 2, grouped=False)
    for b in random_batches:
        for ids, labels, mask in zip(b["input_ids"], b["labels"], b["attention_mask"], strict=True):
            pieces = ids[mask.bool()].tolist()
            tagged = labels[mask.bool()].tolist()
            assert tagged[0] == tagged[-1] == -100  # [CLS], [SEP]
            words = [k for k, p in enumerate(pieces) if p in (4, 5)]  # "a", "b": a word's first piece
            assert [k for k, t in enumerate(tagged) if t != -100] == words
            tags = [tagged[k] for k in words]  # B-x 0, I-x 1, O 2 (sorted names)
            assert tags == ([1] if pieces[1] == 5 else [0] + [2] * (len(words) - 1))
    grouped = step_loop.batches("ner", tok, 2, grouped=True)
    widths = sorted(int(b["attention_mask"].sum(1).max()) for b in grouped)
    # by token count: the 32 shortest rows (3-7 tokens) in one batch, the rest (up to [CLS] b ##b x 16 [SEP])
    assert widths == [7, 19]
    assert sorted(r for b in grouped for r in b["attention_mask"].sum(1).tolist()) == sorted(
        r for b in random_batches for r in b["attention_mask"].sum(1).tolist()
    )  # the same rows


def test_the_step_timer_reports_the_time_between_steps():
    """workers.py: the median gap from a timed step's end to the next one's begin (the Trainer's own time)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("workers", ROOT / "benchmarks" / "workers.py")
    workers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(workers)
    timer = workers.timer(3)
    timer.begins = [0.0, 1.0, 2.0, 3.0, 4.002, 5.001, 6.003, 7.004]  # each step's begin
    timer.ends = [0.9, 1.9, 2.9, 4.0, 5.0, 6.0, 7.0, 8.0]  # and end: gaps 2, 1, 3, 4 ms after the warm-up
    timer.tokens, timer.faults, timer.first_step = list(range(8)), [0] * 8, 0.0
    assert round(timer.result(32)["between_steps_ms"], 6) == 3.0  # the median of 1, 2, 3, 4 ms (upper)


def test_llmkit_and_the_reference_evaluate_in_batches_of_one_size(monkeypatch):
    """The eval samples/s column compares like with like: at --batch 128 (the GPU script) llmkit once evaluated in its
    recipe's batches of 64 while the Trainer evaluated in batches of 256."""
    import argparse

    bench = _bench_module()
    specs = {}
    monkeypatch.setattr(bench, "one_run", lambda which, spec: specs.setdefault(which, spec) and {"samples_per_s": 1.0})
    monkeypatch.setattr(bench, "minilm", lambda: "/nowhere/minilm")
    for name, batch in [("sst2-minilm", 128), ("wnut-minilm", 32), ("summarization", 128)]:
        specs.clear()
        a = argparse.Namespace(steps=2, warmup=3, batch=batch, references=["tuned"], rounds=1, llmkit_set=[])
        bench.bench(name, bench.WORKLOADS[name], a)
        size = specs["reference"]["eval_batch_size"]
        assert size == (batch if name == "summarization" else 2 * batch)
        eval_sizes = [o for o in specs["llmkit"]["overrides"] if o.startswith("trainer.per_device_eval_batch_size=")]
        assert eval_sizes == [f"trainer.per_device_eval_batch_size={size}"], name
