"""What a MiniLM training step asks of the host: operators dispatched and host time with the arithmetic taken away.

On a GPU at fine-tuning sizes the device waits on the host (README, On a CUDA GPU): a step costs about what its
operators cost to dispatch. This measures that on a CPU, with the GPU's settings (SDPA attention, torch's dropout,
no kept embedding gradient) for three setups over the same batches of real rows:
- skip: llmkit's position skipping (`unpad.py`; NER's labelled last layer, a classifier's first-token layer);
- noskip: `model.skip_positions: false`, every position computed;
- tuned: the tuned Trainer's model (the same, with torch's clipping).
Operators: one training step (forward, backward, clipping, fused AdamW) counted under a `TorchDispatchMode`, all
of them and those that launch a kernel (views left out). Host time: forward and backward of MiniLM's graph at
width 48 (its 6 layers and 12 heads, tiny weights) on batches of 4 rows of at most 16 tokens, one thread, the
setups alternated for --rounds rounds; median step of each round, the median of the rounds, and the median of
the rounds' ratios to noskip (the machine's speed drifts between rounds more than between setups).

    python benchmarks/host_ops.py [--task ner|sst2] [--rounds 10]
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import time

from bench import minilm  # benchmarks/ is on the path of its scripts
from step_loop import batches

SETUPS = ("skip", "noskip", "tuned")
VIEWS = ("view", ".t.", "transpose", "detach", "expand", "squeeze", "slice", "select", "as_strided", "permute",
         "alias", "split", "unbind", "chunk", "narrow")  # fmt: skip


def models(task: str, tiny: bool) -> dict:
    """(model, its trainable parameters, fused AdamW) per setup, from one initialisation."""
    import torch
    import transformers

    from llmkit import unpad
    from llmkit.tasks.classification import last_layer_first_token_only

    auto = (
        transformers.AutoModelForTokenClassification
        if task == "ner"
        else transformers.AutoModelForSequenceClassification
    )
    labels = 13 if task == "ner" else 2
    torch.manual_seed(0)
    if tiny:  # the same graph, weights too small to cost anything: what is left is the host's
        config = transformers.AutoConfig.from_pretrained(minilm(), num_labels=labels)
        config.hidden_size, config.intermediate_size = 48, 96
        config._attn_implementation = "sdpa"
        base = auto.from_config(config)
    else:
        base = auto.from_pretrained(minilm(), num_labels=labels, attn_implementation="sdpa")
    out = {}
    for name in SETUPS:
        model = copy.deepcopy(base)
        if name == "skip" and task == "ner":
            unpad.skip_padding(model, labelled_last_layer=True)
        elif name == "skip":
            last_layer_first_token_only(model)
            unpad.skip_padding(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        out[name] = (model, params, torch.optim.AdamW(params, lr=5e-5, fused=True))
    return out


def step(setup: str, model, params, optimizer, batch: dict, optimize: bool = True) -> None:
    import torch

    from llmkit import clipping

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    if optimize:
        if setup == "tuned":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        else:
            clipping.clip_grad_norm([p.grad for p in params if p.grad is not None], 1.0)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_operators(task: str, data: list) -> dict:
    """{setup: (operators, kernels)} for the fourth training step of the real model (three before it warm up)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen[str(func)] += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for name, (model, params, optimizer) in models(task, tiny=False).items():
        for batch in data[:3]:
            step(name, model, params, optimizer, batch)
        with Count() as counter:
            step(name, model, params, optimizer, data[3])
        kernels = sum(n for op, n in counter.seen.items() if not any(v in op for v in VIEWS))
        counts[name] = (sum(counter.seen.values()), kernels)
    return counts


def host_time(task: str, data: list, rounds: int) -> dict:
    """{setup: median forward + backward ms of each round} on tiny weights and tiny batches, one thread."""
    import torch

    torch.set_num_threads(1)
    small = []
    for b in data:
        width = min(16, b["input_ids"].shape[1])
        s = {k: (v[:4, :width] if v.dim() == 2 else v[:4]).clone() for k, v in b.items()}
        s["attention_mask"][1, width // 2 :] = 0  # a shorter row: padding to skip
        if task == "ner":
            s["labels"] = s["labels"].masked_fill(s["attention_mask"] == 0, -100)
        small.append(s)
    setups = models(task, tiny=True)
    for name, (model, params, optimizer) in setups.items():
        for b in small:
            step(name, model, params, optimizer, b, optimize=False)
    times: dict[str, list] = {name: [] for name in setups}
    for r in range(rounds):
        for name in SETUPS if r % 2 == 0 else SETUPS[::-1]:
            model, params, optimizer = setups[name]
            steps = []
            for b in small:
                start = time.perf_counter()
                step(name, model, params, optimizer, b, optimize=False)
                steps.append(1000 * (time.perf_counter() - start))
            times[name].append(statistics.median(steps))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["ner", "sst2"], default="ner")
    p.add_argument("--rounds", type=int, default=10)
    a = p.parse_args()
    import transformers

    data = batches(a.task, transformers.AutoTokenizer.from_pretrained(minilm()), 8, grouped=False)
    counts = count_operators(a.task, data)
    times = host_time(a.task, data, a.rounds)
    print(
        f"{a.task}: operators of one training step (random batch of 32); host ms, forward + backward ({a.rounds} rounds)"
    )
    print(
        "| setup | operators | that launch kernels | host ms (median of rounds) | / noskip (median of rounds) | each round |"
    )
    print("|---|---|---|---|---|---|")
    for name in SETUPS:
        ratio = statistics.median(t / n for t, n in zip(times[name], times["noskip"], strict=True))
        rounds = " / ".join(f"{t:.1f}" for t in times[name])
        median = statistics.median(times[name])
        print(f"| {name} | {counts[name][0]:,} | {counts[name][1]:,} | {median:.1f} | {ratio:.2f}x | {rounds} |")


if __name__ == "__main__":
    main()
