"""What a study leaves in its folder: trials.json, best.yaml, the trials table, plots, the best trial's card."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from llmkit.files import atomic_write, write_json
from llmkit.recipefile import apply_overrides, dump_yaml
from llmkit.search import overrides

CARD_MARK = "## Hyperparameter search"
log = logging.getLogger("llmkit")


def rows(study: Any) -> list[dict]:
    """Every trial that ran (surplus starts excluded): number, state, objective, steps, params, folder."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        value = t.value if t.value is not None else t.user_attrs.get("value")
        out.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": value,
                "steps": t.user_attrs.get("steps"),
                "params": dict(t.params),
                "output_dir": t.user_attrs.get("output_dir"),
                "retry_of": t.system_attrs.get("failed_trial"),
            }
        )
    return out


def best(study: Any) -> Any:
    """The best complete trial, or None."""
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def best_so_far(p: Any, study: Any) -> str:
    b = best(study)
    pruned = sum(r["state"] == "pruned" for r in rows(study))
    head = f"best {p.objective.removeprefix('eval_')} {b.value:.4f} (trial {b.number})" if b else "no result yet"
    return f"{head}, {pruned} pruned"


def best_recipe(p: Any, trial: Any) -> str:
    """The study's recipe with the best trial's values, ready for `llmkit finetune` (output: STUDY/best)."""
    raw = {k: v for k, v in p.recipe.raw.items() if k not in ("search", "tune")}
    raw = apply_overrides(raw, [*overrides(trial.params), f"trainer.output_dir={p.folder / 'best'}"])
    head = f"# Trial {trial.number} of study {p.study!r}: {p.objective} {trial.value:.4f} ({p.direction})\n"
    return head + dump_yaml(raw)


def write(p: Any, study: Any, final: bool = False) -> None:
    """trials.json and best.yaml after every trial; at the end also plots, the card section and the table."""
    table = rows(study)
    b = best(study)
    write_json(
        p.folder / "trials.json",
        {
            "study": p.study,
            "objective": p.objective,
            "direction": p.direction,
            "best": {"number": b.number, "value": b.value, "params": b.params} if b else None,
            "trials": table,
        },
    )
    if b is not None:
        atomic_write(p.folder / "best.yaml", best_recipe(p, b))
    if final:
        try:
            plot(p, table)
        except Exception as e:  # noqa: BLE001 - a plot is not worth the study's results: say it and go on
            log.warning("could not draw the study's plots: %s", e)
        if b is not None:
            card_section(p, b, table)


def format_table(p: Any, table: list[dict]) -> str:
    keys = [s.key for s in p.spaces]
    head = ["trial", "state", p.objective.removeprefix("eval_"), "steps", *keys]
    lines = [head]
    for r in table:
        value = "-" if r["value"] is None else f"{r['value']:.4f}"
        params = [_short(r["params"].get(k)) for k in keys]
        lines.append([str(r["number"]), r["state"], value, str(r["steps"] or "-"), *params])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _short(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def card_section(p: Any, trial: Any, table: list[dict]) -> None:
    """The best trial's model card says how it was chosen."""
    folder = trial.user_attrs.get("output_dir")
    card = Path(folder) / "README.md" if folder else None
    if card is None or not card.is_file():
        return
    text = card.read_text(encoding="utf-8").split(CARD_MARK)[0].rstrip()
    done = [r for r in table if r["state"] in ("complete", "pruned")]
    lines = [
        "",
        "",
        CARD_MARK,
        "",
        f"Best of {len(done)} trials ({sum(r['state'] == 'pruned' for r in done)} pruned) of the study "
        f"`{p.study}` (`llmkit tune`, Optuna {p.settings.sampler} sampler, {p.settings.pruner} pruner), "
        f"{p.direction} `{p.objective}`: {trial.value:.4f}.",
        "",
        "| parameter | value |",
        "|---|---|",
        *[f"| `{k}` | {v} |" for k, v in trial.params.items()],
    ]
    atomic_write(card, text + "\n".join(lines) + "\n")


def plot(p: Any, table: list[dict]) -> None:
    """plots/objective.png (each trial, the running best) and plots/PARAM.png (objective against each value)."""
    from llmkit.report import pyplot

    done = [r for r in table if r["value"] is not None]
    if not done:
        return
    plt = pyplot()
    folder = p.folder / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    better = max if p.direction == "maximize" else min
    fig, ax = plt.subplots(figsize=(6, 4))
    for state, marker in (("complete", "o"), ("pruned", "x")):
        pts = [(r["number"], r["value"]) for r in done if r["state"] == state]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, label=state)
    running, xs, ys = None, [], []
    for r in sorted((r for r in done if r["state"] == "complete"), key=lambda r: r["number"]):
        running = r["value"] if running is None else better(running, r["value"])
        xs.append(r["number"])
        ys.append(running)
    ax.step(xs, ys, where="post", label="best so far")
    ax.set(xlabel="trial", ylabel=p.objective, title=f"study {p.study}")
    ax.legend()
    _save(fig, folder / "objective.png")
    plt.close(fig)
    for space in p.spaces:
        pts = [(r["params"][space.key], r["value"]) for r in done if space.key in r["params"]]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter(*zip(*pts, strict=True))
        if space.log:
            ax.set_xscale("log")
        ax.set(xlabel=space.key, ylabel=p.objective)
        _save(fig, folder / f"{space.key}.png")
        plt.close(fig)


def _save(fig: Any, path: Path) -> None:
    """Through a temporary file and a rename: two workers finishing together never interleave a PNG."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    tmp.replace(path)
