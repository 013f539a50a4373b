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


def test_table_names_each_runs_page_faults_per_step():
    bench = _bench_module()
    run = lambda sps, faults: {  # noqa: E731
        "samples_per_s": sps, "tokens_per_s": None, "first_step_s": 9.0, "peak_rss_mb": 1000.0,
        **({"page_faults_per_step": faults} if faults is not None else {}),
    }  # fmt: skip
    runs = {"llmkit": run(200.0, 37), "reference_tuned": run(150.0, 11446)}
    results = {"workloads": {"sst2-minilm": runs, "old": {"llmkit": run(1.0, None)}}}
    results.update(steps=40, warmup=80, batch=32, device="a CPU")
    text = bench.table(results, {"fp32": 0.2, "bf16": 0.4, "bf16_head": 0.3})
    assert "sst2-minilm, minor page faults in a timed step (median): llmkit 37; reference_tuned 11,446." in text
    assert "old, minor page faults" not in text  # results from before the column: no line
    assert "| sst2-minilm | - | - | 1.33x |" in text
