"""One table over several runs, in the paper's layout: `python -m pivot_jax.report RUN_DIR... --out=DIR`.

Rows are training modes (runs of the same mode and perturbation with other seeds are averaged),
columns are test conditions, and each cell shows our accuracy beside the paper's where the paper has
that number (docs/method.md). Each run must have been evaluated (`eval/results.json`). Writes
`report.md` and `sweeps.png` (every run's sweep curves) into `--out`.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np
from absl import app, flags
from etils import epath

from pivot_jax import results

ROW_ORDER = ("Clean only", "Noisy only", "LR only", "MR only", "LR, MR only", "Clean, Noisy", "Clean, LR",
             "Clean, MR", "Clean, LR, MR", "Pivot loss (Ours)", "Pivot loss, symmetric")
_KIND_NAMES = {"noise": "Noisy", "lr": "LR", "mr": "MR"}

# The paper's test accuracies (%), by table, row and test condition (docs/method.md).
PAPER = {
    "cifar10": {
        "Clean only": {"clean": 91.6, "noise_0.05": 62.4, "noise_0.15": 16.6, "lr4_nearest": 19.2, "lr4_bicubic": 19.9},
        "Noisy only": {"clean": 89.8, "noise_0.05": 88.9, "noise_0.15": 82.0},
        "Clean, Noisy": {"clean": 90.5, "noise_0.05": 89.1, "noise_0.15": 80.7},
        "LR only": {"clean": 86.9, "lr4_nearest": 75.9, "lr4_bicubic": 72.9},
        "Clean, LR": {"clean": 91.7, "lr4_nearest": 71.5, "lr4_bicubic": 70.7},
        ("Pivot loss (Ours)", "noise"): {"clean": 90.8, "noise_0.05": 89.6, "noise_0.15": 81.7},
        ("Pivot loss (Ours)", "lr"): {"clean": 92.0, "lr4_nearest": 73.5, "lr4_bicubic": 72.7},
    },
    "mnist": {
        "Clean only": {"clean": 99.6, "noise_0.15": 40.9, "lr4_nearest": 50.4, "lr4_bicubic": 57.5},
        ("Pivot loss (Ours)", "noise"): {"clean": 99.5, "noise_0.15": 99.5},
        ("Pivot loss (Ours)", "lr"): {"lr4_nearest": 87.1, "lr4_bicubic": 86.2},
    },
    # The paper's ImageNet LR x 4 column does not say which up-sampling it used: only clean and MR here.
    "imagenet": {
        "Clean only": {"clean": 68.1, "mr4_nearest": 57.8},
        "Clean, LR, MR": {"clean": 67.9, "mr4_nearest": 61.5},
        ("Pivot loss (Ours)", "lr+mr"): {"clean": 67.4, "mr4_nearest": 62.1},
    },
}


def row_label(config: dict) -> str:
    mode, kinds = config["loss"]["mode"], [_KIND_NAMES[k] for k in config["perturb"]["kinds"]]
    if mode == "clean":
        return "Clean only"
    if mode == "perturbed":
        return f"{', '.join(kinds)} only"
    if mode == "mixed":
        return "Clean, " + ", ".join(kinds)
    # The ablation whose L_dist gradient also reaches the clean logits (as in the released code).
    return "Pivot loss, symmetric" if config["loss"].get("symmetric") else "Pivot loss (Ours)"


def paper_numbers(config: dict) -> dict[str, float]:
    # Runs saved before `paper_table` was named so call it `dataset`.
    table = PAPER.get(config.get("paper_table", config.get("dataset", "")), {})
    label = row_label(config)
    return table.get(label) or table.get((label, "+".join(config["perturb"]["kinds"])), {})


def load_run(run_dir) -> dict:
    run_dir = epath.Path(run_dir)
    for name in ("config.json", "eval/results.json"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir}: no {name} (train it, then run pivot_jax.evaluate on it)")
    config = json.loads((run_dir / "config.json").read_text())
    run_results = json.loads((run_dir / "eval" / "results.json").read_text())
    return {"dir": str(run_dir), "config": config, "results": run_results, "row": row_label(config)}


def build_report(runs: list[dict], columns: list[str] | None = None, title: str = "") -> str:
    """The Markdown table: our mean accuracy (with the seeds' spread) beside the paper's."""
    if columns is None:
        columns = [c for c in runs[0]["config"]["evals"] if all(c in r["results"]["accuracy"] for r in runs)]
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        groups[run["row"]].append(run)
    rows = sorted(groups, key=lambda r: ROW_ORDER.index(r) if r in ROW_ORDER else len(ROW_ORDER))
    lines = [f"## {title}" if title else "", "",
             "Test accuracy (%): ours, then the paper's in parentheses where it reports the cell. "
             "With several seeds: their mean ± half their range.", "",
             "| training | " + " | ".join(columns) + " | seeds | steps |",
             "|---|" + "---|" * (len(columns) + 2)]
    for row in rows:
        members = groups[row]
        paper = paper_numbers(members[0]["config"])
        cells = []
        for column in columns:
            values = [100 * m["results"]["accuracy"][column] for m in members if column in m["results"]["accuracy"]]
            cell = f"{np.mean(values):.2f}" if values else "–"
            if len(values) > 1:
                cell += f" ± {(max(values) - min(values)) / 2:.2f}"
            if column in paper:
                cell += f" ({paper[column]:.1f})"
            cells.append(cell)
        seeds = ", ".join(str(m["config"]["seed"]) for m in members)
        steps = ", ".join(sorted({str(m["results"]["step"]) for m in members}))
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {seeds} | {steps} |")
    lines += ["", "Runs: " + ", ".join(f"`{m['dir']}`" for row in rows for m in groups[row]), ""]
    return "\n".join(lines).lstrip("\n")


def write_report(run_dirs: list[str], out_dir, columns: list[str] | None = None, title: str = "") -> str:
    runs = [load_run(d) for d in run_dirs]
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = build_report(runs, columns, title)
    (out_dir / "report.md").write_text(text)
    curves = {f"{r['row']} (seed {r['config']['seed']})": r["results"]["accuracy"] for r in runs}
    results.plot_sweeps(curves, out_dir / "sweeps.png")
    return text


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("usage: python -m pivot_jax.report RUN_DIR... --out=DIR")
    try:
        print(write_report(argv[1:], flags.FLAGS.out, flags.FLAGS.columns, flags.FLAGS.title))
    except (FileNotFoundError, KeyError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    flags.DEFINE_string("out", None, "Where report.md and sweeps.png go.")
    flags.DEFINE_list("columns", None, "Test conditions to tabulate (default: the runs' config.evals).")
    flags.DEFINE_string("title", "", "A heading for the table.")
    flags.mark_flags_as_required(["out"])
    app.run(main)
