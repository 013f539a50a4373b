"""Pretraining on corpora larger than memory: data.streaming and `llmkit prepare`, measured.

1. Peak memory (PSS of the llmkit process and its dataloader worker, summed) when the clm recipe streams a
   generated corpus of 200 MB and of 2 GB for the same steps, and the in-memory path on the 200 MB corpus.
2. Training throughput (the Trainer's train samples/s) of the stream vs the in-memory path at the same steps.
3. Resume: the time from launch to the first step after resuming a stream at step 200 and at step 2,000.

The corpora are written to --scratch (default /tmp/llmkit-stream-bench), never into the repository. Results go to
benchmarks/results-streaming.md and .json. Run one job at a time on the machine: timings are the point.

    python benchmarks/stream_bench.py                   # 200 MB and 2 GB, ~25 min on 2 cores
    python benchmarks/stream_bench.py --sizes 20 --steps 40 --resume-at 20 100   # a quick try
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks"


def write_corpus(path: Path, megabytes: int) -> Path:
    """A text corpus of about `megabytes` MB: CPython's documentation paragraphs, each line a random one rotated at
    a random word (no two lines alike, English word statistics)."""
    if path.exists() and path.stat().st_size >= megabytes * 1_000_000:
        return path
    sys.path.insert(0, str(ROOT))
    from llmkit.data import pydoc_corpus_file

    paragraphs = [p.split() for p in pydoc_corpus_file().read_text(encoding="utf-8").splitlines() if p.strip()]
    rng = random.Random(megabytes)
    target, written = megabytes * 1_000_000, 0
    tmp = path.with_suffix(".partial")
    with tmp.open("w", encoding="utf-8") as f:
        while written < target:
            lines = []
            for _ in range(2000):
                words = rng.choice(paragraphs)
                cut = rng.randrange(len(words))
                lines.append(" ".join(words[cut:] + words[:cut]))
            chunk = "\n".join(lines) + "\n"
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    tmp.replace(path)
    return path


class PeakRss:
    """Samples the memory of a process and its children every 0.2 s: summed PSS (proportional set size), which
    counts the pages a forked dataloader worker shares with its parent once, not twice as summed RSS would."""

    def __init__(self, pid: int):
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_full_info().pss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def llmkit(args: list[str], until_step: int | None = None) -> dict:
    """Run `llmkit ARGS`; wall time, peak RSS and (with until_step) the time to the logged step `until_step`,
    after which the run is stopped."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmkit", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    rss, reached, tail = PeakRss(proc.pid), None, []
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace")
        tail = (tail + [line])[-30:]
        if until_step is not None and line.startswith(f"step {until_step}/"):
            reached = time.time() - started
            proc.terminate()
            break
    proc.wait()
    peak = rss.stop()
    if until_step is None and proc.returncode != 0:
        raise SystemExit(f"llmkit {' '.join(args)} failed:\n{''.join(tail)}")
    return {"wall_s": time.time() - started, "peak_rss_mb": peak / 1e6, "to_step_s": reached}


def pretrain(corpus: Path, out: Path, steps: int, *extra: str, until: int | None = None) -> dict:
    args = ["pretrain", "recipes/gpt2.yaml", f"trainer.output_dir={out}", f"data.train={corpus}", "data.source=null"]
    args += [f"trainer.max_steps={steps}", "trainer.eval_strategy=no", "trainer.eval_on_start=false"]
    args += ["tokenizer.train.max_texts=20000", "trainer.logging_steps=10", "data.num_proc=2", *extra]
    facts = llmkit(args, until)
    summary = out / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        facts |= {"train_samples_per_second": s["train_samples_per_second"], "train_runtime_s": s["train_runtime_s"]}
    return facts


def resume_times(corpus: Path, scratch: Path, at: list[int]) -> dict:
    """A small model streams to the largest step of `at` plus 50, saving at each step of `at`; each of those
    checkpoints is then resumed alone and timed from launch to the 10th step after it (logged every 10 steps)."""
    model = ["model.config.n_embd=32", "model.config.n_layer=1", "model.config.n_head=2"]
    stream = ["data.streaming=true", "trainer.save_strategy=steps", f"trainer.save_steps={min(at)}", *model]
    stream += ["trainer.save_total_limit=null", "trainer.per_device_train_batch_size=16"]
    out, last = scratch / "resume", max(at) + 50
    shutil.rmtree(out, ignore_errors=True)
    pretrain(corpus, out, last, *stream)
    times = {}
    for step in at:
        cut = scratch / f"resume-{step}"
        shutil.rmtree(cut, ignore_errors=True)
        others = [f"checkpoint-{s}" for s in range(0, last + 1) if s != step]
        shutil.copytree(out, cut, ignore=shutil.ignore_patterns(*others))
        (cut / "summary.json").unlink()
        times[step] = pretrain(corpus, cut, last, *stream, "--resume", until=step + 10)["to_step_s"]
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[200, 2000], help="corpus sizes in MB (the first also in memory)"
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--resume-at", type=int, nargs="+", default=[200, 2000])
    p.add_argument("--scratch", type=Path, default=Path("/tmp/llmkit-stream-bench"))
    p.add_argument("--resume-only", action="store_true", help="only the resume timing (the rest from the last JSON)")
    a = p.parse_args()
    a.scratch.mkdir(parents=True, exist_ok=True)
    corpora = {mb: write_corpus(a.scratch / f"corpus-{mb}mb.txt", mb) for mb in a.sizes}
    rows = json.loads((OUT / "results-streaming.json").read_text())["runs"] if a.resume_only else {}
    for mb, corpus in ({} if a.resume_only else corpora).items():
        out = a.scratch / f"stream-{mb}"
        shutil.rmtree(out, ignore_errors=True)
        rows[f"stream {mb} MB"] = pretrain(corpus, out, a.steps, "data.streaming=true")
        print(f"stream {mb} MB: {rows[f'stream {mb} MB']}", flush=True)
    first = a.sizes[0]
    out = a.scratch / f"memory-{first}"
    if not a.resume_only:
        shutil.rmtree(out, ignore_errors=True)
        rows[f"in memory {first} MB"] = pretrain(corpora[first], out, a.steps)
        print(f"in memory {first} MB: {rows[f'in memory {first} MB']}", flush=True)
        (OUT / "results-streaming.json").write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    resumed = resume_times(corpora[first], a.scratch, a.resume_at)
    print(f"resume: {resumed}", flush=True)
    (OUT / "results-streaming.json").write_text(json.dumps({"runs": rows, "resume_s": resumed}, indent=2) + "\n")
    lines = ["| run | peak memory, PSS (MB) | train samples/s | wall (s) |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['peak_rss_mb']:,.0f} | {r.get('train_samples_per_second', 0):.1f} | {r['wall_s']:.0f} |"
        )
    lines += ["", "| resumed at step | launch to the 10th step after it (s) |", "|---|---|"]
    lines += [f"| {step:,} | {t:.1f} |" for step, t in resumed.items()]
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "?")
    text = f"# Streaming benchmark\n\n{cpu}, {os.cpu_count()} cores, {a.steps} steps of recipes/gpt2.yaml\n\n"
    (OUT / "results-streaming.md").write_text(text + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
