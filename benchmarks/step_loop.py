"""Where a MiniLM fine-tuning step goes: llmkit's levers against the tuned Trainer's setup, outside any Trainer.

The same step both ways (bf16 autocast forward, backward, gradient-norm clipping at 1.0, fused AdamW at lr 5e-5,
gradients set to None), on the same rows of the real data:
- llmkit: what `llmkit finetune` installs on the model (`tasks/*.py` `_speed_up`, `fastdropout.install`, the
  reused word-embedding gradient and allocator settings of `memory.py`, eager attention, `clipping.py`);
- tuned: the model as the tuned Trainer reference runs it (SDPA, torch's dropout, torch's clipping).
Each (setup, batches) pair runs in a fresh process, the pairs alternating for --rounds rounds; batches are
random (32 rows drawn at random: what NER trains on) or length-grouped (rows sorted by token count, cut into
batches of 32, served in random order: what the tuned Trainer and llmkit's classification train on). Prints each
pair's median step and its forward / backward / optimizer parts, in ms, with the real tokens per row.

    python benchmarks/step_loop.py [--task ner|sst2] [--rounds 2] [--batches 12]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import DATA, minilm  # benchmarks/ is on the path of its scripts

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [("llmkit", "random"), ("llmkit", "grouped"), ("tuned", "grouped")]


def batches(task: str, tok, n: int, grouped: bool) -> list[dict]:
    import torch

    from llmkit.tasks.ner import align_labels

    rows = [json.loads(line) for line in (DATA / ("wnut17" if task == "ner" else "sst2") / "train.jsonl").open()]
    names = sorted({t for r in rows for t in r["ner_tags"]}) if task == "ner" else []
    index = {name: i for i, name in enumerate(names)}
    random.Random(0).shuffle(rows)
    rows = rows[: 32 * n]
    if task == "ner":
        enc = [tok(r["tokens"], is_split_into_words=True, truncation=True, max_length=128) for r in rows]
    else:
        enc = [tok(r["text"], truncation=True, max_length=128) for r in rows]
    order = list(range(len(rows)))
    if grouped:
        order.sort(key=lambda i: len(enc[i]["input_ids"]))
        chunks = [order[i : i + 32] for i in range(0, len(order), 32)]
        random.Random(1).shuffle(chunks)
        order = [i for c in chunks for i in c]
    out = []
    for start in range(0, len(order), 32):
        picked = order[start : start + 32]
        width = max(len(enc[i]["input_ids"]) for i in picked)
        ids = torch.zeros(32, width, dtype=torch.long)
        mask = torch.zeros(32, width, dtype=torch.long)
        labels = torch.full((32, width), -100) if task == "ner" else torch.zeros(32, dtype=torch.long)
        for j, i in enumerate(picked):
            row = enc[i]["input_ids"]
            ids[j, : len(row)], mask[j, : len(row)] = torch.tensor(row), 1
            if task == "ner":  # a word's first piece carries its tag (NER's default, as run_ner labels)
                tags = [index[t] for t in rows[i]["ner_tags"]]
                labels[j, : len(row)] = torch.tensor(align_labels(enc[i].word_ids(), tags, False, {}))
            else:
                labels[j] = int(rows[i]["label"])
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def one(task: str, setup: str, grouped: bool, n: int) -> dict:
    """One process: build the model as `setup` does, warm up on 4 batches, time 2 passes over the batches."""
    from llmkit import memory

    if setup == "llmkit":
        memory.keep_freed_memory()  # before torch allocates, as `llmkit finetune` does
    import torch
    import transformers

    from llmkit import clipping, fastdropout, unpad
    from llmkit.tasks.classification import last_layer_first_token_only

    tok = transformers.AutoTokenizer.from_pretrained(minilm())
    data = batches(task, tok, n, grouped)
    auto = (
        transformers.AutoModelForTokenClassification
        if task == "ner"
        else transformers.AutoModelForSequenceClassification
    )
    torch.manual_seed(0)
    attention = "eager" if setup == "llmkit" else "sdpa"
    model = auto.from_pretrained(minilm(), num_labels=13 if task == "ner" else 2, attn_implementation=attention)
    if setup == "llmkit":
        if task == "ner":
            unpad.skip_padding(model, labelled_last_layer=True)
        else:
            last_layer_first_token_only(model)
            unpad.skip_padding(model)
        fastdropout.install(model)
        memory.reuse_embedding_gradient(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01, fused=True)
    times: dict[str, list] = {"step": [], "forward": [], "backward": [], "optimizer": []}
    for k, b in enumerate(data[:4] + data + data):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**b).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if setup == "llmkit":
            clipping.clip_grad_norm([p.grad for p in params if p.grad is not None], 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if k >= 4:
            for key, v in zip(times, (t3 - t0, t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[key].append(1000 * v)
    real = sum(int(b["attention_mask"].sum()) for b in data) / (32 * len(data))
    positions = sum(b["attention_mask"].numel() for b in data) / (32 * len(data))
    return {k: statistics.median(v) for k, v in times.items()} | {"real_tokens": real, "positions": positions}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["ner", "sst2"], default="ner")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # SETUP BATCHES: one run in this process
    a = p.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(a.task, a.one[0], a.one[1] == "grouped", a.batches)), flush=True)
        return
    results: dict[tuple, list] = {pair: [] for pair in PAIRS}
    for r in range(a.rounds):
        for pair in PAIRS if r % 2 == 0 else PAIRS[::-1]:
            cmd = [sys.executable, __file__, "--task", a.task, "--batches", str(a.batches), "--one", *pair]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{pair} failed:\n{proc.stderr[-3000:]}")
            results[pair].append(json.loads(line[len("RESULT ") :]))
    print(f"{a.task}, {a.batches} batches of 32, median step in ms (each round's median; rounds: {a.rounds})")
    print("| setup | batches | positions / real tokens a row | step | forward | backward | optimizer |")
    print("|---|---|---|---|---|---|---|")
    for (setup, kind), runs in results.items():
        cells = [" / ".join(f"{r[k]:.1f}" for r in runs) for k in ("step", "forward", "backward", "optimizer")]
        print(
            f"| {setup} | {kind} | {runs[0]['positions']:.1f} / {runs[0]['real_tokens']:.1f} | "
            + " | ".join(cells)
            + " |"
        )


if __name__ == "__main__":
    main()
