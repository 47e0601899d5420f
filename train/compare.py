"""`python -m train.compare RUN_DIR [RUN_DIR ...] [--plot PNG]`: compare finished (or running)
runs.

Reads each run folder's config.yml, summary.json (absent while a run is going or after a
crash: its status is then "running or stopped") and metrics.jsonl, prints one table row a
run (config, model, norm, micro-batch x accumulation x replicas, seed, status, steps,
final and best validation accuracy, training images/s, wall time) and draws the validation
accuracy and loss against the optimiser step, one line a run, into --plot (compare.png).
Patterns are expanded (`'runs/cluttered*'`), so a quoted glob works as the shell's does.
"""
import argparse
import glob
import json
import os
import sys

import yaml

from train.files import RunFolderError, write_atomically
from train.metrics import read_records


class CompareError(Exception):
    """A folder that is not a run, or nothing to compare: one line, exit status 2."""


def read_run(folder):
    """{"name", "config", "summary", "curve"} of a run folder."""
    config_path = os.path.join(folder, "config.yml")
    if not os.path.isfile(config_path):
        raise CompareError(f"{folder} is not a run folder (no config.yml)")
    try:
        with open(config_path) as f:
            config = yaml.safe_load(f)
        summary = None
        if os.path.isfile(os.path.join(folder, "summary.json")):
            with open(os.path.join(folder, "summary.json")) as f:
                summary = json.load(f)
        curve = [record for record in read_records(os.path.join(folder, "metrics.jsonl"))
                 if record.get("kind") == "val"]
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise CompareError(f"cannot read run folder {folder}: {error}") from None
    if not isinstance(config, dict):
        raise CompareError(f"{config_path} is not a run's config")
    return {"name": os.path.basename(os.path.normpath(folder)), "config": config,
            "summary": summary, "curve": curve}


def percent(value):
    return "–" if value is None else f"{100 * value:.2f}"


def row(run):
    config, summary, curve = run["config"], run["summary"] or {}, run["curve"]
    last = curve[-1] if curve else {}
    accuracy = summary.get("val_accuracy", last.get("val_accuracy"))
    best = summary.get("best_val_accuracy", last.get("best_val_accuracy"))
    speed = summary.get("train_images_per_second")
    wall = summary.get("wall_seconds")
    plan = (f"{config.get('micro_batch_size')} x {config.get('gradient_accumulation')} x "
            f"{config.get('replicas')}")
    return [run["name"], config.get("config"), config.get("model"), config.get("norm"), plan,
            config.get("seed"), summary.get("status", "running or stopped"),
            summary.get("steps", last.get("step", 0)), percent(accuracy), percent(best),
            "–" if speed is None else f"{speed:.0f}", "–" if wall is None else f"{wall:.0f}"]


HEADER = ["run", "config", "model", "norm", "micro-batch x accum. x replicas", "seed", "status",
          "steps", "val acc. %", "best %", "images/s", "wall s"]


def table(runs):
    """A plain-text table, columns padded to their widest cell."""
    rows = [HEADER] + [[str(cell) for cell in row(run)] for run in runs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def plot(runs, path):
    """Validation accuracy and loss against the step, one line a run."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global state to touch

    figure = Figure(figsize=(11, 4.5))
    accuracy_axis, loss_axis = figure.subplots(1, 2)
    for run in runs:
        steps = [r["step"] for r in run["curve"]]
        accuracy_axis.plot(steps, [100 * r["val_accuracy"] for r in run["curve"]], marker=".",
                           label=run["name"])
        loss_axis.plot(steps, [r["val_loss"] for r in run["curve"]], marker=".",
                       label=run["name"])
    accuracy_axis.set_ylabel("validation accuracy (%)")
    loss_axis.set_ylabel("validation loss")
    for axis in (accuracy_axis, loss_axis):
        axis.set_xlabel("optimiser step")
        axis.grid(alpha=0.3)
    accuracy_axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    write_atomically(path, lambda f: figure.savefig(f, dpi=110, format="png"), binary=True)


def run_folders(patterns):
    """The folders the patterns name, in order, each once (a pattern without a match is
    taken as a path, so that a missing folder is named in the error)."""
    folders = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or [pattern]
        folders += [m for m in matches if m not in folders]
    return folders


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.compare",
                                     description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders or patterns")
    parser.add_argument("--plot", default="compare.png", metavar="PNG",
                        help="where to draw the validation curves (default compare.png)")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(folder) for folder in run_folders(args.runs)]
        print(table(runs))
        if any(run["curve"] for run in runs):
            plot(runs, args.plot)
            print(f"validation curves: {args.plot}")
        else:
            print("no validation records yet: no plot")
    except (CompareError, RunFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
