"""Teacher vs students, as `llmkit evaluate` measured them one after another on this machine (eval_validation.json).

Usage: python benchmarks/distill_table.py TEACHER_RUN STUDENT_RUN [STUDENT_RUN ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MAIN = {"classification": "eval_accuracy", "ner": "eval_f1", "mlm": "eval_perplexity", "clm": "eval_perplexity"}


def row(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    metrics = json.loads((run / "eval_validation.json").read_text())
    key = MAIN.get(summary["task"], "eval_loss")
    return {
        "run": run.name,
        "key": key,
        "value": metrics[key],
        "speed": metrics["eval_samples_per_second"],
        "parameters": summary["parameters"],
        "steps": summary["steps"],
    }


def main(runs: list[str]) -> None:
    rows = [row(Path(r)) for r in runs]
    teacher = rows[0]
    print(
        f"| run | {teacher['key'].removeprefix('eval_')} | vs teacher | eval samples/s | vs teacher | parameters | steps |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['value']:.4f} | {r['value'] / teacher['value']:.3f} | {r['speed']:.1f} | "
            f"{r['speed'] / teacher['speed']:.2f}x | {r['parameters']:,} | {r['steps']} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
