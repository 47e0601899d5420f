"""The accuracy study's results: the JSON of its runs (benchmarks/results/accuracy.json, a
record per cell, keyed by the cell's settings), which runs belong to a study, and the
statistics over seeds the tables and figures show (mean +- std, paired lifts)."""
import json
import math
import os
import re


NORMS = ["batch", "sync_batch", "group", "layer", "instance", "group_pn", "layer_pn"]
NORM_WORDS = {"batch": "BatchNorm", "sync_batch": "BatchNorm", "group": "GroupNorm",
              "layer": "LayerNorm", "instance": "InstanceNorm",
              "group_pn": "GroupNorm + Proxy Norm", "layer_pn": "LayerNorm + Proxy Norm",
              "none": "no normalisation"}
# The settings that make two runs the same cell; a finished cell is skipped when they agree.
# Settings added later have a default, so cells recorded before them keep their key.
KEY_DEFAULTS = {"config": None, "model": None, "norm": None, "data_path": None,
                "global_batch": None, "micro_batch_size": None, "seed": None, "epochs": None,
                "max_steps": None, "lr": None, "holdout": False,
                "label_smoothing": 0.0, "mixup_alpha": 0.0, "groups": None}
REGULARISATION = {"label_smoothing": "label smoothing", "mixup_alpha": "mixup"}


class StudyError(Exception):
    """A bad argument or config: one line, exit status 2."""


def load_report(path):
    if not os.path.exists(path):
        return {"runs": []}
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as error:
        raise StudyError(f"cannot read {path}: {error}") from None
    if not isinstance(report, dict) or not isinstance(report.get("runs"), list):
        raise StudyError(f"{path} is not an accuracy study (no 'runs' list)")
    return report


def add_run(report, run):
    """Adds a finished run to the report, in place of an earlier run of the same cell."""
    key = cell_key(run)
    report["runs"] = [earlier for earlier in report["runs"] if cell_key(earlier) != key]
    report["runs"].append(run)


def cell_key(cell):
    return tuple(json.dumps(cell.get(name, default)) for name, default in KEY_DEFAULTS.items())


def finished(run):
    """Whether a run trained its whole recipe (or its --max-steps): not diverged or cut short."""
    return run["status"] in ("finished", "max_steps")


def split_invariant(norm):
    """Whether the norm's statistics ignore how the global batch is split into micro-batches:
    every batch-independent norm, and sync_batch over all replicas (the study's
    bn_group_size 0). tests/test_execution_plans.py proves both exactly."""
    from proxynorm.norms import norm_kind
    kind = norm_kind(norm)
    return not kind.batch_statistics or kind.synchronised


def natural(name):
    """A sort key that orders the numbers in a name by value: cifar_preact_resnet20, 56, 110."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", name)]


# Student's t, two-sided 95% (the 0.975 quantile), for 1 to 10 degrees of freedom
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def paired_ci(differences):
    """(mean, low, high): the mean of paired differences and its 95% confidence interval
    (Student's t over the n - 1 degrees of freedom; low = high = mean for one pair)."""
    mean, std = mean_std(differences)
    if len(differences) < 2:
        return mean, mean, mean
    if len(differences) - 1 > len(T_975):
        raise ValueError(f"paired_ci: {len(differences)} pairs; T_975 goes to 11")
    half = T_975[len(differences) - 2] * std / math.sqrt(len(differences))
    return mean, mean - half, mean + half


def mean_std(values):
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) \
        if len(values) > 1 else 0.0
    return mean, std


def study_runs(report, cells):
    """The report's finished runs of `cells` (a study's plan), in plan order."""
    by_key = {cell_key(run): run for run in report["runs"]}
    return [by_key[cell_key(cell)] for cell, _ in cells if cell_key(cell) in by_key
            and finished(by_key[cell_key(cell)])]


def budget_runs(report, cells):
    """The report's finished runs of `cells` (a study's plan) at any number of epochs: the
    same recipe, split and seed trained for longer or shorter."""
    wanted = {cell_key({**cell, "epochs": None}) for cell, _ in cells}
    return [run for run in report["runs"]
            if finished(run) and cell_key({**run, "epochs": None}) in wanted]


def depth_sweep(runs):
    """A depth sweep's numbers, per model in the order of `runs` (a study's finished runs):
    {model: {"lifts": {norm: {seed: points}}, "collapse": {norm: {seed: {"init": ..., "end":
    ...}}}}}. A lift is the final validation accuracy of `NORM_pn` minus that of `NORM`
    (points), paired by seed at otherwise equal settings (the seed fixes the batches); a run
    whose partner did not finish is left out. The collapse shares ("mean" over the layers and
    "deepest") are each run's own, per norm and seed."""
    def pair_key(run, norm):
        return run["data"], norm, cell_key({**run, "config": None, "norm": None})

    by_key = {pair_key(run, run["norm"]): run for run in runs}
    sweep = {}
    for run in runs:
        model = sweep.setdefault(run["model"], {"lifts": {}, "collapse": {}})
        if "collapse" in run:
            model["collapse"].setdefault(run["norm"], {})[run["seed"]] = {
                when: {key: run["collapse"][when][key] for key in ("mean", "deepest")}
                for when in ("init", "end")}
        twin = by_key.get(pair_key(run, run["norm"] + "_pn"))
        if twin is not None:
            model["lifts"].setdefault(run["norm"], {})[run["seed"]] = 100 * (
                twin["val_accuracy"] - run["val_accuracy"])
    return sweep
