"""Scores, agreement with the full cache, and the results table and plot.

The table has the paper's layout: one row per method and budget (the full cache first), one
column per MileBench task group present (``T-1`` ... ``I-1``: the mean of its tasks) and per task,
then ``Avg`` (mean over tasks), the KV kept, and the agreement with the full-cache run:

* ``KV kept``: mean over items of ``kv_tokens_kept / prompt_tokens`` as the engine reports it
  (LOOK-M keeps whole blocks in vLLM, so this can be above the budget);
* ``Token match``: mean over items of the share of decode positions whose greedy token equals
  the full-cache run's (:func:`~lookm_vllm.eval.metrics.token_agreement`);
* ``Identical``: share of items whose whole output equals the full-cache output;
* ``First div.``: mean first decode step (0-based) where the output leaves the full-cache one,
  an identical output counting its full length.

Scores are percentages (as MileBench's ``score.py`` reports them); agreement numbers fractions.
Agreement is meaningful even for random-weight models: it measures what compression changes.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

from .grid import FULL_CACHE
from .metrics import METRIC_LABELS, score, token_agreement
from .milebench import TASK_GROUPS
from .runner import PredictionFile

AGREEMENT_COLUMNS = ("KV kept", "Token match", "Identical", "First div.")


@dataclass
class CellResult:
    """One (task, cell): per-item scores and agreement with the same task's full-cache run."""

    task: str
    cell: str
    method: str
    budget: float | None
    metric: str
    group: str | None
    scores: list[float] = field(default_factory=list)
    match_rates: list[float] = field(default_factory=list)
    first_divergence: list[int] = field(default_factory=list)
    identical: list[bool] = field(default_factory=list)
    kv_kept: list[float] = field(default_factory=list)

    @property
    def score(self) -> float:
        return 100.0 * fmean(self.scores) if self.scores else math.nan


def _cell_files(out_dir: Path) -> list[tuple[str, str]]:
    root = out_dir / "predictions"
    if not root.is_dir():
        return []
    return sorted((p.parent.name, p.name[:-len(".settings.json")])
                  for p in root.glob("*/*.settings.json"))


def collect(out_dir: str | Path, cells: Sequence[str] | None = None,
            tasks: Sequence[str] | None = None) -> list[CellResult]:
    """Score every predictions file under ``out_dir`` (or only those of ``cells`` x ``tasks``);
    files without a complete record are left out."""
    out_dir = Path(out_dir)
    results: list[CellResult] = []
    reference: dict[str, dict[str, list[int]]] = {}
    for task, cell in _cell_files(out_dir):
        if cell == FULL_CACHE:
            reference[task] = {str(r["sample_id"]): r["token_ids"]
                               for r in PredictionFile(out_dir, task, cell).records()}
    for task, cell in _cell_files(out_dir):
        if (cells is not None and cell not in cells) or (tasks is not None and task not in tasks):
            continue
        store = PredictionFile(out_dir, task, cell)
        settings, records = store.settings(), store.records()
        if not records:
            continue
        result = CellResult(task, cell, settings["method"], settings["budget"],
                            settings["metric"], settings["group"])
        for record in records:
            result.scores.append(score(settings["metric"], record["prediction"],
                                       record["response"], record["choice_list"]))
            stats = record["kv_compression"]
            result.kv_kept.append(stats["kv_tokens_kept"] / stats["prompt_tokens"]
                                  if stats else 1.0)
            ref = reference.get(task, {}).get(str(record["sample_id"]))
            if ref is None:
                continue
            rate, first = token_agreement(record["token_ids"], ref)
            result.match_rates.append(rate)
            result.identical.append(first is None)
            result.first_divergence.append(len(record["token_ids"]) if first is None else first)
        results.append(result)
    return results


def _task_order(task: str) -> tuple[int, int, str]:
    """MileBench's tasks in the order of its task table, then any other task by name."""
    for g, tasks in enumerate(TASK_GROUPS.values()):
        if task in tasks:
            return g, tasks.index(task), task
    return len(TASK_GROUPS), 0, task


def _mean(values: Sequence[float]) -> float | None:
    return fmean(values) if values else None


def build_table(results: Sequence[CellResult],
                cell_order: Sequence[str] | None = None) -> dict[str, Any]:
    """Rows = method/budget cells, columns = groups, tasks, Avg and the agreement columns."""
    tasks = sorted({r.task for r in results}, key=_task_order)
    groups_of = {r.task: r.group for r in results}
    groups = [g for g in TASK_GROUPS if any(groups_of[t] == g for t in tasks)]
    if cell_order is None:
        seen = {r.cell: (r.budget is not None, r.method, r.budget or 0.0) for r in results}
        cell_order = sorted(seen, key=seen.__getitem__)
    rows = []
    for cell in cell_order:
        mine = {r.task: r for r in results if r.cell == cell}
        if not mine:
            continue
        first = next(iter(mine.values()))
        values: dict[str, float | None] = {}
        for group in groups:
            scores = [mine[t].score for t in tasks if groups_of[t] == group and t in mine]
            values[group] = _mean(scores)
        for task in tasks:
            values[task] = mine[task].score if task in mine else None
        values["Avg"] = _mean([mine[t].score for t in tasks if t in mine])
        every = list(mine.values())
        values["KV kept"] = _mean([x for r in every for x in r.kv_kept])
        values["Token match"] = _mean([x for r in every for x in r.match_rates])
        values["Identical"] = _mean([float(x) for r in every for x in r.identical])
        values["First div."] = _mean([float(x) for r in every for x in r.first_divergence])
        rows.append({"method": first.method, "budget": first.budget, "cell": cell,
                     "items": sum(len(r.scores) for r in every), "values": values})
    return {
        "columns": ["method", "budget", *groups, *tasks, "Avg", *AGREEMENT_COLUMNS],
        "rows": rows,
        "tasks": {t: {"group": groups_of[t],
                      "metric": METRIC_LABELS[next(r.metric for r in results if r.task == t)],
                      "items": max(len(r.scores) for r in results if r.task == t)}
                  for t in tasks},
        "units": {"scores": "percent (MileBench metric per task; groups and Avg: task means)",
                  "KV kept": "fraction of prompt KV tokens kept (engine stats)",
                  "Token match": "fraction of decode positions equal to the full-cache run",
                  "Identical": "fraction of items whose output equals the full-cache output",
                  "First div.": "mean first decode step differing from the full cache "
                                "(identical outputs count their length)"},
    }


def _fmt(value: float | None, column: str) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if column in AGREEMENT_COLUMNS[:3] else f"{value:.1f}"


def table_rows(table: dict[str, Any]) -> list[list[str]]:
    """The table as strings, header first (what the CSV and the printout show)."""
    out = [list(table["columns"])]
    for row in table["rows"]:
        line = [row["method"], "full" if row["budget"] is None else f"{row['budget']:g}"]
        line += [_fmt(row["values"][c], c) for c in table["columns"][2:]]
        out.append(line)
    return out


def format_table(table: dict[str, Any]) -> str:
    """A fixed-width text rendering of the table, for the terminal."""
    rows = table_rows(table)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_table(table: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``results.json`` (the table with raw numbers) and ``results.csv`` (formatted)."""
    out_dir = Path(out_dir)
    json_path, csv_path = out_dir / "results.json", out_dir / "results.csv"
    json_path.write_text(json.dumps(table, indent=2) + "\n")
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(table_rows(table))
    return json_path, csv_path


def plot(table: dict[str, Any], path: str | Path) -> Path:
    """Two panels against the budget, one line per method: Avg score and token match rate.

    The full cache is a dashed horizontal line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("Avg", "Score (Avg over tasks, %)"), ("Token match", "Token match with full cache"))
    for ax, (column, label) in zip(axes, panels, strict=True):
        by_method: dict[str, list[tuple[float, float]]] = {}
        for row in table["rows"]:
            value = row["values"][column]
            if value is None:
                continue
            if row["budget"] is None:
                ax.axhline(value, color="black", linestyle="--", linewidth=1, label=row["method"])
            else:
                by_method.setdefault(row["method"], []).append((row["budget"], value))
        for method, points in by_method.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xlabel("KV budget (fraction of the prompt kept)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if column == "Token match":
            ax.set_ylim(-0.02, 1.05)
    axes[0].legend(fontsize=8)
    fig.suptitle("Score and agreement vs KV budget")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_by_scoring(table: dict[str, Any], path: str | Path, x: str = "budget") -> Path:
    """Accuracy (``Avg``) against the budget (``x="budget"``) or against the KV actually kept
    (``x="kv"``: the ``KV kept`` column, so methods compare at equal memory), one panel per
    attention scoring (``+full``, ``+window`` methods; methods that do not score, e.g.
    ``streaming`` and ``random``, appear in every panel), one line per method; the full cache
    is a dashed horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scorings = sorted({row["method"].partition("+")[2] for row in table["rows"]} - {""})
    fig, axes = plt.subplots(1, len(scorings), figsize=(5.8 * len(scorings), 4.4), sharey=True,
                             squeeze=False)
    for ax, scoring in zip(axes[0], scorings, strict=True):
        by_method: dict[str, list[tuple[float, float]]] = {}
        for row in table["rows"]:
            value = row["values"]["Avg"]
            base, _, own = row["method"].partition("+")
            if value is None or (own and own != scoring):
                continue
            if row["budget"] is None:
                ax.axhline(value, color="black", linestyle="--", linewidth=1,
                           label=f"{row['method']} (full cache)")
            else:
                where = row["budget"] if x == "budget" else row["values"]["KV kept"]
                by_method.setdefault(base, []).append((where, value))
        for method, points in by_method.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("KV budget (fraction of the prompt kept, log scale)" if x == "budget" else
                      "KV kept (measured fraction of the prompt's KV, log scale)")
        ax.set_title(f"{scoring} attention scoring")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("Accuracy (Avg over tasks, %)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(out_dir: str | Path, cells: Sequence[str] | None = None,
           tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Score, write ``results.json``/``results.csv``/``scores.png`` (and, for a grid with
    ``+full``/``+window`` scoring variants, ``accuracy.png`` and ``accuracy_vs_kv.png``) under
    ``out_dir`` (all
    predictions there, or only those of ``cells`` x ``tasks``, rows in ``cells`` order).

    Raises
    ------
    FileNotFoundError
        When there are no predictions under ``out_dir``.
    """
    results = collect(out_dir, cells, tasks)
    if not results:
        raise FileNotFoundError(f"{out_dir}: no predictions (expected predictions/<Task>/*.jsonl)")
    table = build_table(results, cells)
    write_table(table, out_dir)
    plot(table, Path(out_dir) / "scores.png")
    if any("+" in row["method"] for row in table["rows"]):
        plot_by_scoring(table, Path(out_dir) / "accuracy.png")
        plot_by_scoring(table, Path(out_dir) / "accuracy_vs_kv.png", x="kv")
    return table
