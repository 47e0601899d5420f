"""Accuracy study: final validation accuracy of every norm against the micro-batch, over seeds.

    python -m benchmarks.accuracy [--data digits|cluttered_digits|cifar10 | --configs NAME ...]
        [--norms ...] [--global-batch 64] [--micro-batches 2 8 64] [--seeds 0 1 2]
        [--jobs 2] [--epochs N ...] [--max-steps N] [--lr LR ...] [--label-smoothing E ...]
        [--mixup ALPHA ...] [--model NAME ...] [--holdout] [--every-split]
        [--data-path DIR] [--figures DIR] [--depth-figure FILE] [--headline] [--output JSON]
        [--markdown FILE --section NAME]
        [--no-resume] [--no-readme] [--report-only]

Each cell (config, epochs, lr, regularisation, micro-batch, seed) is one training run of a
named config from configs.yml, through the training application's own API
(`train.build.resolve_config`, `train.loop.run`), with its recipe as written (optimiser,
lr, schedule, epochs, regularisation) except: the global batch is `--global-batch`, split as
`micro_batch_size` x `replicas` with `gradient_accumulation` 1 (so BatchNorm's statistics
cover one micro-batch and sync_batch's, with `bn_group_size` 0, all replicas: the whole
global batch), `cpu_threads` 1, wandb disabled and the run folder a temporary one, deleted
afterwards (its validation curve is kept in the JSON). `lr` stays the config's (it is not
rescaled for the global batch; `--lr` sets another, several make a search, as several
`--epochs` do; `--label-smoothing` and `--mixup` set the extra regularisation the same way,
a cell for each combination; `--model` trains another model with the same recipe, its
runs a row of their own; several models run one after another, all of the first model's
cells first). The sample order depends only on the seed and the global
batch, so at one seed every micro-batch sees the same batches: only the normalisation's
statistics domain differs.

Every run also records its channel-wise collapse (`collapse`): analysis.power's
`channel_squared_mean` share of the power of each pre-activation (a norm layer followed by
an activation), in eval mode over the first 256 validation images, at initialisation (the
model as built with the run's seed, before the first step) and at the end (the final
weights): the layers' names, each layer's share, their mean and the deepest layer's. In
eval mode BatchNorm uses its running statistics (at initialisation: none yet).

Split-invariant norms (the batch-independent ones, and sync_batch over all replicas) give
the same maths for every split (tests/test_execution_plans.py), so they run once per seed,
at their config's micro-batch where the grid has it (else the largest), and the table
shows that value in every column, marked; `--every-split` runs them at every micro-batch.
`--holdout` (cluttered digits) validates on held-out training digits instead of the
validation digits: for choosing a recipe without looking at the data it is reported on.

`--data digits` (the default) takes `digits_resnet_NORM`, `--data cluttered_digits`
`cluttered_digits_preact_resnet20_NORM`, `--data cifar10` `cifar10_preact_resnet20_NORM`
(with `--data-path`); a norm without its own config there takes the family's first config with
`norm` overridden. `--configs` names configs directly (their norms come from them).

Runs go `--jobs` at a time in separate processes (each uses one thread). Every finished
run is added to `--output` (benchmarks/results/accuracy.json) at once (written to a
temporary file, then renamed), so an interrupted study keeps what it finished; by default
a cell already in the JSON with the same settings is skipped (`--no-resume` runs it again
and replaces it), so running the same command again finishes a partial grid. The table
between the `--section` markers of `--markdown` (docs/evidence.md, `accuracy`) is rebuilt
from the whole JSON: final validation accuracy, mean +- standard deviation (n - 1) over the
seeds, per (config family, norm, lr) and micro-batch, then the wall minutes per run of each
length. `--figures DIR` draws this study's
runs: accuracy_vs_microbatch.png and training_curves.png, and error_vs_budget.png where the
JSON holds the same cells trained for other numbers of epochs; `--depth-figure FILE` draws,
against the depth of the `--model` networks (the number ending each name), the lift in final
accuracy from each norm to its Proxy Norm twin, paired by seed, and the collapse shares at
initialisation and at the end (docs/depth_sweep.png for the depth sweep of docs/evidence.md);
`--headline` rewrites README.md's
headline table (`accuracy_headline`) from them: a row per norm and micro-batch, best first,
and each row's paired distance below the best BatchNorm. `--report-only` runs nothing and
rebuilds the tables and figures from what the JSON holds (while a study is still running).
"""
import argparse
import collections
import concurrent.futures
import contextlib
import copy
import itertools
import json
import math
import multiprocessing
import os
import platform
import re
import shlex
import sys
import tempfile

from benchmarks.measure import log2_x_axis, write_json, write_png
from benchmarks.readme import README, markdown_table, replace_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "accuracy.json")
EVIDENCE = os.path.join(ROOT, "docs", "evidence.md")
NORMS = ["batch", "sync_batch", "group", "layer", "instance", "group_pn", "layer_pn"]
FAMILIES = {  # --data: the config family, `FAMILY_NORM` in configs.yml
    "digits": "digits_resnet",
    "cluttered_digits": "cluttered_digits_preact_resnet20",
    "cifar10": "cifar10_preact_resnet20",
}
# The settings that make two runs the same cell; a finished cell is skipped when they agree.
# Settings added later have a default, so cells recorded before them keep their key.
KEY_DEFAULTS = {"config": None, "model": None, "norm": None, "data_path": None,
                "global_batch": None, "micro_batch_size": None, "seed": None, "epochs": None,
                "max_steps": None, "lr": None, "holdout": False,
                "label_smoothing": 0.0, "mixup_alpha": 0.0}
REGULARISATION = {"label_smoothing": "label smoothing", "mixup_alpha": "mixup"}
COLLAPSE_IMAGES = 256  # validation images over which each run's collapse is measured


class StudyError(Exception):
    """A bad argument or config: one line, exit status 2."""


class RunFailed(Exception):
    """A training run raised: the study stops with what finished kept, exit status 1."""


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


def cell_key(cell):
    return tuple(json.dumps(cell.get(name, default)) for name, default in KEY_DEFAULTS.items())


def split_invariant(norm):
    """Whether the norm's statistics ignore how the global batch is split into micro-batches:
    every batch-independent norm, and sync_batch over all replicas (the study's
    bn_group_size 0). tests/test_execution_plans.py proves both exactly."""
    from proxynorm.norms import norm_kind
    kind = norm_kind(norm)
    return not kind.batch_statistics or kind.synchronised


def family_configs(configs, data):
    family = FAMILIES[data]
    return [name for name in configs if name.startswith(family + "_")
            and not name.startswith("_")]


def plan(args):
    """The cells of the study, in run order: config, micro-batch, seed; each a dict with the
    KEY settings and the overrides to train it."""
    from train.build import resolve_config
    from train.config import ConfigError, load_configs

    configs = load_configs()
    if args.configs:
        names = [(name, None) for name in args.configs]
    else:
        members = family_configs(configs, args.data)
        if not members:
            raise StudyError(f"configs.yml has no {FAMILIES[args.data]}_* config")
        names = []
        for norm in args.norms:
            own = f"{FAMILIES[args.data]}_{norm}"
            names.append((own, None) if own in configs else (members[0], norm))
    for micro_batch in args.micro_batches:
        if args.global_batch % micro_batch:
            raise StudyError(f"--micro-batches {micro_batch} does not divide --global-batch "
                             f"{args.global_batch}")
    cells = []
    for model, (name, norm) in itertools.product(args.model or [None], names):
        try:
            recipe = resolve_config(name, {"norm": norm} if norm else {}, configs=configs)
        except ConfigError as error:
            raise StudyError(str(error)) from None
        once = not args.every_split and split_invariant(recipe["norm"])
        micro_batches = args.micro_batches
        if once:  # one run per seed, at the config's own micro-batch where the grid has it
            own = recipe["micro_batch_size"]
            micro_batches = [own if own in micro_batches else max(micro_batches)]
        for epochs, lr, smoothing, mixup, micro_batch, seed in itertools.product(
                args.epochs or [None], args.lr or [None], args.label_smoothing or [None],
                args.mixup or [None], micro_batches, args.seeds):
            overrides = {
                "seed": seed, "micro_batch_size": micro_batch, "gradient_accumulation": 1,
                "replicas": args.global_batch // micro_batch, "bn_group_size": 0,
                "cpu_threads": args.threads, "wandb_mode": "disabled",
                "max_steps": args.max_steps,
            }
            if args.holdout:
                overrides["clutter_holdout"] = True
            for option, value in (("norm", norm), ("epochs", epochs), ("lr", lr),
                                  ("label_smoothing", smoothing), ("mixup_alpha", mixup),
                                  ("model", model), ("data_path", args.data_path),
                                  ("engine", args.engine)):
                if value is not None:
                    overrides[option] = value
            try:
                config = resolve_config(name, overrides, configs=configs)
            except ConfigError as error:
                raise StudyError(str(error)) from None
            cell = {"config": name, "norm": config["norm"], "data": config["data"],
                    "model": config["model"], "data_path": config["data_path"],
                    "global_batch": args.global_batch, "micro_batch_size": micro_batch,
                    "replicas": config["replicas"], "seed": seed,
                    "epochs": config["epochs"], "max_steps": config["max_steps"],
                    "lr": config["lr"], "holdout": args.holdout, "split_invariant": once,
                    **{option: config[option] for option in REGULARISATION}}
            cells.append((cell, overrides))
    return cells


def train_cell(name, overrides, log_dir=None):
    """One training run in this process; returns the summary's numbers and the collapse
    shares at initialisation and at the end (no run folder kept).

    The run's own output goes to a log in its temporary folder; on a failure its tail is in
    the error."""
    from analysis.checkpoint import first_validation_images
    from train.build import resolve_config
    from train.loop import run

    started = {}

    def keep_initial(training):  # before the first step: a copy of the model as built
        started["run"], started["model"] = training, copy.deepcopy(training.engine.model)

    with tempfile.TemporaryDirectory(prefix="accuracy-", dir=log_dir) as folder:
        _running["folder"] = folder
        config = resolve_config(name, {**overrides, "output_dir": os.path.join(folder, "run")})
        log_path = os.path.join(folder, "log.txt")
        try:
            with open(log_path, "w") as log, contextlib.redirect_stdout(log), \
                    contextlib.redirect_stderr(log):
                summary, _ = run(config, on_start=keep_initial)
        except Exception as error:
            with open(log_path) as log:
                tail = log.read()[-2000:]
            raise RunFailed(f"{name} {overrides}: {type(error).__name__}: {error}; the run's "
                            f"output ended:\n{tail}") from None
        curve = validation_curve(os.path.join(folder, "run", "metrics.jsonl"))
    images = first_validation_images(started["run"].data, COLLAPSE_IMAGES)
    names, initial = collapse_shares(started["model"], images)
    _, final = collapse_shares(started["run"].engine.model, images)
    keep = ("status", "val_accuracy", "best_val_accuracy", "steps", "epochs",
            "train_images_per_second", "wall_seconds", "steps_per_epoch", "device")
    result = {key: summary[key] for key in keep}
    result["completed_epochs"] = result.pop("epochs")
    result["curve"] = curve
    result["collapse"] = {"images": len(images), "layers": names, "init": initial,
                          "end": final}
    result["recipe"] = {key: config[key] for key in (
        "optimizer", "lr", "momentum", "nesterov", "weight_decay", "lr_schedule",
        "warmup_epochs", "epochs", "label_smoothing", "mixup_alpha", "precision", "engine",
        "cpu_threads")}
    return result


def collapse_shares(model, images, train=False):
    """(layer names, shares) of `model`'s channel-wise collapse over `images` (analysis.power,
    eval mode, in batches of 64): the channel_squared_mean share of each pre-activation's
    power, in model order, their mean and the deepest layer's. train: in train mode instead
    (BatchNorm on the statistics of each batch, or of each replica chunk of it)."""
    from analysis.power import decompose_model

    layers = decompose_model(model.cpu().train(train), images, batch_size=64)
    shares = [layer["shares"]["channel_squared_mean"] for layer in layers]
    return [layer["layer"] for layer in layers], {
        "layers": shares, "mean": sum(shares) / len(shares), "deepest": shares[-1]}


def validation_curve(path):
    """One record per validation of a run's metrics.jsonl: step, epoch, val_accuracy,
    val_loss, and train_loss, the mean of the training records since the previous one."""
    from train.metrics import read_records

    curve, train_losses = [], []
    for record in read_records(path):
        if record["kind"] == "train":
            train_losses.append(record["loss"])
        elif record["kind"] == "val":
            curve.append({key: record[key] for key in
                          ("step", "epoch", "val_accuracy", "val_loss")})
            curve[-1]["train_loss"] = (sum(train_losses) / len(train_losses)
                                       if train_losses else None)
            train_losses = []
    return curve


def finished(run):
    """Whether a run trained its whole recipe (or its --max-steps): not diverged or cut short."""
    return run["status"] in ("finished", "max_steps")


def mean_std(values):
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) \
        if len(values) > 1 else 0.0
    return mean, std


_running = {}  # this worker's current run folder, for end_with_parent


def end_with_parent(parent):
    """Pool initializer: on Linux a worker ends when the study's process does, even by
    SIGKILL, removing its current run folder: a stopped study leaves no run training on
    and takes no further cell from its queue."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import shutil
    import signal

    def end(signum, frame):
        if _running.get("folder"):
            shutil.rmtree(_running["folder"], ignore_errors=True)
        os._exit(128 + signum)

    # SIGHUP, which the training loop leaves alone (it turns SIGINT/SIGTERM into a
    # graceful stop, after which the worker would take the next cell)
    signal.signal(signal.SIGHUP, end)
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGHUP)
    if os.getppid() != parent:  # the parent ended before prctl took effect
        end(signal.SIGHUP, None)


def percent(values):
    mean, std = mean_std(values)
    return f"{100 * mean:.2f}" if len(values) < 2 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def regularisation(run):
    """The run's extra regularisation, in words ("none" for runs recorded before it was)."""
    parts = [f"{words} {run.get(option, KEY_DEFAULTS[option]):g}"
             for option, words in REGULARISATION.items()
             if run.get(option, KEY_DEFAULTS[option])]
    return ", ".join(parts) or "none"


def table(report):
    """The markdown table: one row per (data, model, norm, global batch, length, lr,
    regularisation), one
    column per micro-batch; a cell is the mean +- std of the final validation accuracy (%)
    and the number of seeds. A split-invariant norm run at one micro-batch shows its value
    in every column, marked with *."""
    runs = report["runs"]
    if not runs:
        return "No runs yet."
    micro_batches = sorted({run["micro_batch_size"] for run in runs})
    groups = {}
    for run in runs:
        row = (run["data"] + (" (holdout)" if run.get("holdout") else ""), run["model"],
               run["norm"], run["global_batch"], run["epochs"], run["max_steps"], run["lr"],
               regularisation(run))
        groups.setdefault(row, {}).setdefault(run["micro_batch_size"], []).append(run)
    order = {norm: i for i, norm in enumerate(NORMS)}
    rows, once = [], set()
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[3], k[4], k[5], k[6], k[7] != "none",
                                             k[7], order.get(k[2], len(order)), k[2])):
        data, model, norm, global_batch, epochs, max_steps, lr, extra = key
        by_micro_batch = groups[key]
        shared = None
        if len(by_micro_batch) == 1 and all(r.get("split_invariant") for runs in
                                            by_micro_batch.values() for r in runs):
            (shared,) = by_micro_batch
            once.add(shared)
        cells = []
        for micro_batch in micro_batches:
            done = by_micro_batch.get(micro_batch if shared is None else shared, [])
            accuracies = [r["val_accuracy"] for r in done if r["val_accuracy"] is not None
                          and finished(r)]
            failed = len(done) - len(accuracies)
            cell = f"{percent(accuracies)} ({len(accuracies)})" if accuracies else "–"
            if failed:
                cell += f", {failed} diverged"
            if shared is not None:
                cell += " *"
            cells.append(cell)
        steps = sorted({r.get("steps") for runs in by_micro_batch.values() for r in runs}
                       - {None})
        length = f"{epochs} epochs" + (f", max {max_steps} steps" if max_steps else "")
        length += f" ({'/'.join(map(str, steps))} steps)" if steps else ""
        rows.append([data, f"`{model}`", f"`{norm}`", global_batch, length, lr, extra, *cells])
    header = ["data", "model", "norm", "global batch", "length", "lr", "regularisation",
              *[f"micro-batch {mb}" for mb in micro_batches]]
    commands = sorted({run["command"] for run in runs})
    seeds = sorted({run["seed"] for run in runs})
    environment = report.get("environment", {})
    threads = sorted({run.get("recipe", {}).get("cpu_threads") for run in runs} - {None})
    threads = " or ".join(map(str, threads)) or "?"
    # a seed reproduces a run only on the same kind of CPU (its kernels round differently)
    runs_by_cpu = collections.Counter(run.get("cpu", "an unrecorded CPU") for run in runs)
    machines = ", ".join(f"{count} on {cpu}" if len(runs_by_cpu) > 1 else cpu
                         for cpu, count in runs_by_cpu.most_common())
    note = (f"Final validation accuracy (%), mean ± standard deviation (n - 1) over seeds "
            f"({', '.join(map(str, seeds))}), the number of seeds in brackets; \"–\": not run "
            f"yet. The global batch is micro-batch x replicas (gradient accumulation 1): "
            f"`batch` normalises over one micro-batch, `sync_batch` over the whole global "
            f"batch, the others over one sample, and at one seed every column sees the same "
            f"batches in the same order. ")
    if once:
        note += (f"*: run once per seed at micro-batch {'/'.join(map(str, sorted(once)))}; "
                 f"this norm's statistics do not depend on how the global batch is split "
                 f"(tests/test_execution_plans.py proves it exactly), so the value stands "
                 f"for every column. ")
    note += (f"Each config's recipe (optimiser, lr, schedule, epochs, regularisation: label "
             f"smoothing and mixup beyond the weight decay every run has) as in configs.yml, lr "
             f"not rescaled for the global batch; {threads} CPU thread(s) per run "
             f"({machines}; torch {environment.get('torch', '?')}). "
             + " ".join(f"`{command}`" for command in commands) + ".")
    return markdown_table(header, rows) + "\n\n" + note


def time_table(report):
    """The markdown table of what the runs took: per (data, model, length), the wall minutes
    of one run, lowest to highest, for the norms with batch statistics and for the
    batch-independent ones, and the hours of all the row's runs together."""
    groups = {}
    for run in report["runs"]:
        if run.get("wall_seconds") is None:
            continue
        row = (run["data"] + (" (holdout)" if run.get("holdout") else ""), run["model"],
               run["epochs"], run["max_steps"])
        kind = "independent" if split_invariant(run["norm"]) and run["norm"] != "sync_batch" \
            else "batch"
        groups.setdefault(row, {}).setdefault(kind, []).append(run["wall_seconds"] / 60)
    if not groups:
        return "No timed runs yet."

    def minutes(values):
        if not values:
            return "–"
        return f"{min(values):.0f}–{max(values):.0f} ({len(values)})"

    rows = []
    for key in sorted(groups):
        data, model, epochs, max_steps = key
        by_kind = groups[key]
        every = [m for values in by_kind.values() for m in values]
        length = f"{epochs} epochs" + (f", max {max_steps} steps" if max_steps else "")
        rows.append([data, f"`{model}`", length, minutes(by_kind.get("batch", [])),
                     minutes(by_kind.get("independent", [])), f"{sum(every) / 60:.1f}"])
    header = ["data", "model", "length", "`batch`, `sync_batch`: minutes per run",
              "batch-independent norms: minutes per run", "all the runs: hours"]
    note = ("Wall time of each run (one process, one thread), from its start to its summary, "
            "lowest to highest, the number of runs in brackets; the hours add up the row's "
            "runs. The studies ran `--jobs 2` on a 2-core machine, so each run shared the "
            "cores with another (and at times with a third process or other work): these "
            "are the times the runs took, not a speed benchmark.")
    return markdown_table(header, rows) + "\n\n" + note


NORM_WORDS = {"batch": "BatchNorm", "sync_batch": "BatchNorm", "group": "GroupNorm",
              "layer": "LayerNorm", "instance": "InstanceNorm",
              "group_pn": "GroupNorm + Proxy Norm", "layer_pn": "LayerNorm + Proxy Norm",
              "none": "no normalisation"}


def headline(runs, planned=()):
    """The README's headline table of one study's runs (one recipe per norm): a row per
    (norm, micro-batch), best first, with each row's distance below the best BatchNorm row
    as the mean of the per-seed differences (a seed fixes the batches, so the comparison
    is paired) and their range. Rows of `planned` cells (the study's plan) with no finished
    run yet follow, marked so."""
    def row_key(run):
        return run["norm"], None if run.get("split_invariant") else run["micro_batch_size"]

    groups = {}
    for run in runs:
        if run["val_accuracy"] is not None and finished(run):
            groups.setdefault(row_key(run), {})[run["seed"]] = run
    missing = {}
    for cell in planned:
        if row_key(cell) not in groups:
            missing.setdefault(row_key(cell), cell)
    if not groups and not missing:
        return "No runs yet."
    mean = {key: mean_std([r["val_accuracy"] for r in by_seed.values()])[0]
            for key, by_seed in groups.items()}
    # on a tie (sync_batch over all replicas is BatchNorm over the whole global batch) the
    # synchronised one is the reference
    batchnorms = sorted((key for key in groups if key[0] in ("batch", "sync_batch")),
                        key=lambda k: k[0] != "sync_batch")
    best = max(batchnorms, key=mean.get) if batchnorms else None

    def statistics_over(run):
        replicas = run["global_batch"] // run["micro_batch_size"]
        if run["norm"] == "sync_batch":
            return f"{run['global_batch']} samples (synchronised over {replicas} replicas)"
        if run["norm"] == "batch":
            return f"{run['micro_batch_size']} samples (" + (
                "one replica)" if replicas == 1 else f"per replica, {replicas} replicas)")
        return "1 sample"

    def label(norm):
        return f"{NORM_WORDS.get(norm, norm)} (`{norm}`)"

    rows = []
    for key in sorted(groups, key=lambda k: (-mean[k], k != best)):
        by_seed = groups[key]
        run = next(iter(by_seed.values()))
        below = "–"
        if best is not None and key != best:
            paired = [100 * (groups[best][seed]["val_accuracy"] - r["val_accuracy"])
                      for seed, r in by_seed.items() if seed in groups[best]]
            if paired:
                below = f"{sum(paired) / len(paired):.2f}"
                if len(paired) > 1:
                    below += f" ({min(paired):.2f} to {max(paired):.2f})"
        accuracies = [r["val_accuracy"] for r in by_seed.values()]
        rows.append([label(key[0]), statistics_over(run), regularisation(run),
                     f"{percent(accuracies)} ({len(accuracies)})", below])
    for key, cell in missing.items():
        rows.append([label(key[0]), statistics_over(cell), regularisation(cell),
                     "not run yet", "–"])
    header = ["norm", "statistics over", "extra regularisation",
              "final validation accuracy (%)", "below the best BatchNorm (points)"]
    first = runs[0] if runs else next(iter(missing.values()))
    seeds = sorted({run["seed"] for run in [*runs, *planned]})
    note = (f"{first['data']}, `{first['model']}`, global batch {first['global_batch']}, "
            f"{first['epochs']} epochs, seeds {', '.join(map(str, seeds))}: mean ± standard "
            f"deviation (n - 1) over the seeds, their number in brackets. Below the best "
            f"BatchNorm: the mean of the per-seed differences (a seed fixes the batches) and "
            f"their range; negative is above it.")
    return markdown_table(header, rows) + "\n\n" + note


def study_runs(report, cells):
    """The report's finished runs of `cells` (a study's plan), in plan order."""
    by_key = {cell_key(run): run for run in report["runs"]}
    return [by_key[cell_key(cell)] for cell, _ in cells if cell_key(cell) in by_key
            and finished(by_key[cell_key(cell)])]


def plot_accuracy_vs_micro_batch(runs, path, micro_batches=None):
    """Final validation accuracy (mean +- std over seeds) against the micro-batch, a line per
    norm, on the study's grid (`micro_batches`, default: those of the runs). A
    split-invariant norm run once per seed is one measurement, not one per micro-batch: a
    single marker where it ran, and a dashed line across the axis at its mean (any split
    gives the same value)."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global state to touch

    micro_batches = sorted(set(micro_batches or []) | {run["micro_batch_size"] for run in runs})
    by_norm = {}
    for run in runs:
        by_norm.setdefault(run["norm"], {}).setdefault(run["micro_batch_size"], []).append(
            100 * run["val_accuracy"])
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    order = {norm: i for i, norm in enumerate(NORMS)}
    norms = sorted(by_norm, key=lambda n: order.get(n, len(order)))
    once = [norm for norm in norms if len(by_norm[norm]) == 1 and all(
        r.get("split_invariant") for r in runs if r["norm"] == norm)]
    for color, norm in enumerate(norms):
        points = by_norm[norm]
        if norm in once:
            ((ran, values),) = points.items()
            mean, std = mean_std(values)
            axis.axhline(mean, color=f"C{color}", linestyle="--", linewidth=1)
            # nudged sideways so that the norms measured at one micro-batch keep their
            # error bars apart
            nudge = 1.05 ** (once.index(norm) - (len(once) - 1) / 2)
            axis.errorbar([ran * nudge], [mean], yerr=[std], capsize=3, marker="o",
                          color=f"C{color}", label=f"{norm} (run at {ran}; any split)")
        else:
            xs = sorted(points)
            stats = [mean_std(points[x]) for x in xs]
            axis.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3,
                          marker="o", color=f"C{color}", label=norm)
    log2_x_axis(axis, micro_batches, f"micro-batch (global batch {runs[0]['global_batch']})")
    axis.set_ylabel("final validation accuracy (%)")
    axis.set_title(f"{runs[0]['data']}, {runs[0]['model']}, {runs[0]['epochs']} epochs: "
                   f"mean ± std over seeds")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    write_png(figure, path)


def plain_log_y(axis):
    """A log y axis whose tick labels read as plain numbers (2, 3, 10), not powers of ten."""
    from matplotlib.ticker import ScalarFormatter

    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(ScalarFormatter())
    axis.yaxis.set_minor_formatter(ScalarFormatter())


def budget_runs(report, cells):
    """The report's finished runs of `cells` (a study's plan) at any number of epochs: the
    same recipe, split and seed trained for longer or shorter."""
    wanted = {cell_key({**cell, "epochs": None}) for cell, _ in cells}
    return [run for run in report["runs"]
            if finished(run) and cell_key({**run, "epochs": None}) in wanted]


def plot_error_vs_budget(runs, path):
    """Final validation error (mean +- std over seeds) against the number of epochs trained,
    a line per (norm, micro-batch), log scales: how much of a gap is a matter of budget. A
    line stops at the longest budget it has finished runs for, and says so in the legend
    where others go further: nothing is drawn that did not run."""
    from matplotlib.figure import Figure

    groups = {}
    for run in runs:
        key = (run["norm"], 0 if run.get("split_invariant") else run["micro_batch_size"])
        groups.setdefault(key, {}).setdefault(run["epochs"], []).append(
            100 * (1 - run["val_accuracy"]))
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    order = {norm: i for i, norm in enumerate(NORMS)}
    longest = max(run["epochs"] for run in runs)
    for norm, micro_batch in sorted(groups, key=lambda k: (order.get(k[0], len(order)), k)):
        by_epochs = groups[norm, micro_batch]
        epochs = sorted(by_epochs)
        stats = [mean_std(by_epochs[e]) for e in epochs]
        label = norm + (f", micro-batch {micro_batch}" if micro_batch else "")
        if epochs[-1] < longest:
            label += f" (not run past {epochs[-1]})"
        axis.errorbar(epochs, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3,
                      marker="o", label=label)
    log2_x_axis(axis, sorted({run["epochs"] for run in runs}),
                "epochs trained (cosine schedule over the whole run)")
    plain_log_y(axis)
    axis.set_ylabel("final validation error (%, 100 - accuracy)")
    axis.set_title(f"{runs[0]['data']}, {runs[0]['model']}: mean ± std over seeds")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    write_png(figure, path)


def plot_training_curves(runs, path):
    """Validation error and training loss against the step, a line per (norm, micro-batch) of
    the runs at the mean over seeds, in a band from the lowest seed to the highest (so that a
    seed far from the others shows); both on log scales, so that the last few tenths of a
    point between the norms show beside the first epochs' tens."""
    from matplotlib.figure import Figure

    groups = {}
    for run in runs:
        label = run["norm"] if run.get("split_invariant") else \
            f"{run['norm']}, micro-batch {run['micro_batch_size']}"
        groups.setdefault(label, []).append(run["curve"])
    figure = Figure(figsize=(11, 4.5))
    error_axis, loss_axis = figure.subplots(1, 2)
    for color, (label, curves) in enumerate(groups.items()):
        length = min(len(curve) for curve in curves)
        steps = [curves[0][i]["step"] for i in range(length)]
        error = [[100 * (1 - c[i]["val_accuracy"]) for c in curves] for i in range(length)]
        loss = [[c[i]["train_loss"] for c in curves]
                if all(c[i]["train_loss"] is not None for c in curves) else [math.nan]
                for i in range(length)]  # None: no training record before that validation
        for axis, values in ((error_axis, error), (loss_axis, loss)):
            axis.plot(steps, [sum(v) / len(v) for v in values], marker=".",
                      color=f"C{color}", label=label)
            known = [(step, v) for step, v in zip(steps, values) if not math.isnan(v[0])]
            if known:  # a NaN in a band breaks a log axis
                axis.fill_between([step for step, _ in known], [min(v) for _, v in known],
                                  [max(v) for _, v in known], color=f"C{color}", alpha=0.15,
                                  linewidth=0)
    error_axis.set_ylabel("validation error (%, 100 - accuracy)")
    plain_log_y(error_axis)
    loss_axis.set_ylabel("training loss (mean since the last validation)")
    loss_axis.set_yscale("log")
    for axis in (error_axis, loss_axis):
        axis.set_xlabel("optimiser step")
        axis.grid(alpha=0.3)
    error_axis.legend(fontsize=7, loc="upper right")
    figure.suptitle(f"{runs[0]['data']}, {runs[0]['model']}: mean over seeds "
                    f"({', '.join(map(str, sorted({r['seed'] for r in runs})))}), "
                    f"shaded from the lowest seed to the highest")
    figure.tight_layout()
    write_png(figure, path)


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


def model_depth(model):
    """The depth in a model's name (cifar_preact_resnet110: 110)."""
    found = re.search(r"(\d+)$", model)
    if found is None:
        raise StudyError(f"--depth-figure: the model name {model} ends in no depth")
    return int(found.group(1))


def plot_depth_sweep(runs, path, models=()):
    """Against depth (the models of `runs`, a study's finished runs): Proxy Norm's lift of
    each norm's final validation accuracy (per-seed paired lifts as dots, their mean as a
    line), and the collapse share at initialisation and at the end, mean over the layers and
    the deepest layer (each seed a dot, the mean over seeds a line). The x axis has a tick
    for each of `models` (the study's) too: a model with no finished run has no point there,
    absent, not zero."""
    from matplotlib.figure import Figure

    if len({run["epochs"] for run in runs}) > 1:
        raise StudyError("--depth-figure draws one budget: give one --epochs")
    sweep = depth_sweep(runs)
    depths = {model: model_depth(model) for model in [*models, *sweep]}
    norms = sorted({norm for model in sweep.values() for norm in model["collapse"]},
                   key=lambda n: NORMS.index(n) if n in NORMS else len(NORMS))
    figure = Figure(figsize=(13, 4.6))
    lift_axis, *share_axes = figure.subplots(1, 3)

    def series(axis, values_by_model, offset, color, label, **style):
        """Each seed a dot, the mean over seeds a line; dots nudged sideways (log x) so
        that the series at one depth do not hide each other."""
        xs, means = [], []
        for model, values in values_by_model.items():
            x = depths[model] * 1.04 ** offset
            axis.scatter([x] * len(values), list(values.values()), s=18, color=color,
                         alpha=0.5, linewidths=0)
            xs.append(x)
            means.append(sum(values.values()) / len(values))
        axis.plot(xs, means, color=color, marker="o", label=label, **style)

    bases = sorted({norm for model in sweep.values() for norm in model["lifts"]})
    for i, norm in enumerate(bases):
        series(lift_axis, {model: values["lifts"][norm] for model, values in sweep.items()
                           if norm in values["lifts"]}, 0, f"C{i}",
               f"{NORM_WORDS.get(norm, norm)} → + Proxy Norm")
    lift_axis.axhline(0, color="black", linewidth=0.8)
    lift_axis.set_ylabel("lift in final validation accuracy (points)")
    lift_axis.set_title("Proxy Norm's lift, paired by seed")
    for axis, statistic, title in zip(share_axes, ("mean", "deepest"),
                                      ("collapse share, mean over layers",
                                       "collapse share, deepest layer")):
        for i, norm in enumerate(norms):
            for when, style, offset in (("init", "--", -1), ("end", "-", 1)):
                shares = {model: {seed: record[when][statistic]
                                  for seed, record in values["collapse"][norm].items()}
                          for model, values in sweep.items() if norm in values["collapse"]}
                series(axis, shares, offset + 0.5 * i, f"C{i}",
                       f"{NORM_WORDS.get(norm, norm)}, "
                       f"{'at initialisation' if when == 'init' else 'at the end'}",
                       linestyle=style, markerfacecolor="white" if when == "init" else None)
        axis.set_ylim(bottom=0)
        axis.set_ylabel("channel_squared_mean share of the power")
        axis.set_title(title)
    for axis in (lift_axis, *share_axes):
        ticks = sorted(set(depths.values()))
        log2_x_axis(axis, ticks, "depth (layers)")
        axis.set_xlim(ticks[0] / 1.3, ticks[-1] * 1.3)
        axis.grid(alpha=0.3)
    if bases:
        lift_axis.legend(fontsize=8)
    else:
        lift_axis.text(0.5, 0.5, "no norm has finished beside its\nProxy Norm twin at a seed yet",
                       transform=lift_axis.transAxes, ha="center", va="center")
    # the two collapse panels share their series: one legend under both
    figure.legend(*share_axes[0].get_legend_handles_labels(), loc="lower right",
                  bbox_to_anchor=(0.99, 0), ncol=2, fontsize=8)
    first = runs[0]
    figure.suptitle(f"{first['data']}, {', '.join(sweep)}, {first['epochs']} epochs, "
                    f"seeds {', '.join(map(str, sorted({run['seed'] for run in runs})))}: "
                    f"dots are seeds, lines their mean", fontsize=10)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    write_png(figure, path)


def command_line(argv):
    """The command that reproduces the results (README and output flags left out)."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--no-readme", "--no-resume", "--resume", "--report-only", "--headline"):
            continue
        if arg in ("--output", "--jobs", "--markdown", "--section", "--figures",
                   "--depth-figure"):
            skip = True
            continue
        if arg.startswith(("--output=", "--jobs=", "--markdown=", "--section=", "--figures=",
                           "--depth-figure=")):
            continue
        shown.append(arg)
    return " ".join(["python -m benchmarks.accuracy", *map(shlex.quote, shown)])


def environment():
    import torch

    from benchmarks.layer import cpu_name
    return {"cpu": cpu_name(), "torch": torch.__version__, "python": platform.python_version()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="digits", choices=list(FAMILIES),
                        help="config family: digits_resnet_NORM, "
                             "cluttered_digits_preact_resnet20_NORM, cifar10_preact_resnet20_NORM")
    parser.add_argument("--configs", nargs="+", help="config names (instead of --data/--norms)")
    parser.add_argument("--norms", nargs="+", default=NORMS)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--micro-batches", nargs="+", type=int, default=[2, 8, 64])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", nargs="+", type=int,
                        help="override the configs' epochs (several: each a cell)")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="stop every run after this many steps (0 = the whole recipe)")
    parser.add_argument("--lr", nargs="+", type=float,
                        help="override the configs' lr (several: a search, each lr a cell)")
    parser.add_argument("--label-smoothing", nargs="+", type=float,
                        help="override the configs' label_smoothing (several: a search)")
    parser.add_argument("--mixup", nargs="+", type=float,
                        help="override the configs' mixup_alpha (several: a search)")
    parser.add_argument("--model", nargs="+",
                        help="override the configs' model (models.list_models(): "
                             "cifar_preact_resnet56, say); its runs are rows of their own; "
                             "several run in order, each model's cells before the next's")
    parser.add_argument("--data-path", help="dataset folder (CIFAR-10: data/cifar10)")
    parser.add_argument("--engine", help="override the configs' engine (cpu, cuda)")
    parser.add_argument("--holdout", action="store_true",
                        help="cluttered_digits: validate on held-out training digits "
                             "(clutter_holdout), for tuning a recipe")
    parser.add_argument("--every-split", action="store_true",
                        help="run split-invariant norms at every micro-batch too (default: "
                             "once per seed)")
    parser.add_argument("--threads", type=int, default=1, help="cpu_threads of each run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (processes)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="skip cells already in the JSON with the same settings (default)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rebuild the table and figures from the JSON")
    parser.add_argument("--output", default=RESULTS, help="JSON path")
    parser.add_argument("--markdown", default=EVIDENCE,
                        help="the markdown file whose table to rewrite (default docs/evidence.md)")
    parser.add_argument("--section", default="accuracy",
                        help="the table's marker name in --markdown (<!-- NAME:start -->)")
    parser.add_argument("--figures", metavar="DIR",
                        help="also draw this study's accuracy_vs_microbatch.png, "
                             "training_curves.png and, where the JSON holds other budgets, "
                             "error_vs_budget.png into DIR")
    parser.add_argument("--depth-figure", metavar="FILE",
                        help="also draw, against the depth of the --model networks, Proxy "
                             "Norm's paired lift and the collapse shares of this study's runs "
                             "into FILE (docs/depth_sweep.png)")
    parser.add_argument("--headline", action="store_true",
                        help="also rewrite README.md's headline table (accuracy_headline) "
                             "from this study's runs")
    parser.add_argument("--no-readme", action="store_true",
                        help="do not rewrite any table (--markdown's, nor the headline)")
    args = parser.parse_args(argv)
    try:
        return study(args, command_line(argv))
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def study(args, command):
    if args.jobs < 1 or args.global_batch < 1 or min(args.micro_batches) < 1:
        raise StudyError("--jobs, --global-batch and --micro-batches must be >= 1")
    cells = plan(args)
    report = load_report(args.output)
    report["environment"] = environment()
    done = {cell_key(run) for run in report["runs"]}
    todo = []
    for cell, overrides in cells:
        if args.resume and cell_key(cell) in done:
            continue
        todo.append((cell, overrides))
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already in {args.output}, "
          f"{len(todo)} to run, {args.jobs} at a time", flush=True)
    if args.report_only:
        todo = []

    def record(cell, result):
        key = cell_key(cell)
        report["runs"] = [run for run in report["runs"] if cell_key(run) != key]
        report["runs"].append({**cell, **result, "command": command,
                               "cpu": report["environment"]["cpu"]})
        write_json(args.output, report)
        accuracy = result["val_accuracy"]
        print(f"{len(report['runs'])} in JSON: {cell['config']} model {cell['model']} norm "
              f"{cell['norm']} epochs {cell['epochs']} micro-batch "
              f"{cell['micro_batch_size']} x {cell['replicas']} seed {cell['seed']}: "
              f"{result['status']}, val_accuracy "
              f"{'n/a' if accuracy is None else f'{accuracy:.2%}'}, "
              f"{result['wall_seconds']:.0f} s", flush=True)

    status = 0
    try:
        if args.jobs == 1:
            for cell, overrides in todo:
                record(cell, train_cell(cell["config"], overrides))
        elif todo:
            context = multiprocessing.get_context("spawn")  # no torch state forked into workers
            with concurrent.futures.ProcessPoolExecutor(
                    args.jobs, mp_context=context, initializer=end_with_parent,
                    initargs=(os.getpid(),)) as pool:
                futures = {pool.submit(train_cell, cell["config"], overrides): cell
                           for cell, overrides in todo}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        record(futures[future], future.result())
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    except RunFailed as error:
        # a run that raised (missing data, a bug): stop, keep what finished, show its log
        print(f"error: {error}", file=sys.stderr)
        status = 1
    write_json(args.output, report)
    text = table(report) + "\n\n" + time_table(report)
    print(text)
    runs = study_runs(report, cells)
    if args.figures and runs:
        path = os.path.join(args.figures, "accuracy_vs_microbatch.png")
        plot_accuracy_vs_micro_batch(runs, path, args.micro_batches)
        print(f"wrote {path}")
        path = os.path.join(args.figures, "training_curves.png")
        plot_training_curves(runs, path)
        print(f"wrote {path}")
        budgets = budget_runs(report, cells)
        if len({run["epochs"] for run in budgets}) > 1:
            path = os.path.join(args.figures, "error_vs_budget.png")
            plot_error_vs_budget(budgets, path)
            print(f"wrote {path}")
    if args.depth_figure and runs:
        plot_depth_sweep(runs, args.depth_figure, args.model or ())
        print(f"wrote {args.depth_figure}")
    if not args.no_readme:
        try:
            replace_section(args.section, text, args.markdown)
            if args.headline:
                replace_section("accuracy_headline",
                                headline(runs, [cell for cell, _ in cells]), README)
        except ValueError as error:
            raise StudyError(str(error)) from None
    return status


if __name__ == "__main__":
    sys.exit(main())
