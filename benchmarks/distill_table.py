"""Teacher vs students on the validation split: the main metric, and evaluation throughput measured here, in
turns (teacher, student, ..., then again), REPEAT times each; the median samples/s of each run is reported.

Usage: python benchmarks/distill_table.py TEACHER_RUN STUDENT_RUN [STUDENT_RUN ...] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from llmkit import engine, rundir
from llmkit.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    speeds: dict[Path, list[float]] = {run: [] for run in args.runs}
    metrics: dict[Path, dict] = {}
    for _ in range(args.repeat):
        for run in args.runs:  # in turns: a slow spell of the machine hits every run alike
            metrics[run] = engine.evaluate(rundir.recipe_for_evaluation(run, []))
            speeds[run].append(metrics[run]["eval_samples_per_second"])
    rows = []
    for run in args.runs:
        summary = json.loads((run / "summary.json").read_text())
        key = get_task(summary["task"]).main_metric
        rows.append((run.name, key, metrics[run][key], statistics.median(speeds[run]), summary))
    _, key, base_value, base_speed, _ = rows[0]
    print(
        f"| run | {key.removeprefix('eval_')} | vs teacher | eval samples/s (median of {args.repeat}) "
        "| vs teacher | parameters | train samples/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, _, value, speed, summary in rows:
        print(
            f"| {name} | {value:.4f} | {value / base_value:.3f} | {speed:.1f} | {speed / base_speed:.2f}x | "
            f"{summary['parameters']:,} | {summary['train_samples_per_second']:.1f} |"
        )


if __name__ == "__main__":
    main()
