"""`python -m train.compare RUN_DIR [RUN_DIR ...] [--plot PNG] [--x epochs|samples|steps]`:
compare finished (or running) runs.

Reads each run folder's config.yml, summary.json (absent while a run is going or after a
crash: its status is then "running or stopped") and metrics.jsonl, prints one table row a
run (config, model, norm, micro-batch x accumulation x replicas, seed, status, steps,
final and best validation accuracy, training images/s, wall time; a resumed run's cover all
of its parts) and draws the validation accuracy and loss (log scale), one line a run,
against epochs (or samples, or optimiser steps), so that runs of different global batches
compare, into compare.png beside the runs (the folder that holds them) or --plot.
Patterns are expanded (`'runs/cluttered*'`), so a quoted glob works as the shell's does.
"""
import argparse
import glob
import json
import math
import os
import sys

from train.config import ConfigError, read_yaml
from train.files import RunFolder, RunFolderError, write_atomically
from train.metrics import read_records

DESCRIPTION = ("Compare finished (or running) runs: a table of their settings, status, "
               "validation accuracy, speed and wall time, and their validation curves in a "
               "PNG.")
X_AXES = {"epochs": "epochs", "samples": "training samples", "steps": "optimiser steps"}
# summary.json's numbers: each a number or null
SUMMARY_NUMBERS = ("epochs", "steps", "val_accuracy", "best_val_accuracy",
                   "train_images_per_second", "wall_seconds", "global_batch_size",
                   "steps_per_epoch")


class CompareError(Exception):
    """A folder that is not a run, or nothing to compare: one line, exit status 2."""


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_curve_point(record):
    """A validation record that can be drawn: a step, an accuracy in 0..1 and a loss."""
    return (record.get("kind") == "val" and isinstance(record.get("step"), int)
            and not isinstance(record["step"], bool) and is_number(record.get("val_accuracy"))
            and 0 <= record["val_accuracy"] <= 1 and is_number(record.get("val_loss")))


def read_summary(path):
    """summary.json's dict (None without one); CompareError for one that is not a run's."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        summary = json.loads(f.read().decode("utf-8"))
    if not isinstance(summary, dict):
        raise CompareError(f"{path} is not a run's summary (a JSON object)")
    for key in SUMMARY_NUMBERS:
        if summary.get(key) is not None and not is_number(summary[key]):
            raise CompareError(f"{path}: {key} {summary[key]!r} is not a number")
    if not isinstance(summary.get("status", ""), str):
        raise CompareError(f"{path}: status {summary['status']!r} is not a word")
    return summary


def read_run(folder):
    """{"name", "folder", "config", "summary", "curve", "left_out"} of a run folder: curve
    holds the validation records that can be drawn, left_out counts the others."""
    run = RunFolder(folder)
    if not os.path.isfile(run.config):
        raise CompareError(f"{folder} is not a run folder (no {RunFolder.CONFIG})")
    try:
        config = read_yaml(run.config)  # the same bounded loader as the trainer's
        summary = read_summary(run.summary)
        records = [record for record in read_records(run.metrics) if record.get("kind") == "val"]
    except (OSError, ValueError, ConfigError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise CompareError(f"cannot read run folder {folder}: {reason}") from None
    if not isinstance(config, dict):
        raise CompareError(f"{run.config} is not a run's config")
    curve = [record for record in records if is_curve_point(record)]
    return {"name": os.path.basename(os.path.normpath(folder)), "folder": folder,
            "config": config, "summary": summary, "curve": curve,
            "left_out": len(records) - len(curve)}


def percent(value):
    return "–" if value is None else f"{100 * value:.2f}"


def row(run):
    config, summary, curve = run["config"], run["summary"] or {}, run["curve"]
    last = curve[-1] if curve else {}
    accuracy = summary.get("val_accuracy", last.get("val_accuracy"))
    best = summary.get("best_val_accuracy", last.get("best_val_accuracy"))
    if not is_number(best):  # a record's, unchecked
        best = None
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


def global_batch(run):
    summary, config = run["summary"] or {}, run["config"]
    if is_number(summary.get("global_batch_size")):
        return summary["global_batch_size"]
    sizes = [config.get(key) for key in ("micro_batch_size", "gradient_accumulation", "replicas")]
    return math.prod(sizes) if all(is_number(size) for size in sizes) else None


def x_values(run, x_axis):
    """The curve's x values on the axis (None for a point the run cannot place there)."""
    curve = run["curve"]
    if x_axis == "steps":
        return [record["step"] for record in curve]
    if x_axis == "samples":
        batch = global_batch(run)
        return [None if batch is None else record["step"] * batch for record in curve]
    steps_per_epoch = (run["summary"] or {}).get("steps_per_epoch")
    return [record["epoch"] if is_number(record.get("epoch")) else
            record["step"] / steps_per_epoch if steps_per_epoch else None for record in curve]


def default_plot_path(runs):
    """compare.png in the folder that holds the runs (their closest common folder)."""
    common = os.path.commonpath([os.path.dirname(os.path.abspath(run["folder"]))
                                 for run in runs])
    here = os.getcwd()
    inside = os.path.commonpath([common, here]) == here  # then shown as the user wrote it
    return os.path.join(os.path.relpath(common) if inside else common, "compare.png")


def title(runs):
    configs = list(dict.fromkeys(str(run["config"].get("config")) for run in runs))
    shown = ", ".join(configs[:3]) + (f" and {len(configs) - 3} more" if len(configs) > 3 else "")
    return f"Validation of {len(runs)} run{'s' if len(runs) > 1 else ''} ({shown})"


def plot(runs, path, x_axis="epochs"):
    """Draws `figure` into the PNG at path, written whole or not at all."""
    drawn = figure(runs, x_axis)
    write_atomically(path, lambda f: drawn.savefig(f, dpi=110, format="png"), binary=True)


def figure(runs, x_axis="epochs"):
    """Validation accuracy and loss (log scale) against x_axis, one line a run."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global state to touch

    drawn = Figure(figsize=(11, 4.8))
    accuracy_axis, loss_axis = drawn.subplots(1, 2)
    for run in runs:
        points = [(x, record) for x, record in zip(x_values(run, x_axis), run["curve"])
                  if x is not None]
        accuracy_axis.plot([x for x, _ in points], [100 * r["val_accuracy"] for _, r in points],
                           marker=".", label=run["name"])
        losses = [(x, r["val_loss"]) for x, r in points if r["val_loss"] > 0]
        loss_axis.plot([x for x, _ in losses], [loss for _, loss in losses], marker=".",
                       label=run["name"])
    accuracy_axis.set_ylabel("validation accuracy (%)")
    loss_axis.set_ylabel("validation loss")
    loss_axis.set_yscale("log")
    for axis in (accuracy_axis, loss_axis):
        axis.set_xlabel(X_AXES[x_axis])
        axis.grid(alpha=0.3)
    accuracy_axis.legend(fontsize=7, loc="lower right")
    drawn.suptitle(title(runs))
    drawn.tight_layout()
    return drawn


def run_folders(patterns):
    """The folders the patterns name, in order, each once (a pattern without a match is
    taken as a path, so that a missing folder is named in the error)."""
    folders = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or [pattern]
        folders += [m for m in matches if m not in folders]
    return folders


class ArgumentParser(argparse.ArgumentParser):
    """A bad argument is one line, `error: ...`, and exit status 2 (argparse adds a usage
    block)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser():
    parser = ArgumentParser(prog="python -m train.compare", description=DESCRIPTION)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run folders, or patterns such as 'runs/cluttered*'")
    parser.add_argument("--plot", metavar="PNG",
                        help="where to draw the validation curves (default: compare.png in "
                             "the folder that holds the runs)")
    parser.add_argument("--x", choices=list(X_AXES), default="epochs", dest="x_axis",
                        help="the curves' x-axis: epochs or training samples compare runs of "
                             "different global batches, steps do not (default: epochs)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        runs = [read_run(folder) for folder in run_folders(args.runs)]
        print(table(runs))
        for run in runs:
            if run["left_out"]:
                print(f"warning: {run['folder']}: {run['left_out']} validation record(s) "
                      f"without a step, an accuracy in 0..1 or a loss left out", file=sys.stderr)
        if any(run["curve"] for run in runs):
            path = args.plot or default_plot_path(runs)
            plot(runs, path, args.x_axis)
            print(f"validation curves: {path}")
        else:
            print("no validation records yet: no plot")
    except (CompareError, RunFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
