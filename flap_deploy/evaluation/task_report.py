"""Task accuracy results (``flap_deploy.evaluation.tasks.run_tasks``) as a table, a comparison and a PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flap_deploy.evaluation.tasks import METRICS


def compare_results(reference: dict[str, Any], model: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task and metric both runs have: both values and stderrs, ``difference``
    (model - reference) and ``same_predictions``, the fraction of items where both chose the
    same answer by raw log-likelihood (the runs score the same items in the same order)."""
    rows = []
    for task, ref in reference["tasks"].items():
        other = model["tasks"].get(task)
        if other is None:
            continue
        same = [a == b for a, b in zip(ref["predictions"], other["predictions"])]
        for metric in METRICS:
            if metric in ref["metrics"] and metric in other["metrics"]:
                a, b = ref["metrics"][metric], other["metrics"][metric]
                rows.append({"task": task, "metric": metric, "n": ref["n"],
                             "reference": a["value"], "reference_stderr": a["stderr"],
                             "model": b["value"], "model_stderr": b["stderr"],
                             "difference": b["value"] - a["value"],
                             "same_predictions": sum(same) / len(same) if same else None})
    return rows


def _pct(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:5.1f} ± {100 * stderr:4.1f}" if stderr is not None else f"{100 * value:5.1f}"


def _label(result: dict[str, Any]) -> str:
    return f"{result['model']} ({result['backend']})"


def format_table(model: dict[str, Any], reference: dict[str, Any] | None = None,
                 chance: dict[str, float] | None = None) -> str:
    """Accuracies in percent ± stderr; with a reference, side by side with the difference."""
    chance = chance or {}
    if reference is None:
        header = ["task", "metric", "n", _label(model), "chance"]
        body = [[task, metric, str(r["n"]), _pct(m["value"], m["stderr"]),
                 f"{100 * chance[task]:.1f}" if task in chance else ""]
                for task, r in model["tasks"].items() for metric, m in r["metrics"].items()]
    else:
        header = ["task", "metric", "n", _label(reference), _label(model), "difference", "same answer", "chance"]
        body = [[row["task"], row["metric"], str(row["n"]), _pct(row["reference"], row["reference_stderr"]),
                 _pct(row["model"], row["model_stderr"]), f"{100 * row['difference']:+.1f}",
                 f"{100 * row['same_predictions']:.0f} %" if row["same_predictions"] is not None else "",
                 f"{100 * chance[row['task']]:.1f}" if row["task"] in chance else ""]
                for row in compare_results(reference, model)]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(accuracy in %, ± one standard error; lm-eval " \
        f"{model.get('lm_eval_version') or ''})".replace(" )", ")")


def plot_comparison(model: dict[str, Any], reference: dict[str, Any], out: str | os.PathLike,
                    chance: dict[str, float] | None = None) -> Path:
    """PNG: per task and metric, reference and model accuracy with one-stderr error bars
    (a dashed line at chance where the task states it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = compare_results(reference, model)
    chance = chance or {}
    x = list(range(len(rows)))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(rows) + 5.0), 4.2))
    for shift, key, color, label in ((-width / 2, "reference", "#9aa9bd", _label(reference)),
                                     (width / 2, "model", "#3b75af", _label(model))):
        ax.bar([i + shift for i in x], [100 * r[key] for r in rows], width,
               yerr=[100 * (r[f"{key}_stderr"] or 0) for r in rows], capsize=3, color=color, label=label)
    for i, r in enumerate(rows):
        if r["task"] in chance:
            ax.hlines(100 * chance[r["task"]], i - width, i + width, colors="#c44e52", linestyles="dashed",
                      label="chance" if i == 0 else None)
    ax.set_xticks(x, [f"{r['task']}\n{r['metric']}" for r in rows], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"lm-eval zero-shot accuracy, n = {rows[0]['n'] if rows else 0} items per task", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
