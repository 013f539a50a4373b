"""The benchmark scripts' own contracts that a CPU can check: without a CUDA GPU the GPU benchmark says so in
one line and exits 1 (it never falls back to timing a CPU under the GPU table's name)."""

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
